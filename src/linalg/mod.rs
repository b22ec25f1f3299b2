//! Numerical kernels: symmetric eigendecompositions (one-stage with r leading vectors,
//! two-stage for values), tridiagonal reductions and solvers, and the SIMD vector kernels
//! they share.
//!
//! This layer knows nothing of checkpoints, tensors or routes: it works on faer matrices
//! of an [`Elem`] type and returns [`LinalgError`]. The decomposition routes
//! (`crate::decompose`) build on it; nothing here reaches back into them. Every kernel is
//! sequential with a fixed summation order, so results do not depend on the thread count.

mod elem;
pub mod kernels;
pub mod symeig;
mod tridiag_blocked;
pub mod tridiagonal;
pub mod twostage;

pub use elem::Elem;
pub use symeig::{symmetric_eig, symmetric_eigenvalues};

/// Why a kernel failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LinalgError {
    /// A workspace could not be allocated (`what` names it, with its size).
    #[error("cannot allocate {what}")]
    Allocation {
        /// The workspace, e.g. "SVD workspace for a 4096×4096 matrix".
        what: String,
    },
    /// An iterative solver did not converge or met a non-finite value.
    #[error("{what} did not converge{}", detail_suffix(detail))]
    NotConverged {
        /// The solver, e.g. "Gram eigendecomposition".
        what: String,
        /// The solver's own report, if any.
        detail: String,
    },
    /// The input holds a NaN or an infinity.
    #[error("{what} has a non-finite entry")]
    NonFinite {
        /// The input, e.g. "tridiagonal matrix".
        what: String,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl LinalgError {
    /// An allocation failure of `what`.
    pub fn alloc(what: impl Into<String>) -> Self {
        LinalgError::Allocation { what: what.into() }
    }

    /// A solver that did not converge, with its own report `detail` (`Debug` of faer's error).
    pub fn not_converged(what: impl Into<String>, detail: impl std::fmt::Debug) -> Self {
        LinalgError::NotConverged {
            what: what.into(),
            detail: format!("{detail:?}"),
        }
    }
}
