//! `cersa export --to safetensors`: a CERSA checkpoint (optionally with a trained adapter
//! folded in) back to a plain Hugging Face model directory.
//!
//! Every tensor is written under its source name and shape: dense ones as stored (or cast
//! to `--dtype`), factored ones recomposed as W = U·diag(σ)·Vᵀ — or the adapted W' of
//! `cersa_loader::adapter` — in f64 and rounded once to the output dtype (the source's float
//! dtype by default; BF16 for quantized sources). The shard layout is known from the
//! manifest before any data is computed, so each shard's header is written first and the
//! tensors streamed after it. Tensors are recomposed `threads` at a time, each on one core
//! (the bytes do not depend on the thread count), and written in name order. Output goes to
//! a hidden sibling directory renamed into place at the end, as `convert` does.
//! [`peft`] writes the adapter alone as a PEFT LoRA directory.

pub mod gguf;
mod gguf_hf;
pub mod peft;

use crate::error::{ConvertError, Result};
use cersa_loader::adapter::Adapter;
use cersa_loader::dtype::{decode_f64, encode_f64};
use cersa_loader::safetensors::serialize_header;
use cersa_loader::{Checkpoint, Dtype, TensorView};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wire-format version of [`ExportReport`].
pub const EXPORT_REPORT_VERSION: u32 = 1;

/// Name of the shard index Hugging Face loaders read for sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Options of [`export_safetensors`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Output dtype of the float tensors; `None`: each tensor's source float dtype (BF16
    /// where the source was quantized).
    pub dtype: Option<Dtype>,
    /// A shard is closed before it would exceed this many tensor bytes.
    pub max_shard_size: u64,
    /// Tensors recomposed at once.
    pub threads: usize,
    /// A trained adapter to fold in.
    pub adapter: Option<PathBuf>,
}

/// One written file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    /// File name inside the output directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The result of an export, as printed by `cersa export --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportReport {
    /// [`EXPORT_REPORT_VERSION`].
    pub report_version: u32,
    /// The output directory.
    pub out_dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Of them, recomposed from factors.
    pub recomposed: usize,
    /// Of them, with the adapter's update folded in.
    pub adapted: usize,
    /// Sum of the tensors' bytes (the index's `total_size`).
    pub tensor_bytes: u64,
    /// The safetensors shards (and index), in order.
    pub files: Vec<ExportedFile>,
    /// Side files copied from the CERSA directory (`config.json`, tokenizer files).
    pub side_files: Vec<String>,
}

/// What one output tensor is: where it comes from and how it is written.
struct Planned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: usize,
}

/// The output dtype of a tensor stored as `stored` with source dtype `source`.
fn output_dtype(opt: Option<Dtype>, source: &str, stored: Dtype, factored: bool) -> Dtype {
    let float = |d: Dtype| d.is_factor_float();
    match opt {
        Some(d) if float(stored) || factored => d,
        _ if factored => Dtype::parse(source)
            .filter(|d| float(*d))
            .unwrap_or(Dtype::BF16),
        _ => stored,
    }
}

/// Lays out the tensors, in name order, into shards of at most `max` data bytes (a larger
/// tensor gets its own shard).
fn shard_layout(planned: &[Planned], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, p) in planned.iter().enumerate() {
        if i > start && size + p.bytes as u64 > max {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size += p.bytes as u64;
    }
    if start < planned.len() || planned.is_empty() {
        shards.push(start..planned.len());
    }
    shards
}

fn shard_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", k + 1)
    }
}

/// W = L·R in f64, row-major [m, n], for L row-major [m, q] and R row-major [q, n], on one
/// core (a fixed summation order: the same bytes whatever the thread count).
fn product(left: &[f64], right: &[f64], m: usize, q: usize, n: usize) -> Vec<f64> {
    let mut w = vec![0f64; m * n];
    // Row-major [m, n] is column-major Wᵀ [n, m] = Rᵀ·Lᵀ.
    let lt = MatRef::from_column_major_slice(left, q, m);
    let rt = MatRef::from_column_major_slice(right, n, q);
    let wt = MatMut::from_column_major_slice_mut(&mut w, n, m);
    matmul(wt, Accum::Replace, rt, lt, 1.0, Par::Seq);
    w
}

/// One tensor's content before it is written.
enum Values<'a> {
    /// A dense tensor's stored bytes.
    Stored(Dtype, &'a [u8]),
    /// Values in f64, row-major (a recomposed W, or a dense tensor to be cast).
    F64(Vec<f64>),
}

/// An error about tensor `name` of the checkpoint.
fn tensor_error(ckpt: &Checkpoint, name: &str, reason: String) -> ConvertError {
    ConvertError::Tensor {
        path: ckpt.dir().to_path_buf(),
        tensor: name.to_string(),
        reason,
    }
}

/// Tensor `name` as stored (dense), or recomposed in f64 (factored, with the adapter's
/// update when it adapts this tensor); `as_f64` also decodes a dense tensor.
fn tensor_values<'a>(
    ckpt: &'a Checkpoint,
    adapter: Option<&Adapter>,
    name: &str,
    keep: Option<Dtype>,
) -> Result<Values<'a>> {
    let fail = |reason: String| tensor_error(ckpt, name, reason);
    let adapted = adapter.filter(|a| a.layers.contains_key(name));
    Ok(match ckpt.get(name)? {
        // A dense-base layer (checked by check_base: a dense float matrix): W + ΔW.
        TensorView::Dense(t) if adapted.is_some() => Values::F64({
            let a = adapted.expect("matched");
            let [m, n] = a.layers[name].matrix_shape;
            let mut w = decode_f64(t.dtype, t.bytes)
                .filter(|w| w.len() == m * n)
                .ok_or_else(|| fail(format!("cannot read {} values as [{m}, {n}]", t.dtype)))?;
            let (left, right, q) = a.dense_update(name)?;
            let delta = product(&left, &right, m, q, n);
            w.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
            w
        }),
        TensorView::Dense(t) if Some(t.dtype) == keep || !t.dtype.is_factor_float() => {
            Values::Stored(t.dtype, t.bytes)
        }
        TensorView::Dense(t) => Values::F64(
            decode_f64(t.dtype, t.bytes)
                .ok_or_else(|| fail(format!("cannot read {} values", t.dtype)))?,
        ),
        TensorView::Factored(f) => Values::F64({
            let [m, n] = f.matrix_shape;
            match adapted {
                Some(a) => {
                    let (left, right, q) = a.adapted_product(ckpt, name)?;
                    product(&left, &right, m, q, n)
                }
                None => recompose(&f).map_err(fail)?,
            }
        }),
        // Every expert in turn, dense ones decoded (adapters never adapt experts).
        TensorView::Experts(count) => {
            let mut values = Vec::new();
            for e in 0..count {
                match ckpt.expert(name, e)? {
                    TensorView::Factored(f) => values.extend(recompose(&f).map_err(fail)?),
                    TensorView::Dense(t) => values.extend(
                        decode_f64(t.dtype, t.bytes)
                            .ok_or_else(|| fail(format!("cannot read {} values", t.dtype)))?,
                    ),
                    TensorView::Experts(_) => unreachable!("experts are dense or factored"),
                }
            }
            Values::F64(values)
        }
    })
}

/// U·diag(σ)·Vᵀ of stored factors, in f64.
fn recompose(f: &cersa_loader::Factors<'_>) -> std::result::Result<Vec<f64>, String> {
    let [m, n] = f.matrix_shape;
    let (mut u, s, vt) = f
        .values_f64()
        .map_err(|what| format!("cannot decode {what} ({})", f.encoding))?;
    let r = f.rank;
    for row in u.chunks_exact_mut(r.max(1)) {
        row.iter_mut().zip(&s).for_each(|(x, sv)| *x *= sv);
    }
    Ok(product(&u, &vt, m, r, n))
}

/// The bytes of one output tensor.
fn tensor_bytes(ckpt: &Checkpoint, adapter: Option<&Adapter>, p: &Planned) -> Result<Vec<u8>> {
    match tensor_values(ckpt, adapter, &p.name, Some(p.dtype))? {
        Values::Stored(dtype, bytes) if dtype == p.dtype => Ok(bytes.to_vec()),
        Values::Stored(dtype, _) => Err(tensor_error(
            ckpt,
            &p.name,
            format!("cannot write {dtype} values as {}", p.dtype),
        )),
        Values::F64(values) => encode_f64(p.dtype, &values)
            .ok_or_else(|| tensor_error(ckpt, &p.name, format!("cannot write it as {}", p.dtype))),
    }
}

/// The adapter at `path`, checked against `ckpt`.
fn read_adapter(path: Option<&Path>, ckpt: &Checkpoint) -> Result<Option<Adapter>> {
    let Some(path) = path else { return Ok(None) };
    let a = Adapter::read(path)?;
    a.check_base(ckpt)?;
    Ok(Some(a))
}

/// Computes `compute` of `items` `threads` at a time on a pool of that many threads, and
/// hands each result to `sink` in order (so the output does not depend on the thread
/// count); stops at the first error, or before a window once `cancel` is set.
fn in_windows<T: Sync>(
    items: &[T],
    threads: usize,
    cancel: &AtomicBool,
    compute: &(dyn Fn(&T) -> Result<Vec<u8>> + Sync),
    sink: &mut dyn FnMut(&T, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| ConvertError::Options(format!("cannot start the thread pool: {e}")))?;
    for window in items.chunks(threads) {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        let results: Vec<Result<Vec<u8>>> =
            pool.install(|| window.par_iter().map(compute).collect());
        for (item, bytes) in window.iter().zip(results) {
            sink(item, bytes?)?;
        }
    }
    Ok(())
}

/// Exports the checkpoint at `dir` to a Hugging Face safetensors directory `out` (which
/// must not exist or be empty). `progress(done, total)` is called after each tensor; once
/// `cancel` is set no further tensor starts and nothing is left at `out`.
pub fn export_safetensors(
    dir: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<ExportReport> {
    let ckpt = Checkpoint::open(dir)?;
    let adapter = read_adapter(opts.adapter.as_deref(), &ckpt)?;
    let mut planned = Vec::new();
    for (name, info) in &ckpt.manifest().tensors {
        let factored = info.has_factors();
        let stored = info.stored_dtype;
        let dtype = output_dtype(opts.dtype, &info.source_dtype, stored, factored);
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = numel
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| ConvertError::Tensor {
                path: dir.to_path_buf(),
                tensor: name.clone(),
                reason: format!("shape {:?} overflows", info.shape),
            })?;
        planned.push(Planned {
            name: name.clone(),
            dtype,
            shape: info.shape.clone(),
            bytes,
        });
    }
    let job = Job {
        ckpt: &ckpt,
        adapter: adapter.as_ref(),
        planned: &planned,
        opts,
        progress,
        cancel,
    };
    let mut report = write_staged(out, |tmp| write_all(&job, tmp))?;
    report.out_dir = out.to_path_buf();
    Ok(report)
}

/// Runs `write` into the hidden partial sibling of `out` (locked, as `convert` does) and
/// renames it into place; on any error nothing is left at `out`.
pub(super) fn write_staged<R>(out: &Path, write: impl FnOnce(&Path) -> Result<R>) -> Result<R> {
    let staging = crate::convert::prepare_output(out, false, false)?;
    let tmp = &staging.partial;
    match write(tmp).and_then(|r| crate::convert::commit(&staging, out).map(|()| r)) {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(e)
        }
    }
}

/// What [`write_all`] reads.
struct Job<'a> {
    ckpt: &'a Checkpoint,
    adapter: Option<&'a Adapter>,
    planned: &'a [Planned],
    opts: &'a ExportOptions,
    progress: &'a (dyn Fn(usize, usize) + Sync),
    cancel: &'a AtomicBool,
}

fn write_all(job: &Job, tmp: &Path) -> Result<ExportReport> {
    let layout = shard_layout(job.planned, job.opts.max_shard_size.max(1));
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let (mut done, total) = (0, job.planned.len());
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for (k, range) in layout.iter().enumerate() {
        let file = shard_name(k, layout.len());
        let path = tmp.join(&file);
        let shard = &job.planned[range.clone()];
        let entries: Vec<_> = shard
            .iter()
            .map(|p| (p.name.clone(), p.dtype, p.shape.clone(), p.bytes))
            .collect();
        let header = serialize_header(&metadata, &entries);
        let io = |e| ConvertError::io(&path, "write", e);
        let mut w = BufWriter::new(File::create(&path).map_err(io)?);
        w.write_all(&header).map_err(io)?;
        in_windows(
            shard,
            job.opts.threads,
            job.cancel,
            &|p| tensor_bytes(job.ckpt, job.adapter, p),
            &mut |p, b| {
                debug_assert_eq!(b.len(), p.bytes);
                w.write_all(&b).map_err(io)?;
                weight_map.insert(p.name.clone(), file.clone());
                done += 1;
                (job.progress)(done, total);
                Ok(())
            },
        )?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        let bytes = f.metadata().map_err(io)?.len();
        files.push(ExportedFile { file, bytes });
    }
    let tensor_bytes: u64 = job.planned.iter().map(|p| p.bytes as u64).sum();
    if layout.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": tensor_bytes},
            "weight_map": weight_map,
        });
        let path = tmp.join(INDEX_FILE);
        let text = serde_json::to_vec_pretty(&index).expect("json serializes");
        std::fs::write(&path, &text).map_err(|e| ConvertError::io(&path, "write", e))?;
        files.push(ExportedFile {
            file: INDEX_FILE.into(),
            bytes: text.len() as u64,
        });
    }
    let side = crate::side_files::carry_side_files(job.ckpt, tmp, false)?;
    let adapted = job.adapter.map_or(0, |a| {
        job.planned
            .iter()
            .filter(|p| a.layers.contains_key(&p.name))
            .count()
    });
    let manifest = job.ckpt.manifest();
    Ok(ExportReport {
        report_version: EXPORT_REPORT_VERSION,
        out_dir: PathBuf::new(),
        tensors: job.planned.len(),
        recomposed: manifest
            .tensors
            .values()
            .filter(|t| t.has_factors())
            .count(),
        adapted,
        tensor_bytes,
        files,
        side_files: side.into_iter().map(|f| f.file).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(bytes: &[usize]) -> Vec<Planned> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| Planned {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![b],
                bytes: b,
            })
            .collect()
    }

    #[test]
    fn shards_close_before_they_overflow() {
        assert_eq!(shard_layout(&planned(&[4, 4, 4]), 8), vec![0..2, 2..3]);
        assert_eq!(shard_layout(&planned(&[10, 1]), 8), vec![0..1, 1..2]);
        assert_eq!(
            shard_layout(&planned(&[1, 10, 1]), 8),
            vec![0..1, 1..2, 2..3]
        );
        assert_eq!(shard_layout(&planned(&[]), 8), vec![0..0]);
    }

    #[test]
    fn product_is_the_row_major_matrix_product() {
        // L [2, 3], R [3, 2].
        let l = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let r = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        assert_eq!(product(&l, &r, 2, 3, 2), vec![58.0, 64.0, 139.0, 154.0]);
        assert_eq!(product(&[], &[], 2, 0, 2), vec![0.0; 4]);
    }
}
