//! Why a route could not decompose a matrix.

use super::Route;
use crate::linalg::LinalgError;

/// Why a route could not decompose a matrix. The converter adds the tensor and file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecomposeError {
    /// A numerical kernel failed (allocation, convergence, non-finite input).
    #[error(transparent)]
    Linalg(#[from] LinalgError),
    /// This binary was built without the route's cargo feature.
    #[error("--algorithm {route}: {how}")]
    NotBuilt {
        /// The route.
        route: Route,
        /// How to get a build that has it.
        how: &'static str,
    },
    /// The route is built but cannot run on this machine (no usable GPU, missing libraries).
    #[error("{route} route unavailable: {reason}")]
    Unavailable {
        /// The route.
        route: Route,
        /// Why not.
        reason: String,
    },
    /// A device or external library call failed while decomposing (GPU, LAPACK).
    #[error("{route} route: {detail}")]
    Backend {
        /// The route.
        route: Route,
        /// The call and what it reported.
        detail: String,
    },
    /// The route panicked (a bug: the converter turns the panic into this error).
    #[error("internal panic while decomposing (please report)")]
    Panic,
}
