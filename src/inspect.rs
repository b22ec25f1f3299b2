//! `inspect`: ranks and energies of a source (singular values only) or of a CERSA
//! directory (what its validated manifest says). Both reports are a documented JSON wire
//! format (`schema_version` 3, docs/inspect-json.md). A stacked experts tensor is analysed
//! one expert at a time, as `convert` factors it.

pub mod checkpoint;
mod experts;
pub mod groups;
pub mod metrics;

pub use checkpoint::{
    expert_ranks, function_warnings, inspect_checkpoint, CheckpointReport, StoredTensor,
};

use crate::decompose::rank::{break_even_rank, energy_at, saves, RankRule};
use crate::decompose::Decomposer;
use crate::error::{ConvertError, Result};
use crate::input::Source;
use crate::matrix::{read_matrix, Matrix};
use crate::select::Selection;
use crate::storage::{FactorDtype, Stored};
use cersa_loader::{DenseReason, Dtype};
use groups::{group, At, Contribution, GroupRow};
use metrics::{kind_and_layer, spectrum_metrics, SpectrumMetrics};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Version of the inspect JSON schema (3: stacked experts analysed per expert, `experts`;
/// 2: metrics, bytes, groups; 1: ranks only).
pub const SCHEMA_VERSION: u32 = 3;

/// Rank of a matrix at one energy threshold. For a stacked experts tensor, the sums over its
/// experts (see [`TensorSpectrum::experts`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankAtEnergy {
    /// τ.
    pub threshold: f64,
    /// Rank the rule keeps.
    pub rank: usize,
    /// rank / min(m, n).
    pub rank_fraction: f64,
    /// Retained energy at that rank.
    pub energy: f64,
    /// r·(m+n+1).
    pub factored_params: u64,
    /// Whether factoring is smaller than the dense matrix.
    pub saves: bool,
    /// Bytes stored at τ with `--dtype source`: the factors where they save, else dense.
    pub stored_bytes: u64,
}

/// One tensor of a source report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpectrum {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Source dtype.
    pub dtype: String,
    /// Elements.
    pub params: u64,
    /// Bytes in the source.
    pub source_bytes: u64,
    /// Module kind: the name without its layer index (`attention.self.query`).
    pub module_kind: String,
    /// Layer index (the first all-digit name segment).
    pub layer: Option<usize>,
    /// Why it would stay dense regardless of τ (`None`: it is factored when it saves).
    pub reason: Option<DenseReason>,
    /// [m, n] matrix view (selected tensors).
    pub matrix_shape: Option<[usize; 2]>,
    /// Largest rank that still saves memory, mn/(m+n+1) rounded down.
    pub break_even_rank: Option<usize>,
    /// Spectrum summaries (analysed matrices).
    pub metrics: Option<SpectrumMetrics>,
    /// One entry per threshold (selected tensors).
    pub ranks: Vec<RankAtEnergy>,
    /// All min(m, n) singular values, non-increasing; only with `--singular-values`
    /// (always kept in memory for `cersa report`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub singular_values: Vec<f64>,
    /// Analysed in the output metric (`--calibration` had statistics for it): the
    /// spectrum, metrics, ranks and energies are of the whitened matrix W·L (or Lᵀ·W).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whitened: bool,
    /// A selected stacked experts tensor: each expert's `[m, n]` matrix analysed on its own,
    /// named `NAME.cersa_expert.e`, in expert order. The tensor's `matrix_shape` and
    /// `break_even_rank` are then those of one expert, its `metrics` `null`, and each of its
    /// `ranks` sums the experts' (see docs/inspect-json.md). Absent for other tensors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<TensorSpectrum>,
}

/// Totals at one threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotalAtEnergy {
    /// τ.
    pub threshold: f64,
    /// Elements stored if converted at τ (factors where they save, the rest dense).
    pub stored_params: u64,
    /// stored_params / params.
    pub param_ratio: f64,
    /// Bytes stored if converted at τ with `--dtype source`.
    pub stored_bytes: u64,
    /// stored_bytes / source_bytes.
    pub byte_ratio: f64,
}

/// Totals of a source report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceTotals {
    /// Tensors.
    pub tensors: usize,
    /// Elements in all tensors.
    pub params: u64,
    /// Elements in selected matrices.
    pub selected_params: u64,
    /// Bytes of all tensors in the source.
    pub source_bytes: u64,
    /// Per threshold.
    pub at_energy: Vec<TotalAtEnergy>,
}

/// `cersa inspect SRC --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Always `"source"`.
    pub kind: String,
    /// Source format.
    pub format: String,
    /// Thresholds.
    pub energies: Vec<f64>,
    /// Tensors in source order.
    pub tensors: Vec<TensorSpectrum>,
    /// Totals.
    pub totals: SourceTotals,
    /// Sums per module kind, largest first.
    pub by_kind: Vec<GroupRow>,
    /// Sums per layer index, tensors outside layers (`"-"`) last.
    pub by_layer: Vec<GroupRow>,
    /// Thresholds known to break the model's function under plain truncation (see
    /// [`source_warnings`]); absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The calibration statistics the spectra were whitened with (`--calibration`): then
    /// the matrices with statistics (`TensorSpectrum.whitened`) report output energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<cersa_loader::manifest::CalibrationConfig>,
}

/// Options of [`inspect_source`].
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// Thresholds τ, each in (0, 1].
    pub energies: Vec<f64>,
    /// `--include` globs.
    pub include: Vec<String>,
    /// `--exclude` globs.
    pub exclude: Vec<String>,
    /// Keep every singular value in the report (`--singular-values`, `cersa report`).
    pub keep_singular_values: bool,
    /// Calibration statistics (`--calibration`): matrices with statistics are analysed in
    /// their output metric, the spectrum of W·L (or Lᵀ·W) that `convert --calibration`
    /// truncates, so ranks and energies are of output energy.
    pub calibration: Option<std::sync::Arc<crate::calibration::Calibration>>,
}

/// Singular values of every selected matrix of `src` (in parallel over tensors), and the
/// ranks at each threshold. `progress(done, total)` is called from worker threads; once
/// `cancel` is set no further tensor starts and the result is [`ConvertError::Interrupted`].
pub fn inspect_source(
    src: &dyn Source,
    opts: &InspectOptions,
    decomposer: &dyn Decomposer,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<SourceReport> {
    let selection = Selection::new(&opts.include, &opts.exclude, src.default_excludes())?;
    if let Some(cal) = &opts.calibration {
        cal.check_source(src)?;
    }
    let metas = src.tensors();
    let done = AtomicUsize::new(0);
    let total = metas.len();
    let tensors = (0..total)
        .into_par_iter()
        .map(|i| {
            if cancel.load(Ordering::Relaxed) {
                return Err(ConvertError::Interrupted);
            }
            let t = &metas[i];
            let (module_kind, layer) = kind_and_layer(&t.name);
            let mut spec = TensorSpectrum {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.source_dtype.clone(),
                params: t.numel(),
                source_bytes: t.source_bytes,
                module_kind,
                layer,
                reason: selection.check(t).err(),
                matrix_shape: None,
                break_even_rank: None,
                metrics: None,
                ranks: Vec::new(),
                singular_values: Vec::new(),
                whitened: false,
                experts: Vec::new(),
            };
            if spec.reason.is_none() {
                match selection.is_experts(t) {
                    true => {
                        experts::analyse(src, i, selection.view(t), opts, decomposer, &mut spec)?
                    }
                    false => analyse(src, i, opts, decomposer, &mut spec)?,
                }
            }
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Ok(spec)
        })
        .collect::<Result<Vec<_>>>()?;
    let params: u64 = tensors.iter().map(|t| t.params).sum();
    let source_bytes: u64 = tensors.iter().map(|t| t.source_bytes).sum();
    let contributions: Vec<Contribution<'_>> = tensors.iter().map(contribution).collect();
    let at_energy = opts
        .energies
        .iter()
        .enumerate()
        .map(|(k, &tau)| {
            let (stored, bytes) = contributions
                .iter()
                .map(|c| {
                    c.at.get(k).map_or((c.params, c.source_bytes), |a| {
                        (a.stored_params, a.stored_bytes)
                    })
                })
                .fold((0u64, 0u64), |(p, b), (x, y)| (p + x, b + y));
            TotalAtEnergy {
                threshold: tau,
                stored_params: stored,
                param_ratio: ratio(stored, params),
                stored_bytes: bytes,
                byte_ratio: ratio(bytes, source_bytes),
            }
        })
        .collect();
    let (by_kind, by_layer) = group(&opts.energies, &contributions);
    let totals = SourceTotals {
        tensors: tensors.len(),
        params,
        selected_params: tensors.iter().flat_map(matrices).map(|t| t.params).sum(),
        source_bytes,
        at_energy,
    };
    drop(contributions);
    Ok(SourceReport {
        schema_version: SCHEMA_VERSION,
        kind: "source".into(),
        format: src.format().into(),
        energies: opts.energies.clone(),
        tensors,
        totals,
        by_kind,
        by_layer,
        warnings: source_warnings(&opts.energies, opts.calibration.is_some()),
        calibration: opts.calibration.as_ref().map(|c| c.config.clone()),
    })
}

/// The analysed matrices of a source tensor: itself, or its analysed experts.
pub fn matrices(t: &TensorSpectrum) -> Vec<&TensorSpectrum> {
    match (t.experts.is_empty(), t.matrix_shape.is_some()) {
        (false, _) => t
            .experts
            .iter()
            .filter(|x| x.matrix_shape.is_some())
            .collect(),
        (true, true) => vec![t],
        (true, false) => Vec::new(),
    }
}

/// What a source tensor adds to the group and total sums at each threshold.
fn contribution(t: &TensorSpectrum) -> Contribution<'_> {
    let ms = matrices(t);
    Contribution {
        kind: &t.module_kind,
        layer: t.layer,
        params: t.params,
        source_bytes: t.source_bytes,
        matrices: ms.len(),
        at: t
            .ranks
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let at: Vec<&RankAtEnergy> = ms.iter().filter_map(|x| x.ranks.get(k)).collect();
                // Zero experts stay dense: their params count as stored.
                let analysed: u64 = ms.iter().map(|x| x.params).sum();
                let factored: u64 = ms
                    .iter()
                    .map(|x| match x.ranks.get(k) {
                        Some(a) if a.saves => a.factored_params,
                        _ => x.params,
                    })
                    .sum();
                At {
                    stored_params: t.params - analysed + factored,
                    stored_bytes: r.stored_bytes,
                    rank_fractions: at.iter().map(|a| a.rank_fraction).collect(),
                    saving: at.iter().filter(|a| a.saves).count(),
                }
            })
            .collect(),
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

fn analyse(
    src: &dyn Source,
    i: usize,
    opts: &InspectOptions,
    decomposer: &dyn Decomposer,
    spec: &mut TensorSpectrum,
) -> Result<()> {
    let t = &src.tensors()[i];
    let Some(Matrix {
        mut data,
        m,
        n,
        mut norm2,
    }) = read_matrix(src, i)?
    else {
        spec.reason = Some(DenseReason::Zero);
        return Ok(());
    };
    // The output metric: the matrix convert --calibration truncates.
    let whitener = match &opts.calibration {
        Some(cal) => cal.whitener(src, i, m, n)?,
        None => None,
    };
    if let Some(w) = &whitener {
        let a = w.whiten(&data, m, n);
        norm2 = a.iter().map(|x| x * x).sum();
        data = crate::input::FloatData::F64(a);
        spec.whitened = true;
    }
    let sigma =
        decomposer
            .singular_values(&data, m, n)
            .map_err(|source| ConvertError::Decompose {
                tensor: t.name.clone(),
                source,
            })?;
    drop(data);
    fill(spec, sigma, norm2, m, n, t.dense_dtype, opts);
    Ok(())
}

/// Fills what the singular values `sigma` of an `m`×`n` matrix with ‖W‖_F² = `norm2` tell:
/// its metrics and, at each τ, the rank and the bytes `convert --dtype source` would store
/// (`dense_dtype`: the dtype of its dense copy).
fn fill(
    spec: &mut TensorSpectrum,
    sigma: Vec<f64>,
    norm2: f64,
    m: usize,
    n: usize,
    dense_dtype: Dtype,
    opts: &InspectOptions,
) {
    let factor_dtype = FactorDtype::Source.resolve(dense_dtype);
    let dense_bytes = Stored::dense(spec.params, dense_dtype).bytes;
    spec.matrix_shape = Some([m, n]);
    spec.break_even_rank = Some(break_even_rank(m, n));
    spec.metrics = spectrum_metrics(&sigma, norm2);
    spec.ranks = opts
        .energies
        .iter()
        .map(|&tau| {
            let rule = RankRule {
                energy: tau,
                ..RankRule::default()
            };
            let r = rule.rank(&sigma, norm2, m, n);
            let factored = Stored::factored(m, n, r, factor_dtype);
            let saves = saves(r, m, n);
            RankAtEnergy {
                threshold: tau,
                rank: r,
                rank_fraction: r as f64 / m.min(n) as f64,
                energy: energy_at(&sigma, norm2, r),
                factored_params: factored.params,
                saves,
                stored_bytes: if saves { factored.bytes } else { dense_bytes },
            }
        })
        .collect();
    if opts.keep_singular_values {
        spec.singular_values = sigma;
    }
}

/// Plain truncation that keeps less than this share of any factored matrix's energy was
/// measured to break the model (`bench/quality.py`, README "Keeping the model working").
pub const PLAIN_ENERGY_THAT_WORKS: f64 = 0.99;

/// Whitened truncation that keeps less than this share of any matrix's output energy
/// was measured to cost the model most of its function (SmolLM2-135M at τ = 0.95:
/// perplexity 178 vs 18.7 dense; at 0.99: 28.7), README "Keeping the model working".
pub const WHITENED_ENERGY_THAT_WORKS: f64 = 0.99;

/// The measured figures the warnings cite (`bench/quality.py`).
pub(crate) const PLAIN_MEASURED: &str =
    "SmolLM2-135M at τ = 0.90: held-out perplexity 4.8 million vs \
                              18.7 dense; bench/quality.py";
pub(crate) const WHITENED_MEASURED: &str =
    "SmolLM2-135M whitened at τ = 0.95: held-out perplexity 178 \
                                 vs 18.7 dense, at 0.99: 28.7; bench/quality.py";

/// What the measurements say about the thresholds a source is inspected at (`whitened`:
/// with calibration statistics), in words.
pub fn source_warnings(energies: &[f64], whitened: bool) -> Vec<String> {
    let level = if whitened {
        WHITENED_ENERGY_THAT_WORKS
    } else {
        PLAIN_ENERGY_THAT_WORKS
    };
    let low: Vec<String> = energies
        .iter()
        .filter(|&&e| e < level)
        .map(|e| e.to_string())
        .collect();
    if low.is_empty() {
        return Vec::new();
    }
    if whitened {
        return vec![format!(
            "whitened truncation at τ = {} (below {level} of output energy) was measured \
             to cost the model most of its function before training ({WHITENED_MEASURED}).",
            low.join(", ")
        )];
    }
    vec![format!(
        "plain truncation at τ = {} (below {PLAIN_ENERGY_THAT_WORKS}) was measured to break \
         the model before any training ({PLAIN_MEASURED}). These sizes are of plain \
         truncation; convert with --calibration (whitened truncation, docs/calibration.md) \
         to keep the model working at fewer bytes.",
        low.join(", ")
    )]
}
