//! The `lapack` route (cargo feature `lapack`): LAPACK `?gesdd` (divide and conquer SVD)
//! through ndarray-linalg and a system OpenBLAS, for machines with a tuned BLAS/LAPACK.
//!
//! f32 data runs `sgesdd`, f64 data `dgesdd`; the rank comes from the same [`RankRule`]
//! on the σ LAPACK returns and ‖W‖_F² from the entries in f64, signs follow
//! formats/cersa-v1.md §4.7 ([`fix_signs`]), exactly like the `svd` route.
//!
//! **Threads.** cersa parallelizes across tensors (one matrix per worker), so OpenBLAS's
//! own thread pool would only oversubscribe the cores, and a threaded BLAS may split its
//! reductions by the number of threads it runs, which can change output bits between
//! machines or settings. OpenBLAS reads `OPENBLAS_NUM_THREADS` in its library constructor,
//! before `main`, so setting the variable from inside cersa is too late; the route instead
//! calls `openblas_set_num_threads(1)` once before its first LAPACK call. Each gesdd then
//! runs sequentially in the calling worker, and the bits do not depend on `--threads`.

use super::rank::{frobenius2, RankRule};
use super::svd::{scale_exponent, scaled_by_pow2, FaerSvd};
use super::{
    fix_signs, footprint_of, DecomposeError, Decomposer, Elem, Factorization, Result, Route,
};
use crate::input::{FloatData, Precision};
use ndarray::ArrayView2;
use ndarray_linalg::{JobSvd, Lapack, Scalar, SVDDC};
use std::sync::Once;

/// LAPACK gesdd route.
#[derive(Debug, Clone, Copy, Default)]
pub struct LapackSvd;

// OpenBLAS's C API (the library ndarray-linalg links with feature `openblas-system`).
extern "C" {
    fn openblas_set_num_threads(num_threads: std::os::raw::c_int);
}

static SINGLE_THREADED: Once = Once::new();

/// Pins OpenBLAS to one thread, once per process (see the module docs for why).
#[allow(unsafe_code)]
fn pin_openblas_to_one_thread() {
    SINGLE_THREADED.call_once(|| {
        // SAFETY: `openblas_set_num_threads` takes a plain int, has no preconditions and is
        // exported by every OpenBLAS build; `Once` makes this the only call, before any
        // LAPACK call of this route.
        unsafe { openblas_set_num_threads(1) }
    });
}

/// A failed LAPACK call.
fn backend(detail: String) -> DecomposeError {
    DecomposeError::Backend {
        route: Route::Lapack,
        detail,
    }
}

/// σ (non-increasing, f64) and, with `vectors`, U (row-major m×k) and Vᵀ (row-major k×n)
/// in f64, k = min(m, n), of the row-major m×n matrix `w`.
type Gesdd = (Vec<f64>, Option<(Vec<f64>, Vec<f64>)>);

fn gesdd<T>(w: &[T], m: usize, n: usize, vectors: bool) -> Result<Gesdd>
where
    T: Elem + Lapack + Scalar<Real = T>,
{
    pin_openblas_to_one_thread();
    // LAPACK scales internally only near under/overflow; like the `svd` route, bring the
    // largest |entry| near 1 by an exact power of two and scale σ back.
    let e = scale_exponent(w);
    let scaled = scaled_by_pow2(w, e);
    let w = scaled.as_deref().unwrap_or(w);
    let a = ArrayView2::from_shape((m, n), w)
        .map_err(|err| backend(format!("cannot view {m}×{n} data as a matrix: {err}")))?;
    let job = if vectors { JobSvd::Some } else { JobSvd::None };
    let (u, s, vt) = a
        .svddc(job)
        .map_err(|err| backend(format!("LAPACK gesdd failed on a {m}×{n} matrix: {err}")))?;
    let f = e.exp2();
    let sigma: Vec<f64> = s.iter().map(|&x| Into::<f64>::into(x) * f).collect();
    if !vectors {
        return Ok((sigma, None));
    }
    let (Some(u), Some(vt)) = (u, vt) else {
        return Err(backend("LAPACK gesdd returned no singular vectors".into()));
    };
    // Iterating an ndarray visits elements in logical (row-major) order whatever the layout.
    let u: Vec<f64> = u.iter().map(|&x| x.into()).collect();
    let vt: Vec<f64> = vt.iter().map(|&x| x.into()).collect();
    Ok((sigma, Some((u, vt))))
}

fn factorize_t<T>(w: &[T], m: usize, n: usize, rule: &RankRule) -> Result<Factorization>
where
    T: Elem + Lapack + Scalar<Real = T>,
{
    let k = m.min(n);
    let norm2 = frobenius2(w);
    let (sigma, vectors) = gesdd(w, m, n, true)?;
    let Some((u_all, vt_all)) = vectors else {
        return Err(backend("LAPACK gesdd returned no singular vectors".into()));
    };
    if sigma.len() != k || u_all.len() != m * k || vt_all.len() != k * n {
        return Err(backend(format!(
            "LAPACK gesdd returned {} values, U of {} and Vᵀ of {} entries for a {m}×{n} matrix",
            sigma.len(),
            u_all.len(),
            vt_all.len()
        )));
    }
    let r = rule.rank(&sigma, norm2, m, n);
    let mut u = vec![0f64; m * r];
    for i in 0..m {
        u[i * r..(i + 1) * r].copy_from_slice(&u_all[i * k..i * k + r]);
    }
    let mut vt = vt_all[..r * n].to_vec();
    fix_signs(&mut u, &mut vt, m, r, n);
    Ok(Factorization {
        rank: r,
        u: u.into(),
        s: sigma[..r].to_vec(),
        vt: vt.into(),
        sigma,
        norm2,
    })
}

impl Decomposer for LapackSvd {
    fn route(&self) -> Route {
        Route::Lapack
    }

    /// gesdd's workspace and its m×k and k×n vectors, like faer's SVD: 5·S + 3·k²·e.
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
        if m == 0 || n == 0 {
            // LAPACK rejects empty leading dimensions; an empty matrix has nothing to factor.
            return FaerSvd.factorize(w, m, n, rule);
        }
        match w {
            FloatData::F32(v) => factorize_t(v, m, n, rule),
            FloatData::F64(v) => factorize_t(v, m, n, rule),
        }
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>> {
        if m == 0 || n == 0 {
            return Ok(Vec::new());
        }
        match w {
            FloatData::F32(v) => gesdd(v, m, n, false).map(|r| r.0),
            FloatData::F64(v) => gesdd(v, m, n, false).map(|r| r.0),
        }
    }
}
