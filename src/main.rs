use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = cersa::cli::args::Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // First Ctrl-C: stop cleanly (finished shards kept for --resume). Second: exit at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping; finished work is kept for `cersa convert --resume`…");
    });
    let status = cersa::cli::run(cli, cancel);
    if std::env::var_os("CERSA_PRINT_PEAK_RSS").is_some() {
        // For memory tests and benchmarks: the peak resident set of this process.
        if let Some(line) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .map(str::to_owned)
            })
        {
            eprintln!(
                "cersa-peak-rss: {}",
                line.trim_start_matches("VmHWM:").trim()
            );
        }
    }
    match status {
        Ok(cersa::cli::Status::Ok) => ExitCode::SUCCESS,
        Ok(cersa::cli::Status::CheckFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
