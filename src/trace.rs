//! Debug and measurement switches, read from the environment in one place.
//!
//! None of them changes what cersa computes or writes: they only print to stderr. Each
//! variable is read once per process (a `OnceLock`), so the hot paths pay one load of a
//! cached bool.
//!
//! - `CERSA_TRACE_RSS`: [`rss`] prints `cersa-rss LABEL: VmRSS` at the marked phases (for
//!   calibrating the routes' memory footprints).
//! - `CERSA_PRINT_PEAK_RSS`: [`print_peak_rss`] prints `cersa-peak-rss: VmHWM` at exit (for
//!   memory tests and benchmarks).
//! - `CERSA_TRACE_CUDA`: [`cuda_phases`] tells the GPU route to print each matrix's phase
//!   times.

use std::sync::OnceLock;

fn env_flag(cell: &'static OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var_os(name).is_some())
}

/// The value of `key` (e.g. `VmRSS:`) in /proc/self/status.
fn proc_status(key: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line.trim_start_matches(key).trim().to_owned())
}

/// With `CERSA_TRACE_RSS` set, prints `cersa-rss LABEL: VmRSS` to stderr.
pub fn rss(label: &str) {
    static ON: OnceLock<bool> = OnceLock::new();
    if !env_flag(&ON, "CERSA_TRACE_RSS") {
        return;
    }
    if let Some(v) = proc_status("VmRSS:") {
        eprintln!("cersa-rss {label}: {v}");
    }
}

/// With `CERSA_PRINT_PEAK_RSS` set, prints `cersa-peak-rss: VmHWM` (the peak resident set
/// of this process) to stderr.
pub fn print_peak_rss() {
    static ON: OnceLock<bool> = OnceLock::new();
    if !env_flag(&ON, "CERSA_PRINT_PEAK_RSS") {
        return;
    }
    if let Some(v) = proc_status("VmHWM:") {
        eprintln!("cersa-peak-rss: {v}");
    }
}

/// Whether `CERSA_TRACE_CUDA` asks the GPU route for per-phase times.
pub fn cuda_phases() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    env_flag(&ON, "CERSA_TRACE_CUDA")
}
