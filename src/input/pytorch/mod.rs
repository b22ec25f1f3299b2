//! PyTorch checkpoints (`.pt`, `.pth`, `.bin`), read without executing pickles.
//!
//! Two layouts: `zip` (torch ≥ 1.6) and `legacy`; both give the state-dict pickle
//! ([`pickle`], read without executing anything) and the byte ranges of its storages, from
//! which `views` lists the tensors. [`sharded`] joins the shards of a
//! `pytorch_model.bin.index.json`.
//!
//! Nested dicts (`{"state_dict": {...}}`, `{"model": ..., "optimizer": ...}`) are flattened
//! with dotted names: every tensor anywhere under dicts/lists is listed, in pickle order.
//! Non-tensor leaves (epochs, hyper-parameters) are skipped and counted in the details.

// `legacy` and `zip` are public (hidden) only for the in-process fuzz targets (fuzz/).
#[doc(hidden)]
pub mod legacy;
pub mod pickle;
pub mod sharded;
mod views;
#[doc(hidden)]
pub mod zip;

use super::mapped::{decode_float, Mapped};
use super::{Catalog, FloatData, Precision, Source, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::Dtype;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use views::{check_view, flatten, StoredTensor};

/// An opened PyTorch checkpoint.
pub struct PytorchSource {
    file: Mapped,
    catalog: Catalog,
    views: Vec<StoredTensor>,
    layout: &'static str,
    skipped: usize,
}

impl PytorchSource {
    /// Opens a `.pt`/`.pth`/`.bin` file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = Mapped::open(path)?;
        let bytes = file.bytes();
        let err = |reason: String| ConvertError::Source {
            path: path.to_path_buf(),
            reason,
        };
        let (layout, root, storages) = if bytes.starts_with(b"PK\x03\x04") {
            let (root, storages) = zip::read_zip(bytes).map_err(err)?;
            ("zip", root, storages)
        } else if bytes.starts_with(b"\x80") && bytes.get(2..14).is_some() {
            let (root, storages) = legacy::read_legacy(bytes).map_err(err)?;
            ("legacy", root, storages)
        } else {
            return Err(err(
                "not a PyTorch checkpoint (neither a zip archive nor a legacy pickle); \
                 TorchScript and tar checkpoints are not supported"
                    .into(),
            ));
        };
        let mut found = Vec::new();
        let mut skipped = 0usize;
        flatten(&root, String::new(), 0, &mut found, &mut skipped).map_err(err)?;
        if found.is_empty() {
            return Err(err("the checkpoint holds no tensors".into()));
        }
        let mut tensors = Vec::new();
        let mut views = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        for (name, view) in found {
            let terr = |reason: String| ConvertError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason,
            };
            if names.insert(name.clone(), ()).is_some() {
                return Err(terr("two tensors flatten to this name".into()));
            }
            let storage = storages
                .get(&view.storage.key)
                .cloned()
                .ok_or_else(|| terr(format!("storage `{}` is missing", view.storage.key)))?;
            let dtype = view.storage.dtype;
            check_view(&view, &storage, dtype).map_err(terr)?;
            let shape: Vec<usize> = view.shape.iter().map(|&d| d as usize).collect();
            let numel: u64 = view.shape.iter().product();
            let float = match dtype {
                Dtype::F64 => Some(Precision::F64),
                Dtype::F32 | Dtype::F16 | Dtype::BF16 => Some(Precision::F32),
                _ => None,
            };
            tensors.push(TensorMeta {
                name,
                shape,
                source_dtype: dtype.to_string(),
                float,
                dense_dtype: dtype,
                source_bytes: numel * dtype.size() as u64,
                file: 0,
            });
            views.push(StoredTensor { view, storage });
        }
        let mut catalog = Catalog::new("pytorch", tensors);
        catalog.add_file(&file, file.file_name());
        Ok(PytorchSource {
            file,
            catalog,
            views,
            layout,
            skipped,
        })
    }

    /// Streams the row-major bytes of tensor `i` in chunks.
    fn stream(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let t = &self.views[i];
        let storage = self
            .file
            .bytes()
            .get(t.storage.clone())
            .ok_or_else(|| self.terr(i, "storage outside the mapped file".into()))?;
        if t.view.shape.iter().product::<u64>() == 0 {
            return Ok(());
        }
        match t.contiguous_range() {
            // Inside the storage (check_view), which is inside the file.
            Some(range) => self
                .file
                .copy_range(range, &self.catalog.tensors[i].name, sink),
            None => t.gather(storage, sink, &|| {
                self.terr(i, "view outside its storage".into())
            }),
        }
    }

    fn terr(&self, i: usize, reason: String) -> ConvertError {
        self.file
            .tensor_error(&self.catalog.tensors[i].name, reason)
    }
}

impl Source for PytorchSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::from([
            ("layout".into(), json!(self.layout)),
            ("non_tensor_entries_skipped".into(), json!(self.skipped)),
            (
                "names".into(),
                json!("nested dicts flattened with dotted names"),
            ),
        ])
    }

    fn read_float(&self, i: usize) -> Result<FloatData> {
        let meta = &self.catalog.tensors[i];
        // Contiguous views decode straight from the map; strided ones are gathered first.
        if let Some(range) = self.views[i].contiguous_range() {
            return self.file.read_float(range, meta);
        }
        let mut buf = Vec::with_capacity(meta.source_bytes as usize);
        self.stream(i, &mut |c| {
            buf.extend_from_slice(c);
            Ok(())
        })?;
        decode_float(meta, &buf).ok_or_else(|| {
            let reason = format!("dtype {} cannot be decoded to floats", meta.dense_dtype);
            self.terr(i, reason)
        })
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.stream(i, sink)
    }

    fn check_unchanged(&self) -> Result<()> {
        self.file.check_unchanged()
    }
}

#[cfg(test)]
mod tests {
    use super::legacy::read_legacy;
    use super::views::storage_refs;
    use super::zip::read_zip;
    use std::path::Path;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/pytorch")
            .join(name);
        std::fs::read(p).expect("fixture")
    }

    /// fuzz/regressions/pytorch_zip/shared-tuples-2pow31-paths.pt: data.pkl is `0` then
    /// 31 × (DUP, TUPLE2), 67 bytes whose value has 2^31 paths; flattening walked every
    /// one (a timeout of the pytorch_zip target; minutes of CPU for `cersa inspect`).
    #[test]
    fn shared_containers_are_flattened_within_a_budget() {
        let b =
            include_bytes!("../../../fuzz/regressions/pytorch_zip/shared-tuples-2pow31-paths.pt");
        let (root, _) = read_zip(b).unwrap();
        let start = std::time::Instant::now();
        let e = storage_refs(&root).err().unwrap();
        assert!(e.contains("reach more than"), "{e}");
        assert!(start.elapsed().as_secs() < 30);
    }

    /// fuzz/regressions/pytorch_zip/empty-view-stride-overflow.pt: a view of size
    /// (0, 2^32, 2^32), stride (1, 2^32, 1) passes check_view (it addresses nothing), and
    /// the contiguity test multiplied 2^32 · 2^32 (an overflow panic with overflow checks).
    #[test]
    fn empty_view_with_huge_dims_reads_as_empty() {
        use crate::input::Source;
        let b =
            include_bytes!("../../../fuzz/regressions/pytorch_zip/empty-view-stride-overflow.pt");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        std::fs::write(&path, b).unwrap();
        let src = super::PytorchSource::open(&path).unwrap();
        assert_eq!(src.tensors()[0].shape, [0, 1 << 32, 1 << 32]);
        assert_eq!(src.read_float(0).unwrap().len(), 0);
        let mut copied = 0;
        src.copy_dense(0, &mut |c| {
            copied += c.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(copied, 0);
    }

    #[test]
    fn every_truncation_and_byte_flip_errors_or_reads_without_panic() {
        for (name, read) in [
            ("pnet.pt", read_legacy as fn(&[u8]) -> _),
            ("tiny-excerpt.pt", read_zip),
        ] {
            let full = fixture(name);
            assert!(read(&full).is_ok(), "{name} reads");
            for cut in (0..full.len()).step_by(61) {
                assert!(read(&full[..cut]).is_err(), "{name} cut at {cut} must fail");
            }
            let mut bytes = full.clone();
            for at in (0..full.len()).step_by(7) {
                bytes[at] ^= 0xa5;
                let _ = read(&bytes).map(|(root, _)| storage_refs(&root));
                bytes[at] = full[at];
            }
        }
    }
}
