//! Adapter files: the trained part of a subspace fine-tune, stored apart from the frozen
//! CERSA checkpoint it belongs to.
//!
//! An adapter is one safetensors file of F32 tensors, per adapted layer `NAME`:
//!
//! | mode      | tensors                                                   |
//! |-----------|-----------------------------------------------------------|
//! | `scale`   | `NAME.adapter_s` `[r]` (replaces σ_r)                      |
//! | `core`    | `NAME.adapter_a` [r, k], `NAME.adapter_b` [k, r] (ΔM = A·B) |
//! | `factors` | `NAME.adapter_left` [m, r] (U·√σ), `NAME.adapter_right` [r, n] (√σ·Vᵀ) |
//! | `cersa`   | `NAME.adapter_c` [t, t] (the leading t×t block of the core C)   |
//!
//! and `__metadata__` `{"format": "cersa-adapter", "adapter_version": "1",
//! "manifest_sha256": <sha256 of the base cersa.json>, "layers": <JSON {NAME: {"mode",
//! "k", "rank", "matrix_shape"}}>}`. The adapted matrix is, per mode,
//! `U·diag(s')·Vᵀ`, `U·(diag σ + A·B)ᵀ·Vᵀ` (the layer computes y = x·V·(diag σ + A·B)·Uᵀ),
//! `left·right`, or `U·C·Vᵀ` (the layer computes y = x·V·Cᵀ·Uᵀ) with C = the trained block
//! `adapter_c` in its leading t×t corner and diag(σ_{t+1..r}) after it.
//!
//! **Dense-base layers** (version 2). A layer the base checkpoint stores dense (reason
//! `no-saving` or `planned`) can be adapted in its own top-r subspace, computed by the
//! trainer when it loads the model (`cersa_torch.load_hf`). Its metadata entry has
//! `"base": "dense"` (absent means `"factored"`), its mode is `scale`, `core` or `cersa`,
//! and it stores the basis it was trained in beside the mode's tensors, since SVDs differ
//! across libraries and thread counts:
//!
//! | tensor | shape | |
//! |---|---|---|
//! | `NAME.adapter_u` | [m, r] | U_r of the dense W |
//! | `NAME.adapter_sigma` | [r] | σ_r, the diagonal the mode's core starts from |
//! | `NAME.adapter_vt` | [r, n] | V_rᵀ |
//!
//! The adapted matrix is `W + U·(M − diag σ)·Vᵀ`, M the mode's r×r core as above (so
//! `U·diag(s' − σ)·Vᵀ`, `U·(A·B)ᵀ·Vᵀ`, or `U_t·(C − diag σ_t)·V_tᵀ` is added to the
//! exact W); `cersa merge` and `cersa export` fold it into the dense tensor without
//! recomputing any SVD. A file with a dense-base layer carries `"adapter_version": "2"`,
//! so that a reader of version 1 refuses it instead of silently dropping the layer; a file
//! without one is written as version 1 exactly as before, and both are read.
//! This module reads and writes the files without any tensor library; the `candle`
//! feature and `cersa merge` build on it.

use crate::checkpoint::{Checkpoint, TensorView};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::manifest::MANIFEST_FILE;
use crate::safetensors;
use crate::writer::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// `__metadata__["format"]` of adapter files.
pub const ADAPTER_FORMAT: &str = "cersa-adapter";
/// `__metadata__["adapter_version"]` of files whose layers are all factored in the base.
pub const ADAPTER_VERSION: &str = "1";
/// `__metadata__["adapter_version"]` of files with a dense-base layer ([`Base::Dense`]).
pub const ADAPTER_VERSION_DENSE: &str = "2";
/// Adapter files above this size are rejected (an adapter never exceeds its base's factors).
pub const MAX_ADAPTER_SIZE: u64 = 64 << 30;

/// How a factored layer is adapted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// Nothing trainable (inference only).
    Frozen,
    /// σ_r trainable.
    Scale,
    /// ΔM = A·B trainable inside the subspace, A: r×k, B: k×r.
    Core {
        /// Inner rank of ΔM.
        k: usize,
    },
    /// U·√σ and √σ·Vᵀ trainable (PiSSA-like, no residual).
    Factors,
    /// The CERSA paper's mode: U_r, V_r frozen and an r×r core C, initialized to diag(σ_r),
    /// trainable in its leading `trainable`×`trainable` block (all of it when
    /// `trainable` = r; fewer when a second threshold β < τ limits training to the
    /// components up to cumulative energy β); the rest of C stays diag(σ).
    Cersa {
        /// Side t of the trainable leading block of C (1..=r).
        trainable: usize,
    },
}

impl Mode {
    /// Lowercase name (`frozen`, `scale`, `core`, `factors`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Frozen => "frozen",
            Mode::Scale => "scale",
            Mode::Core { .. } => "core",
            Mode::Factors => "factors",
            Mode::Cersa { .. } => "cersa",
        }
    }

    /// Stored adapter tensors of layer `name` (suffix, shape) for rank `r`, matrix [m, n].
    pub fn tensors(self, name: &str, r: usize, [m, n]: [usize; 2]) -> Vec<(String, Vec<usize>)> {
        match self {
            Mode::Frozen => vec![],
            Mode::Scale => vec![(format!("{name}.adapter_s"), vec![r])],
            Mode::Core { k } => vec![
                (format!("{name}.adapter_a"), vec![r, k]),
                (format!("{name}.adapter_b"), vec![k, r]),
            ],
            Mode::Factors => vec![
                (format!("{name}.adapter_left"), vec![m, r]),
                (format!("{name}.adapter_right"), vec![r, n]),
            ],
            Mode::Cersa { trainable: t } => vec![(format!("{name}.adapter_c"), vec![t, t])],
        }
    }
}

/// What an adapted layer's base tensor is in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    /// Factored: the adapter acts on the stored U_r, σ_r, V_r.
    #[default]
    Factored,
    /// Stored dense: the adapter carries its own basis (`adapter_u`, `adapter_sigma`,
    /// `adapter_vt`) and adds U·(M − diag σ)·Vᵀ to W.
    Dense,
}

impl Base {
    fn is_factored(&self) -> bool {
        *self == Base::Factored
    }
}

/// One adapted layer's description in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Adaptation mode (and k for `core`).
    #[serde(flatten)]
    pub mode: Mode,
    /// Rank r of the base factors (of the stored basis, for a dense base).
    pub rank: usize,
    /// Matrix shape [m, n] of the base tensor.
    pub matrix_shape: [usize; 2],
    /// The base tensor's kind (absent in the file: factored).
    #[serde(default, skip_serializing_if = "Base::is_factored")]
    pub base: Base,
}

impl LayerInfo {
    /// Every stored tensor of layer `name` (suffix, shape): the mode's, and for a dense
    /// base the basis.
    pub fn tensors(&self, name: &str) -> Vec<(String, Vec<usize>)> {
        let (r, [m, n]) = (self.rank, self.matrix_shape);
        let mut list = self.mode.tensors(name, r, [m, n]);
        if self.base == Base::Dense {
            list.push((format!("{name}.adapter_u"), vec![m, r]));
            list.push((format!("{name}.adapter_sigma"), vec![r]));
            list.push((format!("{name}.adapter_vt"), vec![r, n]));
        }
        list
    }
}

/// A whole adapter: base identity, layers and their F32 tensors (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Lowercase hex sha256 of the base checkpoint's `cersa.json`.
    pub manifest_sha256: String,
    /// Adapted layers by source tensor name.
    pub layers: BTreeMap<String, LayerInfo>,
    /// Stored tensors by name (see the module table), F32 values.
    pub tensors: BTreeMap<String, Vec<f32>>,
}

/// The identity an adapter records: sha256 of the checkpoint's `cersa.json` bytes.
pub fn manifest_sha256(dir: &Path) -> Result<String> {
    let path = dir.join(MANIFEST_FILE);
    let text = crate::regular::read_regular(&path).map_err(|e| Error::io(&path, "read", e))?;
    Ok(hex(&Sha256::digest(&text)))
}

fn bad(path: &Path, tensor: &str, reason: impl Into<String>) -> Error {
    Error::Mismatch {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

impl Adapter {
    /// Checks that every layer's tensors exist with their shapes and nothing else is stored.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let mut expected = BTreeMap::new();
        for (name, info) in &self.layers {
            let [m, n] = info.matrix_shape;
            if info.rank == 0 || info.rank > m.min(n) {
                return Err(bad(
                    path,
                    name,
                    format!("rank {} outside 1..=min({m}, {n})", info.rank),
                ));
            }
            match info.mode {
                Mode::Core { k } if k == 0 || k > info.rank => {
                    return Err(bad(path, name, format!("k {k} outside 1..={}", info.rank)));
                }
                Mode::Cersa { trainable: t } if t == 0 || t > info.rank => {
                    return Err(bad(
                        path,
                        name,
                        format!("trainable block {t} outside 1..={}", info.rank),
                    ));
                }
                _ => {}
            }
            if info.base == Base::Dense
                && !matches!(
                    info.mode,
                    Mode::Scale | Mode::Core { .. } | Mode::Cersa { .. }
                )
            {
                return Err(bad(
                    path,
                    name,
                    format!(
                        "mode {} cannot adapt a dense base layer (scale, core or cersa)",
                        info.mode.name()
                    ),
                ));
            }
            for (t, shape) in info.tensors(name) {
                expected.insert(t, shape);
            }
        }
        for (t, shape) in &expected {
            let values = self
                .tensors
                .get(t)
                .ok_or_else(|| bad(path, t, "listed layer tensor is missing"))?;
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if numel != Some(values.len()) {
                return Err(bad(
                    path,
                    t,
                    format!("{} values, shape {shape:?}", values.len()),
                ));
            }
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(bad(path, t, format!("non-finite value {v}")));
            }
        }
        if let Some(stray) = self.tensors.keys().find(|t| !expected.contains_key(*t)) {
            return Err(bad(path, stray, "stored but belongs to no listed layer"));
        }
        Ok(())
    }

    /// Checks the adapter belongs to `ckpt`: same manifest identity, every layer factored
    /// there with the same rank and matrix shape, or, for a dense-base layer, stored dense
    /// there as a float matrix whose manifest `shape` has that matrix shape.
    pub fn check_base(&self, ckpt: &Checkpoint) -> Result<()> {
        let mpath = ckpt.dir().join(MANIFEST_FILE);
        let sha = manifest_sha256(ckpt.dir())?;
        if sha != self.manifest_sha256 {
            return Err(Error::Checksum {
                path: mpath,
                what: "adapter base manifest sha256",
                expected: self.manifest_sha256.clone(),
                found: sha,
            });
        }
        for (name, info) in &self.layers {
            match (info.base, ckpt.get(name)?) {
                (Base::Factored, TensorView::Factored(f))
                    if f.rank == info.rank && f.matrix_shape == info.matrix_shape => {}
                (Base::Dense, TensorView::Dense(t)) => {
                    let shape = dense_matrix_shape(t.shape);
                    if shape != Some(info.matrix_shape) || !t.dtype.is_factor_float() {
                        return Err(bad(
                            &mpath,
                            name,
                            format!(
                                "the adapter expects a dense float {:?} matrix, the \
                                 checkpoint stores {} {:?}",
                                info.matrix_shape, t.dtype, t.shape
                            ),
                        ));
                    }
                }
                (Base::Dense, TensorView::Factored(_)) => {
                    return Err(bad(
                        &mpath,
                        name,
                        "the adapter was trained on a dense layer, the checkpoint stores it \
                         factored",
                    ))
                }
                _ => {
                    return Err(bad(
                        &mpath,
                        name,
                        match info.base {
                            Base::Factored => format!(
                                "adapter expects a factored {:?} of rank {}",
                                info.matrix_shape, info.rank
                            ),
                            Base::Dense => format!(
                                "adapter expects a dense {:?} matrix, the checkpoint stores \
                                 stacked experts",
                                info.matrix_shape
                            ),
                        },
                    ))
                }
            }
        }
        Ok(())
    }

    /// Writes the adapter to `path` (through a temporary sibling, renamed at the end).
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate(path)?;
        let layers = serde_json::to_string(&self.layers).map_err(|e| Error::Usage {
            tensor: String::new(),
            reason: e.to_string(),
        })?;
        let version = match self.layers.values().any(|l| l.base == Base::Dense) {
            true => ADAPTER_VERSION_DENSE,
            false => ADAPTER_VERSION,
        };
        let metadata = BTreeMap::from([
            ("format".to_string(), ADAPTER_FORMAT.to_string()),
            ("adapter_version".to_string(), version.to_string()),
            ("manifest_sha256".to_string(), self.manifest_sha256.clone()),
            ("layers".to_string(), layers),
        ]);
        let mut list = Vec::with_capacity(self.tensors.len());
        for (name, info) in &self.layers {
            for (t, shape) in info.tensors(name) {
                let bytes = self.tensors[&t]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                list.push((t, Dtype::F32, shape, bytes));
            }
        }
        let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{}.tmp", file_name.unwrap_or_default()));
        safetensors::write_file(&tmp, &metadata, &list).map_err(|e| Error::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename", e))
    }

    /// Reads and validates an adapter file.
    pub fn read(path: &Path) -> Result<Adapter> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len > MAX_ADAPTER_SIZE {
            return Err(bad(
                path,
                "",
                format!("{len} bytes exceeds the adapter size cap"),
            ));
        }
        let file = crate::regular::read_regular(path).map_err(|e| Error::io(path, "read", e))?;
        let header = safetensors::parse(&file).map_err(|kind| Error::Safetensors {
            path: path.to_path_buf(),
            kind,
        })?;
        let meta = |key: &str| {
            header
                .metadata
                .get(key)
                .ok_or_else(|| bad(path, "__metadata__", format!("no {key:?} entry")))
        };
        let version = meta("adapter_version")?;
        if meta("format")? != ADAPTER_FORMAT
            || (version != ADAPTER_VERSION && version != ADAPTER_VERSION_DENSE)
        {
            return Err(bad(
                path,
                "__metadata__",
                format!(
                    "not a {ADAPTER_FORMAT} v{ADAPTER_VERSION} or v{ADAPTER_VERSION_DENSE} file"
                ),
            ));
        }
        let layers: BTreeMap<String, LayerInfo> = serde_json::from_str(meta("layers")?)
            .map_err(|e| bad(path, "__metadata__", format!("layers: {e}")))?;
        if version == ADAPTER_VERSION {
            if let Some((name, _)) = layers.iter().find(|(_, l)| l.base == Base::Dense) {
                return Err(bad(
                    path,
                    name,
                    format!(
                        "a dense-base layer in a v{ADAPTER_VERSION} file (needs \
                         v{ADAPTER_VERSION_DENSE})"
                    ),
                ));
            }
        }
        let mut tensors = BTreeMap::new();
        for e in &header.tensors {
            if e.dtype != Dtype::F32 {
                return Err(bad(
                    path,
                    &e.name,
                    format!("dtype {} (adapters are F32)", e.dtype),
                ));
            }
            let bytes = file
                .get(header.file_range(e))
                .ok_or_else(|| bad(path, &e.name, "data outside the file"))?;
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(e.name.clone(), values);
        }
        let adapter = Adapter {
            manifest_sha256: meta("manifest_sha256")?.clone(),
            layers,
            tensors,
        };
        adapter.validate(path)?;
        Ok(adapter)
    }

    /// The adapted matrix of layer `name` as a product `left [m, q] · right [q, n]`
    /// (f64, row-major), q = r. `ckpt` supplies the frozen factors.
    pub fn adapted_product(
        &self,
        ckpt: &Checkpoint,
        name: &str,
    ) -> Result<(Vec<f64>, Vec<f64>, usize)> {
        let info = self
            .layers
            .get(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        if info.base == Base::Dense {
            return Err(bad(
                ckpt.dir(),
                name,
                "a dense-base layer: its update is Adapter::dense_update",
            ));
        }
        let TensorView::Factored(f) = ckpt.get(name)? else {
            return Err(bad(ckpt.dir(), name, "not factored in the base checkpoint"));
        };
        let m = f.matrix_shape[0];
        let r = f.rank;
        if info.rank != r || info.matrix_shape != f.matrix_shape {
            return Err(bad(
                ckpt.dir(),
                name,
                "adapter layer does not fit the base factors",
            ));
        }
        let (u, s, vt) = f
            .values_f64()
            .map_err(|what| bad(ckpt.dir(), name, format!("{what} cannot be decoded")))?;
        let get = |suffix: &str| -> Result<Vec<f64>> {
            let t = format!("{name}.{suffix}");
            let values = self
                .tensors
                .get(&t)
                .ok_or_else(|| bad(ckpt.dir(), &t, "missing from the adapter"))?;
            Ok(values.iter().map(|&v| f64::from(v)).collect())
        };
        // left = U·M, right = Vᵀ where M is the r×r core of each mode (W' = U·M·Vᵀ).
        let core: Vec<f64> = match info.mode {
            Mode::Frozen => diag(&s),
            Mode::Scale => diag(&get("adapter_s")?),
            Mode::Core { k } => {
                let (a, b) = (get("adapter_a")?, get("adapter_b")?);
                let mut c = diag(&s);
                for i in 0..r {
                    for j in 0..r {
                        // (A·B)ᵀ[i, j] = Σ_p A[j, p]·B[p, i]
                        c[i * r + j] += (0..k).map(|p| a[j * k + p] * b[p * r + i]).sum::<f64>();
                    }
                }
                c
            }
            Mode::Factors => return Ok((get("adapter_left")?, get("adapter_right")?, r)),
            Mode::Cersa { trainable: t } => {
                let block = get("adapter_c")?;
                let mut c = diag(&s);
                for i in 0..t {
                    c[i * r..i * r + t].copy_from_slice(&block[i * t..(i + 1) * t]);
                }
                c
            }
        };
        let mut left = vec![0f64; m * r];
        for i in 0..m {
            for j in 0..r {
                left[i * r + j] = (0..r).map(|p| u[i * r + p] * core[p * r + j]).sum();
            }
        }
        Ok((left, vt, r))
    }
}

impl Adapter {
    /// The update ΔW = U·(M − diag σ)·Vᵀ of dense-base layer `name` (see the module doc)
    /// as a product `left [m, q] · right [q, n]` (f64, row-major): q = r for `scale`, k for
    /// `core` (U·Bᵀ and Aᵀ·Vᵀ), t for `cersa`. Only the adapter's tensors are read; the
    /// adapted matrix is the dense W plus this.
    pub fn dense_update(&self, name: &str) -> Result<(Vec<f64>, Vec<f64>, usize)> {
        let info = self
            .layers
            .get(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        let here = Path::new("<adapter>");
        if info.base != Base::Dense {
            return Err(bad(here, name, "not a dense-base layer"));
        }
        let ([m, n], r) = (info.matrix_shape, info.rank);
        let get = |suffix: &str| -> Result<Vec<f64>> {
            let t = format!("{name}.{suffix}");
            let values = self
                .tensors
                .get(&t)
                .ok_or_else(|| bad(here, &t, "missing from the adapter"))?;
            Ok(values.iter().map(|&v| f64::from(v)).collect())
        };
        let (u, sigma, vt) = (get("adapter_u")?, get("adapter_sigma")?, get("adapter_vt")?);
        // U [m, r] times an r×q matrix `core` (row-major), over its first `rows` rows.
        let u_times = |core: &[f64], rows: usize, q: usize| -> Vec<f64> {
            let mut out = vec![0f64; m * q];
            for i in 0..m {
                for p in 0..rows {
                    let c = u[i * r + p];
                    let row = &core[p * q..(p + 1) * q];
                    out[i * q..(i + 1) * q]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(o, v)| *o += c * v);
                }
            }
            out
        };
        Ok(match info.mode {
            Mode::Scale => {
                let s2 = get("adapter_s")?;
                let mut d = vec![0f64; r * r];
                for i in 0..r {
                    d[i * r + i] = s2[i] - sigma[i];
                }
                (u_times(&d, r, r), vt, r)
            }
            Mode::Core { k } => {
                // (A·B)ᵀ = Bᵀ·Aᵀ: left = U·Bᵀ [m, k], right = Aᵀ·Vᵀ [k, n].
                let (a, b) = (get("adapter_a")?, get("adapter_b")?);
                let mut bt = vec![0f64; r * k];
                for p in 0..k {
                    for i in 0..r {
                        bt[i * k + p] = b[p * r + i];
                    }
                }
                let mut right = vec![0f64; k * n];
                for p in 0..k {
                    for i in 0..r {
                        let c = a[i * k + p];
                        right[p * n..(p + 1) * n]
                            .iter_mut()
                            .zip(&vt[i * n..(i + 1) * n])
                            .for_each(|(o, v)| *o += c * v);
                    }
                }
                (u_times(&bt, r, k), right, k)
            }
            Mode::Cersa { trainable: t } => {
                // U_t·(C − diag σ_t), V_tᵀ: the rows of the core past t are zero.
                let mut d = get("adapter_c")?;
                for i in 0..t {
                    d[i * t + i] -= sigma[i];
                }
                (u_times(&d, t, t), vt[..t * n].to_vec(), t)
            }
            Mode::Frozen | Mode::Factors => {
                return Err(bad(here, name, "mode cannot adapt a dense base layer"))
            }
        })
    }
}

/// The matrix view [d0, d1·d2·…] of a dense tensor's shape (spec §4 rule 1); `None` below
/// two dimensions or on overflow.
pub fn dense_matrix_shape(shape: &[usize]) -> Option<[usize; 2]> {
    let (&m, rest) = shape.split_first()?;
    if rest.is_empty() {
        return None;
    }
    Some([m, rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?])
}

fn diag(s: &[f64]) -> Vec<f64> {
    let r = s.len();
    let mut d = vec![0f64; r * r];
    for (i, v) in s.iter().enumerate() {
        d[i * r + i] = *v;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    const NAME: &str = "layer.weight";
    const M: usize = 5;
    const N: usize = 4;
    const R: usize = 3;

    fn dense_adapter(mode: Mode) -> Adapter {
        let mut tensors = BTreeMap::new();
        let info = LayerInfo {
            mode,
            rank: R,
            matrix_shape: [M, N],
            base: Base::Dense,
        };
        for (i, (t, shape)) in info.tensors(NAME).into_iter().enumerate() {
            tensors.insert(t, values(i as u64 + 1, shape.iter().product()));
        }
        Adapter {
            manifest_sha256: "0".repeat(64),
            layers: BTreeMap::from([(NAME.to_string(), info)]),
            tensors,
        }
    }

    /// U·(M − diag σ)·Vᵀ, [m, n], spelled out from the module doc's definition.
    fn reference_update(a: &Adapter) -> Vec<f64> {
        let info = a.layers[NAME];
        let t = |s: &str| -> Vec<f64> {
            a.tensors[&format!("{NAME}.{s}")]
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        };
        let (u, sigma, vt) = (t("adapter_u"), t("adapter_sigma"), t("adapter_vt"));
        // The mode's r×r core M (row-major) as the layer's W' = U·M·Vᵀ.
        let mut core = [0f64; R * R];
        for i in 0..R {
            core[i * R + i] = sigma[i];
        }
        match info.mode {
            Mode::Scale => {
                let s = t("adapter_s");
                for i in 0..R {
                    core[i * R + i] = s[i];
                }
            }
            Mode::Core { k } => {
                let (aa, bb) = (t("adapter_a"), t("adapter_b"));
                for i in 0..R {
                    for j in 0..R {
                        // M = diag σ + (A·B)ᵀ
                        core[i * R + j] +=
                            (0..k).map(|p| aa[j * k + p] * bb[p * R + i]).sum::<f64>();
                    }
                }
            }
            Mode::Cersa { trainable } => {
                let c = t("adapter_c");
                for i in 0..trainable {
                    for j in 0..trainable {
                        core[i * R + j] = c[i * trainable + j];
                    }
                }
            }
            _ => unreachable!(),
        }
        for i in 0..R {
            core[i * R + i] -= sigma[i];
        }
        let mut out = vec![0f64; M * N];
        for i in 0..M {
            for j in 0..N {
                out[i * N + j] = (0..R)
                    .flat_map(|p| (0..R).map(move |q| (p, q)))
                    .map(|(p, q)| u[i * R + p] * core[p * R + q] * vt[q * N + j])
                    .sum();
            }
        }
        out
    }

    const DENSE_MODES: [Mode; 4] = [
        Mode::Scale,
        Mode::Core { k: 2 },
        Mode::Cersa { trainable: 2 },
        Mode::Cersa { trainable: 3 },
    ];

    #[test]
    fn dense_update_is_the_basis_times_the_core_change() {
        for mode in DENSE_MODES {
            let a = dense_adapter(mode);
            let (left, right, q) = a.dense_update(NAME).unwrap();
            let want = reference_update(&a);
            assert!(
                want.iter().any(|v| v.abs() > 1e-3),
                "{mode:?}: a real update"
            );
            for i in 0..M {
                for j in 0..N {
                    let got: f64 = (0..q).map(|p| left[i * q + p] * right[p * N + j]).sum();
                    assert!((got - want[i * N + j]).abs() < 1e-12, "{mode:?} [{i}, {j}]");
                }
            }
        }
    }

    #[test]
    fn dense_base_files_are_version_2_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for mode in DENSE_MODES {
            let a = dense_adapter(mode);
            let path = dir.path().join("a.safetensors");
            a.write(&path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let header = safetensors::parse(&bytes).unwrap();
            assert_eq!(header.metadata["adapter_version"], ADAPTER_VERSION_DENSE);
            assert!(header.metadata["layers"].contains(r#""base":"dense""#));
            assert_eq!(Adapter::read(&path).unwrap(), a);
        }
    }

    #[test]
    fn factored_layers_keep_the_version_1_layout() {
        let text = r#"{"mode":"scale","rank":2,"matrix_shape":[3,4]}"#;
        let info: LayerInfo = serde_json::from_str(text).unwrap();
        assert_eq!(info.base, Base::Factored, "no base field: factored");
        assert_eq!(serde_json::to_string(&info).unwrap(), text);
    }

    #[test]
    fn a_dense_base_layer_in_a_version_1_file_is_refused() {
        let a = dense_adapter(Mode::Scale);
        let layers = serde_json::to_string(&a.layers).unwrap();
        let metadata = BTreeMap::from([
            ("format".to_string(), ADAPTER_FORMAT.to_string()),
            ("adapter_version".to_string(), ADAPTER_VERSION.to_string()),
            ("manifest_sha256".to_string(), a.manifest_sha256.clone()),
            ("layers".to_string(), layers),
        ]);
        let list: Vec<_> = a.layers[NAME]
            .tensors(NAME)
            .into_iter()
            .map(|(t, shape)| {
                let bytes = a.tensors[&t].iter().flat_map(|v| v.to_le_bytes()).collect();
                (t, Dtype::F32, shape, bytes)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.safetensors");
        safetensors::write_file(&path, &metadata, &list).unwrap();
        let err = Adapter::read(&path).unwrap_err().to_string();
        assert!(err.contains("dense-base layer in a v1 file"), "{err}");
    }

    #[test]
    fn dense_base_layers_refuse_modes_without_a_dense_form() {
        for mode in [Mode::Factors, Mode::Frozen] {
            let mut a = dense_adapter(Mode::Scale);
            a.layers.get_mut(NAME).unwrap().mode = mode;
            a.tensors = a.layers[NAME]
                .tensors(NAME)
                .into_iter()
                .map(|(t, shape)| (t, values(9, shape.iter().product())))
                .collect();
            let err = a.validate(Path::new("x")).unwrap_err().to_string();
            assert!(err.contains("cannot adapt a dense base layer"), "{err}");
            // A missing basis tensor is named.
            let mut b = dense_adapter(Mode::Scale);
            b.tensors.remove(&format!("{NAME}.adapter_vt"));
            let err = b.validate(Path::new("x")).unwrap_err().to_string();
            assert!(err.contains("adapter_vt"), "{err}");
        }
    }
}
