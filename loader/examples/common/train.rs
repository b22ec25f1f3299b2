//! The synthetic fine-tuning task shared by `examples/finetune.rs` and its test:
//! regress the outputs of the same MLP with every weight perturbed inside its principal
//! subspace (W* = W + U_r·E·V_rᵀ, E of rank ≤ k), training only the CERSA adaptation.

use cersa_loader::adapter::Mode;
use cersa_loader::candle::candle_core::{DType, Device, Result, Tensor};
use cersa_loader::candle::candle_nn::{self, AdamW, Module, Optimizer, ParamsAdamW, VarMap};
use cersa_loader::candle::CersaLinear;
use cersa_loader::Checkpoint;

use super::synthetic::Rng;

/// The model: factored layers (in order) with ReLU between them.
pub struct Mlp {
    pub layers: Vec<CersaLinear>,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Builds the model from the factored `PREFIX.weight` / `PREFIX.bias` of `ckpt`.
pub fn build(
    ckpt: &Checkpoint,
    prefixes: &[&str],
    mode: Mode,
    device: &Device,
    varmap: &VarMap,
) -> Result<Mlp> {
    let vb = ckpt.to_candle(device, Some(DType::F32));
    let layers = prefixes
        .iter()
        .map(|p| {
            let bias = format!("{p}.bias");
            let has_bias = ckpt.manifest().tensors.contains_key(&bias);
            CersaLinear::new(
                &vb,
                &format!("{p}.weight"),
                has_bias.then_some(bias.as_str()),
                mode,
                varmap,
            )
        })
        .collect::<Result<_>>()?;
    Ok(Mlp { layers })
}

/// The teacher: dense W* = Ŵ + U_r·E·V_rᵀ per layer (E random of rank `k`, scale
/// `strength` relative to σ₁; `k = 0`: E diagonal, σ scaled by 1 + strength·N(0, 1)),
/// as plain dense matmuls.
pub struct Teacher {
    weights: Vec<(Tensor, Option<Tensor>)>,
}

impl Teacher {
    pub fn new(
        ckpt: &Checkpoint,
        prefixes: &[&str],
        k: usize,
        strength: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let vb = ckpt.to_candle(device, Some(DType::F32));
        let mut weights = Vec::new();
        for p in prefixes {
            let f = vb.factors(&format!("{p}.weight"))?;
            let (_, r) = f.u.dims2()?;
            let s1 = f64::from(f.s.get(0)?.to_scalar::<f32>()?);
            let e1 = Tensor::from_vec(rng.normals(r * k, 1.0), (r, k), device)?;
            let e2 = Tensor::from_vec(rng.normals(k * r, 1.0), (k, r), device)?;
            let e = if k == 0 {
                // Spectrum change only: E = diag(σ ⊙ strength·N(0, 1)).
                let g = Tensor::from_vec(rng.normals(r, strength), r, device)?;
                let d = (f.s.clone() * g)?;
                Tensor::eye(r, DType::F32, device)?.broadcast_mul(&d.reshape((1, r))?)?
            } else {
                (e1.matmul(&e2)? * (strength * s1 / (r as f64 * k as f64).sqrt()))?
            };
            let base = f.u.broadcast_mul(&f.s.reshape((1, r))?)?.matmul(&f.vt)?;
            let w = (base + f.u.matmul(&e)?.matmul(&f.vt)?)?;
            let bias = format!("{p}.bias");
            let b = if ckpt.manifest().tensors.contains_key(&bias) {
                Some(vb.dense(&bias)?)
            } else {
                None
            };
            weights.push((w, b));
        }
        Ok(Teacher { weights })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.weights.iter().enumerate() {
            h = h.matmul(&w.t()?)?;
            if let Some(b) = b {
                h = h.broadcast_add(b)?;
            }
            if i + 1 < self.weights.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Trains `model` (its `varmap`) with AdamW for `steps` on fresh batches; returns the
/// loss of every step.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Mlp,
    teacher: &Teacher,
    varmap: &VarMap,
    steps: usize,
    lr: f64,
    batch: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<f32>> {
    let n = model
        .layers
        .first()
        .map_or(0, |l| l.layer_info().matrix_shape[1]);
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(seed);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let x = Tensor::from_vec(rng.normals(batch * n, 1.0), (batch, n), device)?;
        let target = teacher.forward(&x)?;
        let loss = candle_nn::loss::mse(&model.forward(&x)?, &target)?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(losses)
}
