//! `cersa export --to peft`: a trained CERSA adapter as a PEFT LoRA adapter directory
//! (`adapter_config.json`, `adapter_model.safetensors`) for the `--to safetensors` export of
//! the same checkpoint without the adapter.
//!
//! The update ΔW = W' − U·diag(σ)·Vᵀ of each adapted layer is written exactly as
//! `lora_B · lora_A` (scaling 1: `lora_alpha` = rank per module), in the low-rank form each
//! mode has, never truncated:
//!
//! | mode | lora_B [m, q] | lora_A [q, n] | q |
//! |---|---|---|---|
//! | `scale` | U·diag(s' − σ) | Vᵀ | r |
//! | `core` | U·Bᵀ | Aᵀ·Vᵀ | k |
//! | `cersa` | U_t·(C − diag σ_t) | V_tᵀ | t |
//! | `factors` | [left, −U·diag σ] | [right; Vᵀ] | 2r |
//!
//! Module names are the tensor names without `.weight`. Layers are `nn.Linear` (weight
//! [out, in] = [m, n]: lora_B·lora_A = ΔW), except the `Conv1D` layers of GPT-2-style models
//! (`config.json`'s `model_type` `gpt2` or `openai-gpt`; modules `c_attn`, `c_proj`, `c_fc`,
//! `q_attn`), whose weight is [in, out]: PEFT adds (lora_B·lora_A)ᵀ to them
//! (`fan_in_fan_out`), so their lora_B is the table's lora_Aᵀ and lora_A its lora_Bᵀ.

use super::product;
use crate::error::{ConvertError, Result};
use cersa_loader::adapter::{Adapter, Base, Mode};
use cersa_loader::safetensors::serialize_header;
use cersa_loader::{Checkpoint, Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File names PEFT reads.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
/// The LoRA weights.
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// One exported LoRA module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeftModule {
    /// Module name (tensor name without `.weight`).
    pub module: String,
    /// CERSA adapter mode it came from.
    pub mode: String,
    /// LoRA rank q.
    pub rank: usize,
    /// A GPT-2-style `Conv1D` layer (weight [in, out]; PEFT's `fan_in_fan_out`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conv1d: bool,
}

/// `model_type`s of transformers models whose projection layers are `Conv1D`.
const CONV1D_MODEL_TYPES: &[&str] = &["gpt2", "openai-gpt"];

/// Whether the checkpoint's model (its `config.json` side file) holds `module` as a
/// transposed `Conv1D`.
fn is_conv1d(model_type: Option<&str>, module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    model_type.is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t))
        && matches!(last, "c_attn" | "c_proj" | "c_fc" | "q_attn")
}

/// `model_type` from the checkpoint's `config.json` side file, if it lists one (an unreadable
/// one is an error: guessing `nn.Linear` would write GPT-2's factors transposed).
fn model_type(ckpt: &Checkpoint) -> Result<Option<String>> {
    let config = super::gguf_hf::side_json(ckpt, "config.json")?;
    Ok(config.and_then(|c| c.get("model_type")?.as_str().map(str::to_owned)))
}

/// The result of `cersa export --to peft --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftReport {
    /// [`super::EXPORT_REPORT_VERSION`].
    pub report_version: u32,
    /// The output directory.
    pub out_dir: PathBuf,
    /// The modules, in name order.
    pub modules: Vec<PeftModule>,
}

/// ΔW of layer `name` as (lora_B [m, q], lora_A [q, n], q, mode name), f64 row-major.
fn low_rank_update(
    ckpt: &Checkpoint,
    adapter: &Adapter,
    name: &str,
) -> Result<(Vec<f64>, Vec<f64>, usize, &'static str)> {
    let fail = |reason: String| ConvertError::Tensor {
        path: ckpt.dir().to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let info = &adapter.layers[name];
    if info.base == Base::Dense {
        // ΔW is already the product of the adapter's basis and trained core.
        let (b, a, q) = adapter.dense_update(name)?;
        return Ok((b, a, q, info.mode.name()));
    }
    let TensorView::Factored(f) = ckpt.get(name)? else {
        return Err(fail("not factored in the checkpoint".into()));
    };
    let ([m, n], r) = (f.matrix_shape, f.rank);
    let (u, s, vt) = f
        .values_f64()
        .map_err(|what| fail(format!("cannot decode {what}")))?;
    let get = |suffix: &str, len: usize| -> Result<Vec<f64>> {
        let key = format!("{name}.{suffix}");
        match adapter.tensors.get(&key) {
            Some(v) if v.len() == len => Ok(v.iter().map(|&x| f64::from(x)).collect()),
            _ => Err(fail(format!("the adapter lacks {key} of {len} values"))),
        }
    };
    // U·M for an r×q matrix M (row-major).
    let u_times = |mm: &[f64], q: usize| product(&u, mm, m, r, q);
    Ok(match info.mode {
        Mode::Frozen => return Err(fail("the adapter layer is frozen".into())),
        Mode::Scale => {
            // U·diag(s' − σ): U's columns scaled.
            let s2 = get("adapter_s", r)?;
            let mut b = u.clone();
            for row in b.chunks_exact_mut(r) {
                row.iter_mut()
                    .zip(s2.iter().zip(&s))
                    .for_each(|(x, (a, o))| *x *= a - o);
            }
            (b, vt, r, "scale")
        }
        Mode::Core { k } => {
            let (a, b) = (get("adapter_a", r * k)?, get("adapter_b", k * r)?);
            // Bᵀ [r, k] and Aᵀ [k, r], so ΔW = (U·Bᵀ)·(Aᵀ·Vᵀ).
            let (bt, at) = (transpose(&b, k, r), transpose(&a, r, k));
            let at_vt = product(&at, &vt, k, r, n);
            (u_times(&bt, k), at_vt, k, "core")
        }
        Mode::Cersa { trainable: t } => {
            let c = get("adapter_c", t * t)?;
            // (C − diag σ_t) in the first t rows of an r×t matrix, so U·M = U_t·(C − diag σ_t).
            let mut mm = vec![0f64; r * t];
            for i in 0..t {
                for j in 0..t {
                    mm[i * t + j] = c[i * t + j] - if i == j { s[i] } else { 0.0 };
                }
            }
            (u_times(&mm, t), vt[..t * n].to_vec(), t, "cersa")
        }
        Mode::Factors => {
            let (left, right) = (get("adapter_left", m * r)?, get("adapter_right", r * n)?);
            let mut b = vec![0f64; m * 2 * r];
            for i in 0..m {
                for j in 0..r {
                    b[i * 2 * r + j] = left[i * r + j];
                    b[i * 2 * r + r + j] = -u[i * r + j] * s[j];
                }
            }
            let mut a = right;
            a.extend_from_slice(&vt);
            (b, a, 2 * r, "factors")
        }
    })
}

/// The transpose of a row-major [rows, cols] matrix.
fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// Writes the PEFT LoRA directory of `adapter_path` (trained on the checkpoint at `dir`)
/// to `out`, which must not exist or be empty.
pub fn export_peft(dir: &Path, adapter_path: &Path, out: &Path) -> Result<PeftReport> {
    let ckpt = Checkpoint::open(dir)?;
    let adapter = Adapter::read(adapter_path)?;
    adapter.check_base(&ckpt)?;
    let model_type = model_type(&ckpt)?;
    let mut modules = Vec::new();
    let mut entries = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, info) in &adapter.layers {
        if info.mode == Mode::Frozen {
            continue;
        }
        let module = name
            .strip_suffix(".weight")
            .ok_or_else(|| ConvertError::Tensor {
                path: adapter_path.to_path_buf(),
                tensor: name.clone(),
                reason: "a PEFT module's weight must be named MODULE.weight".into(),
            })?;
        let (b, a, q, mode) = low_rank_update(&ckpt, &adapter, name)?;
        let [m, n] = info.matrix_shape;
        let conv1d = is_conv1d(model_type.as_deref(), module);
        let (a, b, a_shape, b_shape) = match conv1d {
            // W [in, out] = [m, n] takes (lora_B·lora_A)ᵀ: lora_B = Aᵀ [n, q], lora_A = Bᵀ [q, m].
            true => (transpose(&b, m, q), transpose(&a, q, n), [q, m], [n, q]),
            false => (a, b, [q, n], [m, q]),
        };
        for (suffix, values, shape) in [("lora_A", a, a_shape), ("lora_B", b, b_shape)] {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            let key = format!("base_model.model.{module}.{suffix}.weight");
            entries.push((key, Dtype::F32, shape.to_vec(), bytes.len()));
            data.extend_from_slice(&bytes);
        }
        modules.push(PeftModule {
            module: module.to_string(),
            mode: mode.into(),
            rank: q,
            conv1d,
        });
    }
    if modules.is_empty() {
        return Err(ConvertError::Options(format!(
            "{}: no trainable layer in the adapter: nothing to export",
            adapter_path.display()
        )));
    }
    super::write_staged(out, |tmp| {
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut file = serialize_header(&metadata, &entries);
        file.extend_from_slice(&data);
        let path = tmp.join(PEFT_WEIGHTS_FILE);
        std::fs::write(&path, &file).map_err(|e| ConvertError::io(&path, "write", e))?;
        let path = tmp.join(PEFT_CONFIG_FILE);
        let text = serde_json::to_vec_pretty(&peft_config(&modules)).expect("json serializes");
        std::fs::write(&path, text).map_err(|e| ConvertError::io(&path, "write", e))?;
        Ok(())
    })?;
    Ok(PeftReport {
        report_version: super::EXPORT_REPORT_VERSION,
        out_dir: out.to_path_buf(),
        modules,
    })
}

/// `adapter_config.json`: LoRA with each module's own rank and `lora_alpha` = rank (scaling
/// 1), so PEFT adds exactly lora_B·lora_A.
fn peft_config(modules: &[PeftModule]) -> serde_json::Value {
    let ranks: BTreeMap<&str, usize> = modules.iter().map(|m| (&*m.module, m.rank)).collect();
    let r = modules.iter().map(|m| m.rank).max().unwrap_or(1);
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": ranks.keys().collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        // PEFT takes it per module type anyway; said here so it does not warn.
        "fan_in_fan_out": modules.iter().any(|m| m.conv1d),
        "use_rslora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
    })
}
