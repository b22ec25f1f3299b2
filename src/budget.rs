//! The memory budget of `cersa convert` (`--max-memory`): a footprint estimate per tensor
//! and the admission rule that keeps the estimates of the tensors in flight under budget.
//!
//! A tensor is "in flight" from the moment a worker claims it until the writer has written
//! its result: while it is being factored it holds its footprint estimate
//! (`Decomposer::footprint`, each route's own); once finished it holds the exact size of its encoded factors until written. A worker may start the
//! next tensor only when the held bytes plus its estimate stay within the budget, except
//! that a tensor always starts when nothing else is held (a tensor larger than the budget
//! runs alone instead of never). Tensors are still claimed in source order and written in
//! source order, so the budget changes when work happens, never the output bytes.

/// Fraction of `MemAvailable` used when `--max-memory` is not given.
pub const DEFAULT_FRACTION: f64 = 0.5;
/// Budget when /proc/meminfo cannot be read (non-Linux, restricted /proc).
pub const FALLBACK_BUDGET: u64 = 4 << 30;

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
    fn reads_mem_available() {
        let text = "MemTotal:       24684092 kB\nMemFree:  1 kB\nMemAvailable:   23449560 kB\n";
        assert_eq!(mem_available_bytes(text), Some(23449560 * 1024));
        assert_eq!(mem_available_bytes("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available_bytes("MemAvailable: lots kB\n"), None);
        assert!(default_budget() > 0);
    }
}
