//! Symmetric eigendecomposition whose eigenvectors are formed for the leading r only.
//!
//! faer's `self_adjoint_evd` back-transforms all k eigenvectors of the tridiagonal matrix
//! through the k − 1 Householder reflectors of the tridiagonalization (2·k³ flops); the
//! Gram route keeps r of them (r/k 0.36–0.71 on all-MiniLM-L6-v2 at τ = 0.9, 0.28 on the power-law benchmark matrices). Doing the same three steps
//! here (faer's `tridiag_in_place`, its tridiagonal divide and conquer, then the blocked
//! Householder sequence applied to r columns) saves the rest. f32, one thread, r = 0.28·k,
//! best of three (`cargo run --release --example bench_symeig`): k = 1024 0.118 s vs faer's
//! 0.154 s, k = 2048 0.81 vs 0.96 s, k = 4096 4.19 vs 5.29 s (1.2–1.3×), same eigenvalues.
//! It also tridiagonalizes G in place instead of in a copy, so the peak holds one k×k
//! matrix fewer.
//!
//! Sequential (`Par::Seq`), so the bits do not depend on the thread count.

use super::{Elem, LinalgError};
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{tridiag, tridiagonal_self_adjoint_evd};
use faer::linalg::householder;
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::linalg::temp_mat_scratch;
use faer::{Conj, Mat, Par};

/// Eigenvalues of a symmetric matrix, with its eigenvectors held as the tridiagonal
/// matrix's eigenvectors and the Householder reflectors that reduced it.
pub struct SymmetricEig<T: Elem> {
    /// Eigenvalues, non-increasing.
    pub lambda: Vec<f64>,
    /// The reduced matrix: reflector j's essential part below the subdiagonal of column j.
    reduced: Mat<T>,
    /// Block factors of the reflectors (faer's layout: block size × (k − 1)).
    factors: Mat<T>,
    /// Eigenvectors of the tridiagonal matrix, column j ↔ the j-th smallest eigenvalue.
    z: Mat<T>,
}

/// Eigendecomposition of the symmetric matrix whose lower triangle is `g` (consumed: it is
/// reduced in place).
pub fn symmetric_eig<T: Elem>(g: Mat<T>) -> Result<SymmetricEig<T>, LinalgError> {
    symmetric_eig_with(g, Tridiagonalization::Auto)
}

/// [`symmetric_eig`] with the tridiagonalization chosen by the caller (benchmarks compare
/// the two reductions with it; the routes use [`Tridiagonalization::Auto`]).
pub fn symmetric_eig_with<T: Elem>(
    mut g: Mat<T>,
    reduction: Tridiagonalization,
) -> Result<SymmetricEig<T>, LinalgError> {
    let k = g.nrows();
    let factors = tridiagonalize_with(&mut g, reduction.blocked(k))?;
    let diag = faer::Col::<T>::from_fn(k, |i| g[(i, i)]);
    let sub = faer::Col::<T>::from_fn(k, |i| if i + 1 < k { g[(i + 1, i)] } else { T::zero() });
    let mut s = faer::diag::Diag::<T>::zeros(k);
    let mut z = Mat::<T>::zeros(k, k);
    // faer's tridiagonal solver: its own copies of the diagonals, then divide and conquer
    // (4 index and 6 scalar columns, two k×k temporaries: `divide_and_conquer_scratch`).
    let req = StackReq::all_of(&[
        temp_mat_scratch::<T>(k, 1).array(10),
        StackReq::new::<usize>(k).array(4),
        temp_mat_scratch::<T>(k, k).array(2),
    ]);
    let mut mem = MemBuffer::try_new(req).map_err(|_| {
        LinalgError::alloc(format!("tridiagonal eigensolver workspace for order {k}"))
    })?;
    tridiagonal_self_adjoint_evd(
        diag.as_diagonal(),
        sub.as_diagonal(),
        s.as_mut(),
        Some(z.as_mut()),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| LinalgError::not_converged("eigendecomposition", e))?;
    crate::trace::rss("symeig: tridiagonal EVD done");
    Ok(SymmetricEig {
        lambda: s.column_vector().iter().rev().map(|&x| x.into()).collect(),
        reduced: g,
        factors,
        z,
    })
}

/// Eigenvalues (non-increasing) of the symmetric matrix whose lower triangle is `g`
/// (consumed): faer's tridiagonalization, then the root-free QL of
/// [`super::tridiagonal`] (on all-MiniLM-L6-v2's k = 384 matrices faer's own tridiagonal
/// QR was 27 % of `inspect`).
pub fn symmetric_eigenvalues<T: Elem>(mut g: Mat<T>) -> Result<Vec<f64>, LinalgError> {
    let k = g.nrows();
    tridiagonalize_with(&mut g, Tridiagonalization::Auto.blocked(k))?;
    let diag: Vec<f64> = (0..k).map(|i| g[(i, i)].into()).collect();
    let sub: Vec<f64> = (1..k).map(|i| g[(i, i - 1)].into()).collect();
    super::tridiagonal::eigenvalues(&diag, &sub)
}

/// Order from which the blocked reduction is used. Below it the panels' small products
/// cost what the blocking saves (f32, one thread, `bench_symeig --reduction faer` for
/// faer's: k = 512 and 1024 within noise of each other; 2048: tridiagonalization 0.40 vs
/// 0.40–0.48 s; 4096: EVD with r vectors 3.6 vs 4.4 s).
pub const BLOCKED_FROM: usize = 1536;

/// Which reduction to tridiagonal form [`symmetric_eig_with`] uses. Only the benchmarks
/// choose: the routes always take `Auto`, so no switch outside the code changes output bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Only the benchmarks and tests construct the forced reductions.
#[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
pub enum Tridiagonalization {
    /// The blocked reduction from [`BLOCKED_FROM`] on, faer's unblocked one below.
    Auto,
    /// faer's unblocked reduction at every order.
    Unblocked,
    /// The blocked reduction (LAPACK `dsytrd`'s algorithm) at every order.
    Blocked,
}

impl Tridiagonalization {
    /// Whether order `k` is reduced by the blocked algorithm.
    fn blocked(self, k: usize) -> bool {
        match self {
            Tridiagonalization::Auto => k >= BLOCKED_FROM,
            Tridiagonalization::Unblocked => false,
            Tridiagonalization::Blocked => true,
        }
    }
}

/// Reduces the lower triangle of `g` to tridiagonal form in place, blocked or by faer's
/// unblocked reduction; returns the reflectors' block factors (their essential parts stay
/// below the subdiagonal of `g`).
fn tridiagonalize_with<T: Elem>(g: &mut Mat<T>, blocked: bool) -> Result<Mat<T>, LinalgError> {
    let k = g.nrows();
    let bs = recommended_block_size::<T>(k, k);
    let mut factors = Mat::<T>::zeros(bs, k.saturating_sub(1));
    if blocked {
        super::tridiag_blocked::tridiagonalize_blocked(g, &mut factors);
        return Ok(factors);
    }
    let req = tridiag::tridiag_in_place_scratch::<T>(k, Par::Seq, Default::default());
    let mut mem = MemBuffer::try_new(req)
        .map_err(|_| LinalgError::alloc(format!("tridiagonalization workspace for order {k}")))?;
    tridiag::tridiag_in_place(
        g.as_mut(),
        factors.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    Ok(factors)
}

impl<T: Elem> SymmetricEig<T> {
    /// The eigenvectors of the `r` largest eigenvalues (k×r, column j ↔ `lambda[j]`).
    pub fn leading_vectors(&self, r: usize) -> Result<Mat<T>, LinalgError> {
        let k = self.lambda.len();
        let r = r.min(k);
        let mut v = Mat::<T>::from_fn(k, r, |i, c| self.z[(i, k - 1 - c)]);
        if k > 1 && r > 0 {
            let bs = self.factors.nrows();
            let req = householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(
                k - 1,
                bs,
                r,
            );
            let mut mem = MemBuffer::try_new(req).map_err(|_| {
                LinalgError::alloc(format!("back-transformation workspace ({k}×{r})"))
            })?;
            householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
                self.reduced.as_ref().submatrix(1, 0, k - 1, k - 1),
                self.factors.as_ref(),
                Conj::No,
                v.as_mut().subrows_mut(1, k - 1),
                Par::Seq,
                MemStack::new(&mut mem),
            );
        }
        Ok(v)
    }
}

/// Eigenvalues (non-increasing) of the symmetric matrix whose lower triangle is `g`, by
/// faer's one-stage EVD without vectors: the reference the solvers in [`super::twostage`] and
/// this module are tested against.
#[cfg(any(test, feature = "bench-internals"))]
pub fn faer_eigenvalues<T: Elem>(g: Mat<T>) -> Result<Vec<f64>, LinalgError> {
    use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
    let k = g.nrows();
    let mut mem = MemBuffer::try_new(self_adjoint_evd_scratch::<T>(
        k,
        ComputeEigenvectors::No,
        Par::Seq,
        Default::default(),
    ))
    .map_err(|_| LinalgError::alloc(format!("eigensolver workspace for order {k}")))?;
    let mut s = faer::diag::Diag::<T>::zeros(k);
    self_adjoint_evd(
        g.as_ref(),
        s.as_mut(),
        None,
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| LinalgError::not_converged("eigendecomposition", e))?;
    // faer returns non-decreasing eigenvalues; reverse to non-increasing.
    Ok(s.column_vector()
        .iter()
        .rev()
        .map(|x| (*x).into())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::rng::Rng;

    /// max |A·V − V·Λ| / |λ₁| and max |VᵀV − I| of the leading eigenpairs, in f64.
    fn residuals<T: Elem>(a: &Mat<f64>, lambda: &[f64], v: &Mat<T>) -> (f64, f64) {
        let v = Mat::<f64>::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)].into());
        let av = a * &v;
        let mut res = 0f64;
        for j in 0..v.ncols() {
            for i in 0..v.nrows() {
                res = res.max((av[(i, j)] - lambda[j] * v[(i, j)]).abs());
            }
        }
        let vtv = v.transpose() * &v;
        let mut orth = 0f64;
        for j in 0..v.ncols() {
            for i in 0..v.ncols() {
                let want = if i == j { 1.0 } else { 0.0 };
                orth = orth.max((vtv[(i, j)] - want).abs());
            }
        }
        (res / lambda[0].abs().max(f64::MIN_POSITIVE), orth)
    }

    #[test]
    fn leading_vectors_are_eigenvectors() {
        // Orders around faer's block size and its divide-and-conquer threshold (64), a
        // spread spectrum, only the lower triangle given (upper poisoned with NaN), f64 and
        // f32, every r from none to all.
        let mut rng = Rng::new(11);
        // Both reductions; the blocked one's panels are 32 columns: orders of one partial
        // panel, exact multiples and remainders.
        for &(p, n) in &[
            (1, 1),
            (3, 2),
            (40, 33),
            (90, 64),
            (200, 65),
            (300, 130),
            (260, 300),
        ] {
            let x = Mat::<f64>::from_fn(p, n, |_, j| rng.normal() / ((j + 1) as f64).sqrt());
            let g = x.transpose() * &x;
            let want = crate::linalg::symeig::faer_eigenvalues(g.clone()).expect("evd");
            let lower = Mat::<f64>::from_fn(n, n, |i, j| if i >= j { g[(i, j)] } else { f64::NAN });
            for (r, blocked) in [0, 1, n / 3 + 1, n].into_iter().flat_map(|r| {
                [
                    (r, Tridiagonalization::Unblocked),
                    (r, Tridiagonalization::Blocked),
                ]
            }) {
                let eig = symmetric_eig_with(lower.clone(), blocked).expect("f64");
                for (i, (a, b)) in eig.lambda.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-12 * want[0],
                        "{p}×{n} {blocked:?}: λ{i} {a} vs {b}"
                    );
                }
                let lambda = eig.lambda.clone();
                let v = eig.leading_vectors(r).expect("vectors");
                assert_eq!((v.nrows(), v.ncols()), (n, r));
                if r > 0 {
                    let (res, orth) = residuals(&g, &lambda, &v);
                    assert!(
                        res <= 1e-12 && orth <= 1e-12,
                        "f64 {p}×{n} r={r} {blocked:?}: {res:e} {orth:e}"
                    );
                }

                let lower32 = Mat::<f32>::from_fn(n, n, |i, j| lower[(i, j)] as f32);
                let eig = symmetric_eig_with(lower32, blocked).expect("f32");
                for (i, (a, b)) in eig.lambda.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * want[0],
                        "f32 {p}×{n} {blocked:?}: λ{i} {a} vs {b}"
                    );
                }
                let lambda = eig.lambda.clone();
                let v = eig.leading_vectors(r).expect("vectors");
                if r > 0 {
                    let (res, orth) = residuals(&g, &lambda, &v);
                    assert!(
                        res <= 2e-5 && orth <= 2e-5,
                        "f32 {p}×{n} r={r} {blocked:?}: {res:e} {orth:e}"
                    );
                }
            }
        }
    }
}
