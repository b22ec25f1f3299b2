//! Safetensors sources: a single file, a sharded `*.safetensors.index.json`, or a
//! Hugging Face directory holding either.

use super::index::{check_index, find_index, index_files};
use super::mapped::Mapped;
use super::{child_path, Catalog, FloatData, Precision, Source, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::dtype::decode_f32;
use cersa_loader::safetensors::{parse, Header};
use cersa_loader::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct File {
    file: Mapped,
    header: Header,
}

/// An opened safetensors checkpoint.
pub struct SafetensorsSource {
    files: Vec<File>,
    catalog: Catalog,
    /// Position of each tensor in its file's header.
    entry: Vec<usize>,
    /// FP8 tensor index → index of its `NAME_scale_inv` block-scale companion.
    scale_inv: HashMap<usize, usize>,
}

/// Block edge of the FP8 block-scale scheme (DeepSeek-V3 style releases): one inverse
/// scale per 128×128 block, `scale_inv` of shape [⌈m/128⌉, ⌈n/128⌉].
const FP8_BLOCK: usize = 128;

impl SafetensorsSource {
    /// Opens a `.safetensors` file, an index JSON, or a directory.
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, names) = resolve(path)?;
        let mut files = Vec::new();
        for name in &names {
            let file = Mapped::open(&child_path(&dir, name, path)?)?;
            let header = parse(file.bytes()).map_err(|kind| {
                ConvertError::Format(cersa_loader::Error::Safetensors {
                    path: file.path().to_path_buf(),
                    kind,
                })
            })?;
            files.push(File { file, header });
        }
        let mut tensors = Vec::new();
        let mut entry = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let block_scaled: std::collections::HashSet<&str> = files
            .iter()
            .flat_map(|f| &f.header.tensors)
            .filter_map(|t| t.name.strip_suffix("_scale_inv"))
            .collect();
        for (fi, f) in files.iter().enumerate() {
            for (ei, t) in f.header.tensors.iter().enumerate() {
                if let Some(prev) = seen.insert(t.name.clone(), fi) {
                    return Err(ConvertError::Tensor {
                        path: f.file.path().to_path_buf(),
                        tensor: t.name.clone(),
                        reason: format!("also stored in {}", files[prev].file.path().display()),
                    });
                }
                let float = match t.dtype {
                    Dtype::F64 => Some(Precision::F64),
                    Dtype::F32 | Dtype::F16 | Dtype::BF16 => Some(Precision::F32),
                    // FP8 decodes to f32; with a `NAME_scale_inv` companion its 128×128
                    // block scales are applied on reading (see `read_float`).
                    Dtype::F8_E4M3 | Dtype::F8_E5M2 => Some(Precision::F32),
                    _ => None,
                };
                tensors.push(TensorMeta {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    source_dtype: t.dtype.to_string(),
                    float,
                    dense_dtype: t.dtype,
                    source_bytes: (t.end - t.begin) as u64,
                    file: fi,
                });
                entry.push(ei);
            }
        }
        if let Some(index_path) = index_file(path, &dir) {
            let paths: Vec<&Path> = files.iter().map(|f| f.file.path()).collect();
            check_index(&index_path, &paths, &seen, &names)?;
        }
        let index: HashMap<&str, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let scale_inv = tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                matches!(t.dense_dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2)
                    && block_scaled.contains(t.name.as_str())
            })
            .filter_map(|(i, t)| {
                index
                    .get(format!("{}_scale_inv", t.name).as_str())
                    .map(|&k| (i, k))
            })
            .collect();
        let mut catalog = Catalog::new("safetensors", tensors);
        for (f, name) in files.iter().zip(names) {
            catalog.add_file(&f.file, name);
        }
        Ok(SafetensorsSource {
            files,
            catalog,
            entry,
            scale_inv,
        })
    }

    /// The `__metadata__` map of the first file (empty when absent).
    pub fn metadata(&self) -> &std::collections::BTreeMap<String, String> {
        &self.files[0].header.metadata
    }

    /// Multiplies FP8 values of tensor `i` by its 128×128 block scales.
    fn apply_block_scales(&self, i: usize, k: usize, values: &mut [f32]) -> Result<()> {
        let meta = &self.catalog.tensors[i];
        let scales_meta = &self.catalog.tensors[k];
        let err = |reason: String| self.files[meta.file].file.tensor_error(&meta.name, reason);
        let [m, n] = meta.shape[..] else {
            return Err(err(format!(
                "block-scaled FP8 needs a 2-D tensor, shape is {:?}",
                meta.shape
            )));
        };
        let (bm, bn) = (m.div_ceil(FP8_BLOCK), n.div_ceil(FP8_BLOCK));
        if scales_meta.shape != [bm, bn] {
            return Err(err(format!(
                "{} has shape {:?}, expected [{bm}, {bn}] for 128×128 blocks of [{m}, {n}]",
                scales_meta.name, scales_meta.shape
            )));
        }
        let (f, range) = self.bytes(k);
        let scales = f
            .file
            .bytes()
            .get(range)
            .and_then(|b| decode_f32(scales_meta.dense_dtype, b))
            .ok_or_else(|| err(format!("{} is not a float tensor", scales_meta.name)))?;
        for (r, row) in values.chunks_exact_mut(n.max(1)).enumerate().take(m) {
            let srow = &scales[(r / FP8_BLOCK) * bn..(r / FP8_BLOCK + 1) * bn];
            for (c, v) in row.iter_mut().enumerate() {
                *v *= srow[c / FP8_BLOCK];
            }
        }
        Ok(())
    }

    fn bytes(&self, i: usize) -> (&File, std::ops::Range<usize>) {
        let t = &self.catalog.tensors[i];
        let f = &self.files[t.file];
        let e = &f.header.tensors[self.entry[i]];
        (f, f.header.file_range(e))
    }
}

impl Source for SafetensorsSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn read_float(&self, i: usize) -> Result<FloatData> {
        let (f, range) = self.bytes(i);
        let mut out = f.file.read_float(range, &self.catalog.tensors[i])?;
        if let (Some(&k), FloatData::F32(values)) = (self.scale_inv.get(&i), &mut out) {
            self.apply_block_scales(i, k, values)?;
        }
        Ok(out)
    }

    fn read_float_part(&self, i: usize, part: usize, parts: usize) -> Result<FloatData> {
        let (f, range) = self.bytes(i);
        // Block-scaled FP8 needs its 2-D scale grid: decoded whole.
        if self.scale_inv.contains_key(&i) || parts == 0 || range.len() % parts != 0 {
            let whole = self.read_float(i)?;
            let len = whole.len() / parts.max(1);
            return Ok(match whole {
                FloatData::F32(v) => FloatData::F32(v[part * len..(part + 1) * len].to_vec()),
                FloatData::F64(v) => FloatData::F64(v[part * len..(part + 1) * len].to_vec()),
            });
        }
        let len = range.len() / parts;
        let start = range.start + part * len;
        f.file
            .read_float(start..start + len, &self.catalog.tensors[i])
    }

    fn details(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut names: Vec<&str> = self
            .scale_inv
            .keys()
            .map(|&i| self.catalog.tensors[i].name.as_str())
            .collect();
        names.sort_unstable();
        let mut d = std::collections::BTreeMap::new();
        if !names.is_empty() {
            d.insert("fp8_block_scaled".to_string(), serde_json::json!(names));
        }
        d
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let (f, range) = self.bytes(i);
        f.file
            .copy_range(range, &self.catalog.tensors[i].name, sink)
    }

    fn check_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(|f| f.file.check_unchanged())
    }
}

/// Returns the directory and the shard file names (relative to it) of a source path.
fn resolve(path: &Path) -> Result<(PathBuf, Vec<String>)> {
    let err = |reason: String| ConvertError::Source {
        path: path.to_path_buf(),
        reason,
    };
    let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if path.is_dir() {
        if let Some(index) = index_file(path, path) {
            return Ok((path.to_path_buf(), index_files(&index)?));
        }
        if path.join("model.safetensors").is_file() {
            return Ok((path.to_path_buf(), vec!["model.safetensors".into()]));
        }
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| ConvertError::io(path, "read directory", e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
            .collect();
        names.sort();
        if names.is_empty() {
            let gguf = std::fs::read_dir(path)
                .map_err(|e| ConvertError::io(path, "read directory", e))?
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .to_lowercase()
                        .ends_with(".gguf")
                });
            let hint = if gguf {
                " (GGUF models are read from their .gguf file, or any part of a split one)"
            } else {
                ""
            };
            return Err(err(format!(
                "no .safetensors files or index in this directory{hint}"
            )));
        }
        return Ok((path.to_path_buf(), names));
    }
    let name = file_name(path);
    if name.ends_with(".index.json") {
        return Ok((parent(path), index_files(path)?));
    }
    Ok((parent(path), vec![name]))
}

fn index_file(path: &Path, dir: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return path
            .to_string_lossy()
            .ends_with(".index.json")
            .then(|| path.to_path_buf());
    }
    find_index(dir, "model.safetensors.index.json", |n| {
        n.ends_with(".safetensors.index.json")
    })
}

/// The loader's header parser (which this module reads sources with) against the reference
/// implementation, the `safetensors` crate: whatever the reference refuses, ours refuses,
/// and whatever both accept they read alike. Ours is stricter on purpose in two ways,
/// asserted here: a tensor name given twice is refused (the reference keeps one), and
/// dtypes a CERSA checkpoint cannot store (F4, F6_*, F8_E8M0, C64) are refused by name.
#[cfg(test)]
mod reference_tests {
    use cersa_loader::safetensors::parse;
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    /// `Err` when ours accepts what the reference refuses, or both accept but disagree.
    fn agree(bytes: &[u8]) -> Result<(), String> {
        let (ours, theirs) = match (parse(bytes), SafeTensors::read_metadata(bytes)) {
            (Err(_), _) => return Ok(()),
            (Ok(_), Err(e)) => return Err(format!("ours accepts, the reference refuses: {e}")),
            (Ok(h), Ok(m)) => (h, m),
        };
        let (n, meta) = theirs;
        let mut theirs: Vec<_> = meta
            .tensors()
            .into_iter()
            .map(|(name, t)| (t.data_offsets.0, name, t.dtype.to_string(), t.shape.clone()))
            .collect();
        theirs.sort();
        // Sorted alike: an empty tensor shares its offset with the next one.
        let mut ours_list: Vec<_> = ours
            .tensors
            .iter()
            .map(|t| {
                (
                    t.begin,
                    t.name.clone(),
                    t.dtype.to_string(),
                    t.shape.clone(),
                )
            })
            .collect();
        ours_list.sort();
        let their_meta = meta.metadata().clone().unwrap_or_default();
        let same_meta = their_meta.len() == ours.metadata.len()
            && their_meta
                .iter()
                .all(|(k, v)| ours.metadata.get(k) == Some(v));
        if ours.data_start != 8 + n || ours_list != theirs || !same_meta {
            return Err(format!("read differently: {ours_list:?} vs {theirs:?}"));
        }
        Ok(())
    }

    const X8: &str = r#""x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;

    #[test]
    fn stricter_than_the_reference_only_where_meant() {
        let twice = file(&format!("{{{X8},{X8}}}"), 8);
        assert!(SafeTensors::read_metadata(&twice).is_ok());
        let e = parse(&twice).unwrap_err().to_string();
        assert!(e.contains("`x` appears twice"), "{e}");
        for (dtype, shape, bytes) in [
            ("F8_E8M0", 2, 2),
            ("F4", 4, 2),
            ("F6_E2M3", 4, 3),
            ("C64", 1, 8),
        ] {
            let f = file(
                &format!(
                    r#"{{"x":{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[0,{bytes}]}}}}"#
                ),
                bytes,
            );
            assert!(SafeTensors::read_metadata(&f).is_ok(), "{dtype}");
            let e = parse(&f).unwrap_err().to_string();
            assert!(e.contains(&format!("unsupported dtype `{dtype}`")), "{e}");
        }
    }

    /// A small valid file of up to four tensors of assorted dtypes, with metadata.
    fn valid_file() -> impl Strategy<Value = Vec<u8>> {
        let dtypes = ["F32", "F16", "BF16", "U8", "I64", "F8_E4M3", "BOOL"];
        let sizes = [4usize, 2, 2, 1, 8, 1, 1];
        let tensor = (0..dtypes.len(), prop::collection::vec(0usize..4, 0..3));
        prop::collection::vec(tensor, 0..4).prop_map(move |ts| {
            let mut entries = vec![r#""__metadata__":{"format":"pt"}"#.to_string()];
            let mut at = 0;
            for (i, (d, shape)) in ts.iter().enumerate() {
                let len = sizes[*d] * shape.iter().product::<usize>();
                entries.push(format!(
                    r#""t{i}":{{"dtype":"{}","shape":{shape:?},"data_offsets":[{at},{}]}}"#,
                    dtypes[*d],
                    at + len
                ));
                at += len;
            }
            file(&format!("{{{}}}", entries.join(",")), at)
        })
    }

    proptest! {
        #[test]
        fn valid_files_read_alike(f in valid_file()) {
            prop_assert!(parse(&f).is_ok());
            prop_assert_eq!(agree(&f), Ok(()));
        }

        #[test]
        fn mutated_files_never_accepted_beyond_the_reference(
            f in valid_file(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut g = f.clone();
            for (at, byte) in &flips {
                let i = at.index(g.len());
                g[i] = *byte;
            }
            prop_assert_eq!(agree(&g), Ok(()));
            prop_assert_eq!(agree(&f[..cut.index(f.len() + 1)]), Ok(()));
        }
    }
}
