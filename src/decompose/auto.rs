//! The `auto` route: picks a route per matrix by its shape.
//!
//! Measured with `bench/run.sh` (per-matrix part, power-law spectra, τ = 0.9, one thread,
//! idle 2-core machine), seconds `svd` / `gram`: 384² 0.025 / 0.014, 1024² 0.33 / 0.16,
//! 1536×384 0.052 / 0.022, 768×3072 0.26 / 0.11, 2048² 2.25 / 3.78, 5632×2048 4.21 / 4.58,
//! 4096² 19.8 / 25.7, 4096×11008 27.5 / 30.5, 32000×2048 12.1 / 12.5. The Gram route wins
//! up to k = min(m, n) = 1024; beyond, its eigensolver (and, when a rank decision is within
//! f32 noise of τ, its f64 rerun) costs more than faer's bidiagonalization. On very tall
//! matrices (long side ≥ 4× the short one) the two tie in time and Gram needs less memory
//! (faer's SVD forms the full m×k vectors), so Gram is kept there. The randomized route only
//! pays off at rank fractions of a few percent (measured ≤ 5 % on 2048²), which real weights
//! at τ ≥ 0.9 do not reach, and it cannot know the fraction before computing a spectrum, so
//! `auto` never picks it. Every route keeps the exact f64 rank (±1 only within 1e-5 of τ)
//! and energy ≥ τ, so the choice changes speed and memory, not the contract. Values-only
//! (`inspect`) uses the f64-Gram eigenvalues: no vectors, half the flops of a
//! bidiagonalization.

use super::gram::Gram;
use super::svd::FaerSvd;
use super::{Decomposer, Factorization, RankRule};
use crate::input::FloatData;

/// Largest short side for which Gram beat faer's SVD in the measurements above.
pub const GRAM_MAX_SHORT_SIDE: usize = 1024;
/// Long/short ratio from which Gram is kept for its smaller footprint.
pub const GRAM_MIN_ASPECT: usize = 4;

/// Whether `auto` factors an m×n matrix with Gram (else faer's thin SVD).
pub fn prefers_gram(m: usize, n: usize) -> bool {
    let (short, long) = (m.min(n), m.max(n));
    short <= GRAM_MAX_SHORT_SIDE || long >= GRAM_MIN_ASPECT.saturating_mul(short)
}

/// Per-matrix route choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auto;

impl Decomposer for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization, String> {
        if prefers_gram(m, n) {
            Gram.factorize(w, m, n, rule)
        } else {
            FaerSvd.factorize(w, m, n, rule)
        }
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>, String> {
        Gram.singular_values(w, m, n)
    }
}

#[cfg(test)]
mod tests {
    use super::prefers_gram;

    #[test]
    fn shape_rule() {
        // Small short side, or very tall/wide: Gram. Large and near-square: faer's SVD.
        assert!(prefers_gram(384, 384) && prefers_gram(1024, 1024) && prefers_gram(384, 1536));
        assert!(prefers_gram(32000, 2048) && prefers_gram(2048, 8192));
        assert!(!prefers_gram(2048, 2048) && !prefers_gram(5632, 2048));
        assert!(!prefers_gram(4096, 11008) && !prefers_gram(1025, 1025));
    }
}
