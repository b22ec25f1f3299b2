//! `cersa merge`: folds a trained adapter into its base CERSA checkpoint.
//!
//! For every adapted layer the adapted matrix W' (see `cersa_loader::adapter`) is formed
//! in f64 and re-decomposed by the same route as `convert` (faer thin SVD, sign rule),
//! truncated by the base checkpoint's own rank rule (`config.energy`, clamps, multiple),
//! rounded to the base factor dtype. Every other tensor is copied byte for byte. The
//! output is written into a temporary sibling and renamed into place.

use crate::decompose::rank::{energy_at, RankRule};
use crate::decompose::svd::residual_norm2;
use crate::decompose::{Decomposer, Factorization};
use crate::error::{ConvertError, Result};
use crate::input::FloatData;
use cersa_loader::adapter::{manifest_sha256, Adapter};
use cersa_loader::dtype::{decode_f64, encode_f64};
use cersa_loader::writer::hex;
use cersa_loader::{Checkpoint, CheckpointWriter, Dtype, Manifest, TensorView};
use sha2::{Digest, Sha256};
use std::path::Path;

/// What `merge` did, per adapted layer: (name, old rank, new rank, energy, rel_error).
#[derive(Debug, Clone, PartialEq)]
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
}

fn rounded(dtype: Dtype, values: &[f64], name: &str) -> Result<(Vec<u8>, Vec<f64>)> {
    let bytes = encode_f64(dtype, values).ok_or_else(|| ConvertError::Tensor {
        path: Default::default(),
        tensor: name.to_string(),
        reason: format!("cannot store factors as {dtype}"),
    })?;
    let back = decode_f64(dtype, &bytes).unwrap_or_default();
    Ok((bytes, back))
}

/// Merges `adapter` into the checkpoint at `base`, writing a new CERSA directory `out`.
pub fn merge(
    base: &Path,
    adapter_path: &Path,
    out: &Path,
    decomposer: &dyn Decomposer,
) -> Result<(Manifest, Vec<MergedLayer>)> {
    let ckpt = Checkpoint::open(base)?;
    let adapter = Adapter::read(adapter_path)?;
    adapter.check_base(&ckpt)?;
    let cfg = &ckpt.manifest().config;
    let rule = RankRule {
        energy: cfg.energy,
        min_rank: cfg.min_rank,
        max_rank: cfg.max_rank,
        rank_multiple: cfg.rank_multiple,
    };
    let (tmp, _) = crate::convert::prepare_output(out, false)?;
    let result = write_merged(&ckpt, &adapter, adapter_path, &tmp, &rule, decomposer);
    match result {
        Ok(done) => {
            crate::convert::commit(&tmp, out)?;
            Ok(done)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_merged(
    ckpt: &Checkpoint,
    adapter: &Adapter,
    adapter_path: &Path,
    tmp: &Path,
    rule: &RankRule,
    decomposer: &dyn Decomposer,
) -> Result<(Manifest, Vec<MergedLayer>)> {
    let mut manifest = ckpt.manifest().clone();
    let mut writer = CheckpointWriter::new(tmp, manifest.config.max_shard_size);
    let mut merged = Vec::new();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for name in &names {
        let view = ckpt.get(name)?;
        match (view, adapter.layers.contains_key(name)) {
            (TensorView::Dense(t), _) => {
                writer.begin_group(name, t.bytes.len() as u64)?;
                writer.write_tensor(name, t.dtype, t.shape, t.bytes)?;
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
                let fact: Factorization =
                    decomposer.factorize(&data, m, n, rule).map_err(|reason| {
                        ConvertError::Tensor {
                            path: adapter_path.to_path_buf(),
                            tensor: name.clone(),
                            reason: reason.to_string(),
                        }
                    })?;
                let dtype = f.u.dtype;
                let r = fact.rank;
                let (u_bytes, u_back) = rounded(dtype, &fact.u.to_f64(), name)?;
                let (vt_bytes, vt_back) = rounded(dtype, &fact.vt.to_f64(), name)?;
                let s32: Vec<f32> = fact.s.iter().map(|&v| v as f32).collect();
                let s_back: Vec<f64> = s32.iter().map(|&v| f64::from(v)).collect();
                let s_bytes: Vec<u8> = s32.iter().flat_map(|v| v.to_le_bytes()).collect();
                let rel = if fact.norm2 > 0.0 {
                    (residual_norm2(&data, m, n, &u_back, &s_back, &vt_back) / fact.norm2).sqrt()
                } else {
                    0.0
                };
                let energy = energy_at(&fact.sigma, fact.norm2, r);
                let total = (u_bytes.len() + s_bytes.len() + vt_bytes.len()) as u64;
                writer.begin_group(name, total)?;
                let (un, sn, vn) = cersa_loader::factor_names(name);
                writer.write_tensor(&un, dtype, &[m, r], &u_bytes)?;
                writer.write_tensor(&sn, Dtype::F32, &[r], &s_bytes)?;
                writer.write_tensor(&vn, dtype, &[r, n], &vt_bytes)?;
                if let Some(info) = manifest.tensors.get_mut(name) {
                    info.rank = Some(r);
                    info.energy = Some(energy);
                    info.rel_error = Some(rel);
                }
                merged.push(MergedLayer {
                    name: name.clone(),
                    old_rank: f.rank,
                    new_rank: r,
                    energy,
                    rel_error: rel,
                });
            }
        }
    }
    // Totals: only the factored tensors' stored sizes change.
    let mut stored_params = 0u64;
    let mut stored_bytes = 0u64;
    for (name, info) in &manifest.tensors {
        match (info.matrix_shape, info.rank) {
            (Some([m, n]), Some(r)) => {
                let elems = (r * (m + n)) as u64;
                stored_params += elems + r as u64;
                stored_bytes += elems * info.stored_dtype.size() as u64 + 4 * r as u64;
            }
            _ => {
                let numel: u64 = info.shape.iter().map(|&d| d as u64).product();
                stored_params += numel;
                let dense = ckpt.get(name)?;
                if let TensorView::Dense(t) = dense {
                    stored_bytes += t.bytes.len() as u64;
                }
            }
        }
    }
    manifest.totals.stored_params = stored_params;
    manifest.totals.stored_bytes = stored_bytes;
    let adapter_bytes =
        std::fs::read(adapter_path).map_err(|e| ConvertError::io(adapter_path, "read", e))?;
    let details = &mut manifest.source.details;
    details.insert(
        "merged_base_manifest_sha256".into(),
        manifest_sha256(ckpt.dir())?.into(),
    );
    details.insert(
        "merged_adapter_sha256".into(),
        hex(&Sha256::digest(&adapter_bytes)).into(),
    );
    let manifest = writer.finish(manifest)?;
    Ok((manifest, merged))
}
