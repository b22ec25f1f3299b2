//! Source checkpoint readers, one module per format, behind the [`Source`] trait.

pub mod gguf;
mod index;
mod mapped;
pub mod pytorch;
pub mod safetensors;

use crate::error::{ConvertError, Result};
use cersa_loader::manifest::SourceFile;
use cersa_loader::Dtype;
use pytorch::sharded;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Precision a float tensor is decomposed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 (F32, F16, BF16 and quantized sources).
    F32,
    /// f64 (F64 sources).
    F64,
}

impl Precision {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F64 => 8,
        }
    }
}

/// A tensor's values decoded for decomposition, row-major.
#[derive(Debug, Clone)]
pub enum FloatData {
    /// f32 values.
    F32(Vec<f32>),
    /// f64 values.
    F64(Vec<f64>),
}

impl FloatData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            FloatData::F32(v) => v.len(),
            FloatData::F64(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// First non-finite value: (count, first as text, flat index).
    pub fn non_finite(&self) -> Option<(usize, String, usize)> {
        fn scan<T: Copy + std::fmt::Display>(
            v: &[T],
            finite: impl Fn(T) -> bool,
        ) -> Option<(usize, String, usize)> {
            let first = v.iter().position(|x| !finite(*x))?;
            let count = v[first..].iter().filter(|x| !finite(**x)).count();
            Some((count, v[first].to_string(), first))
        }
        match self {
            FloatData::F32(v) => scan(v, f32::is_finite),
            FloatData::F64(v) => scan(v, f64::is_finite),
        }
    }
}

/// What a source says about one tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// Tensor name as in the source.
    pub name: String,
    /// Shape, row-major (outermost first).
    pub shape: Vec<usize>,
    /// Source dtype as the format names it (`F32`, `Q4_K`, ...).
    pub source_dtype: String,
    /// `Some` when the tensor holds floats that can be decomposed, with the precision.
    pub float: Option<Precision>,
    /// Dtype a dense copy is stored in (the source dtype where safetensors has it).
    pub dense_dtype: Dtype,
    /// Bytes of the tensor in the source.
    pub source_bytes: u64,
    /// Index into [`Source::files`].
    pub file: usize,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// What a source lists, the same for every format: its format, files and tensors.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Format name recorded in the manifest (`safetensors`, `gguf`, `pytorch`).
    pub format: &'static str,
    /// Files read, with their sizes (names relative to the source directory).
    pub files: Vec<SourceFile>,
    /// Full path of each of `files`.
    pub paths: Vec<PathBuf>,
    /// All tensors, in the order they are converted (file order, then data order).
    pub tensors: Vec<TensorMeta>,
}

impl Catalog {
    /// A catalog of `tensors` in `format`, without files yet.
    fn new(format: &'static str, tensors: Vec<TensorMeta>) -> Self {
        Catalog {
            format,
            files: Vec::new(),
            paths: Vec::new(),
            tensors,
        }
    }

    /// Lists the mapped `file` under `name`.
    fn add_file(&mut self, file: &mapped::Mapped, name: String) {
        self.files.push(SourceFile {
            file: name,
            bytes: file.bytes().len() as u64,
        });
        self.paths.push(file.path().to_path_buf());
    }
}

/// A checkpoint being read. Implementations map files and decode tensor by tensor.
pub trait Source: Send + Sync {
    /// The format, files and tensors of the source.
    fn catalog(&self) -> &Catalog;
    /// Format name recorded in the manifest (`safetensors`, `gguf`, `pytorch`).
    fn format(&self) -> &'static str {
        self.catalog().format
    }
    /// Files read, with their sizes (names relative to the source directory).
    fn files(&self) -> &[SourceFile] {
        &self.catalog().files
    }
    /// Full path of file `i`.
    fn file_path(&self, i: usize) -> &Path {
        &self.catalog().paths[i]
    }
    /// All tensors, in the order they are converted (file order, then data order).
    fn tensors(&self) -> &[TensorMeta] {
        &self.catalog().tensors
    }
    /// Format-specific facts for the manifest's `source.details`.
    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::new()
    }
    /// For a GGUF source: a GGUF file with no tensors holding every metadata pair of the
    /// source (architecture, tokenizer, chat template, …; the `split.*` keys of a split
    /// model left out), byte for byte — kept in the CERSA directory so `export --to gguf`
    /// works after the source is gone.
    fn gguf_metadata(&self) -> Option<Vec<u8>> {
        None
    }
    /// Globs excluded from factoring by default in this format, on top of the common ones.
    fn default_excludes(&self) -> &'static [&'static str] {
        &[]
    }
    /// Sets the dtype dense copies of quantized tensors are dequantized into (default
    /// BF16, see [`TensorMeta::dense_dtype`]). Formats that copy bytes verbatim ignore it.
    fn set_requantized_dtype(&mut self, _dtype: Dtype) {}
    /// Decodes tensor `i` to floats in its [`TensorMeta::float`] precision.
    fn read_float(&self, i: usize) -> Result<FloatData>;
    /// Decodes part `part` of `parts` equal consecutive parts of tensor `i` (one expert of
    /// a stacked experts tensor; `parts` divides the first dimension). Formats whose bytes
    /// split the same way read only that part; the default decodes the whole tensor.
    fn read_float_part(&self, i: usize, part: usize, parts: usize) -> Result<FloatData> {
        let whole = self.read_float(i)?;
        let len = whole.len() / parts.max(1);
        Ok(match whole {
            FloatData::F32(v) => FloatData::F32(v[part * len..(part + 1) * len].to_vec()),
            FloatData::F64(v) => FloatData::F64(v[part * len..(part + 1) * len].to_vec()),
        })
    }
    /// Streams tensor `i` as bytes of its [`TensorMeta::dense_dtype`], in bounded chunks.
    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>;
    /// Fails when a source file's size or mtime differs from when it was opened.
    fn check_unchanged(&self) -> Result<()>;
}

/// Size and mtime of a file, to detect changes during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    mtime: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// Reads the stamp of `path`.
    pub fn of(path: &Path) -> Result<Self> {
        let m = std::fs::metadata(path).map_err(|e| ConvertError::io(path, "stat", e))?;
        Ok(FileStamp {
            len: m.len(),
            mtime: m.modified().ok(),
        })
    }

    /// Errors when `path` no longer has this stamp.
    pub fn check(&self, path: &Path) -> Result<()> {
        let now = FileStamp::of(path)?;
        if now.len != self.len {
            return Err(ConvertError::SourceChanged {
                path: path.to_path_buf(),
                what: format!("size {} → {}", self.len, now.len),
            });
        }
        if now.mtime != self.mtime {
            return Err(ConvertError::SourceChanged {
                path: path.to_path_buf(),
                what: "modification time changed".into(),
            });
        }
        Ok(())
    }
}

/// Opens `path` as a checkpoint, inferring its format from the name or contents.
pub fn open(path: &Path) -> Result<Box<dyn Source>> {
    let format = detect_format(path)?;
    match format {
        "safetensors" => Ok(Box::new(safetensors::SafetensorsSource::open(path)?)),
        "gguf" => Ok(Box::new(gguf::GgufSource::open(path)?)),
        "pytorch" => {
            // A directory without safetensors holds an index or `pytorch_model.bin`.
            let path = match path.is_dir() {
                true => sharded::pytorch_in_dir(path).unwrap_or_else(|| path.to_path_buf()),
                false => path.to_path_buf(),
            };
            let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
            if name.is_some_and(|n| sharded::is_pytorch_index(&n)) {
                Ok(Box::new(sharded::ShardedPytorch::open(&path)?))
            } else {
                Ok(Box::new(pytorch::PytorchSource::open(&path)?))
            }
        }
        other => Err(ConvertError::Source {
            path: path.to_path_buf(),
            reason: format!("format `{other}` is not supported yet"),
        }),
    }
}

/// Infers the source format of `path`.
pub fn detect_format(path: &Path) -> Result<&'static str> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if path.is_dir() {
        // Safetensors first (Hugging Face repos often hold both); PyTorch only without them.
        let has_safetensors = std::fs::read_dir(path)
            .map_err(|e| ConvertError::io(path, "read directory", e))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_lowercase();
                !n.starts_with('.')
                    && (n.ends_with(".safetensors")
                        || n.ends_with(".index.json") && !sharded::is_pytorch_index(&n))
            });
        if !has_safetensors && sharded::pytorch_in_dir(path).is_some() {
            return Ok("pytorch");
        }
        return Ok("safetensors");
    }
    if !path.exists() {
        return Err(ConvertError::Source {
            path: path.to_path_buf(),
            reason: "no such file or directory".into(),
        });
    }
    if sharded::is_pytorch_index(&name) {
        return Ok("pytorch");
    }
    if name.ends_with(".safetensors") || name.ends_with(".index.json") {
        return Ok("safetensors");
    }
    let mut magic = [0u8; 4];
    let read = cersa_loader::regular::open_regular(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut magic))
        .map_err(|e| ConvertError::io(path, "read", e))?;
    // A `.gguf` name with a wrong magic is read as GGUF too, so its error says why.
    if (read == 4 && &magic == b"GGUF") || name.ends_with(".gguf") {
        return Ok("gguf");
    }
    if name.ends_with(".pt") || name.ends_with(".pth") || name.ends_with(".bin") {
        return Ok("pytorch");
    }
    Err(ConvertError::Source {
        path: path.to_path_buf(),
        reason: "cannot tell the checkpoint format from the name (expected .safetensors, \
                 .safetensors.index.json, a directory, .gguf, .pt/.pth/.bin, .bin.index.json)"
            .into(),
    })
}

/// Joins a file name from an index or manifest to `dir`, refusing names that leave it.
pub fn child_path(dir: &Path, name: &str, what: &Path) -> Result<PathBuf> {
    let p = Path::new(name);
    if name.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ConvertError::Source {
            path: what.to_path_buf(),
            reason: format!(
                "file name {name:?} must be relative and stay inside {}",
                dir.display()
            ),
        });
    }
    Ok(dir.join(p))
}
