//! The `auto` route: picks a route per matrix.
//!
//! Measured on the 2-core bench machine (bench/run.sh), the Gram route beats faer's thin SVD
//! at every size we convert, and its precision rule (see `gram`) keeps the exact rank. The
//! randomized route only pays off when the basis it needs is a small fraction of k, which
//! cannot be known before the Gram eigenvalues are computed (and then Gram is done), so
//! `auto` uses Gram. The randomized route stays available by name. Values-only (`inspect`)
//! uses the f64-Gram eigenvalues: no vectors, half the flops of a bidiagonalization.

use super::gram::Gram;
use super::{Decomposer, Factorization, RankRule};
use crate::input::FloatData;

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
        Gram.factorize(w, m, n, rule)
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>, String> {
        Gram.singular_values(w, m, n)
    }
}
