//! Sharded PyTorch checkpoints: `pytorch_model.bin.index.json` beside
//! `pytorch_model-00001-of-00002.bin` …, as Hugging Face `save_pretrained` writes models
//! above its shard size without safetensors. Each shard is a [`PytorchSource`]; this lists
//! them as one source, checked against the index both ways (every indexed tensor is in the
//! shard the index names, every stored tensor is indexed, no name is stored twice).

use super::PytorchSource;
use crate::error::{ConvertError, Result};
use crate::input::index::{check_index, find_index, index_files};
use crate::input::{child_path, Catalog, FloatData, Source, TensorMeta};
use cersa_loader::manifest::SourceFile;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A sharded PyTorch checkpoint.
pub struct ShardedPytorch {
    index: PathBuf,
    parts: Vec<PytorchSource>,
    catalog: Catalog,
    /// Tensor i is tensor `at[i].1` of `parts[at[i].0]`.
    at: Vec<(usize, usize)>,
}

/// Whether `name` is a PyTorch index (`*.bin.index.json`, `*.pt.index.json`,
/// `*.pth.index.json`).
pub fn is_pytorch_index(name: &str) -> bool {
    [".bin.index.json", ".pt.index.json", ".pth.index.json"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The PyTorch checkpoint of a directory that holds no safetensors: its
/// `pytorch_model.bin.index.json` (or the first other `*.bin.index.json`), else its
/// `pytorch_model.bin`.
pub fn pytorch_in_dir(dir: &Path) -> Option<PathBuf> {
    find_index(dir, "pytorch_model.bin.index.json", is_pytorch_index)
        .or_else(|| Some(dir.join("pytorch_model.bin")).filter(|p| p.is_file()))
}

impl ShardedPytorch {
    /// Opens every shard the index `index` names.
    pub fn open(index: &Path) -> Result<Self> {
        let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
        let names = index_files(index)?;
        let mut parts = Vec::with_capacity(names.len());
        for name in &names {
            parts.push(PytorchSource::open(&child_path(&dir, name, index)?)?);
        }
        let mut tensors = Vec::new();
        let mut at = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (p, part) in parts.iter().enumerate() {
            for (j, t) in part.tensors().iter().enumerate() {
                if let Some(prev) = seen.insert(t.name.clone(), p) {
                    return Err(ConvertError::Tensor {
                        path: part.file_path(0).to_path_buf(),
                        tensor: t.name.clone(),
                        reason: format!("also stored in {}", parts[prev].file_path(0).display()),
                    });
                }
                tensors.push(TensorMeta {
                    file: p,
                    ..t.clone()
                });
                at.push((p, j));
            }
        }
        let paths: Vec<&Path> = parts.iter().map(|p| p.file_path(0)).collect();
        check_index(index, &paths, &seen, &names)?;
        let mut catalog = Catalog::new("pytorch", tensors);
        for (part, name) in parts.iter().zip(names) {
            catalog.files.push(SourceFile {
                file: name,
                bytes: part.files().iter().map(|f| f.bytes).sum(),
            });
            catalog.paths.push(part.file_path(0).to_path_buf());
        }
        Ok(ShardedPytorch {
            index: index.to_path_buf(),
            parts,
            catalog,
            at,
        })
    }
}

impl Source for ShardedPytorch {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The shards' details, merged key by key: counts are summed, a value every shard
    /// agrees on is kept, anything else is listed per shard; plus the index's name.
    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        let all: Vec<_> = self.parts.iter().map(|p| p.details()).collect();
        let mut out = BTreeMap::new();
        for key in all
            .iter()
            .flat_map(|d| d.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let values: Vec<serde_json::Value> = all
                .iter()
                .map(|d| d.get(key).cloned().unwrap_or_default())
                .collect();
            let merged = if values.iter().all(|v| v.is_u64()) {
                serde_json::json!(values.iter().filter_map(|v| v.as_u64()).sum::<u64>())
            } else if values.iter().all(|v| *v == values[0]) {
                values[0].clone()
            } else {
                serde_json::Value::Array(values)
            };
            out.insert(key.clone(), merged);
        }
        let index = self
            .index
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        out.insert("index".into(), serde_json::json!(index));
        out
    }

    fn read_float(&self, i: usize) -> Result<FloatData> {
        let (p, j) = self.at[i];
        self.parts[p].read_float(j)
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let (p, j) = self.at[i];
        self.parts[p].copy_dense(j, sink)
    }

    fn check_unchanged(&self) -> Result<()> {
        self.parts.iter().try_for_each(|p| p.check_unchanged())
    }
}
