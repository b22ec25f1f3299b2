//! Trainer integration with [candle](https://github.com/huggingface/candle) (feature
//! `candle`; `cuda` adds `Device::Cuda`).
//!
//! - [`Checkpoint::to_candle`] gives a [`CersaVarBuilder`]: the stored tensors as candle
//!   `Tensor`s on a device, dense tensors as themselves, factored ones as their factors.
//!   Candle tensors own their storage, so each tensor is copied once out of the mapped shard
//!   (a plain copy when the requested dtype is the stored one, a conversion otherwise).
//! - [`CersaLinear`] implements `candle_nn::Module` as y = ((x·V_r) ⊙ σ)·U_rᵀ + b, in
//!   that order (W is never formed), in one of the [`Mode`]s; trainable parameters live
//!   in a `candle_nn::VarMap`, so any candle optimizer (e.g. `AdamW`) trains them.
//! - [`CersaLinear::dense_base`] builds a layer the checkpoint keeps dense from its W and
//!   the basis a dense-base adapter carries (x·Wᵀ + x·V_r·ΔMᵀ·U_rᵀ; no SVD here, so the
//!   basis comes from the trainer that computed it, e.g. `cersa_torch.load_hf`).
//! - [`adapter_from_varmap`] / [`load_adapter_into`] save and restore the trained part
//!   as an adapter file (see [`crate::adapter`]).

use crate::adapter::{manifest_sha256, Adapter, Base, LayerInfo, Mode};
use crate::checkpoint::{Checkpoint, RawTensor, TensorView};
use crate::dtype::Dtype;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::BTreeMap;

pub use candle_core;
pub use candle_nn;

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The candle dtype of a stored dtype, where candle has one.
pub fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// Tensors of a checkpoint as candle tensors on one device, optionally cast to one dtype.
#[derive(Debug, Clone, Copy)]
pub struct CersaVarBuilder<'a> {
    ckpt: &'a Checkpoint,
    device: &'a Device,
    dtype: Option<DType>,
}

/// The factors of a factored tensor as candle tensors.
#[derive(Debug, Clone)]
pub struct CandleFactors {
    /// U_r, [m, r].
    pub u: Tensor,
    /// σ_r, [r].
    pub s: Tensor,
    /// V_rᵀ, [r, n].
    pub vt: Tensor,
}

impl Checkpoint {
    /// Candle access to this checkpoint on `device`. `dtype`: cast float tensors to it
    /// (`None` keeps the stored dtypes; integer tensors always keep theirs).
    pub fn to_candle<'a>(
        &'a self,
        device: &'a Device,
        dtype: Option<DType>,
    ) -> CersaVarBuilder<'a> {
        CersaVarBuilder {
            ckpt: self,
            device,
            dtype,
        }
    }
}

impl<'a> CersaVarBuilder<'a> {
    /// The checkpoint.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// The device.
    pub fn device(&self) -> &'a Device {
        self.device
    }

    fn load(&self, name: &str, t: RawTensor<'_>) -> Result<Tensor> {
        let stored = candle_dtype(t.dtype).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "{name}: dtype {} has no candle equivalent",
                t.dtype
            ))
        })?;
        let tensor = Tensor::from_raw_buffer(t.bytes, stored, t.shape, self.device)?;
        match self.dtype {
            Some(d) if d != stored && stored.is_float() => tensor.to_dtype(d),
            _ => Ok(tensor),
        }
    }

    /// A dense tensor with its manifest shape.
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        match self.ckpt.get(name).map_err(wrap)? {
            TensorView::Dense(t) => self.load(name, t),
            TensorView::Factored(_) => candle_core::bail!("{name} is factored; use factors()"),
            TensorView::Experts(_) => candle_core::bail!("{name} holds experts; use expert()"),
        }
    }

    /// The factors of a factored tensor.
    pub fn factors(&self, name: &str) -> Result<CandleFactors> {
        match self.ckpt.get(name).map_err(wrap)? {
            TensorView::Factored(f) => self.load_factors(name, &f),
            TensorView::Dense(_) => candle_core::bail!("{name} is stored dense; use dense()"),
            TensorView::Experts(_) => candle_core::bail!("{name} holds experts; use expert()"),
        }
    }

    /// Expert `e` of stacked experts tensor `name` (format revision 1.3), read without the
    /// other experts: its dense `[d1, d2, …]` tensor or its factors.
    pub fn expert(&self, name: &str, e: usize) -> Result<CandleExpert> {
        let stored = crate::manifest::expert_name(name, e);
        match self.ckpt.expert(name, e).map_err(wrap)? {
            TensorView::Dense(t) => Ok(CandleExpert::Dense(self.load(&stored, t)?)),
            TensorView::Factored(f) => Ok(CandleExpert::Factored(self.load_factors(&stored, &f)?)),
            TensorView::Experts(_) => candle_core::bail!("{stored}: experts do not nest"),
        }
    }

    fn load_factors(
        &self,
        name: &str,
        f: &crate::checkpoint::Factors<'_>,
    ) -> Result<CandleFactors> {
        if f.encoding.quant().is_none() {
            return Ok(CandleFactors {
                u: self.load(name, f.u)?,
                s: self.load(name, f.s)?,
                vt: self.load(name, f.vt)?,
            });
        }
        // Quantized factors are dequantized at load into the compute dtype (f32 unless the
        // builder says otherwise).
        let [m, n] = f.matrix_shape;
        let (u, _, vt) = f.values().map_err(|what| {
            candle_core::Error::msg(format!("{name}: {what} cannot be dequantized"))
        })?;
        let to = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
            let t = Tensor::from_vec(v, shape, self.device)?;
            match self.dtype {
                Some(d) if d != DType::F32 => t.to_dtype(d),
                _ => Ok(t),
            }
        };
        Ok(CandleFactors {
            u: to(u, &[m, f.rank])?,
            s: self.load(name, f.s)?,
            vt: to(vt, &[f.rank, n])?,
        })
    }

    /// Every stored tensor by its stored name (`NAME`, `NAME.cersa_u/_s/_vt`, and each
    /// expert's `NAME.cersa_expert.e[.cersa_u/_s/_vt]`), factors in the plain layout
    /// (`[m, r]`, `[r]`, `[r, n]`; quantized factors dequantized).
    pub fn all(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let mut insert_factors = |stored: &str, f: CandleFactors| {
            let (u, s, vt) = crate::factor_names(stored);
            out.insert(u, f.u);
            out.insert(s, f.s);
            out.insert(vt, f.vt);
        };
        let mut dense = BTreeMap::new();
        for name in self.ckpt.names() {
            match self.ckpt.get(name).map_err(wrap)? {
                TensorView::Dense(t) => {
                    dense.insert(name.to_string(), self.load(name, t)?);
                }
                TensorView::Factored(_) => insert_factors(name, self.factors(name)?),
                TensorView::Experts(count) => {
                    for e in 0..count {
                        let stored = crate::manifest::expert_name(name, e);
                        match self.expert(name, e)? {
                            CandleExpert::Dense(t) => {
                                dense.insert(stored, t);
                            }
                            CandleExpert::Factored(f) => insert_factors(&stored, f),
                        }
                    }
                }
            }
        }
        out.extend(dense);
        Ok(out)
    }
}

/// One expert of a stacked experts tensor, as [`CersaVarBuilder::expert`] loads it.
#[derive(Debug, Clone)]
pub enum CandleExpert {
    /// Stored dense: the `[d1, d2, …]` slice.
    Dense(Tensor),
    /// Stored as factors.
    Factored(CandleFactors),
}

/// Dense `bias` (if given) of `vb` as an [m] tensor of `dtype`.
fn load_bias(
    vb: &CersaVarBuilder<'_>,
    bias: Option<&str>,
    dtype: DType,
    m: usize,
) -> Result<Option<Tensor>> {
    bias.map(|b| vb.dense(b)?.to_dtype(dtype)?.reshape(m))
        .transpose()
}

/// Deterministic N(0, 1/r) start for the core's A (B starts at zero, so ΔM = 0): a
/// splitmix64 stream seeded by the layer name, so runs are reproducible without a global RNG.
fn core_a_init(name: &str, r: usize, k: usize) -> Vec<f32> {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let scale = 1.0 / (r as f64).sqrt();
    (0..r * k)
        .map(|_| {
            // Box–Muller; 1 − u keeps the log argument in (0, 1].
            let (u1, u2) = (1.0 - next(), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * scale) as f32
        })
        .collect()
}

/// Names of a layer's variables in the `VarMap` (same as the adapter file's tensors).
fn var_name(layer: &str, what: &str) -> String {
    format!("{layer}.adapter_{what}")
}

fn insert_var(varmap: &VarMap, name: String, value: &Tensor) -> Result<Tensor> {
    let var = Var::from_tensor(value)?;
    let t = var.as_tensor().clone();
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
    if data.contains_key(&name) {
        candle_core::bail!("{name} is already in the VarMap");
    }
    data.insert(name, var);
    Ok(t)
}

/// A linear layer over a factored weight: y = ((x·V_r) ⊙ σ)·U_rᵀ + b, adapted per [`Mode`].
#[derive(Debug, Clone)]
pub struct CersaLinear {
    name: String,
    mode: Mode,
    rank: usize,
    matrix_shape: [usize; 2],
    /// V_r [n, r] (frozen; absent in `factors` mode).
    v: Option<Tensor>,
    /// U_rᵀ [r, m] (frozen; absent in `factors` mode).
    ut: Option<Tensor>,
    /// σ_r [r]: frozen, or the trainable variable in `scale` mode.
    s: Option<Tensor>,
    /// `core`: A [r, k], B [k, r] (variables).
    ab: Option<(Tensor, Tensor)>,
    /// `factors`: left = U·√σ [m, r], right = √σ·Vᵀ [r, n] (variables).
    lr: Option<(Tensor, Tensor)>,
    /// `cersa`: the leading t×t block of the core C (variable, initialized to diag σ₁..t).
    core: Option<Tensor>,
    bias: Option<Tensor>,
    /// A dense-base layer ([`CersaLinear::dense_base`]): Wᵀ [n, m] (frozen) and the σ_r
    /// the core starts from; the layer adds x·V_r·ΔMᵀ·U_rᵀ to x·Wᵀ.
    dense: Option<(Tensor, Tensor)>,
}

impl CersaLinear {
    /// Builds the layer for factored `weight` (and dense `bias`, if given) of `vb`,
    /// registering its trainable parameters in `varmap` under `WEIGHT.adapter_*`.
    /// Compute dtype: the builder's dtype, else F32.
    pub fn new(
        vb: &CersaVarBuilder<'_>,
        weight: &str,
        bias: Option<&str>,
        mode: Mode,
        varmap: &VarMap,
    ) -> Result<Self> {
        let dtype = vb.dtype.unwrap_or(DType::F32);
        let f = vb.factors(weight)?;
        let (u, s, vt) = (
            f.u.to_dtype(dtype)?,
            f.s.to_dtype(dtype)?,
            f.vt.to_dtype(dtype)?,
        );
        let (m, _) = u.dims2()?;
        let (_, n) = vt.dims2()?;
        let bias = load_bias(vb, bias, dtype, m)?;
        Self::build(
            weight,
            mode,
            [m, n],
            bias,
            None,
            (u, s, vt),
            varmap,
            vb.device,
        )
    }

    /// Builds the layer for `weight` stored dense in `vb`'s checkpoint and adapted by the
    /// dense-base layer of `adapter` of that name (see [`crate::adapter`]): the frozen W
    /// plus the mode's core in the basis the adapter carries (the loader computes no SVD).
    /// The trainable parameters start at ΔM = 0; [`load_adapter_into`] sets the trained ones.
    pub fn dense_base(
        vb: &CersaVarBuilder<'_>,
        weight: &str,
        bias: Option<&str>,
        adapter: &Adapter,
        varmap: &VarMap,
    ) -> Result<Self> {
        let dtype = vb.dtype.unwrap_or(DType::F32);
        let info = adapter
            .layers
            .get(weight)
            .filter(|i| i.base == Base::Dense)
            .ok_or_else(|| {
                candle_core::Error::msg(format!("{weight}: not a dense-base layer of the adapter"))
            })?;
        let ([m, n], r) = (info.matrix_shape, info.rank);
        let w = vb.dense(weight)?.to_dtype(dtype)?;
        if w.elem_count() != m * n {
            candle_core::bail!(
                "{weight}: dense {:?}, the adapter's matrix is [{m}, {n}]",
                w.dims()
            );
        }
        let basis = |what: &str, shape: &[usize]| -> Result<Tensor> {
            let t = var_name(weight, what);
            let values = adapter
                .tensors
                .get(&t)
                .ok_or_else(|| candle_core::Error::msg(format!("adapter has no tensor {t}")))?;
            Tensor::from_slice(values, shape, vb.device)?.to_dtype(dtype)
        };
        let (u, s, vt) = (
            basis("u", &[m, r])?,
            basis("sigma", &[r])?,
            basis("vt", &[r, n])?,
        );
        let bias = load_bias(vb, bias, dtype, m)?;
        let dense = Some((w.reshape((m, n))?.t()?.contiguous()?, s.clone()));
        Self::build(
            weight,
            info.mode,
            [m, n],
            bias,
            dense,
            (u, s, vt),
            varmap,
            vb.device,
        )
    }

    /// A layer of `mode` over the basis (U [m, r], σ [r], Vᵀ [r, n]), with the frozen dense
    /// part (Wᵀ, σ) of a dense-base layer, its variables registered in `varmap`.
    #[allow(clippy::too_many_arguments)]
    fn build(
        weight: &str,
        mode: Mode,
        matrix_shape: [usize; 2],
        bias: Option<Tensor>,
        dense: Option<(Tensor, Tensor)>,
        (u, s, vt): (Tensor, Tensor, Tensor),
        varmap: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        let mut layer = CersaLinear {
            name: weight.to_string(),
            mode,
            rank: s.elem_count(),
            matrix_shape,
            v: None,
            ut: None,
            s: None,
            ab: None,
            lr: None,
            core: None,
            bias,
            dense,
        };
        layer.init_mode(u, s, vt, varmap, device)?;
        Ok(layer)
    }

    /// The mode's frozen tensors and variables from U [m, r], σ [r], Vᵀ [r, n].
    fn init_mode(
        &mut self,
        u: Tensor,
        s: Tensor,
        vt: Tensor,
        varmap: &VarMap,
        device: &Device,
    ) -> Result<()> {
        let (mode, r, weight) = (self.mode, self.rank, self.name.clone());
        let weight = weight.as_str();
        let dtype = u.dtype();
        let layer = self;
        if layer.dense.is_some()
            && !matches!(mode, Mode::Scale | Mode::Core { .. } | Mode::Cersa { .. })
        {
            candle_core::bail!(
                "{weight}: mode {} cannot adapt a dense base layer",
                mode.name()
            );
        }
        if mode == Mode::Factors {
            let root = s.sqrt()?;
            let left = u.broadcast_mul(&root.reshape((1, r))?)?;
            let right = vt.broadcast_mul(&root.reshape((r, 1))?)?;
            layer.lr = Some((
                insert_var(varmap, var_name(weight, "left"), &left)?,
                insert_var(varmap, var_name(weight, "right"), &right)?,
            ));
            return Ok(());
        }
        layer.v = Some(vt.t()?.contiguous()?);
        layer.ut = Some(u.t()?.contiguous()?);
        layer.s = Some(match mode {
            Mode::Scale => insert_var(varmap, var_name(weight, "s"), &s)?,
            _ => s,
        });
        if let Mode::Cersa { trainable: t } = mode {
            if t == 0 || t > r {
                candle_core::bail!("{weight}: trainable core block {t} outside 1..={r}");
            }
            let lead = layer
                .s
                .as_ref()
                .ok_or_else(|| unexpected(weight))?
                .narrow(0, 0, t)?;
            let diag = Tensor::eye(t, lead.dtype(), lead.device())?
                .broadcast_mul(&lead.reshape((1, t))?)?;
            layer.core = Some(insert_var(varmap, var_name(weight, "c"), &diag)?);
        }
        if let Mode::Core { k } = mode {
            if k == 0 || k > r {
                candle_core::bail!("{weight}: core k = {k} outside 1..={r}");
            }
            let a = Tensor::from_vec(core_a_init(weight, r, k), (r, k), device)?;
            let b = Tensor::zeros((k, r), DType::F32, device)?;
            layer.ab = Some((
                insert_var(varmap, var_name(weight, "a"), &a.to_dtype(dtype)?)?,
                insert_var(varmap, var_name(weight, "b"), &b.to_dtype(dtype)?)?,
            ));
        }
        Ok(())
    }

    /// The weight's source name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The adaptation mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The layer's entry in an adapter's metadata.
    pub fn layer_info(&self) -> LayerInfo {
        LayerInfo {
            mode: self.mode,
            rank: self.rank,
            matrix_shape: self.matrix_shape,
            base: match self.dense {
                Some(_) => Base::Dense,
                None => Base::Factored,
            },
        }
    }

    /// The frozen tensors (V_r, U_rᵀ, σ except in `scale` mode, and a dense base's Wᵀ and
    /// starting σ): what training must leave untouched.
    pub fn frozen_tensors(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = self.v.iter().chain(&self.ut).cloned().collect();
        if let Some((wt, s0)) = &self.dense {
            out.extend([wt.clone(), s0.clone()]);
        }
        if !matches!(self.mode, Mode::Scale | Mode::Factors) {
            out.extend(self.s.iter().cloned());
        }
        out
    }
}

fn unexpected(name: &str) -> candle_core::Error {
    candle_core::Error::msg(format!("{name}: layer tensors missing for its mode"))
}

impl candle_nn::Module for CersaLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [m, n] = self.matrix_shape;
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("{}: input is a scalar", self.name);
        };
        if last != n {
            candle_core::bail!("{}: input width {last}, expected {n}", self.name);
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, n))?;
        let y = if let Some((left, right)) = &self.lr {
            x2.matmul(&right.t()?)?.matmul(&left.t()?)?
        } else {
            let (v, ut, s) = match (&self.v, &self.ut, &self.s) {
                (Some(v), Some(ut), Some(s)) => (v, ut, s),
                _ => return Err(unexpected(&self.name)),
            };
            let t = x2.matmul(v)?; // x·V_r [rows, r]
            if let Some((wt, s0)) = &self.dense {
                return self.finish(self.dense_forward(&x2, &t, wt, s0, ut, s)?, lead, m);
            }
            let mut z = t.broadcast_mul(s)?; // ⊙ σ
            if let Some((a, b)) = &self.ab {
                z = (z + t.matmul(a)?.matmul(b)?)?; // + x·V_r·A·B
            }
            if let Some(c) = &self.core {
                // z = x·V_r·Cᵀ: the leading block through C's trained block, the rest ⊙ σ.
                let tb = c.dims()[0];
                let lead = t.narrow(1, 0, tb)?.matmul(&c.t()?)?;
                z = if tb == self.rank {
                    lead
                } else {
                    Tensor::cat(&[&lead, &z.narrow(1, tb, self.rank - tb)?], 1)?
                };
            }
            z.matmul(ut)? // ·U_rᵀ [rows, m]
        };
        self.finish(y, lead, m)
    }
}

impl CersaLinear {
    /// x·Wᵀ + x·V_r·ΔMᵀ·U_rᵀ of a dense-base layer, `t` = x·V_r.
    fn dense_forward(
        &self,
        x2: &Tensor,
        t: &Tensor,
        wt: &Tensor,
        s0: &Tensor,
        ut: &Tensor,
        s: &Tensor,
    ) -> Result<Tensor> {
        let y = x2.matmul(wt)?;
        let delta = match (&self.ab, &self.core) {
            (Some((a, b)), _) => t.matmul(a)?.matmul(b)?.matmul(ut)?,
            (None, Some(c)) => {
                // x·V_t·(C − diag σ_t)ᵀ·U_tᵀ: only the leading block changes.
                let tb = c.dims()[0];
                let lead = s0.narrow(0, 0, tb)?;
                let diag = Tensor::eye(tb, lead.dtype(), lead.device())?
                    .broadcast_mul(&lead.reshape((1, tb))?)?;
                t.narrow(1, 0, tb)?
                    .matmul(&(c - diag)?.t()?)?
                    .matmul(&ut.narrow(0, 0, tb)?)?
            }
            // scale: x·V_r·diag(s − σ)·U_rᵀ
            (None, None) => t.broadcast_mul(&(s - s0)?)?.matmul(ut)?,
        };
        y + delta
    }

    /// Adds the bias and restores the input's leading dimensions.
    fn finish(&self, y: Tensor, lead: &[usize], m: usize) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(m);
        y.reshape(out_dims)
    }
}

/// The trained part of `layers` (their variables in `varmap`) as an [`Adapter`] for the
/// checkpoint of `ckpt` (frozen layers are omitted).
pub fn adapter_from_varmap(
    ckpt: &Checkpoint,
    layers: &[&CersaLinear],
    varmap: &VarMap,
) -> Result<Adapter> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
    let mut adapter = Adapter {
        manifest_sha256: manifest_sha256(ckpt.dir()).map_err(wrap)?,
        layers: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    for layer in layers.iter().filter(|l| l.mode != Mode::Frozen) {
        let info = layer.layer_info();
        if let (Some((_, s0)), Some(v), Some(ut)) = (&layer.dense, &layer.v, &layer.ut) {
            // A dense-base layer's basis, in the checkpoint's orientation.
            let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            };
            let name = &layer.name;
            adapter
                .tensors
                .insert(var_name(name, "u"), f32s(&ut.t()?.contiguous()?)?);
            adapter.tensors.insert(var_name(name, "sigma"), f32s(s0)?);
            adapter
                .tensors
                .insert(var_name(name, "vt"), f32s(&v.t()?.contiguous()?)?);
        }
        for (t, _) in info.mode.tensors(&layer.name, info.rank, info.matrix_shape) {
            let var = data
                .get(&t)
                .ok_or_else(|| candle_core::Error::msg(format!("{t} is not in the VarMap")))?;
            let values = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            adapter.tensors.insert(t, values);
        }
        adapter.layers.insert(layer.name.clone(), info);
    }
    Ok(adapter)
}

/// Sets the variables of `layers` in `varmap` from `adapter` (which must belong to the
/// layers' checkpoint: see [`Adapter::check_base`]).
pub fn load_adapter_into(
    adapter: &Adapter,
    layers: &[&CersaLinear],
    varmap: &VarMap,
) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
    for layer in layers.iter().filter(|l| l.mode != Mode::Frozen) {
        let info = adapter.layers.get(&layer.name).ok_or_else(|| {
            candle_core::Error::msg(format!("adapter has no layer {}", layer.name))
        })?;
        if *info != layer.layer_info() {
            candle_core::bail!(
                "{}: adapter layer {info:?} differs from {:?}",
                layer.name,
                layer.layer_info()
            );
        }
        for (t, shape) in info.mode.tensors(&layer.name, info.rank, info.matrix_shape) {
            let var = data
                .get(&t)
                .ok_or_else(|| candle_core::Error::msg(format!("{t} is not in the VarMap")))?;
            let values = adapter
                .tensors
                .get(&t)
                .ok_or_else(|| candle_core::Error::msg(format!("adapter has no tensor {t}")))?;
            let value = Tensor::from_slice(values, shape, var.device())?.to_dtype(var.dtype())?;
            var.set(&value)?;
        }
    }
    Ok(())
}
