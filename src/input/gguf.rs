//! GGUF sources (llama.cpp checkpoints): one memory-mapped file, tensors decoded in place.
//!
//! The header is read by our own strict parser (`gguf_header`), not the `gguf-rs` crate:
//! gguf-rs 0.1.8 allocates a string's declared length (up to 1 GiB) before reading it,
//! caps array counts only for `tokenizer.*` keys, decodes names lossily, opens its own
//! memory map outside the loader's single unsafe edge, and reports errors as untyped
//! `anyhow` values. Here every size from the file is checked before use.

use super::ggml_quants::{dequantize, GgmlType};
use super::gguf_header::{parse, GgufHeader};
use super::{FileStamp, FloatData, Precision, Source, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::dtype::{decode_f64, encode_f32};
use cersa_loader::manifest::SourceFile;
use cersa_loader::mmap::MappedFile;
use cersa_loader::Dtype;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bytes copied per chunk of a verbatim dense copy.
const COPY_CHUNK: usize = 32 << 20;
/// f32 values decoded per chunk of a re-encoded (dequantized) dense copy.
const DECODE_CHUNK: usize = 2 << 20;

/// An opened GGUF file.
pub struct GgufSource {
    path: PathBuf,
    map: MappedFile,
    stamp: FileStamp,
    header: GgufHeader,
    file_info: Vec<SourceFile>,
    tensors: Vec<TensorMeta>,
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

impl GgufSource {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let stamp = FileStamp::of(path)?;
        // SAFETY (of the contract): `stamp` is checked again before the output is
        // committed, so a file changed under the map is reported, not trusted.
        #[allow(unsafe_code)]
        let map = unsafe { MappedFile::open(path)? };
        let header = parse(map.bytes()).map_err(|kind| ConvertError::Gguf {
            path: path.to_path_buf(),
            kind,
        })?;
        let tensors = header
            .tensors
            .iter()
            .map(|t| TensorMeta {
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
                file: 0,
            })
            .collect();
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_info = vec![SourceFile {
            file,
            bytes: map.bytes().len() as u64,
        }];
        Ok(GgufSource {
            path: path.to_path_buf(),
            map,
            stamp,
            header,
            file_info,
            tensors,
        })
    }

    fn data(&self, i: usize) -> Result<(&[u8], GgmlType)> {
        let t = &self.header.tensors[i];
        let bytes = self
            .map
            .bytes()
            .get(t.range.clone())
            .ok_or_else(|| ConvertError::Tensor {
                path: self.path.clone(),
                tensor: t.name.clone(),
                reason: "data outside the mapped file".into(),
            })?;
        Ok((bytes, t.ty))
    }
}

impl Source for GgufSource {
    fn format(&self) -> &'static str {
        "gguf"
    }

    fn files(&self) -> &[SourceFile] {
        &self.file_info
    }

    fn file_path(&self, _i: usize) -> &Path {
        &self.path
    }

    fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        let h = &self.header;
        let types: BTreeMap<&str, &str> = h
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ty.name()))
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        h.tensors
            .iter()
            .for_each(|t| *counts.entry(t.ty.name()).or_default() += 1);
        BTreeMap::from([
            ("gguf_version".into(), json!(h.version)),
            ("architecture".into(), json!(h.architecture)),
            ("name".into(), json!(h.name)),
            ("alignment".into(), json!(h.alignment)),
            ("metadata_count".into(), json!(h.kv_count)),
            ("tensor_types".into(), json!(types)),
            ("type_counts".into(), json!(counts)),
        ])
    }

    fn default_excludes(&self) -> &'static [&'static str] {
        &["token_embd*", "output.weight", "*_norm*"]
    }

    fn set_requantized_dtype(&mut self, dtype: Dtype) {
        for (meta, t) in self.tensors.iter_mut().zip(&self.header.tensors) {
            meta.dense_dtype = dense_dtype(t.ty, dtype);
        }
    }

    fn read_float(&self, i: usize) -> Result<FloatData> {
        let (bytes, ty) = self.data(i)?;
        let meta = &self.tensors[i];
        let out = match meta.float {
            Some(Precision::F64) => {
                FloatData::F64(decode_f64(Dtype::F64, bytes).ok_or_else(|| {
                    ConvertError::Tensor {
                        path: self.path.clone(),
                        tensor: meta.name.clone(),
                        reason: "F64 data is not a whole number of values".into(),
                    }
                })?)
            }
            Some(Precision::F32) => {
                let mut v = Vec::new();
                dequantize(ty, bytes, &mut v);
                FloatData::F32(v)
            }
            None => {
                return Err(ConvertError::Tensor {
                    path: self.path.clone(),
                    tensor: meta.name.clone(),
                    reason: format!("type {} cannot be decoded to floats", ty.name()),
                })
            }
        };
        self.map.release(self.header.tensors[i].range.clone());
        Ok(out)
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let (bytes, ty) = self.data(i)?;
        let base = self.header.tensors[i].range.start;
        let dtype = self.tensors[i].dense_dtype;
        // Verbatim copy when the GGML type is already a safetensors dtype.
        let chunk = if ty.is_quantized() {
            let (block_elems, block_bytes) = ty.block();
            (DECODE_CHUNK / block_elems).max(1) * block_bytes
        } else {
            COPY_CHUNK
        };
        let mut decoded = Vec::new();
        let mut start = 0;
        while start < bytes.len() {
            let end = (start + chunk).min(bytes.len());
            let part = &bytes[start..end];
            if ty.is_quantized() {
                decoded.clear();
                dequantize(ty, part, &mut decoded);
                let encoded = encode_f32(dtype, &decoded).ok_or_else(|| ConvertError::Tensor {
                    path: self.path.clone(),
                    tensor: self.tensors[i].name.clone(),
                    reason: format!("dense dtype {dtype} is not a float dtype"),
                })?;
                sink(&encoded)?;
            } else {
                sink(part)?;
            }
            self.map.release(base + start..base + end);
            start = end;
        }
        Ok(())
    }

    fn check_unchanged(&self) -> Result<()> {
        self.stamp.check(&self.path)
    }
}
