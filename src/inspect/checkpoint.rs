//! `inspect CERSA_DIR`: what a validated manifest stores, per tensor and per expert.

use super::groups::{group, At, Contribution, GroupRow};
use super::metrics::kind_and_layer;
use super::{
    PLAIN_ENERGY_THAT_WORKS, PLAIN_MEASURED, SCHEMA_VERSION, WHITENED_ENERGY_THAT_WORKS,
    WHITENED_MEASURED,
};
use crate::storage::Stored;
use cersa_loader::{expert_name, Checkpoint, DenseReason, Dtype, TensorInfo, TensorKind};
use serde::{Deserialize, Serialize};

/// One tensor of a CERSA directory report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTensor {
    /// Tensor name.
    pub name: String,
    /// `factored` or `dense`.
    pub kind: TensorKind,
    /// Original shape.
    pub shape: Vec<usize>,
    /// Dtype in the source.
    pub source_dtype: String,
    /// Stored dtype (factored: the factors' dtype, or their quantization, e.g. `Q8_0`).
    pub stored_dtype: String,
    /// Module kind: the name without its layer index.
    pub module_kind: String,
    /// Layer index (the first all-digit name segment).
    pub layer: Option<usize>,
    /// Rank (factored).
    pub rank: Option<usize>,
    /// rank / min(m, n) (factored).
    pub rank_fraction: Option<f64>,
    /// Retained energy (factored).
    pub energy: Option<f64>,
    /// Relative Frobenius error of the stored factors (factored).
    pub rel_error: Option<f64>,
    /// What the truncation alone costs, √(1 − energy) (factored).
    pub truncation_error: Option<f64>,
    /// Share of the squared error that storing adds to the truncation's (rounding to the
    /// factor dtype, or quantization): (rel_error² − truncation_error²) / rel_error²,
    /// at least 0 (factored; 0 when rel_error is 0).
    pub rounding_share: Option<f64>,
    /// Whitened entries (`convert --calibration`): ‖(W − Ŵ)·X‖_F / ‖W·X‖_F on the
    /// calibration inputs. Then `energy`, `truncation_error` and `rounding_share` are of
    /// the output metric, `rel_error` still of the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// Why dense (dense).
    pub reason: Option<DenseReason>,
    /// Elements in the source tensor.
    pub params: u64,
    /// Elements stored.
    pub stored_params: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Bytes in the source (`null` for source dtypes without a fixed element size, e.g.
    /// quantized GGUF blocks).
    pub source_bytes: Option<u64>,
    /// A stacked experts entry (`kind` `experts`): each expert as a tensor of its own,
    /// named `NAME.cersa_expert.e`, in expert order. Absent for other kinds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<StoredTensor>,
}

/// `cersa inspect OUT_DIR --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Always `"cersa"`.
    pub kind: String,
    /// τ the checkpoint was made with.
    pub energy: f64,
    /// Tensors sorted by name.
    pub tensors: Vec<StoredTensor>,
    /// The manifest's totals.
    pub totals: cersa_loader::manifest::Totals,
    /// Sums per module kind (one `at_energy` entry: the checkpoint's τ), largest first.
    pub by_kind: Vec<GroupRow>,
    /// Sums per layer index, tensors outside layers (`"-"`) last.
    pub by_layer: Vec<GroupRow>,
    /// Settings known to break the model's function (see [`function_warnings`]); absent
    /// when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Energies of every factored matrix of the manifest and whether each was whitened: one
/// per factored entry, one per factored expert of an experts entry.
fn matrix_energies(man: &cersa_loader::Manifest) -> impl Iterator<Item = (f64, bool)> + '_ {
    man.tensors.values().flat_map(|t| {
        let whitened = t.whitening.is_some();
        let own = (t.kind == TensorKind::Factored)
            .then_some(t.energy)
            .flatten();
        let experts = t.experts.iter().flatten().filter_map(|x| x.energy);
        own.into_iter().chain(experts).map(move |e| (e, whitened))
    })
}

/// What the measurements say about a checkpoint's setting, in words.
pub fn function_warnings(man: &cersa_loader::Manifest) -> Vec<String> {
    let low = |whitened: bool, level: f64| {
        matrix_energies(man)
            .filter(|&(e, w)| w == whitened && e < level)
            .count()
    };
    let mut out = Vec::new();
    let plain_low = low(false, PLAIN_ENERGY_THAT_WORKS);
    if plain_low > 0 {
        out.push(format!(
            "{plain_low} matrices keep less than {PLAIN_ENERGY_THAT_WORKS} of their weight \
             energy with plain truncation: measured to break the model before any \
             training ({PLAIN_MEASURED}). Convert with --calibration (whitened truncation) \
             to keep it working at fewer bytes."
        ));
    }
    let white_low = low(true, WHITENED_ENERGY_THAT_WORKS);
    if white_low > 0 {
        out.push(format!(
            "{white_low} whitened matrices keep less than {WHITENED_ENERGY_THAT_WORKS} of \
             their output energy on the calibration text: measured to cost the model most \
             of its function before training ({WHITENED_MEASURED}). Check it with \
             `python -m cersa_torch.evaluate` before training on it."
        ));
    }
    out
}

/// One manifest entry (or one expert of an experts entry, as [`TensorInfo::expert`]
/// gives it) as a report row.
fn stored_tensor(name: &str, t: &TensorInfo) -> StoredTensor {
    let params: u64 = t.shape.iter().map(|&d| d as u64).product();
    let stored = Stored::of(t);
    let (module_kind, layer) = kind_and_layer(name);
    let truncation_error = t.energy.map(|e| (1.0 - e).max(0.0).sqrt());
    let output_rel_error = t.whitening.as_ref().map(|w| w.output_rel_error);
    // The storing's share of the error in the metric the truncation was made in.
    let measured = output_rel_error.or(t.rel_error);
    let rounding_share = measured.zip(truncation_error).map(|(rel, trunc)| {
        if rel > 0.0 {
            ((rel * rel - trunc * trunc) / (rel * rel)).max(0.0)
        } else {
            0.0
        }
    });
    let experts = (0..t.expert_count())
        .filter_map(|e| {
            t.expert(e)
                .map(|x| stored_tensor(&expert_name(name, e), &x))
        })
        .collect();
    StoredTensor {
        name: name.to_string(),
        kind: t.kind,
        shape: t.shape.clone(),
        source_dtype: t.source_dtype.clone(),
        stored_dtype: t.factor_type(),
        module_kind,
        layer,
        rank: t.rank,
        rank_fraction: t
            .matrix_shape
            .zip(t.rank)
            .map(|([m, n], r)| r as f64 / m.min(n) as f64),
        energy: t.energy,
        rel_error: t.rel_error,
        truncation_error,
        rounding_share,
        output_rel_error,
        reason: t.reason,
        params,
        stored_params: stored.params,
        stored_bytes: stored.bytes,
        source_bytes: Dtype::parse(&t.source_dtype)
            .and_then(|d| params.checked_mul(d.size() as u64)),
        experts,
    }
}

/// What a stored tensor adds to its groups: a factored entry is one matrix, an experts
/// entry one per factored expert.
fn contribution(t: &StoredTensor) -> Contribution<'_> {
    let factored: Vec<&StoredTensor> = match t.kind {
        TensorKind::Experts => t
            .experts
            .iter()
            .filter(|x| x.kind == TensorKind::Factored)
            .collect(),
        TensorKind::Factored => vec![t],
        _ => Vec::new(),
    };
    Contribution {
        kind: &t.module_kind,
        layer: t.layer,
        params: t.params,
        source_bytes: t.source_bytes.unwrap_or(t.stored_bytes),
        matrices: factored.len(),
        at: vec![At {
            stored_params: t.stored_params,
            stored_bytes: t.stored_bytes,
            rank_fractions: factored.iter().filter_map(|x| x.rank_fraction).collect(),
            saving: factored.len(),
        }],
    }
}

/// Opens and validates a CERSA directory and reports what it stores.
pub fn inspect_checkpoint(ckpt: &Checkpoint) -> CheckpointReport {
    let man = ckpt.manifest();
    let tensors: Vec<StoredTensor> = man
        .tensors
        .iter()
        .map(|(name, t)| stored_tensor(name, t))
        .collect();
    let contributions: Vec<Contribution<'_>> = tensors.iter().map(contribution).collect();
    let (by_kind, by_layer) = group(&[man.config.energy], &contributions);
    drop(contributions);
    CheckpointReport {
        schema_version: SCHEMA_VERSION,
        kind: "cersa".into(),
        energy: man.config.energy,
        tensors,
        totals: man.totals.clone(),
        by_kind,
        by_layer,
        warnings: function_warnings(man),
    }
}

/// The smallest, median and largest rank of an experts entry's factored experts, and how
/// many of its experts are factored (`None`: no factored expert, or not an experts entry).
pub fn expert_ranks(t: &StoredTensor) -> Option<(usize, usize, usize, usize)> {
    let mut ranks: Vec<usize> = t.experts.iter().filter_map(|x| x.rank).collect();
    ranks.sort_unstable();
    let (&lo, &hi) = (ranks.first()?, ranks.last()?);
    Some((lo, ranks[ranks.len() / 2], hi, ranks.len()))
}
