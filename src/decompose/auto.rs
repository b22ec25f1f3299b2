//! The `auto` route: picks a route per matrix.
//!
//! The Gram route beat faer's thin SVD on the MiniLM excerpt (3.4 s vs 4.3 s, whole convert,
//! 1 thread, loaded machine; the issue measured 0.54 s vs 1.41 s on 2048²; the per-size
//! table of bench/run.sh is still to be run), and its precision rule (see `gram`) keeps the
//! exact rank. The
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
