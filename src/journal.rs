//! The conversion journal: what an interrupted `cersa convert` had finished, so that
//! `--resume` continues instead of starting over.
//!
//! The journal is `journal.jsonl` inside the temporary output directory
//! (`.OUT.cersa-partial`). Its first line fingerprints the run (options, source files with
//! sizes and mtimes, tensor list); every following line records one closed shard: its
//! temporary file, size, sha256, and the manifest entries (completed tensors) it holds.
//! A line is appended and fsynced only after the shard file itself is synced, so every
//! journaled shard was complete on disk. A torn last line (the process was killed while
//! writing it) is ignored.
//!
//! Resuming is at shard granularity: the tensors of the shard that was open are redone.
//! Since a shard is closed exactly when the next tensor group begins, restarting the
//! writer at a shard boundary gives the same shard layout, hence byte-identical output.

use crate::error::{ConvertError, Result};
use cersa_loader::writer::sha256_file;
use cersa_loader::{CheckpointWriter, TensorInfo};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// File name of the journal inside the temporary output directory.
pub const JOURNAL_FILE: &str = "journal.jsonl";
const JOURNAL_FORMAT: &str = "cersa-convert-journal";
const JOURNAL_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct JournalHeader {
    journal: String,
    version: u32,
    fingerprint: serde_json::Value,
}

/// One closed shard and the tensors it completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// 0-based shard index.
    pub index: usize,
    /// Temporary file name inside the partial directory.
    pub file: String,
    /// File size.
    pub bytes: u64,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Index (in source order) of the first tensor in this shard.
    pub first_tensor: usize,
    /// One past the index of the last tensor in this shard.
    pub end_tensor: usize,
    /// Manifest entries of the tensors in this shard, in source order (`shard` empty).
    pub tensors: Vec<(String, TensorInfo)>,
}

/// An open journal, appended to as shards close.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// What a resumed run starts from.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Closed shards verified on disk, in order; their tensors are a prefix of the source.
    pub shards: Vec<ShardRecord>,
}

impl Recovered {
    /// Index of the first tensor still to convert.
    pub fn next_tensor(&self) -> usize {
        self.shards.last().map_or(0, |s| s.end_tensor)
    }
}

fn header_line(fingerprint: &serde_json::Value) -> Result<String> {
    let h = JournalHeader {
        journal: JOURNAL_FORMAT.into(),
        version: JOURNAL_VERSION,
        fingerprint: fingerprint.clone(),
    };
    serde_json::to_string(&h)
        .map(|s| s + "\n")
        .map_err(|e| ConvertError::Options(format!("journal header: {e}")))
}

impl Journal {
    /// Starts a new journal in `dir` (which must be empty apart from stale files the caller
    /// removed).
    pub fn create(dir: &Path, fingerprint: &serde_json::Value) -> Result<Journal> {
        Self::write_new(dir, fingerprint, &[])
    }

    /// Writes `header + records` to a temporary file and renames it over the journal, so a
    /// crash leaves either the old or the new journal.
    fn write_new(
        dir: &Path,
        fingerprint: &serde_json::Value,
        records: &[ShardRecord],
    ) -> Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        let tmp = dir.join(format!("{JOURNAL_FILE}.new"));
        let mut text = header_line(fingerprint)?;
        for r in records {
            text.push_str(&record_line(r)?);
        }
        let mut f = File::create(&tmp).map_err(|e| ConvertError::io(&tmp, "create", e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| ConvertError::io(&tmp, "write", e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| ConvertError::io(&path, "rename", e))?;
        sync_dir(dir);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| ConvertError::io(&path, "open", e))?;
        Ok(Journal { path, file })
    }

    /// Appends a closed shard; returns once the line is on disk.
    pub fn record(&mut self, record: &ShardRecord) -> Result<()> {
        let line = record_line(record)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| ConvertError::io(&self.path, "write", e))
    }
}

fn record_line(r: &ShardRecord) -> Result<String> {
    serde_json::to_string(r)
        .map(|s| s + "\n")
        .map_err(|e| ConvertError::Options(format!("journal record: {e}")))
}

fn sync_dir(dir: &Path) {
    // Persist renames; best effort on filesystems without directory fsync.
    let _ = File::open(dir).and_then(|d| d.sync_all());
}

/// Reads the journal of the partial directory `dir`, re-verifies every journaled shard
/// (size and sha256 of the file on disk), keeps the longest verified prefix, removes
/// everything else from `dir`, and reopens the journal for appending.
///
/// Errors when the journal was written for a different source or options.
pub fn recover(
    dir: &Path,
    fingerprint: &serde_json::Value,
    tensor_count: usize,
) -> Result<(Journal, Recovered)> {
    let path = dir.join(JOURNAL_FILE);
    let file = cersa_loader::regular::open_regular(&path)
        .map_err(|e| ConvertError::io(&path, "open", e))?;
    let mut lines = BufReader::new(file).lines();
    let header: Option<JournalHeader> = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str(&l).ok());
    let Some(header) = header.filter(|h| h.journal == JOURNAL_FORMAT) else {
        return Err(ConvertError::Source {
            path,
            reason: "not a cersa conversion journal (or its first line is damaged); \
                     remove the partial directory and convert without --resume"
                .into(),
        });
    };
    if header.version != JOURNAL_VERSION || header.fingerprint != *fingerprint {
        return Err(ConvertError::Source {
            path,
            reason: "the interrupted conversion used a different source or different \
                     options; rerun it with the same ones, or convert without --resume \
                     to start over"
                .into(),
        });
    }
    let mut shards: Vec<ShardRecord> = Vec::new();
    for line in lines {
        // A torn or unreadable line ends the trusted part of the journal.
        let Ok(line) = line else { break };
        let Ok(r) = serde_json::from_str::<ShardRecord>(&line) else {
            break;
        };
        let expected_first = shards.last().map_or(0, |s| s.end_tensor);
        let plausible = r.index == shards.len()
            && r.first_tensor == expected_first
            && r.end_tensor > r.first_tensor
            && r.end_tensor <= tensor_count
            && r.tensors.len() == r.end_tensor - r.first_tensor
            && r.file == CheckpointWriter::temp_shard_name(r.index);
        if !plausible {
            break;
        }
        match sha256_file(&dir.join(&r.file)) {
            Ok((bytes, sha)) if bytes == r.bytes && sha == r.sha256 => shards.push(r),
            _ => break,
        }
    }
    // Everything not verified (the open shard's data, later shards, a manifest written
    // just before the kill) is redone.
    let keep: std::collections::HashSet<&str> = shards.iter().map(|s| s.file.as_str()).collect();
    let entries = std::fs::read_dir(dir).map_err(|e| ConvertError::io(dir, "read directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ConvertError::io(dir, "read directory", e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == JOURNAL_FILE || keep.contains(name.as_ref()) {
            continue;
        }
        let p = entry.path();
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| ConvertError::io(&p, "remove unverified partial file", e))?;
    }
    let journal = Journal::write_new(dir, fingerprint, &shards)?;
    Ok((journal, Recovered { shards }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cersa_loader::writer::hex;
    use sha2::{Digest, Sha256};

    fn record(dir: &Path, index: usize, first: usize, end: usize) -> ShardRecord {
        let file = CheckpointWriter::temp_shard_name(index);
        let body = format!("shard {index}");
        std::fs::write(dir.join(&file), &body).unwrap();
        ShardRecord {
            index,
            file,
            bytes: body.len() as u64,
            sha256: hex(&Sha256::digest(body.as_bytes())),
            first_tensor: first,
            end_tensor: end,
            tensors: (first..end)
                .map(|i| {
                    (
                        format!("t{i}"),
                        TensorInfo {
                            kind: cersa_loader::TensorKind::Dense,
                            shape: vec![1],
                            source_dtype: "F32".into(),
                            stored_dtype: cersa_loader::Dtype::F32,
                            shard: String::new(),
                            matrix_shape: None,
                            rank: None,
                            energy: None,
                            rel_error: None,
                            quant: None,
                            reason: Some(cersa_loader::DenseReason::NotAMatrix),
                            rule: None,
                            whitening: None,
                            experts: None,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn recovers_verified_prefix_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let fp = serde_json::json!({"a": 1});
        let mut j = Journal::create(dir.path(), &fp).unwrap();
        let r0 = record(dir.path(), 0, 0, 2);
        let r1 = record(dir.path(), 1, 2, 3);
        let r2 = record(dir.path(), 2, 3, 5);
        j.record(&r0).unwrap();
        j.record(&r1).unwrap();
        j.record(&r2).unwrap();
        // Shard 2 damaged on disk, an open shard's data file, a torn line.
        std::fs::write(dir.path().join(&r2.file), "shard 9").unwrap();
        std::fs::write(dir.path().join(".shard-00004.data"), "x").unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"index\":3,\"fi").unwrap();
        drop(f);
        let (_, rec) = recover(dir.path(), &fp, 5).unwrap();
        assert_eq!(rec.shards, vec![r0.clone(), r1.clone()]);
        assert_eq!(rec.next_tensor(), 3);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![r0.file, r1.file, JOURNAL_FILE.to_string()]);
        // A different fingerprint is refused.
        assert!(recover(dir.path(), &serde_json::json!({"a": 2}), 5).is_err());
    }
}
