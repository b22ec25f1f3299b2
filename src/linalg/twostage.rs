//! Symmetric eigendecomposition by two-stage tridiagonalization.
//!
//! faer's one-stage tridiagonalization spends half its 4/3·k³ flops in matrix–vector
//! products, which run at memory speed (f32, one thread: 0.77 s at k = 2048 and 5.7 s at
//! k = 4096, against 0.13 s and 0.71 s for forming G itself). Two stages (as in LAPACK's
//! `dsytrd_2stage`, PLASMA, ELPA) move nearly all of that work into matrix–matrix products:
//! 1. dense → band of half-bandwidth `b`: block Householder QR of each panel below the band
//!    and a two-sided update of the trailing matrix, A ← QᵀAQ = A − W·Vᵀ − V·Wᵀ, on the
//!    lower triangle (4/3·k³ flops, GEMM speed);
//! 2. band → tridiagonal by Householder bulge chasing (O(k²·b) flops, cache-resident);
//! 3. eigenvalues of the tridiagonal matrix (root-free QL, O(k²): src/decompose/tridiagonal.rs).
//!
//! Values only: with eigenvectors, the back-transformation through the bulge reflectors
//! costs 2·k²·r flops at small-matrix speed, and a blocked version (branch
//! `exp/twostage-vectors`) measured slower than faer's one-stage EVD with the leading-r
//! back-transformation that `gram` uses (f32, k = 2048, r/k ≈ 0.28, one thread: 1.1 s vs
//! 0.5–0.9 s over runs; src/decompose/symeig.rs).
//!
//! Used where the Gram route needs f64 eigenvalues without vectors (`inspect`, and the f64
//! rank check of an f32 pass); results are checked against faer's one-stage EVD in the
//! tests below. Sequential (`Par::Seq`) and fixed-order, so the bits do not depend on the thread count.

use super::kernels::dot;
use super::{Elem, LinalgError};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self as tri, BlockStructure};
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, Mat, MatMut, Par};

/// Half-bandwidth of the intermediate band matrix. Larger makes stage 1's GEMMs faster and
/// stage 2's bulge chasing slower; with stage 1's single rank-2b update, 64 measured
/// slower than 32 (speed-up over faer's one-stage at k = 2048: 1.15× vs 1.5–1.7×; at 4096
/// 2.5× vs 2.8×; `examples/bench_twostage.rs`).
pub const BAND: usize = 32;

/// Below this order the one-stage EVD is as fast or faster (measured equal at 1024; on
/// all-MiniLM-L6-v2's k = 384 `inspect` took 0.94 s one-stage vs 1.11 s two-stage, one
/// thread); callers use it instead.
pub const MIN_ORDER: usize = 1024;

/// Eigenvalues (non-increasing) of the symmetric matrix whose lower triangle is `a`.
pub fn symmetric_eigenvalues(mut a: Mat<f64>) -> Result<Vec<f64>, LinalgError> {
    let n = a.nrows();
    if n == 0 {
        return Ok(vec![]);
    }
    dense_to_band(&mut a, BAND)?;
    let (diag, sub) = band_to_tridiagonal(a.as_mut(), BAND);
    drop(a);
    super::tridiagonal::eigenvalues(&diag, &sub)
}

/// Stage 1: reduces the lower triangle of `a` to half-bandwidth `b` in place (entries
/// below the band are left as exact zeros).
fn dense_to_band<T: Elem>(a: &mut Mat<T>, b: usize) -> Result<(), LinalgError> {
    let n = a.nrows();
    if n <= b + 1 {
        return Ok(());
    }
    // QR workspace for the first (tallest) panel serves every later one.
    let req = qr::qr_in_place_scratch::<T>(n - b, b, b, Par::Seq, Default::default());
    let mut mem = MemBuffer::try_new(req)
        .map_err(|_| LinalgError::alloc(format!("band-reduction workspace ({}×{b})", n - b)))?;
    let (zero, one) = (T::zero(), T::one());
    let half = T::of(0.5);
    let mut j0 = 0;
    while j0 + b + 1 < n {
        let r0 = j0 + b;
        let np = n - r0;
        let kk = np.min(b);
        // Householder QR of the panel below the band: P = Q·R, R stays as the band block.
        let mut h = Mat::<T>::zeros(kk, kk);
        let mut panel = a.as_mut().submatrix_mut(r0, j0, np, b);
        qr::qr_in_place(
            panel.as_mut(),
            h.as_mut(),
            Par::Seq,
            MemStack::new(&mut mem),
            Default::default(),
        );
        // V: unit lower trapezoidal Householder basis, Q = I − V·T⁻¹·Vᵀ (faer's convention).
        let v = Mat::<T>::from_fn(np, kk, |i, c| match i.cmp(&c) {
            std::cmp::Ordering::Equal => one,
            std::cmp::Ordering::Greater => panel[(i, c)],
            std::cmp::Ordering::Less => zero,
        });
        for c in 0..b {
            for i in (c + 1)..np {
                panel[(i, c)] = zero;
            }
        }
        // VS = V·T⁻¹ (solve Tᵀ·VSᵀ = Vᵀ; Tᵀ is lower triangular).
        let mut vs = v.clone();
        solve_lower_triangular_in_place(h.transpose(), vs.as_mut().transpose_mut(), Par::Seq);
        // Y = A22·VS with A22 symmetric, stored lower: tril(A22)·VS + stril(A22)ᵀ·VS.
        let mut a22 = a.as_mut().submatrix_mut(r0, r0, np, np);
        let mut y = Mat::<T>::zeros(np, kk);
        tri::matmul(
            y.as_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            a22.as_ref(),
            BlockStructure::TriangularLower,
            vs.as_ref(),
            BlockStructure::Rectangular,
            one,
            Par::Seq,
        );
        tri::matmul(
            y.as_mut(),
            BlockStructure::Rectangular,
            Accum::Add,
            a22.as_ref().transpose(),
            BlockStructure::StrictTriangularUpper,
            vs.as_ref(),
            BlockStructure::Rectangular,
            one,
            Par::Seq,
        );
        // W = Y − ½·V·(VSᵀ·Y); then QᵀA22Q = A22 − W·Vᵀ − V·Wᵀ.
        let mut mm = Mat::<T>::zeros(kk, kk);
        matmul(
            mm.as_mut(),
            Accum::Replace,
            vs.transpose(),
            y.as_ref(),
            one,
            Par::Seq,
        );
        matmul(
            y.as_mut(),
            Accum::Add,
            v.as_ref(),
            mm.as_ref(),
            -half,
            Par::Seq,
        );
        // One rank-2kk update [W V]·[V W]ᵀ: a single pass over A22 instead of two.
        let lhs = Mat::<T>::from_fn(
            np,
            2 * kk,
            |i, c| if c < kk { y[(i, c)] } else { v[(i, c - kk)] },
        );
        let rhs = Mat::<T>::from_fn(
            np,
            2 * kk,
            |i, c| if c < kk { v[(i, c)] } else { y[(i, c - kk)] },
        );
        tri::matmul(
            a22.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            lhs.as_ref(),
            BlockStructure::Rectangular,
            rhs.transpose(),
            BlockStructure::Rectangular,
            -one,
            Par::Seq,
        );
        j0 += b;
    }
    Ok(())
}

/// A Householder reflector H = I − τ·v·vᵀ (v₀ = 1) with H·x = β·e₀.
#[inline(always)]
fn householder<T: Elem>(x: &[T], v: &mut [T]) -> (T, T) {
    let alpha = x[0];
    // The norm in f64: no overflow or underflow of the squares in f32.
    let tail2: f64 = x[1..].iter().map(|&t| t.into() * t.into()).sum();
    v[0] = T::one();
    if tail2 == 0.0 {
        v[1..x.len()].iter_mut().for_each(|t| *t = T::zero());
        return (T::zero(), alpha);
    }
    let a64: f64 = alpha.into();
    let norm = (a64 * a64 + tail2).sqrt();
    let beta64 = if a64 >= 0.0 { -norm } else { norm };
    let scale = T::of(1.0 / (a64 - beta64));
    for (vi, &xi) in v[1..x.len()].iter_mut().zip(&x[1..]) {
        *vi = xi * scale;
    }
    (T::of((beta64 - a64) / beta64), T::of(beta64))
}

/// Stage 2: reduces the lower-stored symmetric band matrix (half-bandwidth `b`) to
/// tridiagonal form by bulge chasing; returns (diagonal, subdiagonal).
///
/// Sweep j annihilates column j below its subdiagonal with a reflector on rows
/// j+1..j+b, whose right-hand application fills a triangle below the band; the next
/// reflector (rows shifted by b) annihilates that bulge's first column only, and so on down
/// the matrix. The rest of each bulge lies in the columns the following sweeps annihilate,
/// so a reflector on rows p..p+len only meets nonzeros in columns ≥ p − b and rows
/// < p + len + b (`reach`; `matches_one_stage_evd` fails with b − 1 on dense matrices,
/// whose generic fill pattern contains every special one).
fn band_to_tridiagonal<T: Elem>(a: MatMut<'_, T>, b: usize) -> (Vec<T>, Vec<T>) {
    // Compiled for the best SIMD level the CPU has (pulp's runtime dispatch): the loops
    // below are plain Rust that LLVM vectorizes. No fused multiply-add is introduced, so
    // the bits do not depend on that level.
    struct Chase<'a, T: Elem> {
        a: MatMut<'a, T>,
        b: usize,
    }
    impl<T: Elem> pulp::WithSimd for Chase<'_, T> {
        type Output = (Vec<T>, Vec<T>);
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
            chase(self.a, self.b)
        }
    }
    pulp::Arch::new().dispatch(Chase { a, b })
}

/// The body of [`band_to_tridiagonal`].
#[inline(always)]
fn chase<T: Elem>(mut a: MatMut<'_, T>, b: usize) -> (Vec<T>, Vec<T>) {
    let n = a.nrows();
    let reach = b;
    let mut v = vec![T::zero(); b];
    let mut x = vec![T::zero(); b];
    let mut w = vec![T::zero(); b];
    let mut acc = vec![T::zero(); reach];
    let mut blk = vec![T::zero(); b * b];
    for j in 0..n.saturating_sub(2) {
        let (mut col, mut p) = (j, j + 1);
        while p + 1 < n {
            let len = b.min(n - p);
            x[..len].copy_from_slice(&column(a.as_mut(), col)[p..p + len]);
            let (tau, beta) = householder(&x[..len], &mut v[..len]);
            if tau != T::zero() {
                let v = &v[..len];
                {
                    let target = &mut column(a.as_mut(), col)[p..p + len];
                    target[0] = beta;
                    target[1..].iter_mut().for_each(|t| *t = T::zero());
                }
                // Left: rows p..p+len of the other columns that can hold fill.
                for c in p.saturating_sub(reach)..p {
                    if c == col {
                        continue;
                    }
                    let y = &mut column(a.as_mut(), c)[p..p + len];
                    let s = tau * dot(v, y);
                    if s != T::zero() {
                        y.iter_mut().zip(v).for_each(|(y, v)| *y -= s * v);
                    }
                }
                // Two-sided on the diagonal block (full symmetric copy of its lower half).
                for c in 0..len {
                    let src = &column(a.as_mut(), p + c)[p..p + len];
                    for i in c..len {
                        blk[i + c * len] = src[i];
                        blk[c + i * len] = src[i];
                    }
                }
                for c in 0..len {
                    w[c] = tau * dot(&blk[c * len..(c + 1) * len], v);
                }
                let half = T::of(0.5) * tau * dot(v, &w[..len]);
                for i in 0..len {
                    w[i] -= half * v[i];
                }
                for c in 0..len {
                    let dst = &mut column(a.as_mut(), p + c)[p..p + len];
                    for i in c..len {
                        dst[i] -= v[i] * w[c] + w[i] * v[c];
                    }
                }
                // Right: rows below the block that can hold entries in columns p..p+len,
                // column by column (contiguous): acc = A[rows, J]·v, then A −= τ·acc·vᵀ.
                let (q0, q1) = (p + len, (p + len + reach).min(n));
                if q0 < q1 {
                    let acc = &mut acc[..q1 - q0];
                    acc.iter_mut().for_each(|t| *t = T::zero());
                    for (i, vi) in v.iter().enumerate() {
                        let src = &column(a.as_mut(), p + i)[q0..q1];
                        acc.iter_mut().zip(src).for_each(|(t, s)| *t += s * vi);
                    }
                    for (i, vi) in v.iter().enumerate() {
                        let f = tau * vi;
                        let dst = &mut column(a.as_mut(), p + i)[q0..q1];
                        dst.iter_mut()
                            .zip(acc.iter())
                            .for_each(|(d, t)| *d -= f * t);
                    }
                }
            }
            col = p;
            p += len;
        }
    }
    let diag = (0..n).map(|i| a[(i, i)]).collect();
    let sub = (0..n.saturating_sub(1)).map(|i| a[(i + 1, i)]).collect();
    (diag, sub)
}

/// Column `c` of a column-major matrix as a slice.
#[inline(always)]
fn column<T: Elem>(a: MatMut<'_, T>, c: usize) -> &mut [T] {
    a.col_mut(c)
        .try_as_col_major_mut()
        .expect("column-major")
        .as_slice_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::rng::Rng;

    #[test]
    fn matches_one_stage_evd() {
        // Dense Gram matrices (every entry filled, so a missed fill entry would show),
        // orders around multiples of the band and a spread spectrum.
        let mut rng = Rng::new(7);
        for &(p, n) in &[
            (3, 3),
            (40, 33),
            (200, 129),
            (300, 130),
            (500, 257),
            (260, 300),
        ] {
            let x = Mat::<f64>::from_fn(p, n, |_, j| rng.normal() / ((j + 1) as f64).sqrt());
            let g = x.transpose() * &x;
            let want = crate::linalg::symeig::faer_eigenvalues(g.clone()).expect("evd");
            // Only the lower triangle is read: poison the upper one.
            let mut lower = g.clone();
            for c in 0..n {
                for i in 0..c {
                    lower[(i, c)] = f64::NAN;
                }
            }
            let got = symmetric_eigenvalues(lower).expect("two-stage");
            let scale = want[0].abs();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * scale,
                    "{p}×{n}: λ{i} {a} vs {b} (|λ₁| {scale})"
                );
            }
        }
    }
}
