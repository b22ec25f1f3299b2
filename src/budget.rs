//! The memory budget of `cersa convert` (`--max-memory`): a footprint estimate per tensor
//! and the admission rule that keeps the estimates of the tensors in flight under budget.
//!
//! A tensor is "in flight" from the moment a worker claims it until the writer has written
//! its result: while it is being factored it holds its [`footprint_estimate`]; once finished
//! it holds the exact size of its encoded factors until written. A worker may start the
//! next tensor only when the held bytes plus its estimate stay within the budget, except
//! that a tensor always starts when nothing else is held (a tensor larger than the budget
//! runs alone instead of never). Tensors are still claimed in source order and written in
//! source order, so the budget changes when work happens, never the output bytes.

use crate::input::Precision;

/// Fraction of `MemAvailable` used when `--max-memory` is not given.
pub const DEFAULT_FRACTION: f64 = 0.5;
/// Budget when /proc/meminfo cannot be read (non-Linux, restricted /proc).
pub const FALLBACK_BUDGET: u64 = 4 << 30;

/// With `CERSA_TRACE_RSS` set, prints `cersa-rss LABEL: VmRSS` to stderr (for calibrating
/// [`footprint_estimate`]; costs one env lookup otherwise).
pub fn trace_rss(label: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("CERSA_TRACE_RSS").is_some()) {
        return;
    }
    if let Some(line) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
    {
        eprintln!(
            "cersa-rss {label}: {}",
            line.trim_start_matches("VmRSS:").trim()
        );
    }
}

/// Default budget: [`DEFAULT_FRACTION`] of `MemAvailable` from /proc/meminfo.
///
/// `MemAvailable` rather than `MemTotal`: on a machine where other processes already hold
/// memory, a fraction of the total could still push the system into swapping or the OOM
/// killer, while the available figure (free memory plus reclaimable cache) is what this
/// process can actually grow into. Half of it leaves room for the page cache of the source
/// and output files and for estimates that are off.
pub fn default_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_available_bytes(&s))
        .map(|b| ((b as f64 * DEFAULT_FRACTION) as u64).max(1))
        .unwrap_or(FALLBACK_BUDGET)
}

/// `MemAvailable` in bytes from the text of /proc/meminfo.
pub fn mem_available_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Estimated peak bytes allocated while factoring one m×n matrix with route `route` in
/// `precision`, from the input to the encoded factors. With e the element size (4 for f32,
/// 8 for f64), S = m·n·e and k = min(m, n):
///
/// * `gram`, `auto`, `randomized` (randomized falls back to gram): 5·S + 12·k²·e. The f32
///   pass needs the input X, G, its eigenvectors and the eigensolver workspace (measured
///   X + 5.3·k²·4 on 8192×2048). A spectrum whose rank decision is too close to τ for f32
///   reruns in f64 (see `decompose::gram`, common on power-law spectra): f64 G, eigenvectors
///   and workspace (measured 5.8·k²·8 = 11.6·k²·4), then f64 Y = X·V_r (becoming the QR
///   storage) and Q, each p×r·8 ≤ 2·S for r ≤ k/2. Measured on an 8192×2048 f32 power-law
///   matrix that took the rerun: peak 262 MB above the process baseline (S = 67 MB,
///   k²·4 = 16.8 MB; estimate 537 MB, which also covers ranks up to k).
/// * `svd` and other routes: 5·S + 3·k²·e — faer's thin SVD works on a copy of the matrix
///   and forms the full m×k and n×k singular vectors (measured peak 5.1·S on 8192×2048).
///
/// Saturates instead of overflowing on absurd shapes.
pub fn footprint_estimate(m: usize, n: usize, precision: Precision, route: &str) -> u64 {
    let e: u64 = match precision {
        Precision::F32 => 4,
        Precision::F64 => 8,
    };
    let (m, n) = (m as u64, n as u64);
    let k = m.min(n);
    let s = m.saturating_mul(n).saturating_mul(e);
    let k2 = k.saturating_mul(k).saturating_mul(e);
    let k2_copies = match route {
        "gram" | "auto" | "randomized" => 12,
        _ => 3,
    };
    s.saturating_mul(5)
        .saturating_add(k2.saturating_mul(k2_copies))
}

/// Bytes held by the tensors in flight.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes held (estimates of running tensors, result sizes of finished ones).
    pub held: u64,
    /// Tensors holding a non-zero amount.
    pub holders: usize,
}

impl Admission {
    /// A budget of `budget` bytes with nothing in flight.
    pub fn new(budget: u64) -> Self {
        Admission {
            budget,
            held: 0,
            holders: 0,
        }
    }

    /// Whether a tensor with estimate `estimate` may start now.
    pub fn admits(&self, estimate: u64) -> bool {
        estimate == 0 || self.holders == 0 || self.held.saturating_add(estimate) <= self.budget
    }

    /// Records that a tensor now holds `bytes` (call once per started tensor).
    pub fn hold(&mut self, bytes: u64) {
        if bytes > 0 {
            self.held = self.held.saturating_add(bytes);
            self.holders += 1;
        }
    }

    /// Records that a tensor stopped holding `bytes`.
    pub fn release(&mut self, bytes: u64) {
        if bytes > 0 {
            self.held = self.held.saturating_sub(bytes);
            self.holders = self.holders.saturating_sub(1);
        }
    }

    /// A tensor that held `from` (its estimate) now holds `to` (its result).
    pub fn replace(&mut self, from: u64, to: u64) {
        self.release(from);
        self.hold(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_budget_and_always_when_idle() {
        let mut a = Admission::new(100);
        // Nothing in flight: even an estimate above the budget runs (alone).
        assert!(a.admits(250));
        a.hold(250);
        assert!(!a.admits(1), "nothing else may join a tensor over budget");
        assert!(
            a.admits(0),
            "tensors that allocate nothing (pass-through) are not held"
        );
        a.release(250);
        assert_eq!((a.held, a.holders), (0, 0));
        a.hold(60);
        assert!(a.admits(40), "60 + 40 = budget is allowed");
        assert!(!a.admits(41));
        a.hold(40);
        // The first finishes with a 10-byte result waiting for the writer.
        a.replace(60, 10);
        assert_eq!((a.held, a.holders), (50, 2));
        assert!(a.admits(50));
        assert!(!a.admits(51));
        a.replace(40, 0);
        assert_eq!((a.held, a.holders), (10, 1));
        a.release(10);
        assert_eq!((a.held, a.holders), (0, 0));
    }

    #[test]
    fn estimates_scale_with_size_and_route() {
        let svd = footprint_estimate(8192, 2048, Precision::F32, "svd");
        let gram = footprint_estimate(8192, 2048, Precision::F32, "gram");
        let s = 8192 * 2048 * 4u64;
        let k2 = 2048 * 2048 * 4u64;
        assert_eq!(gram, 5 * s + 12 * k2);
        assert_eq!(svd, 5 * s + 3 * k2);
        // Orientation does not matter; f64 doubles; the unknown route gets the svd figure.
        assert_eq!(footprint_estimate(2048, 8192, Precision::F32, "gram"), gram);
        assert_eq!(
            footprint_estimate(8192, 2048, Precision::F64, "gram"),
            2 * gram
        );
        assert_eq!(footprint_estimate(8192, 2048, Precision::F32, "cuda"), svd);
        assert_eq!(
            footprint_estimate(usize::MAX, usize::MAX, Precision::F64, "svd"),
            u64::MAX
        );
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24684092 kB\nMemFree:  1 kB\nMemAvailable:   23449560 kB\n";
        assert_eq!(mem_available_bytes(text), Some(23449560 * 1024));
        assert_eq!(mem_available_bytes("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available_bytes("MemAvailable: lots kB\n"), None);
        assert!(default_budget() > 0);
    }
}
