//! Blocked Householder tridiagonalization of a symmetric matrix (lower triangle), the
//! algorithm of LAPACK's `dsytrd`/`dlatrd`.
//!
//! faer's `tridiag_in_place` is unblocked: every column reads *and writes* the whole
//! trailing triangle (a fused rank-2 update and matrix–vector product), which is bound by
//! memory traffic (0.40–0.48 s of ~0.95 s of a 2048² f32 Gram factorization here). Blocked,
//! each column of a panel only *reads* the trailing triangle once (a symmetric
//! matrix–vector product, corrected for the panel's pending updates), and the panel's
//! updates are applied together as one symmetric rank-2b product at GEMM speed.
//!
//! The output has faer's layout, so faer's blocked Householder application
//! ([`super::symeig`]'s back-transformation) uses it unchanged: the diagonal and
//! subdiagonal of T in place, reflector j's essential part below the subdiagonal of
//! column j, and faer's block factors (faer's τ convention: H = I − v·vᵀ/τ).
//!
//! Everything is sequential and adds in a fixed order, so the bits do not depend on the
//! thread count. They do depend on the CPU's SIMD level (the matrix–vector kernel's lane
//! count), as faer's own kernels' do.

use super::kernels::dot;
use super::Elem;
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self as tri, BlockStructure};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Columns per panel: LAPACK's block size for `dsytrd` (ILAENV's 32); 16 and 64 measured within
/// noise of it at k = 2048 (`bench_symeig 2048`, EVD with r vectors 0.47–0.70 s for all three).
const PANEL: usize = 32;

/// Reduces the lower triangle of `a` (k×k; the strict upper triangle is neither read nor
/// written) to tridiagonal form in place, writing faer's block Householder factors into
/// `factors` (bs × (k − 1), bs its row count).
pub fn tridiagonalize_blocked<T: Elem>(a: &mut Mat<T>, factors: &mut Mat<T>) {
    let k = a.nrows();
    assert_eq!(a.ncols(), k);
    assert_eq!(factors.ncols(), k.saturating_sub(1));
    if k < 2 {
        return;
    }
    // τ of each reflector (faer's convention), block factors are formed at the end.
    let mut tau = vec![T::zero(); k - 1];
    let mut v = Mat::<T>::zeros(k, PANEL);
    let mut w = Mat::<T>::zeros(k, PANEL);
    let mut y = vec![T::zero(); k];
    let mut t1 = Mat::<T>::zeros(PANEL, 1);
    let mut t2 = Mat::<T>::zeros(PANEL, 1);
    let mut j0 = 0;
    while j0 + 1 < k {
        let pn = PANEL.min(k - 1 - j0);
        v.as_mut().fill(T::zero());
        w.as_mut().fill(T::zero());
        for i in 0..pn {
            let c = j0 + i;
            // Column c gets the panel's pending updates: a[c.., c] −= V·W[c]ᵀ + W·V[c]ᵀ.
            if i > 0 {
                let (vp, wp) = (
                    v.as_ref().submatrix(c, 0, k - c, i),
                    w.as_ref().submatrix(c, 0, k - c, i),
                );
                let col = a.as_mut().submatrix_mut(c, c, k - c, 1);
                let wc = w.as_ref().submatrix(c, 0, 1, i).transpose();
                let vc = v.as_ref().submatrix(c, 0, 1, i).transpose();
                matmul(col, Accum::Add, vp, wc, T::of(-1.0), Par::Seq);
                let col = a.as_mut().submatrix_mut(c, c, k - c, 1);
                matmul(col, Accum::Add, wp, vc, T::of(-1.0), Par::Seq);
            }
            // The reflector that zeroes a[c+2.., c] (β lands on the subdiagonal).
            let n = k - c - 1;
            let tau_inv = {
                let (mut head, tail) = a
                    .as_mut()
                    .col_mut(c)
                    .subrows_mut(c + 1, n)
                    .split_at_row_mut(1);
                let info = householder::make_householder_in_place(&mut head[0], tail);
                tau[c] = info.tau;
                let t: f64 = info.tau.into();
                if t.is_infinite() {
                    T::zero()
                } else {
                    T::of(1.0) / info.tau
                }
            };
            // v = [1, essentials] on rows c+1..k of panel column i.
            {
                let col = a.as_ref().col(c);
                let vi = v.as_mut().col_mut(i);
                let vi = vi
                    .try_as_col_major_mut()
                    .expect("column-major")
                    .as_slice_mut();
                vi[c + 1] = T::of(1.0);
                for r in c + 2..k {
                    vi[r] = col[r];
                }
            }
            // w = τ⁻¹·(A₂₂·v − V·(Wᵀv) − W·(Vᵀv)); A₂₂ still lacks the panel's updates.
            let y = &mut y[..n];
            {
                let vi = v.as_ref().col(i).subrows(c + 1, n);
                let vi = vi.try_as_col_major().expect("column-major").as_slice();
                symv_lower(a.as_ref().submatrix(c + 1, c + 1, n, n), vi, y);
            }
            let mut wi = w.as_mut().submatrix_mut(c + 1, i, n, 1);
            {
                let wcol = wi.rb_mut().col_mut(0);
                let wcol = wcol
                    .try_as_col_major_mut()
                    .expect("column-major")
                    .as_slice_mut();
                wcol.copy_from_slice(y);
            }
            if i > 0 {
                let vi = v.as_ref().submatrix(c + 1, i, n, 1);
                let vp = v.as_ref().submatrix(c + 1, 0, n, i);
                let wp = w.as_ref().submatrix(c + 1, 0, n, i);
                let mut t1 = t1.as_mut().subrows_mut(0, i);
                let mut t2 = t2.as_mut().subrows_mut(0, i);
                matmul(
                    t1.rb_mut(),
                    Accum::Replace,
                    wp.transpose(),
                    vi,
                    T::of(1.0),
                    Par::Seq,
                );
                matmul(
                    t2.rb_mut(),
                    Accum::Replace,
                    vp.transpose(),
                    vi,
                    T::of(1.0),
                    Par::Seq,
                );
                // Two borrows of w: the correction reads columns < i, writes column i.
                let (wl, wr) = w.as_mut().split_at_col_mut(i);
                let mut wi = wr.submatrix_mut(c + 1, 0, n, 1);
                matmul(wi.rb_mut(), Accum::Add, vp, t1.rb(), T::of(-1.0), Par::Seq);
                matmul(
                    wi.rb_mut(),
                    Accum::Add,
                    wl.rb().submatrix(c + 1, 0, n, i),
                    t2.rb(),
                    T::of(-1.0),
                    Par::Seq,
                );
            }
            // w = τ⁻¹·w, then w += α·v with α = −½·τ⁻¹·(wᵀv).
            let wcol = w.as_mut().col_mut(i).subrows_mut(c + 1, n);
            let wcol = wcol
                .try_as_col_major_mut()
                .expect("column-major")
                .as_slice_mut();
            let vcol = v.as_ref().col(i).subrows(c + 1, n);
            let vcol = vcol.try_as_col_major().expect("column-major").as_slice();
            wcol.iter_mut().for_each(|x| *x *= tau_inv);
            let alpha = T::of(-0.5) * tau_inv * dot(wcol, vcol);
            for (x, &vv) in wcol.iter_mut().zip(vcol) {
                *x += alpha * vv;
            }
        }
        // The panel's updates to the trailing triangle: A −= V·Wᵀ + W·Vᵀ (lower only).
        let s = j0 + pn;
        if s < k {
            let m = k - s;
            let vp = v.as_ref().submatrix(s, 0, m, pn);
            let wp = w.as_ref().submatrix(s, 0, m, pn);
            for (x, y) in [(vp, wp), (wp, vp)] {
                tri::matmul(
                    a.as_mut().submatrix_mut(s, s, m, m),
                    BlockStructure::TriangularLower,
                    Accum::Add,
                    x,
                    BlockStructure::Rectangular,
                    y.transpose(),
                    BlockStructure::Rectangular,
                    T::of(-1.0),
                    Par::Seq,
                );
            }
        }
        j0 += pn;
    }
    block_factors(a.as_mut(), factors.as_mut(), &tau);
}

/// faer's block factors of the reflectors stored below the subdiagonal of `a`, from their
/// τ (as faer's `tridiag_in_place` forms them).
fn block_factors<T: Elem>(a: MatMut<'_, T>, mut h: MatMut<'_, T>, tau: &[T]) {
    let n = tau.len();
    let bs = h.nrows();
    let a = a.rb().submatrix(1, 0, n, n);
    let mut j = 0;
    while j < n {
        let b = bs.min(n - j);
        let mut hb = h.rb_mut().submatrix_mut(0, j, b, b);
        for t in 0..b {
            hb[(t, t)] = tau[j + t];
        }
        householder::upgrade_householder_factor(hb, a.submatrix(j, j, n - j, b), b, 1, Par::Seq);
        j += b;
    }
}

/// y = A·x for the symmetric n×n matrix whose lower triangle is `a` (column-major).
fn symv_lower<T: Elem>(a: MatRef<'_, T>, x: &[T], y: &mut [T]) {
    struct Kernel<'a, T: Elem> {
        a: MatRef<'a, T>,
        x: &'a [T],
        y: &'a mut [T],
    }
    impl<T: Elem> pulp::WithSimd for Kernel<'_, T> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) {
            symv_body(simd, self.a, self.x, self.y)
        }
    }
    pulp::Arch::new().dispatch(Kernel { a, x, y })
}

/// The body of [`symv_lower`]: four columns at a time, the part below the diagonal both
/// updates y (as A's lower triangle) and adds into y[j] (as its transpose), in one pass.
#[inline(always)]
fn symv_body<T: Elem, S: pulp::Simd>(simd: S, a: MatRef<'_, T>, x: &[T], y: &mut [T]) {
    let n = x.len();
    y.fill(T::zero());
    let col = |j: usize| -> &[T] {
        let c = a.col(j).subrows(j, n - j);
        c.try_as_col_major().expect("column-major").as_slice()
    };
    // Four columns per pass: y is loaded and stored once for the four. The 4×4 diagonal
    // block is done by hand, the rest of the four columns (rows ≥ j + 4) by the kernel.
    let mut j = 0;
    while j + 3 < n {
        let c = [col(j), col(j + 1), col(j + 2), col(j + 3)];
        let xj = [x[j], x[j + 1], x[j + 2], x[j + 3]];
        let below = [&c[0][4..], &c[1][3..], &c[2][2..], &c[3][1..]];
        let t = T::axpy4_dot4(simd, below, xj, &x[j + 4..], &mut y[j + 4..]);
        // Entry (j+r, j+q), r ≥ q, of the block is c[q][r − q].
        for r in 0..4 {
            let mut s = t[r];
            for q in 0..4 {
                let v = if r >= q { c[q][r - q] } else { c[r][q - r] };
                s += v * xj[q];
            }
            y[j + r] += s;
        }
        j += 4;
    }
    // The last n mod 4 columns: fewer than four entries each.
    for j in j..n {
        let c = col(j);
        y[j] += c[0] * x[j];
        for (i, &v) in c.iter().enumerate().skip(1) {
            y[j + i] += v * x[j];
            y[j] += v * x[j + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::rng::Rng;

    /// The four-column kernel, its tails and the diagonal blocks against a plain product
    /// with the full symmetric matrix (upper triangle poisoned: it must not be read).
    #[test]
    fn symv_lower_is_the_symmetric_product() {
        let mut rng = Rng::new(5);
        for n in (0..14).chain([31, 32, 33, 37, 100]) {
            let full = Mat::<f64>::from_fn(n, n, |_, _| rng.normal());
            let sym = Mat::<f64>::from_fn(n, n, |i, j| full[(i.max(j), i.min(j))]);
            let lower =
                Mat::<f64>::from_fn(n, n, |i, j| if i >= j { sym[(i, j)] } else { f64::NAN });
            let x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let mut y = vec![f64::NAN; n];
            symv_lower(lower.as_ref(), &x, &mut y);
            let lower32 = Mat::<f32>::from_fn(n, n, |i, j| lower[(i, j)] as f32);
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let mut y32 = vec![f32::NAN; n];
            symv_lower(lower32.as_ref(), &x32, &mut y32);
            for i in 0..n {
                let want: f64 = (0..n).map(|j| sym[(i, j)] * x[j]).sum();
                let scale: f64 = (0..n).map(|j| (sym[(i, j)] * x[j]).abs()).sum::<f64>() + 1e-300;
                assert!(
                    (y[i] - want).abs() <= 1e-14 * scale,
                    "f64 n={n} i={i}: {} vs {want}",
                    y[i]
                );
                assert!(
                    (y32[i] as f64 - want).abs() <= 1e-5 * scale,
                    "f32 n={n} i={i}: {} vs {want}",
                    y32[i]
                );
            }
        }
    }
}
