//! What [`crate::validate()`] finds wrong with a CERSA directory: one typed [`Issue`] per
//! broken rule of `formats/cersa-v1.md`.

use crate::error::SafetensorsError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// The rule an [`Issue`] breaks. One variant per distinct structural problem; the
/// kebab-case name (`shard-size`, `dtype-mismatch`, …) is the wire name in JSON and the
/// name the invalid test vectors give in `expected_issues.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum IssueKind {
    // ---- the manifest (nothing else can be checked after one of these)
    /// `cersa.json` is missing or cannot be read.
    ManifestUnreadable,
    /// `cersa.json` is larger than [`crate::checkpoint::MAX_MANIFEST_SIZE`].
    ManifestTooLarge,
    /// `cersa.json` is not JSON (syntax error, truncated).
    ManifestNotJson,
    /// `cersa.json` is JSON but not a manifest: a missing field, a wrong type, an unknown
    /// `kind`, a negative rank.
    ManifestInvalid,
    /// `format` is not `"cersa"`.
    WrongFormat,
    /// `format_version` is not one this reader knows.
    UnsupportedVersion,
    // ---- the shard list
    /// A shard name with `/`, `\`, a leading `.`, or empty: it would leave the directory.
    ShardNameNotPlain,
    /// The same shard file appears twice in `shards`.
    ShardListedTwice,
    /// A listed shard is missing or cannot be read.
    ShardMissing,
    /// A shard's size differs from `shards[].bytes`.
    ShardSize,
    /// A shard's sha256 differs from `shards[].sha256`.
    Sha256,
    // ---- the side files (checked by `validate` only, after everything else)
    /// A `side_files[].file` that is not a plain name, is listed twice, or names the
    /// manifest or a shard.
    SideFileNameInvalid,
    /// A listed side file is missing, unreadable, or not a regular file.
    SideFileMissing,
    /// A side file's size or sha256 differs from `side_files[]`.
    SideFileMismatch,
    // ---- the safetensors layout of a shard
    /// Fewer than 8 bytes: no header length.
    ShardTooShort,
    /// The header length exceeds the 100 000 000-byte cap.
    HeaderOverCap,
    /// The header length points past the end of the file.
    HeaderPastEnd,
    /// The header is not UTF-8 JSON of tensor entries.
    HeaderMalformed,
    /// A tensor name appears twice in one header.
    DuplicateTensorName,
    /// A dtype the format does not define.
    UnknownDtype,
    /// A shape whose element count or byte size overflows 64 bits.
    ShapeOverflow,
    /// `data_offsets` span another byte count than `numel × dtype size`.
    DataSizeMismatch,
    /// `data_offsets` fall outside the data section.
    OffsetsOutOfBounds,
    /// Two tensors' byte ranges overlap.
    OverlappingOffsets,
    /// Bytes between two tensors (or before the first) belong to none.
    DataGap,
    /// Bytes after the last tensor belong to none.
    TrailingBytes,
    // ---- the rules of a factored manifest entry
    /// A factored entry without `matrix_shape`.
    FactoredWithoutMatrixShape,
    /// A factored entry without `rank`.
    FactoredWithoutRank,
    /// `matrix_shape` [m, n] is not the matrix view of `shape` (m = d0, n = d1·d2·…).
    MatrixShapeMismatch,
    /// `rank` outside `1..=min(m, n)`.
    RankOutOfRange,
    /// A factored entry whose `stored_dtype` is not F16, BF16, F32 or F64.
    FactorDtypeNotFloat,
    /// A quantized factored entry (`quant` set) whose `stored_dtype` is not U8, or whose
    /// quantized factor rows would not fit in memory.
    QuantStoredDtype,
    /// A whitened entry's `whitening` is malformed: `input_axis` not 0 or 1, or
    /// `output_rel_error` negative or not finite (format revision 1.2).
    WhiteningInvalid,
    /// A stacked experts entry (format revision 1.3) whose shape has fewer than 3
    /// dimensions, whose `experts` list is missing or not one entry per index of the first
    /// dimension, whose `matrix_shape` is not `[d1, d2·…]`, or that lists an expert of kind
    /// `experts`; or an `experts` list on an entry of another kind.
    ExpertsInvalid,
    // ---- manifest ↔ shards
    /// An entry names a shard that is not in `shards`.
    ShardNotListed,
    /// A stored tensor the manifest implies is in no shard.
    TensorMissing,
    /// A stored tensor is in another shard than its manifest entry says.
    WrongShard,
    /// A stored tensor name appears in two shards.
    StoredInTwoShards,
    /// A stored tensor's dtype differs from what its manifest entry implies.
    DtypeMismatch,
    /// A stored tensor's shape differs from what its manifest entry implies.
    ShapeMismatch,
    /// Two manifest entries claim the same stored tensor (a dense `a.cersa_u` beside a
    /// factored `a`).
    ClaimedTwice,
    /// A stored tensor no manifest entry claims.
    StrayTensor,
    // ---- values (only with [`crate::ValidateOptions::check_finite`])
    /// A factor holds NaN or ±Inf.
    NonFiniteFactor,
}

impl IssueKind {
    /// True for the problems of the manifest itself, after which nothing else can be checked.
    pub fn is_manifest_unusable(self) -> bool {
        use IssueKind::*;
        matches!(
            self,
            ManifestUnreadable
                | ManifestTooLarge
                | ManifestNotJson
                | ManifestInvalid
                | WrongFormat
                | UnsupportedVersion
        )
    }

    /// True for the problems of a shard's safetensors layout, whose detail is the parser's
    /// whole message (it names the tensor and the values itself).
    fn is_layout(self) -> bool {
        use IssueKind::*;
        matches!(
            self,
            ShardTooShort
                | HeaderOverCap
                | HeaderPastEnd
                | HeaderMalformed
                | DuplicateTensorName
                | UnknownDtype
                | ShapeOverflow
                | DataSizeMismatch
                | OffsetsOutOfBounds
                | OverlappingOffsets
                | DataGap
                | TrailingBytes
        )
    }

    /// The likely cause, for messages.
    fn hint(self) -> Option<&'static str> {
        use IssueKind::*;
        Some(match self {
            ManifestUnreadable | WrongFormat => "is this a CERSA directory?",
            ManifestNotJson => "was it truncated or edited by hand?",
            ManifestInvalid => "was it edited by hand or written by another program?",
            UnsupportedVersion => "was it written by a newer cersa? upgrade cersa-loader",
            ShardMissing => "was the directory copied incompletely?",
            ShardSize | Sha256 => "was the file modified or truncated?",
            SideFileMissing => "was the directory copied incompletely?",
            SideFileMismatch => {
                "was it edited after conversion? restore it, or update side_files in cersa.json"
            }
            SideFileNameInvalid => "was the manifest edited by hand?",
            FactoredWithoutMatrixShape
            | FactoredWithoutRank
            | MatrixShapeMismatch
            | RankOutOfRange
            | FactorDtypeNotFloat
            | QuantStoredDtype
            | WhiteningInvalid
            | ExpertsInvalid
            | ShardNotListed
            | ClaimedTwice => "was the manifest edited by hand?",
            TensorMissing | WrongShard | StoredInTwoShards | DtypeMismatch | ShapeMismatch
            | StrayTensor => "do the manifest and the shards come from the same conversion?",
            NonFiniteFactor => "was the shard damaged after conversion? convert again",
            // The safetensors messages say what to suspect themselves.
            _ => return None,
        })
    }
}

impl fmt::Display for IssueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The serde name, so messages, JSON and the test vectors spell a kind one way.
        let name = serde_json::to_value(self).ok();
        f.write_str(name.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// One broken rule: what, where (file and tensor), expected and found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Issue {
    /// The rule broken.
    pub kind: IssueKind,
    /// The file concerned, relative to the CERSA directory (`cersa.json` or a shard).
    pub file: String,
    /// The tensor concerned (a manifest name or a stored name), where there is one.
    pub tensor: Option<String>,
    /// The value the rule requires, where there is one.
    pub expected: Option<String>,
    /// The value found, where there is one.
    pub found: Option<String>,
    /// What is wrong, in words (without the expected/found values).
    pub detail: String,
}

impl Issue {
    pub(crate) fn new(kind: IssueKind, file: &str, detail: impl Into<String>) -> Self {
        Issue {
            kind,
            file: file.to_string(),
            tensor: None,
            expected: None,
            found: None,
            detail: detail.into(),
        }
    }

    pub(crate) fn tensor(mut self, tensor: &str) -> Self {
        self.tensor = Some(tensor.to_string());
        self
    }

    pub(crate) fn expected_found(mut self, expected: impl ToString, found: impl ToString) -> Self {
        self.expected = Some(expected.to_string());
        self.found = Some(found.to_string());
        self
    }

    /// The issue of a safetensors problem in shard `file`.
    pub(crate) fn safetensors(file: &str, e: SafetensorsError) -> Self {
        use SafetensorsError as S;
        let detail = format!("invalid safetensors file: {e}");
        let (kind, tensor, expected_found) = match &e {
            S::TooShort(_) => (IssueKind::ShardTooShort, None, None),
            S::HeaderTooLarge { found, cap } => (
                IssueKind::HeaderOverCap,
                None,
                Some((format!("≤ {cap}"), found.to_string())),
            ),
            S::HeaderPastEnd { header, file } => (
                IssueKind::HeaderPastEnd,
                None,
                Some((format!("≤ {}", file.saturating_sub(8)), header.to_string())),
            ),
            S::InvalidJson(_) => (IssueKind::HeaderMalformed, None, None),
            S::UnknownDtype { tensor, dtype } => (
                IssueKind::UnknownDtype,
                Some(tensor),
                Some(("a safetensors dtype".to_string(), dtype.clone())),
            ),
            S::DuplicateName(tensor) => (IssueKind::DuplicateTensorName, Some(tensor), None),
            S::ShapeOverflow { tensor, .. } => (IssueKind::ShapeOverflow, Some(tensor), None),
            S::SizeMismatch {
                tensor,
                expected,
                found,
            } => (
                IssueKind::DataSizeMismatch,
                Some(tensor),
                Some((expected.to_string(), found.to_string())),
            ),
            S::OffsetOutOfBounds {
                tensor,
                begin,
                end,
                data_len,
            } => (
                IssueKind::OffsetsOutOfBounds,
                Some(tensor),
                Some((
                    format!("within [0, {data_len}]"),
                    format!("[{begin}, {end}]"),
                )),
            ),
            S::NotContiguous {
                tensor,
                expected,
                found,
            } => (
                if found < expected {
                    IssueKind::OverlappingOffsets
                } else {
                    IssueKind::DataGap
                },
                Some(tensor),
                Some((expected.to_string(), found.to_string())),
            ),
            S::TrailingBytes(n) => (
                IssueKind::TrailingBytes,
                None,
                Some(("0".to_string(), n.to_string())),
            ),
        };
        let mut issue = Issue::new(kind, file, detail);
        issue.tensor = tensor.cloned();
        if let Some((e, f)) = expected_found {
            issue = issue.expected_found(e, f);
        }
        issue
    }

    /// The message with the file inside `dir` (what [`crate::Error::Invalid`] prints).
    pub fn located(&self, dir: &Path) -> String {
        self.message(&dir.join(&self.file).display().to_string())
    }

    fn message(&self, file: &str) -> String {
        let mut out = format!("{file}: ");
        let layout = self.kind.is_layout();
        if let (Some(t), false) = (&self.tensor, layout) {
            out.push_str(&format!("tensor `{t}`: "));
        }
        out.push_str(&self.detail);
        if let (Some(e), Some(f), false) = (&self.expected, &self.found, layout) {
            out.push_str(&format!(" (expected {e}, found {f})"));
        }
        if let Some(hint) = self.kind.hint() {
            out.push_str(" — ");
            out.push_str(hint);
        }
        out
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(&self.file))
    }
}
