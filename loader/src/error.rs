//! The error type of `cersa-loader`.

use crate::issue::Issue;
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading, validating or writing a CERSA checkpoint or a
/// safetensors file. Variants carry the file, the tensor and the expected/found values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "read", "write", ...).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A CERSA directory breaks a rule of the format: the first [`Issue`] that
    /// [`crate::Checkpoint::open`] (or [`crate::read_manifest`]) found. [`crate::validate()`]
    /// lists them all.
    #[error("{}", .issue.located(.dir))]
    Invalid {
        /// The CERSA directory.
        dir: PathBuf,
        /// What is wrong, where, expected and found.
        issue: Box<Issue>,
    },
    /// A safetensors header or data section is malformed.
    #[error("{path}: invalid safetensors file: {kind}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        kind: SafetensorsError,
    },
    /// The `cersa.json` manifest cannot be parsed or breaks a rule of the spec.
    #[error("{path}: invalid CERSA manifest: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Manifest and shards disagree about a tensor.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Mismatch {
        /// The shard (or manifest) where the disagreement was found.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Expected versus found.
        reason: String,
    },
    /// A shard's sha256 or size differs from the manifest.
    #[error("{path}: {what} mismatch: manifest says {expected}, file has {found} — was the file modified or truncated?")]
    Checksum {
        /// The shard.
        path: PathBuf,
        /// `"sha256"` or `"size"`.
        what: &'static str,
        /// Value recorded in the manifest.
        expected: String,
        /// Value measured on disk.
        found: String,
    },
    /// A tensor name that is not in the checkpoint.
    #[error("no tensor `{0}` in this checkpoint")]
    UnknownTensor(String),
    /// A call with arguments that do not fit the tensor (e.g. `apply` with the wrong width).
    #[error("tensor `{tensor}`: {reason}")]
    Usage {
        /// The tensor name.
        tensor: String,
        /// What does not fit.
        reason: String,
    },
}

/// What is wrong with a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// Fewer than 8 bytes: no header length.
    #[error("file is {0} bytes, too short for the 8-byte header length — was it truncated?")]
    TooShort(u64),
    /// The header length is larger than the cap.
    #[error("header length {found} exceeds the {cap}-byte cap")]
    HeaderTooLarge {
        /// Header length from the file.
        found: u64,
        /// The cap.
        cap: u64,
    },
    /// The header length points past the end of the file.
    #[error(
        "header length {header} + 8 is past the end of a {file}-byte file — was it truncated?"
    )]
    HeaderPastEnd {
        /// Header length from the file.
        header: u64,
        /// File length.
        file: u64,
    },
    /// The header is not valid UTF-8 JSON of the expected shape.
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    /// A tensor uses a dtype this crate does not know.
    #[error("tensor `{tensor}`: unsupported dtype `{dtype}`")]
    UnknownDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// The same tensor name appears twice.
    #[error("tensor `{0}` appears twice in the header")]
    DuplicateName(String),
    /// The product of the shape (or its byte size) overflows.
    #[error("tensor `{tensor}`: shape {shape:?} overflows")]
    ShapeOverflow {
        /// Tensor name.
        tensor: String,
        /// The shape.
        shape: Vec<u64>,
    },
    /// Offsets do not match the byte size implied by dtype and shape.
    #[error(
        "tensor `{tensor}`: data_offsets span {found} bytes but dtype and shape need {expected}"
    )]
    SizeMismatch {
        /// Tensor name.
        tensor: String,
        /// Bytes implied by dtype × shape.
        expected: u64,
        /// Bytes the offsets span.
        found: u64,
    },
    /// Offsets fall outside the data section.
    #[error("tensor `{tensor}`: data_offsets [{begin}, {end}] are outside the {data_len}-byte data section — was the file truncated?")]
    OffsetOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// Tensors overlap, leave gaps, or do not cover the data section.
    #[error("tensor `{tensor}`: data starts at {found}, expected {expected} (tensors must be contiguous, without gaps or overlap, and cover the data section)")]
    NotContiguous {
        /// Tensor name.
        tensor: String,
        /// The offset where the tensor should start.
        expected: u64,
        /// Where it starts.
        found: u64,
    },
    /// Bytes left after the last tensor.
    #[error("{0} bytes after the last tensor are not covered by any tensor")]
    TrailingBytes(u64),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(dir: &Path, issue: impl Into<Box<Issue>>) -> Self {
        Error::Invalid {
            dir: dir.to_path_buf(),
            issue: issue.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
