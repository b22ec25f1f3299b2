//! Decomposition routes behind one trait, and the rank rule.

pub mod auto;
#[cfg(feature = "cuda")]
pub mod cuda;
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

use crate::error::Result;
use crate::input::FloatData;
pub use rank::RankRule;

/// Truncated factors of an m×n matrix W ≈ U·diag(s)·Vᵀ, in f64 for the writer to round.
#[derive(Debug, Clone)]
pub struct Factorization {
    /// Rank r.
    pub rank: usize,
    /// U_r, row-major [m, r].
    pub u: Vec<f64>,
    /// σ_r.
    pub s: Vec<f64>,
    /// V_rᵀ, row-major [r, n].
    pub vt: Vec<f64>,
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
    /// Name recorded in the manifest's `config.algorithm`.
    fn name(&self) -> &'static str;

    /// Factors the row-major m×n matrix `w`, keeping the rank `rule` picks.
    /// Signs follow the rule of formats/cersa-v1.md §4.7.
    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization, String>;

    /// Like [`Decomposer::factorize`] for the tensor called `name`; routes with randomness
    /// seed it from the name so output is deterministic and independent of tensor order.
    fn factorize_named(
        &self,
        name: &str,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization, String> {
        let _ = name;
        self.factorize(w, m, n, rule)
    }

    /// All min(m, n) singular values of `w`, non-increasing.
    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>, String>;
}

/// The route named `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Decomposer>> {
    match name {
        "svd" => Ok(Box::new(svd::FaerSvd)),
        "auto" => Ok(Box::new(auto::Auto)),
        "gram" => Ok(Box::new(gram::Gram)),
        "randomized" => Ok(Box::new(randomized::Randomized)),
        "cuda" => cuda_route(),
        #[cfg(feature = "lapack")]
        "lapack" => Ok(Box::new(lapack::LapackSvd)),
        #[cfg(not(feature = "lapack"))]
        "lapack" => Err(crate::error::ConvertError::Options(
            "--algorithm lapack needs a cersa built with the cargo feature `lapack` \
             (cargo build --features lapack, with a system OpenBLAS such as Debian's \
             libopenblas-dev)"
                .to_string(),
        )),
        other => Err(crate::error::ConvertError::Options(format!(
            "unknown --algorithm `{other}` (known: svd, gram, randomized, auto, cuda, lapack)"
        ))),
    }
}

/// The GPU route (src/decompose/cuda.rs), present only in builds with the `cuda` feature.
#[cfg(feature = "cuda")]
fn cuda_route() -> Result<Box<dyn Decomposer>> {
    Ok(Box::new(cuda::Cuda))
}

#[cfg(not(feature = "cuda"))]
fn cuda_route() -> Result<Box<dyn Decomposer>> {
    Err(crate::error::ConvertError::Options(
        "--algorithm cuda: this cersa binary was built without the `cuda` feature \
         (rebuild with `cargo build --release --features cuda`)"
            .into(),
    ))
}

/// Makes the largest-|x| entry (first on ties) of each column of U positive, negating the
/// matching row of Vᵀ. `u` is row-major [m, r], `vt` row-major [r, n].
pub fn fix_signs(u: &mut [f64], vt: &mut [f64], m: usize, r: usize, n: usize) {
    for j in 0..r {
        let mut best = 0.0f64;
        let mut sign = 1.0f64;
        for i in 0..m {
            let x = u[i * r + j];
            if x.abs() > best {
                best = x.abs();
                sign = x.signum();
            }
        }
        if sign < 0.0 {
            for i in 0..m {
                u[i * r + j] = -u[i * r + j];
            }
            vt[j * n..(j + 1) * n].iter_mut().for_each(|x| *x = -*x);
        }
    }
}
