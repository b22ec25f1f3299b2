//! Errors of the converter library.

use crate::decompose::DecomposeError;
use std::path::PathBuf;

/// Everything the converter can fail on. Variants name the file, the tensor and the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// Reading, validating or writing the CERSA format failed.
    #[error(transparent)]
    Format(#[from] cersa_loader::Error),
    /// An I/O operation failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The source path or its layout is not usable.
    #[error("{path}: {reason}")]
    Source {
        /// The source path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF file is malformed or uses what this reader does not support.
    #[error("{path}: {kind}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        kind: crate::input::gguf::header::GgufError,
    },
    /// A tensor of the source cannot be used.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The file holding the tensor.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor selected for factoring contains NaN or ±Inf.
    #[error("{path}: tensor `{tensor}`: {count} non-finite value(s) (first: {first} at flat index {index}); refusing to factor — exclude it with --exclude or fix the checkpoint")]
    NonFinite {
        /// The file holding the tensor.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Number of non-finite values.
        count: usize,
        /// The first one (`NaN`, `inf`, `-inf`).
        first: String,
        /// Its flat index.
        index: usize,
    },
    /// The route failed on a tensor (did not converge, could not allocate, device error).
    #[error("tensor `{tensor}`: decomposition failed: {source}")]
    Decompose {
        /// Tensor name.
        tensor: String,
        /// What the route reported.
        source: DecomposeError,
    },
    /// The chosen route cannot run in this build or on this machine.
    #[error(transparent)]
    Route(#[from] DecomposeError),
    /// The output directory exists and is not empty.
    #[error(
        "{0}: output directory already exists and is not empty (remove it, choose another path, or pass --overwrite to replace a CERSA directory)"
    )]
    OutputExists(PathBuf),
    /// Another run holds the output's lock (it is converting, resuming, merging or exporting
    /// into the same path right now).
    #[error(
        "{out}: another cersa run is writing this output right now (it holds the lock {lock}); wait for it to finish, or stop it and rerun with --resume"
    )]
    OutputLocked {
        /// The output path.
        out: PathBuf,
        /// The lock file beside it.
        lock: PathBuf,
    },
    /// `--overwrite` found something other than a CERSA directory at the output path.
    #[error("{path}: refusing to replace it with --overwrite: {reason}; only a CERSA directory (holding a cersa.json of format `cersa`) is replaced, anything else is left untouched")]
    NotReplaceable {
        /// The output path.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// A source file changed while it was being read.
    #[error("{path}: source file changed during conversion ({what}); its memory map can no longer be trusted — rerun on a stable file")]
    SourceChanged {
        /// The source file.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// The run was cancelled (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    /// The run stopped (Ctrl-C, a write error such as a full disk) after finishing some
    /// work, which is kept in `partial` for `cersa convert --resume`.
    #[error("{cause}\npartial output kept in {partial}: run the same command with --resume to continue (finished shards are re-verified and kept), or delete that directory")]
    Resumable {
        /// Why the run stopped.
        cause: Box<ConvertError>,
        /// The partial output directory.
        partial: PathBuf,
    },
    /// Invalid options.
    #[error("invalid option: {0}")]
    Options(String),
    /// The part directories given to `cersa assemble` do not make one whole conversion.
    #[error("{0}")]
    Parts(String),
}

/// `Result` with [`ConvertError`].
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
