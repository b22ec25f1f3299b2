//! `inspect`: ranks and energies of a source (singular values only) or of a CERSA
//! directory (what its validated manifest says). Both reports are a documented JSON wire
//! format (`schema_version` 2), see README "inspect --json".

pub mod groups;
pub mod metrics;

use crate::decompose::rank::{break_even_rank, energy_at, saves, RankRule};
use crate::decompose::Decomposer;
use crate::error::{ConvertError, Result};
use crate::input::Source;
use crate::matrix::{read_matrix, Matrix};
use crate::select::Selection;
use crate::storage::{FactorDtype, Stored};
use cersa_loader::{Checkpoint, DenseReason, Dtype, TensorKind};
use groups::{group, Contribution, GroupRow};
use metrics::{kind_and_layer, spectrum_metrics, SpectrumMetrics};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Version of the inspect JSON schema (2: metrics, bytes, groups; 1: ranks only).
pub const SCHEMA_VERSION: u32 = 2;

/// Rank of a matrix at one energy threshold.
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
            };
            if spec.reason.is_none() {
                analyse(src, i, opts, decomposer, &mut spec)?;
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
                    c.at.get(k)
                        .map_or((c.params, c.source_bytes), |a| (a.0, a.1))
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
        selected_params: tensors
            .iter()
            .filter(|t| t.matrix_shape.is_some())
            .map(|t| t.params)
            .sum(),
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

/// What a source tensor adds to the group and total sums at each threshold.
fn contribution(t: &TensorSpectrum) -> Contribution<'_> {
    Contribution {
        kind: &t.module_kind,
        layer: t.layer,
        params: t.params,
        source_bytes: t.source_bytes,
        is_matrix: t.matrix_shape.is_some(),
        at: t
            .ranks
            .iter()
            .map(|r| {
                if r.saves {
                    (
                        r.factored_params,
                        r.stored_bytes,
                        Some(r.rank_fraction),
                        true,
                    )
                } else {
                    (t.params, r.stored_bytes, Some(r.rank_fraction), false)
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
    // Bytes as `convert --dtype source` would store them.
    let factor_dtype = FactorDtype::Source.resolve(t.dense_dtype);
    let dense_bytes = Stored::dense(t.numel(), t.dense_dtype).bytes;
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
    Ok(())
}

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

/// Plain truncation that keeps less than this share of any factored matrix's energy was
/// measured to break the model (`bench/quality.py`, README "Keeping the model working").
pub const PLAIN_ENERGY_THAT_WORKS: f64 = 0.99;

/// Whitened truncation that keeps less than this share of any matrix's output energy
/// was measured to cost the model most of its function (SmolLM2-135M at τ = 0.95:
/// perplexity 178 vs 18.7 dense; at 0.99: 28.7), README "Keeping the model working".
pub const WHITENED_ENERGY_THAT_WORKS: f64 = 0.99;

/// The measured figures the warnings cite (`bench/quality.py`).
const PLAIN_MEASURED: &str = "SmolLM2-135M at τ = 0.90: held-out perplexity 4.8 million vs \
                              18.7 dense; bench/quality.py";
const WHITENED_MEASURED: &str = "SmolLM2-135M whitened at τ = 0.95: held-out perplexity 178 \
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

/// What the measurements say about a checkpoint's setting, in words.
pub fn function_warnings(man: &cersa_loader::Manifest) -> Vec<String> {
    let low = |whitened: bool, level: f64| {
        man.tensors
            .values()
            .filter(|t| t.whitening.is_some() == whitened)
            .filter_map(|t| t.energy)
            .filter(|&e| e < level)
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

/// Opens and validates a CERSA directory and reports what it stores.
pub fn inspect_checkpoint(ckpt: &Checkpoint) -> CheckpointReport {
    let man = ckpt.manifest();
    let tensors = man
        .tensors
        .iter()
        .map(|(name, t)| {
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
            StoredTensor {
                name: name.clone(),
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
            }
        })
        .collect::<Vec<StoredTensor>>();
    let contributions: Vec<Contribution<'_>> = tensors
        .iter()
        .map(|t| Contribution {
            kind: &t.module_kind,
            layer: t.layer,
            params: t.params,
            source_bytes: t.source_bytes.unwrap_or(t.stored_bytes),
            is_matrix: t.kind == TensorKind::Factored,
            at: vec![(
                t.stored_params,
                t.stored_bytes,
                t.rank_fraction,
                t.kind == TensorKind::Factored,
            )],
        })
        .collect();
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
