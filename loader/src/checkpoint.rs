//! Opening, validating and using a CERSA directory.

use crate::dtype::{decode_f32, decode_f64, Dtype};
use crate::encoding::FactorEncoding;
use crate::error::{Error, Result};
use crate::manifest::{factor_names, Manifest, TensorKind};
use crate::mmap::MappedFile;
use crate::safetensors::Header;
use crate::validate;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Manifest size cap: a manifest lists each tensor in ~400 bytes, so 256 MiB covers
/// hundreds of thousands of tensors; larger is hostile.
pub const MAX_MANIFEST_SIZE: u64 = 256 << 20;

/// Options of [`Checkpoint::open_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Also compare every shard's sha256 with the manifest (reads every byte).
    pub verify_checksums: bool,
}

/// A mapped shard with its validated header.
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    pub(crate) map: MappedFile,
    pub(crate) header: Header,
}

/// A stored tensor: dtype, shape and its little-endian bytes inside a mapped shard.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian element bytes, row-major.
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    /// Values as f32 (F64 rounded); `None` for integer and bool dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        decode_f32(self.dtype, self.bytes)
    }
}

/// The three factors of a factored tensor: W ≈ U · diag(s) · Vᵀ.
///
/// `u` and `vt` are the stored tensors: `[m, r]` and `[r, n]` in a float dtype, or U8
/// rows of quantized singular vectors (`encoding`); [`Factors::u_f32`] and
/// [`Factors::vt_f32`] give the values in the plain layout either way.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    /// `cersa_u` as stored: `U_r` [m, r], or quantized rows `[r, row_bytes(m)]`.
    pub u: RawTensor<'a>,
    /// `σ_r`, `[r]`, F32.
    pub s: RawTensor<'a>,
    /// `cersa_vt` as stored: `V_rᵀ` [r, n], or quantized rows `[r, row_bytes(n)]`.
    pub vt: RawTensor<'a>,
    /// Rank r.
    pub rank: usize,
    /// Matrix view [m, n] of the original tensor.
    pub matrix_shape: [usize; 2],
    /// How `u` and `vt` are stored.
    pub encoding: FactorEncoding,
}

/// (U `[m, r]`, σ `[r]`, Vᵀ `[r, n]`) values, row-major.
pub type FactorValues<T> = (Vec<T>, Vec<T>, Vec<T>);

impl Factors<'_> {
    /// U as f32, row-major `[m, r]` (dequantized where quantized).
    pub fn u_f32(&self) -> Option<Vec<f32>> {
        let [m, _] = self.matrix_shape;
        self.encoding.decode_u(self.u.bytes, m, self.rank)
    }

    /// Vᵀ as f32, row-major `[r, n]` (dequantized where quantized).
    pub fn vt_f32(&self) -> Option<Vec<f32>> {
        let [_, n] = self.matrix_shape;
        self.encoding.decode_vt(self.vt.bytes, self.rank, n)
    }

    /// σ as f32, `[r]`.
    pub fn s_f32(&self) -> Option<Vec<f32>> {
        self.s.to_f32()
    }

    /// (U `[m, r]`, σ `[r]`, Vᵀ `[r, n]`) as f32, or the name of the factor that could not
    /// be decoded.
    pub fn values(&self) -> std::result::Result<FactorValues<f32>, &'static str> {
        Ok((
            self.u_f32().ok_or("cersa_u")?,
            self.s_f32().ok_or("cersa_s")?,
            self.vt_f32().ok_or("cersa_vt")?,
        ))
    }

    /// Like [`Factors::values`] in f64: exact for every float dtype (F64 factors keep their
    /// precision), quantized factors widened from their f32 dequantization.
    pub fn values_f64(&self) -> std::result::Result<FactorValues<f64>, &'static str> {
        let s = decode_f64(self.s.dtype, self.s.bytes).ok_or("cersa_s")?;
        match self.encoding {
            FactorEncoding::Float(d) => Ok((
                decode_f64(d, self.u.bytes).ok_or("cersa_u")?,
                s,
                decode_f64(d, self.vt.bytes).ok_or("cersa_vt")?,
            )),
            FactorEncoding::Quant(_) => {
                let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
                Ok((
                    widen(self.u_f32().ok_or("cersa_u")?),
                    s,
                    widen(self.vt_f32().ok_or("cersa_vt")?),
                ))
            }
        }
    }
}

/// A tensor of the checkpoint as stored.
#[derive(Debug, Clone, Copy)]
pub enum TensorView<'a> {
    /// Stored unchanged.
    Dense(RawTensor<'a>),
    /// Stored as factors.
    Factored(Factors<'a>),
    /// A stacked mixture-of-experts tensor with this many experts, each stored on its own
    /// (read one with [`Checkpoint::expert`]).
    Experts(usize),
}

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` values, row-major.
    pub data: Vec<f32>,
}

/// An open, validated CERSA checkpoint. Shards are memory-mapped; views borrow from them.
pub struct Checkpoint {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// Stored tensor name → (shard index, entry index in that shard's header).
    index: HashMap<String, (usize, usize)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.manifest.tensors.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

fn mismatch(path: &Path, tensor: &str, reason: String) -> Error {
    Error::Mismatch {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    }
}

/// Reads and parses `cersa.json` of `dir` without opening shards.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    validate::load_manifest(dir).map_err(|issue| Error::invalid(dir, issue))
}

impl Checkpoint {
    /// Opens `dir` and validates manifest ↔ shards (names, shapes, dtypes, sizes, ranks):
    /// the checks of [`crate::validate()`] without checksums and values, stopping at the
    /// first issue ([`Error::Invalid`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// Like [`Checkpoint::open`], with options (e.g. sha256 verification).
    pub fn open_with(dir: impl AsRef<Path>, options: OpenOptions) -> Result<Self> {
        let dir = dir.as_ref();
        validate::open_checked(dir, options.verify_checksums)
            .map_err(|issue| Error::invalid(dir, issue))
    }

    /// A checkpoint from the parts [`crate::validate()`] checked.
    pub(crate) fn from_checked(
        dir: PathBuf,
        manifest: Manifest,
        shards: Vec<Shard>,
        index: HashMap<String, (usize, usize)>,
    ) -> Self {
        Checkpoint {
            dir,
            manifest,
            shards,
            index,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Names of all tensors (source names), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.manifest.tensors.keys().map(String::as_str)
    }

    fn raw(&self, stored: &str) -> Result<RawTensor<'_>> {
        let &(k, i) = self
            .index
            .get(stored)
            .ok_or_else(|| Error::UnknownTensor(stored.to_string()))?;
        let shard = &self.shards[k];
        let e = &shard.header.tensors[i];
        let bytes = shard
            .map
            .bytes()
            .get(shard.header.file_range(e))
            .ok_or_else(|| mismatch(&shard.path, stored, "data outside the file".into()))?;
        Ok(RawTensor {
            dtype: e.dtype,
            shape: &e.shape,
            bytes,
        })
    }

    /// The stored form of tensor `name`.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self
            .manifest
            .tensors
            .get(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        self.view(name, info)
    }

    /// The stored form of expert `e` of stacked experts tensor `name` (its `[d1, d2, …]`
    /// slice, dense or factored), read without touching the other experts.
    pub fn expert(&self, name: &str, e: usize) -> Result<TensorView<'_>> {
        let info = self
            .manifest
            .tensors
            .get(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        let count = info.expert_count();
        let expert = info.expert(e).ok_or_else(|| Error::Usage {
            tensor: name.to_string(),
            reason: match info.kind {
                TensorKind::Experts => format!("expert {e} out of range (it has {count})"),
                _ => "not a stacked experts tensor".into(),
            },
        })?;
        self.view(&crate::manifest::expert_name(name, e), &expert)
    }

    /// The stored form of entry `info` whose stored tensors are named after `name`.
    fn view(&self, name: &str, info: &crate::manifest::TensorInfo) -> Result<TensorView<'_>> {
        match info.kind {
            TensorKind::Experts => Ok(TensorView::Experts(info.expert_count())),
            TensorKind::Dense => Ok(TensorView::Dense(self.raw(name)?)),
            TensorKind::Factored => {
                let (m, n, r) = validate::factored_dims(name, info).map_err(|issues| {
                    let first = issues.into_iter().next();
                    Error::invalid(&self.dir, first.expect("factored_dims gives a reason"))
                })?;
                let (u, s, vt) = factor_names(name);
                Ok(TensorView::Factored(Factors {
                    u: self.raw(&u)?,
                    s: self.raw(&s)?,
                    vt: self.raw(&vt)?,
                    rank: r,
                    matrix_shape: [m, n],
                    encoding: FactorEncoding::of(info),
                }))
            }
        }
    }

    /// Every stored tensor of entry `name` (dense: itself; factored: `cersa_u`, `cersa_s`,
    /// `cersa_vt`; experts: each expert's in turn), with its stored name, in the order a
    /// writer stores them.
    pub fn stored_tensors<'a>(&'a self, name: &str) -> Result<Vec<(String, RawTensor<'a>)>> {
        let mut out: Vec<(String, RawTensor<'a>)> = Vec::new();
        let mut push = |stored: String, view: TensorView<'a>| match view {
            TensorView::Dense(raw) => out.push((stored, raw)),
            TensorView::Factored(f) => {
                let (u, s, vt) = factor_names(&stored);
                out.extend([(u, f.u), (s, f.s), (vt, f.vt)]);
            }
            TensorView::Experts(_) => {}
        };
        match self.get(name)? {
            TensorView::Experts(count) => {
                for e in 0..count {
                    push(crate::manifest::expert_name(name, e), self.expert(name, e)?);
                }
            }
            view => push(name.to_string(), view),
        }
        Ok(out)
    }

    /// The matrix W (factored: U·diag(s)·Vᵀ; dense: the tensor viewed as
    /// `[shape[0], rest]`; stacked experts: every expert's matrix in turn, viewed as
    /// `[E, d1·d2·…]`) as f32.
    pub fn reconstruct(&self, name: &str) -> Result<Matrix> {
        if let TensorView::Experts(count) = self.get(name)? {
            let mut data = Vec::new();
            for e in 0..count {
                data.extend(self.reconstruct_expert(name, e)?.data);
            }
            return Ok(Matrix {
                rows: count,
                cols: data.len().checked_div(count).unwrap_or(0),
                data,
            });
        }
        self.reconstruct_view(name, self.get(name)?)
    }

    /// Expert `e` of stacked experts tensor `name` as its `[d1, d2·…]` matrix, f32.
    pub fn reconstruct_expert(&self, name: &str, e: usize) -> Result<Matrix> {
        self.reconstruct_view(name, self.expert(name, e)?)
    }

    fn reconstruct_view(&self, name: &str, view: TensorView<'_>) -> Result<Matrix> {
        match view {
            TensorView::Experts(_) => Err(experts_usage(name)),
            TensorView::Dense(t) => {
                let (rows, cols) = dense_matrix_dims(name, t.shape)?;
                let data = t.to_f32().ok_or_else(|| Error::Usage {
                    tensor: name.to_string(),
                    reason: format!("dtype {} is not a float type", t.dtype),
                })?;
                Ok(Matrix { rows, cols, data })
            }
            TensorView::Factored(f) => {
                let (u, s, vt) = decode_factors(name, &f)?;
                let [m, n] = f.matrix_shape;
                let r = f.rank;
                let mut data = vec![0f32; m * n];
                for i in 0..m {
                    let row = &mut data[i * n..(i + 1) * n];
                    for k in 0..r {
                        let c = u[i * r + k] * s[k];
                        let vrow = &vt[k * n..(k + 1) * n];
                        row.iter_mut().zip(vrow).for_each(|(o, v)| *o += c * v);
                    }
                }
                Ok(Matrix {
                    rows: m,
                    cols: n,
                    data,
                })
            }
        }
    }

    /// y = x · Wᵀ for `x` of shape [rows, n] (row-major), computed through the factors
    /// ((x·V)·diag(s))·Uᵀ without forming W. Returns [rows, m].
    pub fn apply(&self, name: &str, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.apply_view(name, self.get(name)?, x, rows)
    }

    /// [`Checkpoint::apply`] for expert `e` of stacked experts tensor `name`.
    pub fn apply_expert(&self, name: &str, e: usize, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.apply_view(name, self.expert(name, e)?, x, rows)
    }

    fn apply_view(
        &self,
        name: &str,
        view: TensorView<'_>,
        x: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        let usage = |reason: String| Error::Usage {
            tensor: name.to_string(),
            reason,
        };
        match view {
            TensorView::Experts(_) => Err(experts_usage(name)),
            TensorView::Dense(t) => {
                let (m, n) = dense_matrix_dims(name, t.shape)?;
                if x.len() != rows * n {
                    return Err(usage(format!(
                        "x has {} values, expected {rows}×{n}",
                        x.len()
                    )));
                }
                let w = t
                    .to_f32()
                    .ok_or_else(|| usage(format!("dtype {} is not a float type", t.dtype)))?;
                Ok(matmul_bt(x, rows, n, &w, m))
            }
            TensorView::Factored(f) => {
                let [m, n] = f.matrix_shape;
                if x.len() != rows * n {
                    return Err(usage(format!(
                        "x has {} values, expected {rows}×{n}",
                        x.len()
                    )));
                }
                let (u, s, vt) = decode_factors(name, &f)?;
                let r = f.rank;
                // t = x · V (V = vtᵀ): t[b, k] = Σ_j x[b, j] vt[k, j]
                let mut t = matmul_bt(x, rows, n, &vt, r);
                for row in t.chunks_exact_mut(r.max(1)) {
                    row.iter_mut().zip(&s).for_each(|(a, b)| *a *= b);
                }
                // y = t · Uᵀ: y[b, i] = Σ_k t[b, k] u[i, k]
                Ok(matmul_bt(&t, rows, r, &u, m))
            }
        }
    }
}

fn experts_usage(name: &str) -> Error {
    Error::Usage {
        tensor: name.to_string(),
        reason: "a stacked experts tensor: use its experts one at a time (expert, \
                 reconstruct_expert, apply_expert)"
            .into(),
    }
}

fn dense_matrix_dims(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [] | [_] => Err(Error::Usage {
            tensor: name.to_string(),
            reason: format!("shape {shape:?} is not a matrix"),
        }),
        [m, rest @ ..] => Ok((*m, rest.iter().product())),
    }
}

fn decode_factors(name: &str, f: &Factors<'_>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    f.values().map_err(|what| Error::Usage {
        tensor: name.to_string(),
        reason: format!("{what} cannot be decoded as {}", f.encoding),
    })
}

/// a [rows, k] · bᵀ where b is [cols, k]; both row-major. Result [rows, cols].
/// Inner products run over contiguous rows of both operands.
fn matmul_bt(a: &[f32], rows: usize, k: usize, b: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if k == 0 {
        return out;
    }
    for (i, arow) in a.chunks_exact(k).enumerate().take(rows) {
        for (j, brow) in b.chunks_exact(k).enumerate().take(cols) {
            // f64 accumulation: the loader is a reference path, not a hot loop.
            let dot: f64 = arow
                .iter()
                .zip(brow)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            out[i * cols + j] = dot as f32;
        }
    }
    out
}
