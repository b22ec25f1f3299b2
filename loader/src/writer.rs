//! Streaming writer of CERSA shards and manifest.
//!
//! Tensor data is appended to a per-shard data file as it arrives; the safetensors header
//! is known only when the shard is closed. With a header reservation the data starts after
//! that many bytes and the header, padded with spaces to fill them, is written in place:
//! the data is never copied, and the file's sha256 is read back while it is synced.
//! Without one, or when the header outgrows it, the header and then the data are copied
//! into a new file, the sha256 taken on the way. Memory use is one copy buffer, whatever
//! the tensor sizes.
//!
//! The writer reserves by itself when it is told the manifest entries to come
//! ([`CheckpointWriter::with_plan`]): a shard opened at entry `i` reserves room for the
//! entries `i..`, each in its longer form (dense or factored), so it never copies.
//! [`CheckpointWriter::begin_group`] returns the shard it closed, so the caller can
//! journal it without asking.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::manifest::{factor_names, shard_file_name, Manifest, ShardInfo, MANIFEST_FILE};
use crate::safetensors::{header_entry_bound, serialize_header};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Shard `__metadata__` every CERSA shard carries.
pub fn shard_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), "cersa".to_string()),
        ("cersa_version".to_string(), "1".to_string()),
    ])
}

struct OpenShard {
    data_path: PathBuf,
    data: BufWriter<File>,
    /// Offset of the data section in the data file (the header reservation, or 0).
    data_start: u64,
    entries: Vec<(String, Dtype, Vec<usize>, usize)>,
    bytes: u64,
}

struct OpenTensor {
    expected: usize,
    written: usize,
}

/// A manifest entry the writer will be given, in order (see
/// [`CheckpointWriter::with_plan`]). It may be stored dense (one tensor `name` with
/// `ndims` dimensions) or factored (`name.cersa_u` [m, r], `.cersa_s` [r], `.cersa_vt`
/// [r, n]); the header reservation covers the longer of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEntry {
    /// Manifest entry name (the source tensor name).
    pub name: String,
    /// Number of dimensions of its source shape.
    pub ndims: usize,
    /// Number of experts when it may be stored as a stacked experts tensor (each expert
    /// dense or factored, format revision 1.3); 0 otherwise.
    pub experts: usize,
}

impl PlannedEntry {
    /// Upper bound on the header bytes this entry adds, dense, factored or per expert.
    fn header_bound(&self) -> u64 {
        let one = |name: &str, ndims: usize| {
            let (un, sn, vn) = factor_names(name);
            let factored = header_entry_bound(&un, 2)
                + header_entry_bound(&sn, 1)
                + header_entry_bound(&vn, 2);
            factored.max(header_entry_bound(name, ndims))
        };
        let experts: u64 = (0..self.experts)
            .map(|e| one(&crate::manifest::expert_name(&self.name, e), self.ndims - 1))
            .sum();
        one(&self.name, self.ndims).max(experts)
    }
}

/// A shard [`CheckpointWriter::begin_group`] closed: its file is complete and synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedShard {
    /// 0-based shard index.
    pub index: usize,
    /// Temporary file name in the output directory ([`CheckpointWriter::temp_shard_name`]).
    pub file: String,
    /// File size.
    pub bytes: u64,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
}

/// Writes the shards and manifest of a CERSA checkpoint into an existing, empty
/// directory. The caller makes that directory appear atomically (see the converter).
pub struct CheckpointWriter {
    dir: PathBuf,
    max_shard_size: u64,
    closed: Vec<(PathBuf, u64, String)>,
    current: Option<OpenShard>,
    tensor: Option<OpenTensor>,
    group_shard: BTreeMap<String, usize>,
    /// Groups begun so far (resumed ones included): the position in `plan`.
    groups_begun: usize,
    /// Planned entry names and, per position `i`, the header bytes a shard opened there
    /// reserves (one more element than entries; empty without a plan).
    plan: Vec<PlannedEntry>,
    reserve_from: Vec<u64>,
    /// Fixed reservation without a plan ([`CheckpointWriter::reserve_header`]).
    header_reserve: u64,
}

impl CheckpointWriter {
    /// Starts writing into `dir`; a shard is closed before it would exceed
    /// `max_shard_size` bytes of tensor data (a single larger group gets its own shard).
    pub fn new(dir: &Path, max_shard_size: u64) -> Self {
        CheckpointWriter {
            dir: dir.to_path_buf(),
            max_shard_size: max_shard_size.max(1),
            closed: Vec::new(),
            current: None,
            tensor: None,
            group_shard: BTreeMap::new(),
            groups_begun: 0,
            plan: Vec::new(),
            reserve_from: Vec::new(),
            header_reserve: 0,
        }
    }

    /// Announces every manifest entry, in the order its group will begin (resumed ones
    /// included). Each shard then reserves room for the headers of the entries still to
    /// come, so its data is written in place instead of copied when it closes (see the
    /// module docs), and [`CheckpointWriter::begin_group`] checks the names against it.
    pub fn with_plan(mut self, plan: Vec<PlannedEntry>) -> Self {
        let mut reserve_from = vec![0u64; plan.len() + 1];
        for (i, entry) in plan.iter().enumerate().rev() {
            reserve_from[i] = reserve_from[i + 1] + entry.header_bound();
        }
        self.plan = plan;
        self.reserve_from = reserve_from;
        self
    }

    /// Without a plan: reserves `bytes` (8-byte length prefix included) for the header of
    /// each shard opened from now on; a header that does not fit is copied (tests of that
    /// path, writers that know their own bound). 0 (the default) reserves nothing.
    pub fn reserve_header(&mut self, bytes: u64) {
        self.header_reserve = bytes;
    }

    /// Header bytes a shard opened now reserves, a multiple of 8.
    fn reservation(&self) -> u64 {
        let bytes = match self.reserve_from.get(self.groups_begun) {
            Some(rest) => header_base_bound() + rest,
            None => self.header_reserve,
        };
        bytes.div_ceil(8).saturating_mul(8)
    }

    /// Continues a run whose first shards were closed before an interruption:
    /// `closed` holds each closed shard's temporary file (`.shard-0000k.safetensors` in
    /// `dir`), size and sha256, and `groups` the manifest entries stored in each of them
    /// (outer index = shard). The next group starts a new shard, exactly as it would have
    /// in an uninterrupted run, since a shard is only closed when the next group begins.
    pub fn resume(
        dir: &Path,
        max_shard_size: u64,
        closed: Vec<(PathBuf, u64, String)>,
        groups: &[Vec<String>],
    ) -> Self {
        let mut w = CheckpointWriter::new(dir, max_shard_size);
        for (k, names) in groups.iter().enumerate() {
            for name in names {
                w.group_shard.insert(name.clone(), k);
                w.groups_begun += 1;
            }
        }
        w.closed = closed;
        w
    }

    /// Temporary file name of shard `k` (0-based) before [`CheckpointWriter::finish`]
    /// renames it.
    pub fn temp_shard_name(k: usize) -> String {
        format!(".shard-{:05}.safetensors", k + 1)
    }

    /// Starts the stored tensors of manifest entry `name` (`total_bytes` in all); they
    /// all go to the same shard. When that closes the open shard, returns it: its file is
    /// complete and synced before any byte of this group is written.
    pub fn begin_group(&mut self, name: &str, total_bytes: u64) -> Result<Option<ClosedShard>> {
        if let Some(planned) = self.plan.get(self.groups_begun) {
            if planned.name != name {
                return Err(Error::Usage {
                    tensor: name.to_string(),
                    reason: format!(
                        "group {} begun where the plan has `{}`",
                        self.groups_begun, planned.name
                    ),
                });
            }
        }
        let need_new = match &self.current {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes.saturating_add(total_bytes) > self.max_shard_size,
        };
        let mut closed = None;
        if need_new {
            closed = self.close_current()?;
            let index = self.closed.len();
            let data_path = self.dir.join(format!(".shard-{:05}.data", index + 1));
            let mut file =
                File::create(&data_path).map_err(|e| Error::io(&data_path, "create", e))?;
            let data_start = self.reservation();
            if data_start > 0 {
                file.seek(SeekFrom::Start(data_start))
                    .map_err(|e| Error::io(&data_path, "seek", e))?;
            }
            self.current = Some(OpenShard {
                data_path,
                data_start,
                data: BufWriter::with_capacity(1 << 20, file),
                entries: Vec::new(),
                bytes: 0,
            });
        }
        self.group_shard.insert(name.to_string(), self.closed.len());
        self.groups_begun += 1;
        Ok(closed)
    }

    /// Starts one stored tensor in the current group.
    pub fn begin_tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let shard = self.current.as_mut().ok_or_else(|| Error::Usage {
            tensor: name.to_string(),
            reason: "begin_tensor called before begin_group".into(),
        })?;
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Usage {
                tensor: name.to_string(),
                reason: format!("shape {shape:?} overflows"),
            })?;
        shard
            .entries
            .push((name.to_string(), dtype, shape.to_vec(), expected));
        self.tensor = Some(OpenTensor {
            expected,
            written: 0,
        });
        Ok(())
    }

    /// Appends bytes of the open tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (Some(shard), Some(t)) = (self.current.as_mut(), self.tensor.as_mut()) else {
            return Err(Error::Usage {
                tensor: String::new(),
                reason: "write called without an open tensor".into(),
            });
        };
        t.written += bytes.len();
        if t.written > t.expected {
            let name = shard
                .entries
                .last()
                .map(|e| e.0.clone())
                .unwrap_or_default();
            return Err(Error::Usage {
                tensor: name,
                reason: format!("{} bytes written, shape needs {}", t.written, t.expected),
            });
        }
        shard
            .data
            .write_all(bytes)
            .map_err(|e| Error::io(&shard.data_path, "write", e))?;
        shard.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Ends the open tensor; its byte count must match its shape.
    pub fn end_tensor(&mut self) -> Result<()> {
        let t = self.tensor.take();
        let name = self
            .current
            .as_ref()
            .and_then(|s| s.entries.last())
            .map(|e| e.0.clone())
            .unwrap_or_default();
        match t {
            Some(t) if t.written == t.expected => Ok(()),
            Some(t) => Err(Error::Usage {
                tensor: name,
                reason: format!("{} bytes written, shape needs {}", t.written, t.expected),
            }),
            None => Err(Error::Usage {
                tensor: name,
                reason: "end_tensor without begin_tensor".into(),
            }),
        }
    }

    /// Writes a whole stored tensor from memory.
    pub fn write_tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        self.begin_tensor(name, dtype, shape)?;
        self.write(bytes)?;
        self.end_tensor()
    }

    fn close_current(&mut self) -> Result<Option<ClosedShard>> {
        let Some(shard) = self.current.take() else {
            return Ok(None);
        };
        let index = self.closed.len();
        let mut data_file = shard
            .data
            .into_inner()
            .map_err(|e| Error::io(&shard.data_path, "flush", e.into_error()))?;
        let header = serialize_header(&shard_metadata(), &shard.entries);
        let path = self.dir.join(Self::temp_shard_name(index));
        let (bytes, sha) = if shard.data_start >= header.len() as u64 && shard.data_start > 0 {
            // In place: pad the JSON with spaces to fill the reservation exactly.
            let json_len = shard.data_start - 8;
            let mut head = Vec::with_capacity(shard.data_start as usize);
            head.extend(json_len.to_le_bytes());
            head.extend(&header[8..]);
            head.resize(shard.data_start as usize, b' ');
            data_file
                .seek(SeekFrom::Start(0))
                .and_then(|_| data_file.write_all(&head))
                .map_err(|e| Error::io(&shard.data_path, "write header", e))?;
            let (synced, hashed) = std::thread::scope(|scope| {
                let sync = scope.spawn(|| data_file.sync_all());
                let hashed = sha256_file(&shard.data_path);
                (sync.join(), hashed)
            });
            synced
                .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")))
                .map_err(|e| Error::io(&shard.data_path, "sync", e))?;
            let (n, sha) = hashed.map_err(|e| Error::io(&shard.data_path, "read", e))?;
            drop(data_file);
            std::fs::rename(&shard.data_path, &path).map_err(|e| Error::io(&path, "rename", e))?;
            (n, sha)
        } else {
            drop(data_file);
            let mut hasher = Sha256::new();
            let out = File::create(&path).map_err(|e| Error::io(&path, "create", e))?;
            let mut out = BufWriter::with_capacity(1 << 20, out);
            hasher.update(&header);
            out.write_all(&header)
                .map_err(|e| Error::io(&path, "write", e))?;
            let mut data =
                File::open(&shard.data_path).map_err(|e| Error::io(&shard.data_path, "open", e))?;
            data.seek(SeekFrom::Start(shard.data_start))
                .map_err(|e| Error::io(&shard.data_path, "seek", e))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = data
                    .read(&mut buf)
                    .map_err(|e| Error::io(&shard.data_path, "read", e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| Error::io(&path, "write", e))?;
            }
            let out = out
                .into_inner()
                .map_err(|e| Error::io(&path, "flush", e.into_error()))?;
            out.sync_all().map_err(|e| Error::io(&path, "sync", e))?;
            std::fs::remove_file(&shard.data_path)
                .map_err(|e| Error::io(&shard.data_path, "remove", e))?;
            (header.len() as u64 + shard.bytes, hex(&hasher.finalize()))
        };
        self.closed.push((path, bytes, sha.clone()));
        Ok(Some(ClosedShard {
            index,
            file: Self::temp_shard_name(index),
            bytes,
            sha256: sha,
        }))
    }

    /// Closes the last shard, names shards `cersa-0000k-of-0000N.safetensors`, fills the
    /// manifest's `shards` and each tensor's `shard`, and writes `cersa.json`.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<Manifest> {
        if self.tensor.is_some() {
            return Err(Error::Usage {
                tensor: String::new(),
                reason: "finish with a tensor still open".into(),
            });
        }
        self.close_current()?;
        let n = self.closed.len();
        let mut names = Vec::with_capacity(n);
        manifest.shards.clear();
        for (k, (path, bytes, sha256)) in self.closed.iter().enumerate() {
            let file = shard_file_name(k + 1, n);
            let dest = self.dir.join(&file);
            std::fs::rename(path, &dest).map_err(|e| Error::io(&dest, "rename", e))?;
            manifest.shards.push(ShardInfo {
                file: file.clone(),
                bytes: *bytes,
                sha256: sha256.clone(),
            });
            names.push(file);
        }
        for (name, info) in manifest.tensors.iter_mut() {
            let k = self.group_shard.get(name).ok_or_else(|| Error::Mismatch {
                path: self.dir.clone(),
                tensor: name.clone(),
                reason: "in the manifest but never written".into(),
            })?;
            info.shard = names[*k].clone();
        }
        if self.group_shard.len() != manifest.tensors.len() {
            let stray = self
                .group_shard
                .keys()
                .find(|k| !manifest.tensors.contains_key(*k))
                .cloned()
                .unwrap_or_default();
            return Err(Error::Mismatch {
                path: self.dir.clone(),
                tensor: stray,
                reason: "written but missing from the manifest".into(),
            });
        }
        let path = self.dir.join(MANIFEST_FILE);
        let mut json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        json.push('\n');
        let mut f = File::create(&path).map_err(|e| Error::io(&path, "create", e))?;
        f.write_all(json.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&path, "write", e))?;
        Ok(manifest)
    }
}

/// Bytes of a shard header beyond its tensor entries: the 8-byte length, the braces and
/// the `__metadata__` map, and up to 7 bytes of alignment padding.
pub fn header_base_bound() -> u64 {
    let meta = serde_json::to_string(&shard_metadata()).expect("string map serializes");
    (8 + 2 + "\"__metadata__\":".len() + meta.len() + 7) as u64
}

/// Size and lowercase hex sha256 of the file at `path` (how shards are checksummed, and
/// re-verified by the converter's journal and `cersa verify`).
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = crate::regular::open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((total, hex(&h.finalize())))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
