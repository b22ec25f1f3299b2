#![doc = include_str!("../../formats/cersa-v1.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod adapter;
#[cfg(feature = "candle")]
pub mod candle;
pub mod checkpoint;
pub mod dtype;
pub mod encoding;
pub mod error;
pub mod issue;
pub mod manifest;
pub mod memory;
pub mod mmap;
pub mod quant;
pub mod regular;
pub mod safetensors;
pub mod validate;
pub mod writer;

pub use checkpoint::{
    read_manifest, Checkpoint, Factors, Matrix, OpenOptions, RawTensor, TensorView,
};
pub use dtype::Dtype;
pub use encoding::FactorEncoding;
pub use error::{Error, Result, SafetensorsError};
pub use issue::{Issue, IssueKind};
pub use manifest::{
    expert_name, factor_names, shard_file_name, DenseReason, ExpertInfo, Manifest, TensorInfo,
    TensorKind, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SUFFIX_S, SUFFIX_U, SUFFIX_VT,
};
pub use quant::Quant;
pub use validate::{non_finite_factors, validate, validate_with, Interrupted, ValidateOptions};
pub use writer::CheckpointWriter;
