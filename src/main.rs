use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Makes glibc serve every allocation of 1 MiB or more with its own mmap, returned to the
/// OS on free. By default glibc raises that threshold after the first large free (up to
/// 32 MiB) and then keeps such buffers in each worker thread's arena, so with several
/// threads the peak RSS crept up with the number of large tensors (398 vs 262 MiB for 4× vs
/// 1× the same 8192×2048 tensors, `--threads 2`). Per-tensor buffers are large and few, so
/// the extra mmap/munmap costs nothing measurable next to an O(m·n·k) factorization.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_large_buffers_to_os() {
    // SAFETY: mallopt only changes allocator parameters; called first thing in main, before
    // any other thread exists. Failure (return 0) just leaves glibc's defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_os() {}

fn main() -> ExitCode {
    return_large_buffers_to_os();
    cersa_loader::mmap::report_sigbus_as_error(
        "; cersa stopped (exit 2) without trusting what it read: restore the file and rerun (convert keeps its finished shards for --resume)",
    );
    let cli = cersa::cli::args::Cli::parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // First Ctrl-C (or SIGTERM, as schedulers send): every command stops between tensors
    // and exits 2 with an `interrupted` error, leaving nothing that looks complete (convert
    // keeps its finished shards for --resume and says so). Second: exit at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping after the tensors in progress…");
    });
    let status = cersa::cli::run(cli, cancel);
    cersa::trace::print_peak_rss();
    match status {
        Ok(cersa::cli::Status::Ok) => ExitCode::SUCCESS,
        Ok(cersa::cli::Status::CheckFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", cersa::cli::error_chain(&e));
            ExitCode::from(2)
        }
    }
}
