//! Decomposition routes behind one trait, and the rank rule.
//!
//! A route ([`Route`], chosen by `--algorithm`) turns a matrix into its truncated factors or
//! its singular values; the numerical kernels it builds on live in [`crate::linalg`].

pub mod auto;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod gram;
#[cfg(feature = "lapack")]
pub mod lapack;
#[cfg(all(test, feature = "lapack"))]
mod lapack_tests;
pub mod randomized;
pub mod rank;
pub mod rng;
pub mod svd;
#[cfg(test)]
mod tests;
pub mod whiten;

use crate::input::{FloatData, Precision};
pub use crate::linalg::Elem;
pub use error::DecomposeError;

/// `Result` with [`DecomposeError`].
pub type Result<T, E = DecomposeError> = std::result::Result<T, E>;
pub use rank::RankRule;

/// A decomposition route, as named by `--algorithm` and recorded in the manifest's
/// `config.algorithm` (formats/cersa-v1.md §4.9).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum Route {
    /// The route that measured fastest (today `gram`), with the exact-rank contract.
    Auto,
    /// faer's thin SVD (the independent route).
    Svd,
    /// Eigendecomposition of the Gram matrix, f32 with an f64 rerun near τ.
    Gram,
    /// Randomized range finder (randQB_EI), never below the exact rank.
    Randomized,
    /// LAPACK gesdd through a system OpenBLAS (cargo feature `lapack`).
    Lapack,
    /// The Gram route's f64 pass on an NVIDIA GPU (cargo feature `cuda`).
    Cuda,
}

impl Route {
    /// Every route, in the order the help text lists them.
    pub const ALL: [Route; 6] = [
        Route::Auto,
        Route::Svd,
        Route::Gram,
        Route::Randomized,
        Route::Lapack,
        Route::Cuda,
    ];

    /// The route's name (`--algorithm` value and manifest `config.algorithm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Auto => "auto",
            Route::Svd => "svd",
            Route::Gram => "gram",
            Route::Randomized => "randomized",
            Route::Lapack => "lapack",
            Route::Cuda => "cuda",
        }
    }

    /// The route named `name` (a manifest's `config.algorithm`), if there is one.
    pub fn from_name(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The route's implementation, or why this build or machine cannot run it.
    pub fn decomposer(self) -> Result<Box<dyn Decomposer>> {
        match self {
            Route::Auto => Ok(Box::new(auto::Auto)),
            Route::Svd => Ok(Box::new(svd::FaerSvd)),
            Route::Gram => Ok(Box::new(gram::Gram)),
            Route::Randomized => Ok(Box::new(randomized::Randomized)),
            Route::Lapack => lapack_route(),
            Route::Cuda => cuda_route(),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The LAPACK route, present only in builds with the `lapack` feature.
#[cfg(feature = "lapack")]
fn lapack_route() -> Result<Box<dyn Decomposer>> {
    Ok(Box::new(lapack::LapackSvd))
}

#[cfg(not(feature = "lapack"))]
fn lapack_route() -> Result<Box<dyn Decomposer>> {
    Err(DecomposeError::NotBuilt {
        route: Route::Lapack,
        how: "needs a cersa built with the cargo feature `lapack` (cargo build --features \
              lapack, with a system OpenBLAS such as Debian's libopenblas-dev)",
    })
}

/// The GPU route (src/decompose/cuda.rs), present only in builds with the `cuda` feature.
#[cfg(feature = "cuda")]
fn cuda_route() -> Result<Box<dyn Decomposer>> {
    Ok(Box::new(cuda::Cuda))
}

#[cfg(not(feature = "cuda"))]
fn cuda_route() -> Result<Box<dyn Decomposer>> {
    Err(DecomposeError::NotBuilt {
        route: Route::Cuda,
        how: "this cersa binary was built without the `cuda` feature (rebuild with \
              `cargo build --release --features cuda`)",
    })
}

/// Peak-bytes estimate shared by the routes: 5·S + c·k²·e with S = m·n·e, k = min(m, n) and
/// e the element size of `precision`; `k2_copies` = c is the route's (see
/// [`Decomposer::footprint`]). Saturates instead of overflowing on absurd shapes.
pub(crate) fn footprint_of(m: usize, n: usize, precision: Precision, k2_copies: u64) -> u64 {
    let e: u64 = match precision {
        Precision::F32 => 4,
        Precision::F64 => 8,
    };
    let (m, n) = (m as u64, n as u64);
    let k = m.min(n);
    let s = m.saturating_mul(n).saturating_mul(e);
    let k2 = k.saturating_mul(k).saturating_mul(e);
    s.saturating_mul(5)
        .saturating_add(k2.saturating_mul(k2_copies))
}

/// Truncated factors of an m×n matrix W ≈ U·diag(s)·Vᵀ.
///
/// `u` and `vt` stay in the precision the route computed them in ([`FloatData::F32`] for
/// f32 work, [`FloatData::F64`] for f64 work), so an f32 route does not double its largest
/// allocation; the writer rounds them to the stored dtype (exact for f32 → f32, f16, bf16).
/// A route filling this from `Vec<f32>` or `Vec<f64>` writes `u: u.into()`. Routes should
/// drop their intermediates (QR storage, full-size SVD vectors) before or while forming
/// `u`/`vt`: the converter's memory budget (`--max-memory`) counts on at most the input, the
/// two factors and one long-side intermediate being alive at once (see
/// `crate::convert::footprint_estimate`).
#[derive(Debug, Clone)]
pub struct Factorization {
    /// Rank r.
    pub rank: usize,
    /// U_r, row-major [m, r].
    pub u: FloatData,
    /// σ_r.
    pub s: Vec<f64>,
    /// V_rᵀ, row-major [r, n].
    pub vt: FloatData,
    /// Every singular value the route computed (at least r), non-increasing.
    pub sigma: Vec<f64>,
    /// ‖W‖_F² in f64.
    pub norm2: f64,
}

/// A route from a matrix to its truncated factors or its singular values.
///
/// Implementations must be deterministic: the same input gives the same bits whatever
/// the thread count (use sequential kernels, or parallel ones with a fixed reduction order).
pub trait Decomposer: Send + Sync {
    /// The route, whose name is recorded in the manifest's `config.algorithm`.
    fn route(&self) -> Route;

    /// Name recorded in the manifest's `config.algorithm`.
    fn name(&self) -> &'static str {
        self.route().as_str()
    }

    /// Estimated peak bytes allocated while factoring one m×n matrix in `precision`, from
    /// the input to the encoded factors: what `--max-memory` admission counts
    /// (`crate::budget`). Measured per route; see each implementation.
    fn footprint(&self, m: usize, n: usize, precision: Precision) -> u64;

    /// Factors the row-major m×n matrix `w`, keeping the rank `rule` picks.
    /// Signs follow the rule of formats/cersa-v1.md §4.7.
    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization>;

    /// Like [`Decomposer::factorize`] for the tensor called `name`; routes with randomness
    /// seed it from the name so output is deterministic and independent of tensor order.
    fn factorize_named(
        &self,
        name: &str,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization> {
        let _ = name;
        self.factorize(w, m, n, rule)
    }

    /// All min(m, n) singular values of `w`, non-increasing.
    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>>;
}

impl From<Vec<f32>> for FloatData {
    fn from(v: Vec<f32>) -> Self {
        FloatData::F32(v)
    }
}

impl From<Vec<f64>> for FloatData {
    fn from(v: Vec<f64>) -> Self {
        FloatData::F64(v)
    }
}

impl FloatData {
    /// The values widened to f64 (exact); borrows when they already are f64.
    pub fn to_f64(&self) -> std::borrow::Cow<'_, [f64]> {
        match self {
            FloatData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            FloatData::F64(v) => std::borrow::Cow::Borrowed(v),
        }
    }

    /// Bytes held by the values.
    pub fn heap_bytes(&self) -> usize {
        match self {
            FloatData::F32(v) => v.len() * 4,
            FloatData::F64(v) => v.len() * 8,
        }
    }
}

/// Makes the largest-|x| entry (first on ties) of each column of U positive, negating the
/// matching row of Vᵀ. `u` is row-major [m, r], `vt` row-major [r, n]. Negation is exact,
/// so the result does not depend on the precision it runs in.
pub fn fix_signs<T: Elem>(u: &mut [T], vt: &mut [T], m: usize, r: usize, n: usize) {
    let neg = |x: T| -> T {
        let v: f64 = x.into();
        T::of(-v)
    };
    // Row by row (u is row-major m×r): a column walk would touch one cache line per entry
    // (0.5 s on a 32000×762 factor). Same result: the first largest |x| down each column.
    let mut best = vec![0.0f64; r];
    let mut flip = vec![false; r];
    for row in u.chunks_exact(r.max(1)).take(m) {
        for (j, &x) in row.iter().enumerate() {
            let x: f64 = x.into();
            if x.abs() > best[j] {
                best[j] = x.abs();
                flip[j] = x < 0.0;
            }
        }
    }
    if !flip.contains(&true) {
        return;
    }
    for row in u.chunks_exact_mut(r.max(1)).take(m) {
        for (x, &f) in row.iter_mut().zip(&flip) {
            if f {
                *x = neg(*x);
            }
        }
    }
    for (j, &f) in flip.iter().enumerate() {
        if f {
            vt[j * n..(j + 1) * n].iter_mut().for_each(|x| *x = neg(*x));
        }
    }
}
