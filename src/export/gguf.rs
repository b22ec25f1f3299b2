//! `cersa export --to gguf`: a CERSA checkpoint back to one GGUF file llama.cpp loads,
//! `OUT_DIR/model.gguf`.
//!
//! From a GGUF source, the metadata pairs (architecture, hyperparameters, tokenizer, chat
//! template) are copied byte for byte from the side file `source-metadata.gguf` that
//! `convert` wrote from the source, so a checkpoint whose source is gone still exports, and
//! tensors keep their GGUF names. From a Hugging Face source of the Llama family, names,
//! hyperparameters and tokenizer are mapped from its side files ([`super::gguf_hf`]). The
//! row-major CERSA shape is written as GGUF's innermost-first dimensions. Types:
//! the source's float type by default (BF16 where the source was quantized), or one
//! `--dtype` for every float tensor with two or more dimensions — F32/F16/BF16, or Q8_0 /
//! Q5_0 / Q4_0 blocks along each row, bit-equal to `gguf.quants.quantize`. As llama.cpp's
//! own converter does, one-dimensional tensors (norms, biases) stay F32 under an explicit
//! type, and a row that is not a whole number of 32-value blocks falls back to F16 (listed
//! in the report). The header is laid out before any data: each tensor's offset is the
//! running sum of the padded sizes before it, the layout llama.cpp's reader requires.

use super::gguf_hf::{hf_mapping, Mapped, RowPermutation};
use super::{tensor_values, Values};
use crate::error::{ConvertError, Result};
use crate::input::gguf::ggml::GgmlType;
use crate::input::gguf::header::parse;
use cersa_loader::adapter::Adapter;
use cersa_loader::dtype::{decode_f64, encode_f64};
use cersa_loader::quant::{Quant, BLOCK};
use cersa_loader::{Checkpoint, Dtype};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The file written into the output directory.
pub const GGUF_FILE: &str = "model.gguf";

/// The GGUF version written (gguf-py and llama.cpp write 3).
const VERSION: u32 = 3;

/// What the float tensors are written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufTarget {
    /// Each tensor's source float type (BF16 where the source was quantized).
    Source,
    /// One plain float type (F32, F16 or BF16).
    Float(Dtype),
    /// One block type.
    Quant(Quant),
}

/// Options of [`export_gguf`].
#[derive(Debug, Clone)]
pub struct GgufOptions {
    /// Tensor types.
    pub target: GgufTarget,
    /// Tensors recomposed at once.
    pub threads: usize,
    /// A trained adapter to fold in.
    pub adapter: Option<PathBuf>,
}

/// The result, as printed by `cersa export --to gguf --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufReport {
    /// [`super::EXPORT_REPORT_VERSION`].
    pub report_version: u32,
    /// The GGUF file written.
    pub file: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Of them, recomposed from factors.
    pub recomposed: usize,
    /// Of them, with the adapter's update folded in.
    pub adapted: usize,
    /// Metadata pairs copied from the source.
    pub metadata_keys: usize,
    /// Tensors per GGML type written.
    pub types: BTreeMap<String, usize>,
    /// Tensors written as F16 because their rows are not whole blocks of the type asked for.
    pub fallbacks: Vec<String>,
    /// For a checkpoint of a Hugging Face source: what the mapping to llama.cpp's names,
    /// hyperparameters and tokenizer could not carry over (absent for GGUF sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One output tensor.
struct Planned {
    /// The checkpoint's name.
    source: String,
    /// The GGUF name.
    name: String,
    /// Rows reordered on the way out (Q and K of a Hugging Face Llama).
    permute: Option<RowPermutation>,
    /// GGUF dimensions, innermost first.
    ne: Vec<u64>,
    ty: GgmlType,
    bytes: usize,
    /// Written as F16 because its rows are not whole blocks of the type asked for.
    fallback: bool,
}

/// The type of a tensor with source dtype `source`, stored as `stored`, of GGUF dimensions
/// `ne`; `true` when it fell back to F16.
fn tensor_type(
    target: GgufTarget,
    source: &str,
    stored: Dtype,
    factored: bool,
    ne: &[u64],
) -> Option<(GgmlType, bool)> {
    let float = factored || stored.is_factor_float() || stored == Dtype::F64;
    if !float {
        return GgmlType::of_dtype(stored).map(|t| (t, false));
    }
    let source_type = || {
        Dtype::parse(source)
            .filter(|d| d.is_factor_float() || *d == Dtype::F64)
            .and_then(GgmlType::of_dtype)
            .unwrap_or(GgmlType::BF16)
    };
    let vector = ne.len() < 2;
    Some(match target {
        GgufTarget::Source => (source_type(), false),
        _ if vector => (GgmlType::F32, false),
        GgufTarget::Float(d) => (GgmlType::of_dtype(d)?, false),
        GgufTarget::Quant(_) if !ne[0].is_multiple_of(BLOCK as u64) => (GgmlType::F16, true),
        GgufTarget::Quant(Quant::Q8_0) => (GgmlType::Q8_0, false),
        GgufTarget::Quant(Quant::Q5_0) => (GgmlType::Q5_0, false),
        GgufTarget::Quant(Quant::Q4_0) => (GgmlType::Q4_0, false),
    })
}

/// What the file's header carries besides the tensor table.
struct Metadata {
    /// Encoded pairs (key, type, value), written as they are.
    kv: Vec<u8>,
    kv_count: u64,
    alignment: u64,
    /// Checkpoint name → GGUF name (Hugging Face sources; GGUF sources keep their names).
    names: Option<BTreeMap<String, Option<Mapped>>>,
    notes: Vec<String>,
}

/// The metadata of the output: the pairs the checkpoint recorded from its GGUF source
/// (copied verbatim), or for a Hugging Face source the Llama mapping of its side files.
fn metadata(ckpt: &Checkpoint) -> Result<Metadata> {
    let name = crate::side_files::SOURCE_METADATA;
    let path = ckpt.dir().join(name);
    let listed = ckpt.manifest().side_files.iter().any(|f| f.file == name);
    if !listed {
        if ckpt.manifest().source.format == "gguf" {
            return Err(ConvertError::Source {
                path: ckpt.dir().to_path_buf(),
                reason: format!(
                    "this checkpoint was converted from GGUF before cersa kept the source's \
                     metadata ({name}); convert the GGUF file again to export it as GGUF"
                ),
            });
        }
        let m = hf_mapping(ckpt)?;
        return Ok(Metadata {
            kv: m.kv,
            kv_count: m.kv_count,
            alignment: 32,
            names: Some(m.names),
            notes: m.notes,
        });
    }
    let bytes = cersa_loader::regular::read_regular(&path)
        .map_err(|e| ConvertError::io(&path, "read", e))?;
    let header = parse(&bytes).map_err(|e| ConvertError::Source {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut kv = Vec::new();
    for (_, range) in &header.metadata {
        kv.extend_from_slice(&bytes[range.clone()]);
    }
    Ok(Metadata {
        kv,
        kv_count: header.metadata.len() as u64,
        alignment: header.alignment,
        names: None,
        notes: Vec::new(),
    })
}

fn plan(ckpt: &Checkpoint, target: GgufTarget, meta: &Metadata) -> Result<Vec<Planned>> {
    let mut out = Vec::new();
    for (name, info) in &ckpt.manifest().tensors {
        let fail = |reason: String| super::tensor_error(ckpt, name, reason);
        let (gguf_name, permute) = match &meta.names {
            None => (name.clone(), None),
            Some(names) => match names.get(name) {
                Some(Some(m)) => (m.name.clone(), m.permute),
                // Dropped (rotary buffers).
                Some(None) => continue,
                None => return Err(fail("has no llama.cpp name".into())),
            },
        };
        if let Some(p) = permute {
            let rows = info.shape.first().copied().unwrap_or(1);
            if p.heads == 0 || rows % (2 * p.heads) != 0 {
                return Err(fail(format!(
                    "{rows} rows do not split into {} heads of pairs (config.json's head \
                     counts do not match the weights)",
                    p.heads
                )));
            }
        }
        let ne: Vec<u64> = match info.shape.as_slice() {
            [] => vec![1],
            s => s.iter().rev().map(|&d| d as u64).collect(),
        };
        let factored = info.has_factors();
        let (ty, fallback) =
            tensor_type(target, &info.source_dtype, info.stored_dtype, factored, &ne)
                .ok_or_else(|| fail(format!("GGUF has no type for {}", info.stored_dtype)))?;
        let (per_block, block_bytes) = ty.block();
        let numel = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes = numel
            .and_then(|n| (n / per_block as u64).checked_mul(block_bytes as u64))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| fail(format!("shape {:?} overflows", info.shape)))?;
        out.push(Planned {
            source: name.clone(),
            name: gguf_name,
            permute,
            ne,
            ty,
            bytes,
            fallback,
        });
    }
    Ok(out)
}

/// The GGUF header: counts, the metadata pairs and the tensor table, padded to
/// `alignment`.
fn header_bytes(meta: &Metadata, planned: &[Planned]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(planned.len() as u64).to_le_bytes());
    h.extend_from_slice(&meta.kv_count.to_le_bytes());
    h.extend_from_slice(&meta.kv);
    let mut offset = 0u64;
    for p in planned {
        h.extend_from_slice(&(p.name.len() as u64).to_le_bytes());
        h.extend_from_slice(p.name.as_bytes());
        h.extend_from_slice(&(p.ne.len() as u32).to_le_bytes());
        p.ne.iter()
            .for_each(|d| h.extend_from_slice(&d.to_le_bytes()));
        h.extend_from_slice(&p.ty.id().to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + p.bytes as u64).next_multiple_of(meta.alignment);
    }
    h.resize(
        (h.len() as u64).next_multiple_of(meta.alignment) as usize,
        0,
    );
    h
}

/// The data of one tensor, `p.bytes` long.
fn data(ckpt: &Checkpoint, adapter: Option<&Adapter>, p: &Planned) -> Result<Vec<u8>> {
    let fail = |reason: String| super::tensor_error(ckpt, &p.source, reason);
    let quant = match p.ty {
        GgmlType::Q8_0 => Some(Quant::Q8_0),
        GgmlType::Q5_0 => Some(Quant::Q5_0),
        GgmlType::Q4_0 => Some(Quant::Q4_0),
        _ => None,
    };
    let plain = p.ty.plain_dtype();
    // GGUF's outermost dimension is the rows of the row-major tensor.
    let rows = p.ne.last().copied().unwrap_or(1) as usize;
    let values = match tensor_values(ckpt, adapter, &p.source, plain)? {
        Values::Stored(d, bytes) if Some(d) == plain => {
            return Ok(match p.permute {
                None => bytes.to_vec(),
                Some(perm) => {
                    let width = d.size();
                    let elems: Vec<&[u8]> = bytes.chunks_exact(width).collect();
                    perm.apply(&elems, rows).concat()
                }
            })
        }
        Values::Stored(d, bytes) => decode_f64(d, bytes)
            .filter(|_| d.is_factor_float() || d == Dtype::F64)
            .ok_or_else(|| fail(format!("cannot write {d} values as {}", p.ty.name())))?,
        Values::F64(v) => v,
    };
    let values = match p.permute {
        Some(perm) => perm.apply(&values, rows),
        None => values,
    };
    match (quant, plain) {
        (Some(q), _) => {
            let row = p.ne[0] as usize;
            let mut out = Vec::with_capacity(p.bytes);
            let mut buf = Vec::with_capacity(row);
            for chunk in values.chunks_exact(row.max(1)) {
                buf.clear();
                // gguf-py quantizes f32 values: round once to f32, then to blocks.
                buf.extend(chunk.iter().map(|&v| v as f32));
                q.quantize_row(&buf, &mut out);
            }
            Ok(out)
        }
        (None, Some(d)) => {
            encode_f64(d, &values).ok_or_else(|| fail(format!("cannot write it as {d}")))
        }
        (None, None) => Err(fail(format!("cannot write type {}", p.ty.name()))),
    }
}

/// Exports the checkpoint at `dir` (converted from a GGUF file) to `out/model.gguf`; `out`
/// must not exist or be empty. `progress(done, total)` is called after each tensor; once
/// `cancel` is set no further tensor starts and nothing is left at `out`.
pub fn export_gguf(
    dir: &Path,
    out: &Path,
    opts: &GgufOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<GgufReport> {
    let ckpt = Checkpoint::open(dir)?;
    let meta = metadata(&ckpt)?;
    let adapter = super::read_adapter(opts.adapter.as_deref(), &ckpt)?;
    let planned = plan(&ckpt, opts.target, &meta)?;
    let job = Job {
        ckpt: &ckpt,
        adapter: adapter.as_ref(),
        planned: &planned,
        header: header_bytes(&meta, &planned),
        alignment: meta.alignment,
        threads: opts.threads.max(1),
        progress,
        cancel,
    };
    let bytes = super::write_staged(out, |tmp| write_file(&job, &tmp.join(GGUF_FILE)))?;
    let mut types = BTreeMap::new();
    for p in &planned {
        *types.entry(p.ty.name().to_string()).or_default() += 1;
    }
    let fallbacks = (planned.iter().filter(|p| p.fallback))
        .map(|p| p.name.clone())
        .collect();
    let manifest = ckpt.manifest();
    Ok(GgufReport {
        report_version: super::EXPORT_REPORT_VERSION,
        file: out.join(GGUF_FILE),
        bytes,
        tensors: planned.len(),
        recomposed: manifest
            .tensors
            .values()
            .filter(|t| t.has_factors())
            .count(),
        adapted: adapter.as_ref().map_or(0, |a| {
            (planned.iter())
                .filter(|p| a.layers.contains_key(&p.source))
                .count()
        }),
        metadata_keys: meta.kv_count as usize,
        types,
        fallbacks,
        notes: meta.notes,
    })
}

/// What [`write_file`] reads.
struct Job<'a> {
    ckpt: &'a Checkpoint,
    adapter: Option<&'a Adapter>,
    planned: &'a [Planned],
    header: Vec<u8>,
    alignment: u64,
    threads: usize,
    progress: &'a (dyn Fn(usize, usize) + Sync),
    cancel: &'a AtomicBool,
}

/// Writes the header, then the tensors `threads` at a time (in order, so the bytes do not
/// depend on the thread count), each padded to the alignment; returns the file's size.
fn write_file(job: &Job, path: &Path) -> Result<u64> {
    let io = |e| ConvertError::io(path, "write", e);
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    w.write_all(&job.header).map_err(io)?;
    let mut written = job.header.len() as u64;
    let (mut done, total) = (0, job.planned.len());
    super::in_windows(
        job.planned,
        job.threads,
        job.cancel,
        &|p| data(job.ckpt, job.adapter, p),
        &mut |p, bytes| {
            debug_assert_eq!(bytes.len(), p.bytes);
            let padded = (bytes.len() as u64).next_multiple_of(job.alignment);
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; (padded - bytes.len() as u64) as usize])
                .map_err(io)?;
            written += padded;
            done += 1;
            (job.progress)(done, total);
            Ok(())
        },
    )?;
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(written)
}
