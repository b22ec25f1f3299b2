//! `cersa merge`: folds a trained adapter into its base CERSA checkpoint.
//!
//! For every adapted layer the adapted matrix W' (see `cersa_loader::adapter`) is formed
//! in f64 and re-decomposed by the route the user chose (default: the one recorded in the
//! base manifest's `config.algorithm`), truncated by the base checkpoint's own rank rule
//! (the per-module rule recorded for the tensor, else `config.energy`, clamps, multiple),
//! stored as the base factors are (dtype or quantization). Whitened entries (`convert
//! --calibration`) are re-truncated in the same output metric, which needs the statistics
//! the base was converted with (`MergeOptions::calibration`; the same file, by sha256).
//! A dense-base layer of the adapter (a matrix the base keeps dense, adapted in its own
//! top-r subspace whose basis the adapter carries) is folded into the dense tensor: W' =
//! W + U·(M − diag σ)·Vᵀ in f64, rounded once to the tensor's dtype, no SVD.
//! Every other tensor is copied byte for byte. The output is written into a temporary sibling and
//! renamed into place, exactly as `convert` does.

use crate::calibration::Calibration;
use crate::decompose::rank::{energy_at, RankRule};
use crate::decompose::svd::residual_norm2;
use crate::decompose::whiten::Whitener;
use crate::decompose::{Decomposer, Factorization, Route};
use crate::error::{ConvertError, Result};
use crate::input::FloatData;
use crate::rank_rules::{ModuleRule, PLAN_RULE};
use crate::storage::Stored;
use cersa_loader::adapter::{manifest_sha256, Adapter};
use cersa_loader::dtype::{decode_f64, encode_f64};
use cersa_loader::manifest::Totals;
use cersa_loader::writer::hex;
use cersa_loader::{Checkpoint, CheckpointWriter, Dtype, FactorEncoding, Manifest, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wire-format version of [`MergeReport`].
pub const MERGE_REPORT_VERSION: u32 = 1;

/// What `merge` did to one adapted layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergedLayer {
    /// Tensor name.
    pub name: String,
    /// Rank in the base checkpoint.
    pub old_rank: usize,
    /// Rank after merging and re-truncating.
    pub new_rank: usize,
    /// Retained energy of the adapted matrix W'.
    pub energy: f64,
    /// ‖W' − Ŵ'‖_F / ‖W'‖_F with the stored (rounded) factors.
    pub rel_error: f64,
    /// Whitened layers: ‖(W' − Ŵ')·X‖_F / ‖W'·X‖_F on the calibration inputs (then
    /// `energy` is of the outputs too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// A dense-base layer, folded into its dense tensor: `old_rank` and `new_rank` are the
    /// adapter's subspace rank, `energy` 1, `rel_error` the rounding's ‖W' − round(W')‖_F /
    /// ‖W'‖_F in the tensor's dtype.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dense: bool,
}

/// The result of a merge, as printed by `cersa merge --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    /// [`MERGE_REPORT_VERSION`].
    pub report_version: u32,
    /// The output directory.
    pub out_dir: PathBuf,
    /// Route the adapted layers were re-decomposed with.
    pub algorithm: String,
    /// The adapted layers, in name order.
    pub layers: Vec<MergedLayer>,
    /// Totals of the merged checkpoint's manifest.
    pub totals: Totals,
}

/// Options of [`merge`].
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Decomposition route; `None`: the base manifest's `config.algorithm`.
    pub algorithm: Option<Route>,
    /// Replace a CERSA directory at the output path once the merged one is complete.
    pub overwrite: bool,
    /// The calibration statistics the base was converted with: needed when an adapted
    /// layer is whitened.
    pub calibration: Option<PathBuf>,
}

/// Factors encoded as `enc` stores them (bytes of U [m, r] and Vᵀ [r, n]) and their values
/// as stored, in f64, for the error of the merged checkpoint.
#[allow(clippy::type_complexity)]
fn rounded(
    enc: FactorEncoding,
    fact: &Factorization,
    [m, n]: [usize; 2],
    name: &str,
) -> Result<((Vec<u8>, Vec<f64>), (Vec<u8>, Vec<f64>))> {
    let r = fact.rank;
    let fail = || ConvertError::Tensor {
        path: Default::default(),
        tensor: name.to_string(),
        reason: format!("cannot store factors as {enc}"),
    };
    let (u, vt) = (fact.u.to_f64(), fact.vt.to_f64());
    let u_bytes = enc.encode_u(&u, m, r).ok_or_else(fail)?;
    let vt_bytes = enc.encode_vt(&vt, r, n).ok_or_else(fail)?;
    let back = |bytes: &[u8], is_u: bool| -> Vec<f64> {
        match enc {
            FactorEncoding::Float(d) => decode_f64(d, bytes).unwrap_or_default(),
            FactorEncoding::Quant(_) => {
                let v = if is_u {
                    enc.decode_u(bytes, m, r)
                } else {
                    enc.decode_vt(bytes, r, n)
                };
                v.unwrap_or_default().into_iter().map(f64::from).collect()
            }
        }
    };
    let (u_back, vt_back) = (back(&u_bytes, true), back(&vt_bytes, false));
    Ok(((u_bytes, u_back), (vt_bytes, vt_back)))
}

/// Merges `adapter` into the checkpoint at `base`, writing a new CERSA directory `out`.
/// Once `cancel` is set no further tensor starts, nothing is left at `out` and the result
/// is [`ConvertError::Interrupted`].
pub fn merge(
    base: &Path,
    adapter_path: &Path,
    out: &Path,
    opts: &MergeOptions,
    cancel: &AtomicBool,
) -> Result<MergeReport> {
    let ckpt = Checkpoint::open(base)?;
    let adapter = Adapter::read(adapter_path)?;
    adapter.check_base(&ckpt)?;
    let cfg = &ckpt.manifest().config;
    let decomposer = match opts.algorithm {
        Some(route) => route.decomposer()?,
        None => Route::from_name(&cfg.algorithm)
            .ok_or_else(|| format!("unknown route `{}`", cfg.algorithm))
            .and_then(|route| route.decomposer().map_err(|e| e.to_string()))
            .map_err(|e| {
                ConvertError::Options(format!(
                    "{}: the base checkpoint was made with --algorithm {} ({e}); pass \
                     --algorithm to merge with another route",
                    base.display(),
                    cfg.algorithm
                ))
            })?,
    };
    let rule = RankRule {
        energy: cfg.energy,
        min_rank: cfg.min_rank,
        max_rank: cfg.max_rank,
        rank_multiple: cfg.rank_multiple,
    };
    let calibration = merge_calibration(&ckpt, &adapter, opts.calibration.as_deref())?;
    let staging = crate::convert::prepare_output(out, false, opts.overwrite)?;
    let tmp = &staging.partial;
    let job = MergeJob {
        ckpt: &ckpt,
        adapter: &adapter,
        adapter_path,
        rule: &rule,
        decomposer: decomposer.as_ref(),
        calibration: calibration.as_ref(),
        cancel,
    };
    match write_merged(&job, tmp) {
        Ok((manifest, layers)) => {
            crate::convert::commit(&staging, out)?;
            Ok(MergeReport {
                report_version: MERGE_REPORT_VERSION,
                out_dir: out.to_path_buf(),
                algorithm: decomposer.name().into(),
                layers,
                totals: manifest.totals,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(e)
        }
    }
}

/// What [`write_merged`] reads.
struct MergeJob<'a> {
    ckpt: &'a Checkpoint,
    adapter: &'a Adapter,
    adapter_path: &'a Path,
    rule: &'a RankRule,
    decomposer: &'a dyn Decomposer,
    calibration: Option<&'a Calibration>,
    cancel: &'a AtomicBool,
}

/// The statistics whitened adapted layers are re-truncated with: the file given, checked
/// to be the one the base recorded; an error before any work when one is needed and
/// missing, or does not match.
fn merge_calibration(
    ckpt: &Checkpoint,
    adapter: &Adapter,
    path: Option<&Path>,
) -> Result<Option<Calibration>> {
    let man = ckpt.manifest();
    let whitened = adapter.layers.keys().find(|name| {
        man.tensors
            .get(*name)
            .is_some_and(|t| t.whitening.is_some())
    });
    let manifest_path = ckpt.dir().join(cersa_loader::MANIFEST_FILE);
    let Some(path) = path else {
        return match whitened {
            None => Ok(None),
            Some(name) => Err(ConvertError::Tensor {
                path: manifest_path,
                tensor: name.clone(),
                reason: "its factors are whitened (convert --calibration): give merge \
                         --calibration, the statistics file the base was converted with, \
                         so the merged layer is re-truncated in the same output metric"
                    .into(),
            }),
        };
    };
    let Some(recorded) = man.config.calibration.as_ref() else {
        return Err(ConvertError::Options(format!(
            "--calibration {}: the base checkpoint {} was converted without calibration \
             statistics",
            path.display(),
            ckpt.dir().display()
        )));
    };
    let calib = Calibration::open(path, recorded.damping)?;
    if calib.config.sha256 != recorded.sha256 {
        return Err(ConvertError::Source {
            path: path.to_path_buf(),
            reason: format!(
                "not the calibration file the base was converted with (sha256 {}, the \
                 manifest records {})",
                calib.config.sha256, recorded.sha256
            ),
        });
    }
    Ok(Some(calib))
}

/// The whitener of adapted layer `name` when it is whitened.
fn layer_whitener(
    ckpt: &Checkpoint,
    calibration: Option<&Calibration>,
    name: &str,
    [m, n]: [usize; 2],
) -> Result<Option<Whitener>> {
    let man = ckpt.manifest();
    let Some(white) = man.tensors.get(name).and_then(|t| t.whitening.as_ref()) else {
        return Ok(None);
    };
    let fail = |path: &Path, reason: String| ConvertError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    // Checked before any work: a whitened adapted layer has statistics.
    let calib = calibration
        .ok_or_else(|| fail(ckpt.dir(), "whitened, but no calibration statistics".into()))?;
    let stats = calib.stats(name)?.ok_or_else(|| {
        fail(
            calib.path(),
            "whitened in the base, but the calibration file has no statistics for it".into(),
        )
    })?;
    let want = Whitener::dim_for(stats.axis, m, n);
    if stats.axis.number() != white.input_axis || stats.dim != want {
        return Err(fail(
            calib.path(),
            format!(
                "statistics of size {} on input axis {}, the base's whitening needs {want} \
                 on axis {}",
                stats.dim,
                stats.axis.number(),
                white.input_axis
            ),
        ));
    }
    let damping = man.config.calibration.as_ref().map_or(0.0, |c| c.damping);
    Whitener::new(&stats, damping)
        .map(Some)
        .map_err(|reason| fail(calib.path(), reason))
}

/// The bytes of dense tensor `name` (`dtype`, `bytes` as stored) with dense-base layer
/// `name` of the adapter folded in: W + left·right in f64, rounded once to `dtype`.
fn fold_dense(
    adapter: &Adapter,
    adapter_path: &Path,
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
) -> Result<(Vec<u8>, MergedLayer)> {
    let fail = |reason: String| ConvertError::Tensor {
        path: adapter_path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let info = &adapter.layers[name];
    let [m, n] = info.matrix_shape;
    // check_base made sure the base is a dense float [m, n] matrix.
    let mut w = decode_f64(dtype, bytes)
        .filter(|w| w.len() == m * n)
        .ok_or_else(|| {
            fail(format!(
                "the base stores it as {dtype}, not a float [{m}, {n}]"
            ))
        })?;
    let (left, right, q) = adapter.dense_update(name)?;
    for i in 0..m {
        let row = &mut w[i * n..(i + 1) * n];
        for p in 0..q {
            let c = left[i * q + p];
            row.iter_mut()
                .zip(&right[p * n..(p + 1) * n])
                .for_each(|(o, v)| *o += c * v);
        }
    }
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        return Err(fail(format!("the adapted matrix holds {v}")));
    }
    let out = encode_f64(dtype, &w).ok_or_else(|| fail(format!("cannot store it as {dtype}")))?;
    let back = decode_f64(dtype, &out).expect("just encoded");
    let norm2: f64 = w.iter().map(|x| x * x).sum();
    let err2: f64 = w.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
    let layer = MergedLayer {
        name: name.to_string(),
        old_rank: info.rank,
        new_rank: info.rank,
        energy: 1.0,
        rel_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
        output_rel_error: None,
        dense: true,
    };
    Ok((out, layer))
}

fn write_merged(job: &MergeJob, tmp: &Path) -> Result<(Manifest, Vec<MergedLayer>)> {
    let MergeJob {
        ckpt,
        adapter,
        adapter_path,
        rule,
        decomposer,
        calibration,
        cancel,
    } = *job;
    let mut manifest = ckpt.manifest().clone();
    // The base's side files (config.json, tokenizer files) travel with it.
    manifest.side_files = crate::side_files::carry_side_files(ckpt, tmp, true)?;
    let mut writer = CheckpointWriter::new(tmp, manifest.config.max_shard_size);
    let mut merged = Vec::new();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for name in &names {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        let view = ckpt.get(name)?;
        match (view, adapter.layers.contains_key(name)) {
            (TensorView::Dense(t), true) => {
                let (bytes, layer) = fold_dense(adapter, adapter_path, name, t.dtype, t.bytes)?;
                writer.begin_group(name, bytes.len() as u64)?;
                writer.write_tensor(name, t.dtype, t.shape, &bytes)?;
                merged.push(layer);
            }
            (TensorView::Dense(t), false) => {
                writer.begin_group(name, t.bytes.len() as u64)?;
                writer.write_tensor(name, t.dtype, t.shape, t.bytes)?;
            }
            // Stacked experts are never adapted: copied as they are.
            (TensorView::Experts(_), _) => {
                let stored = ckpt.stored_tensors(name)?;
                writer.begin_group(name, stored.iter().map(|(_, t)| t.bytes.len() as u64).sum())?;
                for (stored, t) in stored {
                    writer.write_tensor(&stored, t.dtype, t.shape, t.bytes)?;
                }
            }
            (TensorView::Factored(f), false) => {
                let total = (f.u.bytes.len() + f.s.bytes.len() + f.vt.bytes.len()) as u64;
                writer.begin_group(name, total)?;
                let (un, sn, vn) = cersa_loader::factor_names(name);
                for (stored, t) in [(un, f.u), (sn, f.s), (vn, f.vt)] {
                    writer.write_tensor(&stored, t.dtype, t.shape, t.bytes)?;
                }
            }
            (TensorView::Factored(f), true) => {
                let [m, n] = f.matrix_shape;
                // A whitened layer is re-truncated in its output metric: a plain
                // re-truncation would silently change what the rank means.
                let whitener = layer_whitener(ckpt, calibration, name, [m, n])?;
                let (left, right, q) = adapter.adapted_product(ckpt, name)?;
                // W' = left · right, f64, row-major [m, n].
                let mut w = vec![0f64; m * n];
                for i in 0..m {
                    let row = &mut w[i * n..(i + 1) * n];
                    for k in 0..q {
                        let c = left[i * q + k];
                        let r = &right[k * n..(k + 1) * n];
                        row.iter_mut().zip(r).for_each(|(o, v)| *o += c * v);
                    }
                }
                let data = FloatData::F64(w);
                // The rule that chose the base rank (a per-module rule, else the global one).
                let recorded = ckpt
                    .manifest()
                    .tensors
                    .get(name)
                    .and_then(|t| t.rule.as_deref());
                let tensor_rule = match recorded {
                    // A planned rank stays the rank the plan chose.
                    Some(PLAN_RULE) => ModuleRule::fixed_rank(f.rank),
                    Some(text) => ModuleRule::from_text(text)?.apply(rule),
                    None => rule.clone(),
                };
                let whitened = whitener
                    .as_ref()
                    .map(|w| FloatData::F64(w.whiten(&data, m, n)));
                let fact: Factorization = decomposer
                    .factorize(whitened.as_ref().unwrap_or(&data), m, n, &tensor_rule)
                    .map_err(|reason| ConvertError::Tensor {
                        path: adapter_path.to_path_buf(),
                        tensor: name.clone(),
                        reason: reason.to_string(),
                    })?;
                // Rank and energy are of the metric truncated in; the factors W's.
                let energy = energy_at(&fact.sigma, fact.norm2, fact.rank);
                let fact = match &whitener {
                    Some(w) => w.unwhiten(fact, m, n),
                    None => fact,
                };
                // Merged factors are stored as the base's were (dtype or quantization).
                let enc = f.encoding;
                let r = fact.rank;
                let ((u_bytes, u_back), (vt_bytes, vt_back)) = rounded(enc, &fact, [m, n], name)?;
                let s32: Vec<f32> = fact.s.iter().map(|&v| v as f32).collect();
                let s_back: Vec<f64> = s32.iter().map(|&v| f64::from(v)).collect();
                let s_bytes: Vec<u8> = s32.iter().flat_map(|v| v.to_le_bytes()).collect();
                let w_norm2: f64 = data.to_f64().iter().map(|x| x * x).sum();
                let res2 = residual_norm2(&data, m, n, &u_back, &s_back, &vt_back);
                let rel = if w_norm2 > 0.0 {
                    (res2 / w_norm2).sqrt()
                } else {
                    0.0
                };
                let whitening = match (&whitener, &whitened) {
                    (Some(w), Some(FloatData::F64(a))) => Some(cersa_loader::manifest::Whitening {
                        input_axis: w.axis().number(),
                        output_rel_error: w
                            .output_rel_error(a, m, n, &u_back, &s_back, &vt_back, res2, w_norm2),
                    }),
                    _ => None,
                };
                let total = (u_bytes.len() + s_bytes.len() + vt_bytes.len()) as u64;
                writer.begin_group(name, total)?;
                let (un, sn, vn) = cersa_loader::factor_names(name);
                let dtype = enc.stored_dtype();
                let u_shape = enc.u_shape(m, r).expect("encoded, so it fits");
                let vt_shape = enc.vt_shape(r, n).expect("encoded, so it fits");
                writer.write_tensor(&un, dtype, &u_shape, &u_bytes)?;
                writer.write_tensor(&sn, Dtype::F32, &[r], &s_bytes)?;
                writer.write_tensor(&vn, dtype, &vt_shape, &vt_bytes)?;
                if let Some(info) = manifest.tensors.get_mut(name) {
                    info.rank = Some(r);
                    info.energy = Some(energy);
                    info.rel_error = Some(rel);
                    info.whitening = whitening.clone();
                }
                merged.push(MergedLayer {
                    name: name.clone(),
                    old_rank: f.rank,
                    new_rank: r,
                    energy,
                    rel_error: rel,
                    output_rel_error: whitening.map(|w| w.output_rel_error),
                    dense: false,
                });
            }
        }
    }
    // Totals: only the factored tensors' stored sizes change.
    let (stored_params, stored_bytes) = manifest
        .tensors
        .values()
        .map(Stored::of)
        .fold((0, 0), |(p, b), s| (p + s.params, b + s.bytes));
    manifest.totals.stored_params = stored_params;
    manifest.totals.stored_bytes = stored_bytes;
    let adapter_bytes = cersa_loader::regular::read_regular(adapter_path)
        .map_err(|e| ConvertError::io(adapter_path, "read", e))?;
    let details = &mut manifest.source.details;
    details.insert(
        "merged_base_manifest_sha256".into(),
        manifest_sha256(ckpt.dir())?.into(),
    );
    details.insert(
        "merged_adapter_sha256".into(),
        hex(&Sha256::digest(&adapter_bytes)).into(),
    );
    details.insert("merged_algorithm".into(), decomposer.name().into());
    let manifest = writer.finish(manifest)?;
    Ok((manifest, merged))
}
