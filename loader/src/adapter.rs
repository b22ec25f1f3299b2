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
/// `__metadata__["adapter_version"]` this crate reads and writes.
pub const ADAPTER_VERSION: &str = "1";
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

/// One adapted layer's description in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Adaptation mode (and k for `core`).
    #[serde(flatten)]
    pub mode: Mode,
    /// Rank r of the base factors.
    pub rank: usize,
    /// Matrix shape [m, n] of the base tensor.
    pub matrix_shape: [usize; 2],
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
            for (t, shape) in info.mode.tensors(name, info.rank, info.matrix_shape) {
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
    /// there with the same rank and matrix shape.
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
            match ckpt.get(name)? {
                TensorView::Factored(f)
                    if f.rank == info.rank && f.matrix_shape == info.matrix_shape => {}
                _ => {
                    return Err(bad(
                        &mpath,
                        name,
                        format!(
                            "adapter expects a factored {:?} of rank {}",
                            info.matrix_shape, info.rank
                        ),
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
        let metadata = BTreeMap::from([
            ("format".to_string(), ADAPTER_FORMAT.to_string()),
            ("adapter_version".to_string(), ADAPTER_VERSION.to_string()),
            ("manifest_sha256".to_string(), self.manifest_sha256.clone()),
            ("layers".to_string(), layers),
        ]);
        let mut list = Vec::with_capacity(self.tensors.len());
        for (name, info) in &self.layers {
            for (t, shape) in info.mode.tensors(name, info.rank, info.matrix_shape) {
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
        if meta("format")? != ADAPTER_FORMAT || meta("adapter_version")? != ADAPTER_VERSION {
            return Err(bad(
                path,
                "__metadata__",
                format!("not a {ADAPTER_FORMAT} v{ADAPTER_VERSION} file"),
            ));
        }
        let layers: BTreeMap<String, LayerInfo> = serde_json::from_str(meta("layers")?)
            .map_err(|e| bad(path, "__metadata__", format!("layers: {e}")))?;
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

fn diag(s: &[f64]) -> Vec<f64> {
    let r = s.len();
    let mut d = vec![0f64; r * r];
    for (i, v) in s.iter().enumerate() {
        d[i * r + i] = *v;
    }
    d
}
