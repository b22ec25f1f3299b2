//! Hugging Face checkpoint indexes (`model.safetensors.index.json`,
//! `pytorch_model.bin.index.json`): `{"weight_map": {tensor: shard file}}`, checked against
//! what the shards actually hold.

use crate::error::{ConvertError, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Largest index file read (a 70B model's index is ~100 KB).
const MAX_INDEX_SIZE: u64 = 64 << 20;

/// The index's `weight_map`.
pub(crate) fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let len = std::fs::metadata(index)
        .map_err(|e| ConvertError::io(index, "stat", e))?
        .len();
    if len > MAX_INDEX_SIZE {
        return Err(ConvertError::Source {
            path: index.to_path_buf(),
            reason: format!("index is {len} bytes, over the {MAX_INDEX_SIZE}-byte cap"),
        });
    }
    let text = cersa_loader::regular::read_regular(index)
        .map_err(|e| ConvertError::io(index, "read", e))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = serde_json::from_slice(&text).map_err(|e| ConvertError::Source {
        path: index.to_path_buf(),
        reason: format!("not a checkpoint index (expected {{\"weight_map\": {{...}}}}): {e}"),
    })?;
    Ok(idx.weight_map)
}

/// Shard names of an index, in sorted order (Hugging Face names sort by shard number).
pub(crate) fn index_files(index: &Path) -> Result<Vec<String>> {
    let map = read_index(index)?;
    let mut names: Vec<String> = map.values().cloned().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(ConvertError::Source {
            path: index.to_path_buf(),
            reason: "weight_map is empty".into(),
        });
    }
    Ok(names)
}

/// Every tensor the index names must be in the file it names, and every tensor of the
/// shards must be in the index.
pub(crate) fn check_index(
    index: &Path,
    paths: &[&Path],
    seen: &HashMap<String, usize>,
    names: &[String],
) -> Result<()> {
    let map = read_index(index)?;
    for (tensor, file) in &map {
        let found = seen.get(tensor).map(|&fi| names[fi].as_str());
        if found != Some(file.as_str()) {
            return Err(ConvertError::Tensor {
                path: index.to_path_buf(),
                tensor: tensor.clone(),
                reason: match found {
                    Some(other) => format!("index says {file}, but it is stored in {other}"),
                    None => format!("index says {file}, but no shard holds it"),
                },
            });
        }
    }
    if let Some((t, &fi)) = seen.iter().filter(|(t, _)| !map.contains_key(*t)).min() {
        return Err(ConvertError::Tensor {
            path: paths[fi].to_path_buf(),
            tensor: t.clone(),
            reason: format!("stored in the shard but missing from {}", index.display()),
        });
    }
    Ok(())
}

/// The index of directory `dir`: `preferred` when it is there, else the first (by name) file
/// whose name satisfies `is_index`.
pub(crate) fn find_index(
    dir: &Path,
    preferred: &str,
    is_index: impl Fn(&str) -> bool,
) -> Option<PathBuf> {
    let preferred = dir.join(preferred);
    if preferred.is_file() {
        return Some(preferred);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_index(&p.to_string_lossy()))
        .collect();
    found.sort();
    found.into_iter().next()
}
