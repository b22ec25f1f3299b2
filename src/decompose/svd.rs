//! The `svd` route: faer's thin SVD, sequential per matrix so output bits do not depend
//! on the thread count (parallelism comes from converting several tensors at once).

use super::rank::{frobenius2, RankRule};
use super::{fix_signs, footprint_of, Decomposer, Elem, Factorization, Result, Route};
use crate::input::{FloatData, Precision};
use crate::linalg::LinalgError;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{Accum, Mat, MatRef, Par};

/// faer thin SVD.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaerSvd;

/// σ (non-increasing, as f64), U (col-major m×k), V (col-major n×k).
type ThinSvd<T> = (Vec<f64>, Mat<T>, Mat<T>);

/// Singular values and (optionally) thin singular vectors of a row-major m×n matrix.
/// Returns (σ, U col-major m×k, V col-major n×k), k = min(m, n).
fn thin_svd<T: Elem>(w: &[T], m: usize, n: usize, vectors: bool) -> Result<ThinSvd<T>> {
    let k = m.min(n);
    // Row-major W is column-major Wᵀ (n×m): Wᵀ = P Σ Qᵀ gives W = Q Σ Pᵀ, so U = Q, V = P.
    let wt = MatRef::from_column_major_slice(w, n, m);
    let par = Par::Seq;
    let which = if vectors {
        ComputeSvdVectors::Thin
    } else {
        ComputeSvdVectors::No
    };
    let mut s = faer::diag::Diag::<T>::zeros(k);
    let mut p = Mat::<T>::zeros(if vectors { n } else { 0 }, if vectors { k } else { 0 });
    let mut q = Mat::<T>::zeros(if vectors { m } else { 0 }, if vectors { k } else { 0 });
    let mut mem = MemBuffer::try_new(svd_scratch::<T>(
        n,
        m,
        which,
        which,
        par,
        Default::default(),
    ))
    .map_err(|_| LinalgError::alloc(format!("SVD workspace for a {m}×{n} matrix")))?;
    let stack = MemStack::new(&mut mem);
    let (pu, qv) = if vectors {
        (Some(p.as_mut()), Some(q.as_mut()))
    } else {
        (None, None)
    };
    svd(wt, s.as_mut(), pu, qv, par, stack, Default::default())
        .map_err(|e| LinalgError::not_converged("SVD", e))?;
    let sigma: Vec<f64> = s.column_vector().iter().map(|x| (*x).into()).collect();
    Ok((sigma, q, p))
}

/// ‖M‖_F² of a faer matrix, summed in f64 column by column.
pub(crate) fn mat_norm2<T: Elem>(m: MatRef<'_, T>) -> f64 {
    (0..m.ncols())
        .map(|j| {
            m.col(j)
                .iter()
                .map(|x| {
                    let v: f64 = (*x).into();
                    v * v
                })
                .sum::<f64>()
        })
        .sum()
}

/// `w · 2^-e` (exact in binary floating point), or `None` when `e` is 0.
pub(crate) fn scaled_by_pow2<T: Elem>(w: &[T], e: f64) -> Option<Vec<T>> {
    if e == 0.0 {
        return None;
    }
    let f = (-e).exp2();
    Some(
        w.iter()
            .map(|&x| {
                let v: f64 = x.into();
                T::of(v * f)
            })
            .collect(),
    )
}

/// Power-of-two factor that brings the largest |entry| near 1 (1 when already in range):
/// faer's f32 SVD fails to converge on matrices with entries around 1e28 (found by the route
/// tests), and scaling by 2^e is exact.
pub(crate) fn scale_exponent<T: Elem>(w: &[T]) -> f64 {
    let amax = w.iter().fold(0f64, |a, &x| {
        let v: f64 = x.into();
        a.max(v.abs())
    });
    let e = if amax > 0.0 { amax.log2().round() } else { 0.0 };
    if e.abs() > 16.0 {
        e
    } else {
        0.0
    }
}

fn factorize_t<T: Elem>(w: &[T], m: usize, n: usize, rule: &RankRule) -> Result<Factorization>
where
    FloatData: From<Vec<T>>,
{
    let norm2 = frobenius2(w);
    let e = scale_exponent(w);
    let scaled = scaled_by_pow2(w, e);
    let w = scaled.as_deref().unwrap_or(w);
    let (mut sigma, u, v) = thin_svd(w, m, n, true)?;
    crate::trace::rss("svd: thin SVD done");
    sigma.iter_mut().for_each(|s| *s *= e.exp2());
    let r = rule.rank(&sigma, norm2, m, n);
    // Each full m×k / n×k vector matrix is dropped as soon as its r columns are copied out,
    // so at most one of them and one factor are alive next to the input.
    let mut uo = vec![T::of(0.0); m * r];
    for j in 0..r {
        for (i, x) in u.col(j).iter().enumerate() {
            uo[i * r + j] = *x;
        }
    }
    drop(u);
    let mut vt = vec![T::of(0.0); r * n];
    for j in 0..r {
        for (c, x) in v.col(j).iter().enumerate() {
            vt[j * n + c] = *x;
        }
    }
    drop(v);
    fix_signs(&mut uo, &mut vt, m, r, n);
    Ok(Factorization {
        rank: r,
        u: uo.into(),
        s: sigma[..r].to_vec(),
        vt: vt.into(),
        sigma,
        norm2,
    })
}

impl Decomposer for FaerSvd {
    fn route(&self) -> Route {
        Route::Svd
    }

    /// 5·S + 3·k²·e: faer's thin SVD works on a copy of the matrix and forms the full m×k
    /// and n×k singular vectors (measured peak 5.1·S on 8192×2048).
    fn footprint(&self, m: usize, n: usize, precision: Precision) -> u64 {
        footprint_of(m, n, precision, 3)
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization> {
        match w {
            FloatData::F32(v) => factorize_t(v, m, n, rule),
            FloatData::F64(v) => factorize_t(v, m, n, rule),
        }
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>> {
        match w {
            FloatData::F32(v) => thin_svd(v, m, n, false).map(|r| r.0),
            FloatData::F64(v) => thin_svd(v, m, n, false).map(|r| r.0),
        }
    }
}

/// ‖W − U·diag(s)·Vᵀ‖_F² for row-major W [m, n], U [m, r], Vᵀ [r, n] (factors already
/// rounded to their stored dtype), computed in W's precision with an f64 sum.
pub fn residual_norm2(w: &FloatData, m: usize, n: usize, u: &[f64], s: &[f64], vt: &[f64]) -> f64 {
    fn imp<T: Elem>(w: &[T], m: usize, n: usize, u: &[f64], s: &[f64], vt: &[f64]) -> f64 {
        let r = s.len();
        // Work on Wᵀ (n×m, column-major view of row-major W): Rᵀ = Wᵀ − V·diag(s)·Uᵀ.
        let mut rt = MatRef::from_column_major_slice(w, n, m).to_owned();
        let vs = Mat::<T>::from_fn(n, r, |c, k| T::of(vt[k * n + c] * s[k]));
        let ut = Mat::<T>::from_fn(r, m, |k, i| T::of(u[i * r + k]));
        faer::linalg::matmul::matmul(
            rt.as_mut(),
            Accum::Add,
            vs.as_ref(),
            ut.as_ref(),
            T::of(-1.0),
            Par::Seq,
        );
        mat_norm2(rt.as_ref())
    }
    match w {
        FloatData::F32(v) => imp(v, m, n, u, s, vt),
        FloatData::F64(v) => imp(v, m, n, u, s, vt),
    }
}

/// Rows (long-side slices) of W per block of [`stored_residual_norm2`]: fixed, so the sum
/// order (and the bits of `rel_error`) never depends on the thread count.
pub const RESIDUAL_BLOCK: usize = 256;

/// Stored factors as the writer holds them: little-endian bytes of a float `dtype`.
#[derive(Debug, Clone, Copy)]
pub struct StoredFactors<'a> {
    /// Dtype of `u` and `vt`.
    pub dtype: cersa_loader::Dtype,
    /// U bytes, row-major [m, r].
    pub u: &'a [u8],
    /// σ as stored (already rounded to f32), r values.
    pub s: &'a [f64],
    /// Vᵀ bytes, row-major [r, n].
    pub vt: &'a [u8],
}

/// ‖W − U·diag(s)·Vᵀ‖_F² of the factors exactly as stored, computed in W's precision with
/// an f64 sum, streaming over blocks of [`RESIDUAL_BLOCK`] long-side slices: only the
/// short-side factor (k×r) and one block are decoded at a time, never a whole long-side
/// factor or a copy of W.
pub fn stored_residual_norm2(w: &FloatData, m: usize, n: usize, f: &StoredFactors<'_>) -> f64 {
    match w {
        FloatData::F32(v) => stored_residual_imp(v, m, n, f),
        FloatData::F64(v) => stored_residual_imp(v, m, n, f),
    }
}

fn stored_residual_imp<T: Elem>(w: &[T], m: usize, n: usize, f: &StoredFactors<'_>) -> f64 {
    let r = f.s.len();
    let size = f.dtype.size();
    let decode = |b: &[u8]| -> Vec<f64> {
        cersa_loader::dtype::decode_f64(f.dtype, b).expect("factor dtypes are float")
    };
    // Wᵀ: n×m column-major view of row-major W.
    let wt = MatRef::from_column_major_slice(w, n, m);
    let mut total = 0f64;
    if m >= n {
        // Long side = rows of W = columns of Wᵀ. Rᵀ[:, blk] = Wᵀ[:, blk] − (V·diag(s))·Uᵀ[:, blk].
        let mut vs = Mat::<T>::zeros(n, r);
        for k in 0..r {
            let row = decode(&f.vt[k * n * size..(k + 1) * n * size]);
            for (c, x) in row.iter().enumerate() {
                vs[(c, k)] = T::of(x * f.s[k]);
            }
        }
        let mut i0 = 0;
        while i0 < m {
            let b = RESIDUAL_BLOCK.min(m - i0);
            let ub = decode(&f.u[i0 * r * size..(i0 + b) * r * size]);
            let ut = Mat::<T>::from_fn(r, b, |k, i| T::of(ub[i * r + k]));
            let mut rt = wt.subcols(i0, b).to_owned();
            faer::linalg::matmul::matmul(
                rt.as_mut(),
                Accum::Add,
                vs.as_ref(),
                ut.as_ref(),
                T::of(-1.0),
                Par::Seq,
            );
            total += mat_norm2(rt.as_ref());
            i0 += b;
        }
    } else {
        // Long side = columns of W = rows of Wᵀ. Rᵀ[blk, :] = Wᵀ[blk, :] − (V·diag(s))[blk, :]·Uᵀ.
        let ub = decode(f.u);
        let ut = Mat::<T>::from_fn(r, m, |k, i| T::of(ub[i * r + k]));
        drop(ub);
        let mut j0 = 0;
        while j0 < n {
            let b = RESIDUAL_BLOCK.min(n - j0);
            let mut vs = Mat::<T>::zeros(b, r);
            for k in 0..r {
                let seg = decode(&f.vt[(k * n + j0) * size..(k * n + j0 + b) * size]);
                for (c, x) in seg.iter().enumerate() {
                    vs[(c, k)] = T::of(x * f.s[k]);
                }
            }
            let mut rt = wt.subrows(j0, b).to_owned();
            faer::linalg::matmul::matmul(
                rt.as_mut(),
                Accum::Add,
                vs.as_ref(),
                ut.as_ref(),
                T::of(-1.0),
                Par::Seq,
            );
            total += mat_norm2(rt.as_ref());
            j0 += b;
        }
    }
    total
}
