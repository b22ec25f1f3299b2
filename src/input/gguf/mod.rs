//! GGUF sources (llama.cpp checkpoints): memory-mapped files, tensors decoded in place.
//!
//! A model split by llama.cpp's `gguf-split` (or gguf-py's `split_max_*`) is read whole from
//! any of its parts: `PREFIX-00001-of-00003.gguf` … `PREFIX-00003-of-00003.gguf`, each with
//! `split.no`, `split.count` and (first part) `split.tensors.count`, all checked.
//!
//! The header is read by our own strict parser ([`header`]), not the `gguf-rs` crate:
//! gguf-rs 0.1.8 reads no tensor data and no split models, panics on NVFP4 tensors,
//! allocates a string's declared length (up to 1 GiB) before reading it, caps array
//! counts only for `tokenizer.*` keys, decodes names lossily, opens its own memory map
//! outside the loader's single unsafe edge, and reports errors as untyped `anyhow`
//! values (DEPENDENCIES.md). Here every size from the file is checked before use.

mod block;
mod codebook_quants;
pub mod ggml;
mod grid_quants;
mod grids;
pub mod header;
mod quants;

use super::mapped::Mapped;
use super::{Catalog, FloatData, Precision, Source, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::dtype::{decode_f64, encode_f32};
use cersa_loader::Dtype;
use ggml::{dequantize, GgmlType};
use header::{parse, GgufHeader, GgufTensor};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// f32 values decoded per chunk of a re-encoded (dequantized) dense copy.
const DECODE_CHUNK: usize = 2 << 20;

/// One mapped GGUF file (the whole model, or one part of a split model).
struct Part {
    file: Mapped,
    header: GgufHeader,
}

/// An opened GGUF model.
pub struct GgufSource {
    parts: Vec<Part>,
    catalog: Catalog,
    /// Tensor i is `parts[at[i].0].header.tensors[at[i].1]`.
    at: Vec<(usize, usize)>,
}

/// Dtype a tensor of type `ty` is copied in when it stays dense; quantized tensors are
/// dequantized and re-encoded in `requantized`.
fn dense_dtype(ty: GgmlType, requantized: Dtype) -> Dtype {
    match ty {
        GgmlType::F32 => Dtype::F32,
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::BF16,
        GgmlType::F64 => Dtype::F64,
        GgmlType::I8 => Dtype::I8,
        GgmlType::I16 => Dtype::I16,
        GgmlType::I32 => Dtype::I32,
        GgmlType::I64 => Dtype::I64,
        _ => requantized,
    }
}

/// Maps and parses one file.
fn open_part(path: &Path) -> Result<Part> {
    let file = Mapped::open(path)?;
    let header = parse(file.bytes()).map_err(|kind| ConvertError::Gguf {
        path: path.to_path_buf(),
        kind,
    })?;
    Ok(Part { file, header })
}

/// `(PREFIX, part number)` of a file named `PREFIX-NNNNN-of-CCCCC.gguf` whose `CCCCC` is
/// `count` (llama.cpp's `llama_split_path` naming, 1-based).
fn split_name(name: &str, count: u64) -> Option<(&str, u64)> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, of) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(no) && digits(of) && of.parse::<u64>().ok()? == count)
        .then(|| Some((prefix, no.parse().ok()?)))
        .flatten()
}

/// Every part of the split model that `first` (already opened, `split.count` > 1) belongs
/// to, in `split.no` order, each checked against its name and the others.
fn open_split(first: Part) -> Result<Vec<Part>> {
    let keys = first.header.split.expect("caller checked");
    let bad = |path: &Path, reason: String| ConvertError::Source {
        path: path.to_path_buf(),
        reason,
    };
    let name = first.file.file_name();
    let (prefix, no) = split_name(&name, keys.count).ok_or_else(|| {
        bad(
            first.file.path(),
            format!(
                "part {} of a model split in {} (split.no/split.count), but the name does not \
                 follow PREFIX-{:05}-of-{:05}.gguf, so the other parts cannot be found",
                keys.no + 1,
                keys.count,
                keys.no + 1,
                keys.count
            ),
        )
    })?;
    if no != keys.no + 1 {
        return Err(bad(
            first.file.path(),
            format!("named part {no} but its split.no says part {}", keys.no + 1),
        ));
    }
    let dir = first
        .file
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut given = Some(first);
    // split.count is the file's word (the name only has to agree with it, and
    // `m-00001-of-18446744073709551615.gguf` does): grown part by part, never reserved.
    let mut parts = Vec::new();
    for i in 0..keys.count {
        let part = if i == keys.no {
            given.take().expect("one given part")
        } else {
            let path = dir.join(format!("{prefix}-{:05}-of-{:05}.gguf", i + 1, keys.count));
            if !path.exists() {
                return Err(bad(
                    &path,
                    format!(
                        "part {} of {} of the split model is missing",
                        i + 1,
                        keys.count
                    ),
                ));
            }
            open_part(&path)?
        };
        match part.header.split {
            Some(k) if k.no == i && k.count == keys.count => {}
            other => {
                return Err(bad(
                    part.file.path(),
                    format!(
                        "expected part {} of {}, but its split keys say {}",
                        i + 1,
                        keys.count,
                        other.map_or("nothing (not a split part)".into(), |k| format!(
                            "part {} of {}",
                            k.no + 1,
                            k.count
                        ))
                    ),
                ))
            }
        }
        parts.push(part);
    }
    let total: usize = parts.iter().map(|p| p.header.tensors.len()).sum();
    for part in &parts {
        match part.header.split.and_then(|k| k.tensors) {
            Some(want) if want != total as u64 => {
                return Err(bad(
                    part.file.path(),
                    format!(
                        "split.tensors.count says {want} tensors, the {} parts hold {total}",
                        parts.len()
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(parts)
}

impl GgufSource {
    /// Maps and parses `path`, and the other parts when it is part of a split model.
    pub fn open(path: &Path) -> Result<Self> {
        let first = open_part(path)?;
        let parts = match first.header.split {
            Some(k) if k.count > 1 => open_split(first)?,
            _ => vec![first],
        };
        let mut tensors = Vec::new();
        let mut at = Vec::new();
        let mut owner: HashMap<&str, usize> = HashMap::new();
        for (p, part) in parts.iter().enumerate() {
            for (j, t) in part.header.tensors.iter().enumerate() {
                if let Some(q) = owner.insert(t.name.as_str(), p) {
                    return Err(ConvertError::Source {
                        path: part.file.path().to_path_buf(),
                        reason: format!(
                            "tensor `{}` is also in {}",
                            t.name,
                            parts[q].file.path().display()
                        ),
                    });
                }
                tensors.push(meta_of(t, p));
                at.push((p, j));
            }
        }
        let mut catalog = Catalog::new("gguf", tensors);
        for p in &parts {
            catalog.add_file(&p.file, p.file.file_name());
        }
        Ok(GgufSource { parts, catalog, at })
    }

    fn header_tensor(&self, i: usize) -> (&Part, &GgufTensor) {
        let (p, j) = self.at[i];
        (&self.parts[p], &self.parts[p].header.tensors[j])
    }

    fn data(&self, i: usize) -> Result<(&[u8], GgmlType)> {
        let (part, t) = self.header_tensor(i);
        Ok((part.file.tensor_bytes(t.range.clone(), &t.name)?, t.ty))
    }
}

/// What the manifest and the converter need to know of tensor `t` of part `file`.
fn meta_of(t: &GgufTensor, file: usize) -> TensorMeta {
    TensorMeta {
        name: t.name.clone(),
        // GGUF lists dimensions innermost first; row-major is the reverse.
        shape: t.ne.iter().rev().map(|&d| d as usize).collect(),
        source_dtype: t.ty.name().into(),
        float: match t.ty {
            GgmlType::F64 => Some(Precision::F64),
            ty if ty.is_float() => Some(Precision::F32),
            _ => None,
        },
        dense_dtype: dense_dtype(t.ty, Dtype::BF16),
        source_bytes: t.range.len() as u64,
        file,
    }
}

impl Source for GgufSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn gguf_metadata(&self) -> Option<Vec<u8>> {
        // The model's keys live in the first part of a split model.
        let part = &self.parts[0];
        let kept: Vec<_> = part
            .header
            .metadata
            .iter()
            .filter(|(key, _)| !key.starts_with("split."))
            .collect();
        let bytes = part.file.bytes();
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&part.header.version.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&(kept.len() as u64).to_le_bytes());
        for (_, range) in kept {
            // Ranges come from the parser and lie inside the mapped file.
            out.extend_from_slice(bytes.get(range.clone())?);
        }
        Some(out)
    }

    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        let headers = || self.parts.iter().map(|p| &p.header);
        let all = || headers().flat_map(|h| h.tensors.iter());
        let types: BTreeMap<&str, &str> = all().map(|t| (t.name.as_str(), t.ty.name())).collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        all().for_each(|t| *counts.entry(t.ty.name()).or_default() += 1);
        // The general.* keys live in the first part of a split model.
        let h = &self.parts[0].header;
        let mut d = BTreeMap::from([
            ("gguf_version".into(), json!(h.version)),
            ("architecture".into(), json!(h.architecture)),
            ("name".into(), json!(h.name)),
            ("alignment".into(), json!(h.alignment)),
            ("metadata_count".into(), json!(h.kv_count)),
            ("tensor_types".into(), json!(types)),
            ("type_counts".into(), json!(counts)),
        ]);
        if self.parts.len() > 1 {
            d.insert("split_count".into(), json!(self.parts.len()));
        }
        d
    }

    fn default_excludes(&self) -> &'static [&'static str] {
        &["token_embd*", "output.weight", "*_norm*"]
    }

    fn set_requantized_dtype(&mut self, dtype: Dtype) {
        for (meta, &(p, j)) in self.catalog.tensors.iter_mut().zip(&self.at) {
            meta.dense_dtype = dense_dtype(self.parts[p].header.tensors[j].ty, dtype);
        }
    }

    fn read_float(&self, i: usize) -> Result<FloatData> {
        self.read_float_part(i, 0, 1)
    }

    /// Expert slices of a stacked tensor are whole rows, so whole blocks: the part's bytes
    /// are decoded alone.
    fn read_float_part(&self, i: usize, index: usize, parts: usize) -> Result<FloatData> {
        let (all, ty) = self.data(i)?;
        let (part, t) = self.header_tensor(i);
        let meta = &self.catalog.tensors[i];
        if parts == 0 || all.len() % parts != 0 {
            let reason = format!("{} bytes do not split into {parts} equal parts", all.len());
            return Err(part.file.tensor_error(&meta.name, reason));
        }
        let len = all.len() / parts;
        let bytes = &all[index * len..(index + 1) * len];
        let out = match meta.float {
            Some(Precision::F64) => {
                FloatData::F64(decode_f64(Dtype::F64, bytes).ok_or_else(|| {
                    let reason = "F64 data is not a whole number of values".into();
                    part.file.tensor_error(&meta.name, reason)
                })?)
            }
            Some(Precision::F32) => {
                let mut v = Vec::new();
                dequantize(ty, bytes, &mut v);
                FloatData::F32(v)
            }
            None => {
                let reason = format!("type {} cannot be decoded to floats", ty.name());
                return Err(part.file.tensor_error(&meta.name, reason));
            }
        };
        let start = t.range.start + index * len;
        part.file.release(start..start + len);
        Ok(out)
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let (bytes, ty) = self.data(i)?;
        let (src, t) = self.header_tensor(i);
        let name = &self.catalog.tensors[i].name;
        // Verbatim copy when the GGML type is already a safetensors dtype.
        if !ty.is_quantized() {
            return src.file.copy_range(t.range.clone(), name, sink);
        }
        let base = t.range.start;
        let dtype = self.catalog.tensors[i].dense_dtype;
        let (block_elems, block_bytes) = ty.block();
        let chunk = (DECODE_CHUNK / block_elems).max(1) * block_bytes;
        let mut decoded = Vec::new();
        let mut start = 0;
        while start < bytes.len() {
            let end = (start + chunk).min(bytes.len());
            decoded.clear();
            dequantize(ty, &bytes[start..end], &mut decoded);
            let encoded = encode_f32(dtype, &decoded).ok_or_else(|| {
                src.file
                    .tensor_error(name, format!("dense dtype {dtype} is not a float dtype"))
            })?;
            sink(&encoded)?;
            src.file.release(base + start..base + end);
            start = end;
        }
        Ok(())
    }

    fn check_unchanged(&self) -> Result<()> {
        self.parts.iter().try_for_each(|p| p.file.check_unchanged())
    }
}

#[cfg(test)]
mod tests {
    use super::{split_name, GgufSource};

    /// fuzz/regressions/gguf_header/split-count-u64-max.gguf: part 1 of a model split in
    /// 2^64 − 1 (split.count), named to match; opening it reserved room for 2^64 − 1 parts
    /// (`capacity overflow` panic; "memory allocation failed" abort for counts like 10^11).
    #[test]
    fn hostile_split_count_is_an_error() {
        let b = include_bytes!("../../../fuzz/regressions/gguf_header/split-count-u64-max.gguf");
        let dir = tempfile::tempdir().unwrap();
        for count in [u64::MAX, 99_999_999_999] {
            let path = dir.path().join(format!("m-00001-of-{count:05}.gguf"));
            let mut bytes = b.to_vec();
            if count != u64::MAX {
                // The split.count value (the file's last metadata value, a u64).
                let at = bytes
                    .windows(8)
                    .position(|w| w == u64::MAX.to_le_bytes())
                    .unwrap();
                bytes[at..at + 8].copy_from_slice(&count.to_le_bytes());
            }
            std::fs::write(&path, bytes).unwrap();
            let e = GgufSource::open(&path).err().unwrap().to_string();
            assert!(
                e.contains(&format!("part 2 of {count} of the split model is missing")),
                "{e}"
            );
        }
    }

    #[test]
    fn split_names_follow_llama_cpp() {
        assert_eq!(
            split_name("Llama-3-70B-Q4_K_M-00002-of-00005.gguf", 5),
            Some(("Llama-3-70B-Q4_K_M", 2))
        );
        // Wider counters are accepted, as llama.cpp prints at least five digits.
        assert_eq!(
            split_name("m-000001-of-100000.gguf", 100000),
            Some(("m", 1))
        );
        // Count that disagrees with split.count, short counters, other suffixes, no prefix
        // separator, signs.
        for (name, count) in [
            ("m-00001-of-00004.gguf", 5),
            ("m-0001-of-0005.gguf", 5),
            ("m-00001-of-00005.safetensors", 5),
            ("00001-of-00005.gguf", 5),
            ("m-+0001-of-00005.gguf", 5),
        ] {
            assert_eq!(split_name(name, count), None, "{name}");
        }
    }
}
