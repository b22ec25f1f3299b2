//! The `auto` route: the route that measured fastest, with the exact-rank contract.
//!
//! Measured with `bench/run.sh` (per-matrix part, power-law spectra, τ = 0.9, one thread,
//! idle 2-core machine), seconds `svd` / `gram`: 384² 0.025 / 0.014, 1024² 0.32 / 0.23,
//! 2048² 2.37 / 1.08, 5632×2048 3.79 / 1.84–2.88 (two runs), 4096² 20.1 / 7.9,
//! 4096×11008 31.4 / 14.6, 32000×2048 12.0 / 6.0 (session 4, with the leading-r
//! eigenvectors and the Ky Fan rank proof: 384² 0.029 / 0.015, 2048² 2.38 / 1.09, 4096²
//! 25.0 / 8.4, 4096×11008 48.5 / 10.9; README). `gram` wins at every shape (its f32 pass
//! decides the rank on these spectra; f64 eigenvalues are added only when E(r) is within
//! the f32 error margin of τ, and a full f64 pass only when λ_r is below the f32 noise
//! floor) and needs less memory than faer's SVD (G and its eigenvectors are
//! k×k; the SVD forms m×k vectors), so `auto` is `gram`. `svd` stays selectable as the
//! independent route. The randomized route only pays off at rank fractions of a few
//! percent (measured ≤ 5 % on 2048²), which real weights at τ ≥ 0.9 do not reach, and it
//! cannot know the fraction before computing a spectrum, so `auto` never picks it. Every
//! route keeps the exact f64 rank (±1 only within 1e-5 of τ) and energy ≥ τ, so the choice
//! changes speed and memory, not the contract. Values-only (`inspect`) uses the f64-Gram
//! eigenvalues: no vectors, half the flops of a bidiagonalization.
//!
//! An earlier rule sent near-square matrices with k > 1024 to `svd`: it was measured while
//! Gram's noise floor sat at 64·ε·k·λ₁, which rejected the f32 pass on typical LLM weights
//! (λ_r ≈ 50·ε·k·λ₁ at τ = 0.9) and made `gram` pay for both passes (2048²: 3.5 s).

use super::gram::Gram;
use super::{Decomposer, Factorization, RankRule, Result, Route};
use crate::input::{FloatData, Precision};

/// Per-matrix route choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auto;

impl Decomposer for Auto {
    fn route(&self) -> Route {
        Route::Auto
    }

    fn footprint(&self, m: usize, n: usize, precision: Precision) -> u64 {
        Gram.footprint(m, n, precision)
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization> {
        Gram.factorize(w, m, n, rule)
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>> {
        Gram.singular_values(w, m, n)
    }
}
