//! PyTorch checkpoints (`.pt`, `.pth`, `.bin`), read without executing pickles.
//!
//! Two layouts:
//! - zip (torch ≥ 1.6): `<prefix>/data.pkl` holds the state-dict pickle, whose persistent
//!   ids name storages stored as `<prefix>/data/<key>`. Entries are STORED (torch never
//!   compresses them), so tensors are read in place through the memory map. The zip
//!   central directory is parsed here (a few dozen lines) instead of pulling in a zip crate.
//! - legacy: pickles of the magic number, protocol version and sys_info, then the state
//!   dict, then the list of storage keys, then each storage as an 8-byte little-endian
//!   element count followed by its raw bytes.
//!
//! Nested dicts (`{"state_dict": {...}}`, `{"model": ..., "optimizer": ...}`) are flattened
//! with dotted names: every tensor anywhere under dicts/lists is listed, in pickle order.
//! Non-tensor leaves (epochs, hyper-parameters) are skipped and counted in the details.

pub mod pickle;
pub mod sharded;

use super::{FileStamp, FloatData, Precision, Source, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::dtype::{decode_f32, decode_f64};
use cersa_loader::manifest::SourceFile;
use cersa_loader::mmap::MappedFile;
use cersa_loader::Dtype;
use pickle::{StorageRef, TensorRef, Value};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bytes handed to the sink per chunk by a dense pass-through.
const COPY_CHUNK: usize = 32 << 20;
/// Most tensors in one checkpoint.
const MAX_TENSORS: usize = 1 << 20;
/// Deepest nesting of dicts/lists walked when flattening.
const MAX_DEPTH: usize = 32;
/// The magic number that opens a legacy checkpoint (`0x1950a86a20f9469cfc6c`), LE bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

struct Tensor {
    view: TensorRef,
    /// Byte range of the whole storage in the file.
    storage: Range<usize>,
}

/// An opened PyTorch checkpoint.
pub struct PytorchSource {
    path: PathBuf,
    map: MappedFile,
    stamp: FileStamp,
    file_info: Vec<SourceFile>,
    tensors: Vec<TensorMeta>,
    views: Vec<Tensor>,
    layout: &'static str,
    skipped: usize,
}

impl PytorchSource {
    /// Opens a `.pt`/`.pth`/`.bin` file.
    pub fn open(path: &Path) -> Result<Self> {
        let stamp = FileStamp::of(path)?;
        // SAFETY (of the contract): `stamp` is checked again before the output is
        // committed, so a file changed under the map is reported, not trusted.
        #[allow(unsafe_code)]
        let map = unsafe { MappedFile::open(path)? };
        let bytes = map.bytes();
        let err = |reason: String| ConvertError::Source {
            path: path.to_path_buf(),
            reason,
        };
        let (layout, root, storages) = if bytes.starts_with(b"PK\x03\x04") {
            let (root, storages) = read_zip(bytes).map_err(err)?;
            ("zip", root, storages)
        } else if bytes.starts_with(b"\x80") && bytes.get(2..14).is_some() {
            let (root, storages) = read_legacy(bytes).map_err(err)?;
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
            views.push(Tensor { view, storage });
        }
        let file_info = vec![SourceFile {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: bytes.len() as u64,
        }];
        Ok(PytorchSource {
            path: path.to_path_buf(),
            map,
            stamp,
            file_info,
            tensors,
            views,
            layout,
            skipped,
        })
    }

    /// Whether tensor `i` is the row-major contiguous run `offset..offset+numel`.
    fn contiguous(&self, i: usize) -> bool {
        let v = &self.views[i].view;
        let mut expect = 1u64;
        for (d, s) in v.shape.iter().zip(&v.stride).rev() {
            if *d > 1 && *s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }

    /// File byte range of tensor `i` when it is a contiguous run of its storage.
    fn contiguous_range(&self, i: usize) -> Option<Range<usize>> {
        let t = &self.views[i];
        if !self.contiguous(i) {
            return None;
        }
        let size = t.view.storage.dtype.size();
        let numel: u64 = t.view.shape.iter().product();
        if numel == 0 {
            // An empty view's offset is not bounded by check_view: address nothing.
            return Some(t.storage.start..t.storage.start);
        }
        // check_view bounded offset + numel by the storage, so these cannot overflow.
        let start = t.storage.start + t.view.offset as usize * size;
        Some(start..start + numel as usize * size)
    }

    /// Streams the row-major bytes of tensor `i` in chunks.
    fn stream(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let t = &self.views[i];
        let size = t.view.storage.dtype.size();
        let bytes = self.map.bytes();
        let storage = bytes
            .get(t.storage.clone())
            .ok_or_else(|| self.terr(i, "storage outside the mapped file".into()))?;
        let numel: u64 = t.view.shape.iter().product();
        if numel == 0 {
            return Ok(());
        }
        if self.contiguous(i) {
            let start = t.view.offset as usize * size;
            let end = start + numel as usize * size;
            let mut at = start;
            while at < end {
                let stop = (at + COPY_CHUNK).min(end);
                sink(
                    storage
                        .get(at..stop)
                        .ok_or_else(|| self.terr(i, "view outside its storage".into()))?,
                )?;
                self.map
                    .release(t.storage.start + at..t.storage.start + stop);
                at = stop;
            }
            return Ok(());
        }
        // Strided view: walk the index odometer, gathering elements into bounded chunks.
        let dims = t.view.shape.len();
        let mut idx = vec![0u64; dims];
        let mut buf = Vec::with_capacity(COPY_CHUNK.min(numel as usize * size));
        for _ in 0..numel {
            let elem: u64 = t.view.offset
                + idx
                    .iter()
                    .zip(&t.view.stride)
                    .map(|(a, s)| a * s)
                    .sum::<u64>();
            let at = elem as usize * size;
            buf.extend_from_slice(
                storage
                    .get(at..at + size)
                    .ok_or_else(|| self.terr(i, "view outside its storage".into()))?,
            );
            if buf.len() >= COPY_CHUNK {
                sink(&buf)?;
                buf.clear();
            }
            for d in (0..dims).rev() {
                idx[d] += 1;
                if idx[d] < t.view.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        if !buf.is_empty() {
            sink(&buf)?;
        }
        Ok(())
    }

    fn terr(&self, i: usize, reason: String) -> ConvertError {
        ConvertError::Tensor {
            path: self.path.clone(),
            tensor: self.tensors[i].name.clone(),
            reason,
        }
    }
}

impl Source for PytorchSource {
    fn format(&self) -> &'static str {
        "pytorch"
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
        let meta = &self.tensors[i];
        // Contiguous views decode straight from the map; strided ones are gathered first.
        let gathered;
        let (bytes, mapped) = match self.contiguous_range(i) {
            Some(r) => (
                self.map
                    .bytes()
                    .get(r.clone())
                    .ok_or_else(|| self.terr(i, "view outside the mapped file".into()))?,
                Some(r),
            ),
            None => {
                let mut buf = Vec::with_capacity(meta.source_bytes as usize);
                self.stream(i, &mut |c| {
                    buf.extend_from_slice(c);
                    Ok(())
                })?;
                gathered = buf;
                (gathered.as_slice(), None)
            }
        };
        let dtype = meta.dense_dtype;
        let out = match meta.float {
            Some(Precision::F64) => decode_f64(dtype, bytes).map(FloatData::F64),
            Some(Precision::F32) => decode_f32(dtype, bytes).map(FloatData::F32),
            None => None,
        };
        if let Some(r) = mapped {
            self.map.release(r);
        }
        out.ok_or_else(|| self.terr(i, format!("dtype {dtype} cannot be decoded to floats")))
    }

    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.stream(i, sink)
    }

    fn check_unchanged(&self) -> Result<()> {
        self.stamp.check(&self.path)
    }
}

/// Checks that every element the view addresses lies inside the storage.
fn check_view(
    v: &TensorRef,
    storage: &Range<usize>,
    dtype: Dtype,
) -> std::result::Result<(), String> {
    let size = dtype.size() as u64;
    let have = (storage.end - storage.start) as u64 / size;
    if v.storage.numel > have {
        return Err(format!(
            "storage `{}` announces {} elements but holds {have}",
            v.storage.key, v.storage.numel
        ));
    }
    let mut numel = 1u64;
    let mut last = v.offset;
    for (&d, &s) in v.shape.iter().zip(&v.stride) {
        numel = numel.checked_mul(d).ok_or("element count overflows")?;
        if d > 0 {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or("view extent overflows")?;
        }
    }
    if numel > 0 && last >= have {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) needs {} elements but storage `{}` holds {have}",
            v.offset,
            v.shape,
            v.stride,
            last + 1,
            v.storage.key
        ));
    }
    numel
        .checked_mul(size)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or("tensor too large")?;
    Ok(())
}

/// Collects `(dotted name, tensor)` for every tensor under `v`.
fn flatten(
    v: &Value,
    prefix: String,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
    skipped: &mut usize,
) -> std::result::Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "containers nested deeper than {MAX_DEPTH} (or cyclic)"
        ));
    }
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Tensor(t) => {
            if out.len() >= MAX_TENSORS {
                return Err(format!("more than {MAX_TENSORS} tensors"));
            }
            out.push((prefix, (**t).clone()));
        }
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    _ => {
                        *skipped += 1;
                        continue;
                    }
                };
                flatten(v, join(&key), depth + 1, out, skipped)?;
            }
        }
        Value::List(l) => {
            for (i, v) in l.borrow().iter().enumerate() {
                flatten(v, join(&i.to_string()), depth + 1, out, skipped)?;
            }
        }
        Value::Tuple(t) => {
            for (i, v) in t.iter().enumerate() {
                flatten(v, join(&i.to_string()), depth + 1, out, skipped)?;
            }
        }
        _ => *skipped += 1,
    }
    Ok(())
}

type Storages = HashMap<String, Range<usize>>;

/// Every storage the pickle references, by key, with its dtype (a key with two dtypes is
/// refused: the byte length of its storage would be ambiguous).
fn storage_refs(v: &Value) -> std::result::Result<HashMap<String, StorageRef>, String> {
    let mut found = Vec::new();
    flatten(v, String::new(), 0, &mut found, &mut 0)?;
    let mut refs: HashMap<String, StorageRef> = HashMap::new();
    for (_, t) in found {
        if let Some(prev) = refs.get(&t.storage.key) {
            if prev.dtype != t.storage.dtype {
                return Err(format!(
                    "storage `{}` used as {} and as {}",
                    t.storage.key, prev.dtype, t.storage.dtype
                ));
            }
        }
        refs.insert(t.storage.key.clone(), t.storage);
    }
    Ok(refs)
}

fn read_legacy(bytes: &[u8]) -> std::result::Result<(Value, Storages), String> {
    let magic = pickle::unpickle(bytes).map_err(|e| format!("legacy magic number: {e}"))?;
    match &magic.value {
        pickle::Value::BigInt(b) if **b == LEGACY_MAGIC => {}
        _ => return Err("not a PyTorch checkpoint: legacy magic number missing".into()),
    }
    let mut at = magic.end;
    let rest = |at: usize| bytes.get(at..).ok_or("file ends early".to_string());
    let proto = pickle::unpickle(rest(at)?).map_err(|e| format!("protocol version: {e}"))?;
    if proto.value.as_int() != Some(1001) {
        return Err("legacy protocol version is not 1001".into());
    }
    at += proto.end;
    let sys = pickle::unpickle(rest(at)?).map_err(|e| format!("sys_info: {e}"))?;
    if let Value::Dict(d) = &sys.value {
        for (k, v) in d.borrow().iter() {
            if matches!(k, Value::Str(s) if &**s == "little_endian")
                && matches!(v, Value::Bool(false))
            {
                return Err("big-endian checkpoints are not supported".into());
            }
        }
    }
    at += sys.end;
    let main = pickle::unpickle(rest(at)?).map_err(|e| format!("state dict pickle: {e}"))?;
    at += main.end;
    let keys = pickle::unpickle(rest(at)?).map_err(|e| format!("storage key list: {e}"))?;
    at += keys.end;
    let refs = storage_refs(&main.value)?;
    let Value::List(keys) = keys.value else {
        return Err("storage key list is not a list".into());
    };
    let mut storages = Storages::new();
    for k in keys.borrow().iter() {
        let Value::Str(key) = k else {
            return Err("storage key is not a string".into());
        };
        let numel_bytes: [u8; 8] = bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("storage `{key}`: file truncated before its size"))?;
        let numel = u64::from_le_bytes(numel_bytes);
        at += 8;
        // A storage only the key list names (no tensor uses it) is still skipped by
        // size, which needs its dtype: refuse rather than guess.
        let dtype = refs
            .get(&**key)
            .map(|r| r.dtype)
            .ok_or_else(|| format!("storage `{key}` is listed but no tensor uses it"))?;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .and_then(|l| usize::try_from(l).ok())
            .and_then(|l| at.checked_add(l).map(|e| (l, e)))
            .filter(|&(_, e)| e <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "storage `{key}`: {numel} elements of {dtype} run past the end of the file \
                     ({} bytes)",
                    bytes.len()
                )
            })?;
        storages.insert(key.to_string(), at..len.1);
        at = len.1;
    }
    Ok((main.value, storages))
}

struct ZipEntry {
    name: String,
    data: Range<usize>,
}

fn le16(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn le32(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn le64(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn to_usize(v: u64, what: &str, len: usize) -> std::result::Result<usize, String> {
    usize::try_from(v)
        .ok()
        .filter(|&x| x <= len)
        .ok_or_else(|| format!("zip {what} {v} is past the end of the file ({len} bytes)"))
}

/// Parses the zip central directory (with zip64 records) and locates each entry's data.
fn zip_entries(b: &[u8]) -> std::result::Result<Vec<ZipEntry>, String> {
    // The end-of-central-directory record is in the last 22 + 65535 bytes.
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b.get(i..i + 4) == Some(b"PK\x05\x06"))
        .ok_or("zip archive truncated: end of central directory not found")?;
    let mut count = le16(b, eocd + 10)?;
    let mut cd_size = le32(b, eocd + 12)?;
    let mut cd_off = le32(b, eocd + 16)?;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| b.get(l..l + 4) == Some(b"PK\x06\x07"))
            .ok_or("zip64 end-of-central-directory locator missing")?;
        let rec = to_usize(le64(b, loc + 8)?, "zip64 record offset", b.len())?;
        if b.get(rec..rec + 4) != Some(b"PK\x06\x06") {
            return Err("zip64 end-of-central-directory record missing".into());
        }
        count = le64(b, rec + 32)?;
        cd_size = le64(b, rec + 40)?;
        cd_off = le64(b, rec + 48)?;
    }
    let cd_off = to_usize(cd_off, "central directory offset", b.len())?;
    let cd_end = to_usize(
        (cd_off as u64).saturating_add(cd_size),
        "central directory end",
        b.len(),
    )?;
    // Each central record is at least 46 bytes: a count the directory cannot hold is junk.
    if count > cd_size / 46 {
        return Err(format!(
            "zip lists {count} entries in a {cd_size}-byte directory"
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = cd_off;
    for _ in 0..count {
        if at + 46 > cd_end || b.get(at..at + 4) != Some(b"PK\x01\x02") {
            return Err("zip central directory is corrupt".into());
        }
        let method = le16(b, at + 10)?;
        let mut csize = le32(b, at + 20)?;
        let mut usize_ = le32(b, at + 24)?;
        let name_len = le16(b, at + 28)? as usize;
        let extra_len = le16(b, at + 30)? as usize;
        let comment_len = le16(b, at + 32)? as usize;
        let mut local = le32(b, at + 42)?;
        let name = b
            .get(at + 46..at + 46 + name_len)
            .ok_or("zip entry name truncated")?;
        let name = String::from_utf8_lossy(name).into_owned();
        // zip64 extended information: present fields replace the 0xffffffff ones, in order.
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("zip extra field truncated")?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e)?;
            let len = le16(extra, e + 2)? as usize;
            if id == 1 {
                let mut f = e + 4;
                for v in [&mut usize_, &mut csize, &mut local] {
                    if *v == 0xffff_ffff {
                        *v = le64(extra, f)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        at += 46 + name_len + extra_len + comment_len;
        let local = to_usize(local, "local header offset", b.len())?;
        if b.get(local..local + 4) != Some(b"PK\x03\x04") {
            return Err(format!("zip entry `{name}`: local header missing"));
        }
        let start = local + 30 + le16(b, local + 26)? as usize + le16(b, local + 28)? as usize;
        if method != 0 || csize != usize_ {
            return Err(format!(
                "zip entry `{name}` is compressed (method {method}); torch writes entries \
                 stored, so this archive was repacked — unzip and re-zip it with -0"
            ));
        }
        let end = to_usize(
            (start as u64).saturating_add(csize),
            &format!("entry `{name}` end"),
            b.len(),
        )?;
        entries.push(ZipEntry {
            name,
            data: start..end,
        });
    }
    Ok(entries)
}

fn read_zip(b: &[u8]) -> std::result::Result<(Value, Storages), String> {
    let entries = zip_entries(b)?;
    let pkl = entries
        .iter()
        .find(|e| {
            e.name
                .strip_suffix("data.pkl")
                .is_some_and(|p| p.ends_with('/') && p.matches('/').count() == 1)
        })
        .ok_or("zip archive has no <dir>/data.pkl (not a torch.save checkpoint)")?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap_or_default();
    if let Some(order) = entries
        .iter()
        .find(|e| e.name == format!("{prefix}byteorder"))
    {
        if b.get(order.data.clone()) != Some(b"little") {
            return Err("big-endian checkpoints are not supported".into());
        }
    }
    let root = pickle::unpickle(b.get(pkl.data.clone()).unwrap_or(&[]))
        .map_err(|e| format!("{}: {e}", pkl.name))?
        .value;
    let data_dir = format!("{prefix}data/");
    let storages = entries
        .into_iter()
        .filter_map(|e| {
            let key = e.name.strip_prefix(&data_dir)?.to_string();
            Some((key, e.data))
        })
        .collect();
    Ok((root, storages))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// End-of-central-directory record announcing `count` entries in `size` bytes at `off`.
    fn eocd(count: u16, size: u32, off: u32) -> Vec<u8> {
        let mut e = b"PK\x05\x06\0\0\0\0".to_vec();
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&[0, 0]);
        e
    }

    #[test]
    fn zip_hostile_directory_fields_are_refused() {
        let mut f = b"PK\x03\x04".to_vec();
        f.extend([0u8; 46]);
        f.extend(eocd(0xfffe, 46, 4));
        let e = zip_entries(&f).err().unwrap();
        assert!(e.contains("65534 entries in a 46-byte directory"), "{e}");
        let mut f = b"PK\x03\x04".to_vec();
        f.extend(eocd(1, 0xffff_fff0, 0));
        let e = zip_entries(&f).err().unwrap();
        assert!(e.contains("past the end of the file"), "{e}");
        let e = zip_entries(b"PK\x03\x04 no directory").err().unwrap();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn view_bounds_use_checked_arithmetic() {
        let storage = StorageRef {
            dtype: Dtype::F32,
            key: "0".into(),
            numel: 4,
        };
        let view = |offset, shape: Vec<u64>, stride: Vec<u64>| TensorRef {
            storage: storage.clone(),
            offset,
            shape,
            stride,
        };
        let range = 0..16;
        assert!(check_view(&view(0, vec![2, 2], vec![2, 1]), &range, Dtype::F32).is_ok());
        // Transposed view of the same storage.
        assert!(check_view(&view(0, vec![2, 2], vec![1, 2]), &range, Dtype::F32).is_ok());
        let e = check_view(&view(1, vec![2, 2], vec![2, 1]), &range, Dtype::F32).unwrap_err();
        assert!(e.contains("needs 5 elements"), "{e}");
        let e = check_view(
            &view(0, vec![u64::MAX, 2], vec![u64::MAX, 1]),
            &range,
            Dtype::F32,
        )
        .unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        // Empty tensors address nothing.
        assert!(check_view(&view(99, vec![0, 3], vec![3, 1]), &range, Dtype::F32).is_ok());
    }

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/pytorch")
            .join(name);
        std::fs::read(p).expect("fixture")
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
