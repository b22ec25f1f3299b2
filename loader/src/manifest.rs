//! The `cersa.json` manifest: serde types of the CERSA v1 wire format.

use crate::dtype::Dtype;
use crate::quant::Quant;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "cersa";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The highest format revision (`format_minor`) this crate reads: 1 adds quantized
/// factors, 2 whitened (output-metric) factors whose `cersa_vt` or `cersa_u` is not
/// orthonormal, 3 stacked mixture-of-experts tensors factored one expert at a time.
pub const FORMAT_MINOR: u32 = 3;
/// File name of the manifest inside a CERSA directory.
pub const MANIFEST_FILE: &str = "cersa.json";
/// Suffix of the left factor `U_r` ([m, r]).
pub const SUFFIX_U: &str = ".cersa_u";
/// Suffix of the singular values `σ_r` (`[r]`, always F32).
pub const SUFFIX_S: &str = ".cersa_s";
/// Suffix of the right factor `V_rᵀ` ([r, n]).
pub const SUFFIX_VT: &str = ".cersa_vt";
/// Infix of one expert of a stacked experts tensor: expert `e` of `NAME` is stored as the
/// tensor `NAME.cersa_expert.e` (dense) or its three factors (factored).
pub const INFIX_EXPERT: &str = ".cersa_expert.";

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"cersa"`.
    pub format: String,
    /// Always 1 for this version.
    pub format_version: u32,
    /// Format revision within version 1: 0 (absent), 1 (the checkpoint has quantized
    /// factors or planned dense tensors) or 2 (whitened factors). Readers refuse revisions
    /// above [`FORMAT_MINOR`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub format_minor: u32,
    /// The program that wrote the checkpoint.
    pub producer: Producer,
    /// The options the checkpoint was made with.
    pub config: ConvertConfig,
    /// What was converted.
    pub source: SourceInfo,
    /// Shard files, in order.
    pub shards: Vec<ShardInfo>,
    /// Hugging Face side files (`config.json`, tokenizer files) copied byte for byte from
    /// the source directory, in name order; absent when there were none (spec §1, §3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side_files: Vec<SideFile>,
    /// Every tensor of the source, keyed by its source name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Sums over all tensors.
    pub totals: Totals,
}

/// Name and version of the writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    /// Program name.
    pub name: String,
    /// Program version.
    pub version: String,
}

/// Conversion options recorded in the manifest (enough to reproduce the output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertConfig {
    /// Energy threshold τ in (0, 1].
    pub energy: f64,
    /// Lower clamp of the rank.
    pub min_rank: usize,
    /// Upper clamp of the rank (`null`: none).
    pub max_rank: Option<usize>,
    /// Ranks are rounded up to a multiple of this.
    pub rank_multiple: usize,
    /// Factor dtype option: `source`, `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Decomposition algorithm (`svd`, ...).
    pub algorithm: String,
    /// Whether matrices were factored even when that saves nothing.
    pub force_factor: bool,
    /// `--include` globs.
    pub include: Vec<String>,
    /// `--exclude` globs.
    pub exclude: Vec<String>,
    /// Maximum shard size in bytes.
    pub max_shard_size: u64,
    /// Per-module rank rules in the order they were tried (`--energy GLOB=TAU`,
    /// `--rank GLOB=N`); absent when none were given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// The calibration statistics of a whitened conversion (`--calibration`; format
    /// revision 1.2); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationConfig>,
}

/// The calibration statistics a whitened conversion used (docs/calibration.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationConfig {
    /// Lowercase hex sha256 of the whole calibration file.
    pub sha256: String,
    /// Relative damping δ: G + δ·trace(G)/dim(G)·I was factored.
    pub damping: f64,
    /// Weights the file has statistics for.
    pub weights: usize,
    /// The file's `model` document (identity of the model it was collected on).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub model: serde_json::Value,
    /// The file's `text` document (sequences, tokens, hash of the token ids).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub text: serde_json::Value,
}

/// How a whitened factored entry was truncated (format revision 1.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Whitening {
    /// The weight's axis that meets the layer input: 1 for `[out, in]` (W·L was factored;
    /// `cersa_vt` is not orthonormal), 0 for `[in, out]` (Lᵀ·W; `cersa_u` is not).
    pub input_axis: u8,
    /// ‖(W − Ŵ)·X‖_F / ‖W·X‖_F on the calibration inputs (undamped G), Ŵ from the factors
    /// as stored.
    pub output_rel_error: f64,
}

/// The converted source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Source format (`safetensors`, `gguf`, `pytorch`).
    pub format: String,
    /// Source files (names relative to the source directory) with their sizes.
    pub files: Vec<SourceFile>,
    /// Format-specific facts (e.g. GGUF version, architecture); may be empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
}

/// One source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// File name, relative to the source directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the CERSA directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// One side file of the CERSA directory (not a checkpoint file: readers of tensors ignore
/// it; the validator checks it is present with this size and sha256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFile {
    /// Plain file name inside the CERSA directory (e.g. `config.json`).
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorKind {
    /// As `NAME.cersa_u`, `NAME.cersa_s`, `NAME.cersa_vt`.
    Factored,
    /// As `NAME`, unchanged.
    Dense,
    /// A stacked mixture-of-experts tensor `[E, d1, …]`, each expert's `[d1, d2·…]` slice
    /// stored on its own, factored or dense (format revision 1.3).
    Experts,
}

/// Why a tensor is stored dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenseReason {
    /// Not selected by the include/exclude rules.
    Excluded,
    /// Fewer than 2 dimensions.
    NotAMatrix,
    /// Integer or bool dtype.
    NonFloat,
    /// r·(m+n+1) ≥ m·n: the factors would not be smaller.
    NoSaving,
    /// ‖W‖_F = 0 (including matrices with a zero dimension).
    Zero,
    /// A budget plan (`cersa plan`, `convert --plan`) keeps it dense: its bytes buy more
    /// energy there than as factors (format revision 1.1).
    Planned,
}

/// One tensor of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// `factored` or `dense`.
    pub kind: TensorKind,
    /// Original shape.
    pub shape: Vec<usize>,
    /// Dtype in the source (a safetensors dtype name, or e.g. a GGUF type name).
    pub source_dtype: String,
    /// Dtype of the stored tensor (dense) or of `cersa_u`/`cersa_vt` (factored; `U8` when
    /// they are quantized).
    pub stored_dtype: Dtype,
    /// Block quantization of `cersa_u`/`cersa_vt` (factored only; spec §2 "Quantized
    /// factors").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<Quant>,
    /// Shard file holding the stored tensors.
    pub shard: String,
    /// Matrix view [m, n] that was factored (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_shape: Option<[usize; 2]>,
    /// Kept rank r (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Retained energy Σ_{i≤r} σᵢ² / ‖W‖_F² (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// ‖W − Ŵ‖_F / ‖W‖_F measured on the stored factors (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_error: Option<f64>,
    /// Why the tensor is dense (dense only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenseReason>,
    /// The per-module rule (one of `config.rules`) that chose the rank (factored only;
    /// absent: `config.energy` and the clamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Present when the factors were truncated in the calibration's output metric; then
    /// `energy` is the retained share of the (damped) output energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitening: Option<Whitening>,
    /// How each expert of a stacked experts tensor is stored (kind `experts` only; one
    /// entry per index of the first dimension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<ExpertInfo>>,
}

/// How one expert of a stacked experts tensor is stored. Its shape is the tensor's shape
/// without the first dimension; its source dtype, shard, matrix shape and rule are the
/// tensor's (see [`TensorInfo::expert`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    /// `factored` or `dense` (never `experts`).
    pub kind: TensorKind,
    /// Dtype of the expert's dense copy, or of its factors (`U8` when quantized).
    pub stored_dtype: Dtype,
    /// Block quantization of the factors (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<Quant>,
    /// Kept rank (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Retained energy of this expert's matrix (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// ‖W_e − Ŵ_e‖_F / ‖W_e‖_F of this expert, factors as stored (factored only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_error: Option<f64>,
    /// Why the expert is dense (dense only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenseReason>,
}

/// Sums over all tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Elements in the source.
    pub source_params: u64,
    /// Tensor bytes in the source.
    pub source_bytes: u64,
    /// Elements stored (factors + dense tensors).
    pub stored_params: u64,
    /// Tensor bytes stored.
    pub stored_bytes: u64,
    /// Number of factored tensors.
    pub factored_tensors: u64,
    /// Number of dense tensors.
    pub dense_tensors: u64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Manifest {
    /// The `format_minor` a manifest with these tensors needs: 3 when any is a stacked
    /// experts tensor, 2 when any is whitened, 1 when any is quantized or kept dense by a
    /// plan.
    pub fn required_minor(tensors: &BTreeMap<String, TensorInfo>) -> u32 {
        if tensors.values().any(|t| t.kind == TensorKind::Experts) {
            return 3;
        }
        if tensors.values().any(|t| t.whitening.is_some()) {
            return 2;
        }
        u32::from(
            tensors
                .values()
                .any(|t| t.quant.is_some() || t.reason == Some(DenseReason::Planned)),
        )
    }
}

impl TensorInfo {
    /// The factor type as people read it: the quantization's name, else the dtype's (for
    /// an experts tensor: that of its first factored expert).
    pub fn factor_type(&self) -> String {
        let factored = self
            .experts
            .iter()
            .flatten()
            .find(|e| e.kind == TensorKind::Factored);
        let (quant, dtype) = match factored {
            Some(e) => (e.quant, e.stored_dtype),
            None => (self.quant, self.stored_dtype),
        };
        match quant {
            Some(q) => q.to_string(),
            None => dtype.to_string(),
        }
    }

    /// Whether some of its values are stored as factors (a factored entry, or an experts
    /// entry: it always has a factored expert), so reading it recomposes them.
    pub fn has_factors(&self) -> bool {
        self.kind != TensorKind::Dense
    }

    /// Number of experts of a stacked experts tensor (0 for other kinds).
    pub fn expert_count(&self) -> usize {
        self.experts.as_ref().map_or(0, Vec::len)
    }

    /// Expert `e` of a stacked experts tensor as an entry of its own: shape without the
    /// first dimension; the tensor's source dtype, shard, matrix shape and rule. `None`
    /// when this is not an experts tensor or `e` is out of range.
    pub fn expert(&self, e: usize) -> Option<TensorInfo> {
        let x = self.experts.as_ref()?.get(e)?;
        let factored = x.kind == TensorKind::Factored;
        Some(TensorInfo {
            kind: x.kind,
            shape: self.shape.get(1..)?.to_vec(),
            source_dtype: self.source_dtype.clone(),
            stored_dtype: x.stored_dtype,
            quant: x.quant,
            shard: self.shard.clone(),
            matrix_shape: if factored { self.matrix_shape } else { None },
            rank: x.rank,
            energy: x.energy,
            rel_error: x.rel_error,
            reason: x.reason,
            rule: if factored { self.rule.clone() } else { None },
            whitening: None,
            experts: None,
        })
    }
}

/// Stored name of expert `e` of experts tensor `name` (its dense tensor, or the prefix of
/// its factors' names).
pub fn expert_name(name: &str, e: usize) -> String {
    format!("{name}{INFIX_EXPERT}{e}")
}

/// Names of the three stored tensors of factored tensor `name`: (u, s, vt).
pub fn factor_names(name: &str) -> (String, String, String) {
    (
        format!("{name}{SUFFIX_U}"),
        format!("{name}{SUFFIX_S}"),
        format!("{name}{SUFFIX_VT}"),
    )
}

/// Shard file name `cersa-0000k-of-0000N.safetensors` (1-based `k`).
pub fn shard_file_name(k: usize, n: usize) -> String {
    format!("cersa-{k:05}-of-{n:05}.safetensors")
}
