//! `cersa assemble`: joins the part directories of a partitioned conversion
//! (`convert --part I/N`, [`crate::convert::part`]) into one CERSA directory whose shards
//! and manifest are byte-identical to a one-machine `cersa convert` with the same options.
//!
//! Assembly copies bytes, it never recomputes: every tensor is taken, as stored, from the
//! part that converted it and written in source order through the same shard writer, so
//! the shard boundaries, headers and manifest come out as one run would have made them.
//! Before any byte is written, the parts are checked to be of one run (same identity,
//! options, producer, source and side files), none missing or given twice, each holding
//! exactly its share, with every shard's sha256 verified.

use crate::convert::part::{PartRecord, PART_FILE};
use crate::convert::{add_totals, commit, prepare_output, Progress};
use crate::error::{ConvertError, Result};
use cersa_loader::manifest::Totals;
use cersa_loader::writer::PlannedEntry;
use cersa_loader::{Checkpoint, CheckpointWriter, Manifest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Options of [`assemble`].
#[derive(Debug, Clone, Default)]
pub struct AssembleOptions {
    /// Replace an existing CERSA directory at the output path once the new one is complete.
    pub overwrite: bool,
}

/// One part directory, opened and checked.
struct Part {
    dir: PathBuf,
    record: PartRecord,
    ckpt: Checkpoint,
}

fn part_error(dir: &Path, reason: String) -> ConvertError {
    ConvertError::Source {
        path: dir.to_path_buf(),
        reason,
    }
}

/// Opens every part (shards verified by sha256) and checks that together they are one
/// whole run; returns them ordered by part index.
fn open_parts(dirs: &[PathBuf], cancel: &AtomicBool) -> Result<Vec<Part>> {
    if dirs.is_empty() {
        return Err(ConvertError::Parts(
            "give the part directories to assemble".into(),
        ));
    }
    let mut parts: Vec<Part> = Vec::with_capacity(dirs.len());
    for dir in dirs {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        let record = PartRecord::read(dir)?;
        let ckpt = Checkpoint::open_with(
            dir,
            cersa_loader::OpenOptions {
                verify_checksums: true,
            },
        )?;
        parts.push(Part {
            dir: dir.clone(),
            record,
            ckpt,
        });
    }
    let first = &parts[0];
    for p in &parts[1..] {
        let differs = |what: &str| {
            part_error(
                &p.dir,
                format!(
                    "not a part of the same conversion as {} ({what} differ): parts must come \
                     from one source converted with the same options and cersa version",
                    first.dir.display()
                ),
            )
        };
        if p.record.run_sha256 != first.record.run_sha256 {
            return Err(differs("run identities (source or options)"));
        }
        if p.record.parts != first.record.parts {
            return Err(differs("numbers of parts"));
        }
        if p.record.tensors != first.record.tensors {
            return Err(differs("tensor lists"));
        }
        let (a, b) = (p.ckpt.manifest(), first.ckpt.manifest());
        if a.producer != b.producer || a.config != b.config {
            return Err(differs("producers or options in cersa.json"));
        }
        if a.source != b.source {
            return Err(differs("sources in cersa.json"));
        }
        if a.side_files != b.side_files {
            return Err(differs("side files"));
        }
    }
    parts.sort_by_key(|p| p.record.part);
    for w in parts.windows(2) {
        if w[0].record.part == w[1].record.part {
            return Err(part_error(
                &w[1].dir,
                format!(
                    "part {} is given twice (also {})",
                    w[0].record.part,
                    w[0].dir.display()
                ),
            ));
        }
    }
    let count = parts[0].record.parts;
    if parts.len() != count {
        let missing: Vec<String> = (0..count)
            .filter(|i| !parts.iter().any(|p| p.record.part == *i))
            .map(|i| i.to_string())
            .collect();
        return Err(ConvertError::Parts(format!(
            "the conversion has {count} parts but {} were given: part(s) {} missing \
             (indices are 0-based)",
            parts.len(),
            missing.join(", ")
        )));
    }
    for p in &parts {
        check_share(p)?;
    }
    Ok(parts)
}

/// A part's checkpoint holds exactly the tensors its record assigns to it.
fn check_share(p: &Part) -> Result<()> {
    let held = &p.ckpt.manifest().tensors;
    let mut owned = 0usize;
    for t in p.record.tensors.iter().filter(|t| t.part == p.record.part) {
        owned += 1;
        if !held.contains_key(&t.name) {
            return Err(ConvertError::Tensor {
                path: p.dir.clone(),
                tensor: t.name.clone(),
                reason: format!(
                    "part {} should hold this tensor but its cersa.json does not list it",
                    p.record.part
                ),
            });
        }
    }
    if held.len() != owned {
        let stray = held
            .keys()
            .find(|k| {
                !p.record
                    .tensors
                    .iter()
                    .any(|t| &t.name == *k && t.part == p.record.part)
            })
            .cloned()
            .unwrap_or_default();
        return Err(ConvertError::Tensor {
            path: p.dir.clone(),
            tensor: stray,
            reason: format!(
                "part {} holds this tensor but its {PART_FILE} assigns it elsewhere",
                p.record.part
            ),
        });
    }
    Ok(())
}

/// Assembles the part directories `dirs` (any order) into the CERSA directory `out`,
/// which appears only when complete. Returns its manifest.
pub fn assemble(
    out: &Path,
    dirs: &[PathBuf],
    opts: &AssembleOptions,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Manifest> {
    let parts = open_parts(dirs, cancel)?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some(p) = parts.iter().find(|p| same(&p.dir, out)) {
        return Err(ConvertError::Parts(format!(
            "{}: the output is one of the parts; assemble into another directory",
            p.dir.display()
        )));
    }
    let staging = prepare_output(out, false, opts.overwrite)?;
    let tmp = staging.partial.clone();
    let result = write_whole(&parts, &tmp, progress, cancel).and_then(|m| {
        commit(&staging, out)?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes every tensor in source order from the part that holds it, then the manifest.
fn write_whole(
    parts: &[Part],
    tmp: &Path,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Manifest> {
    let template = parts[0].ckpt.manifest();
    let side_files = crate::side_files::carry_side_files(&parts[0].ckpt, tmp, true)?;
    if side_files != template.side_files {
        return Err(part_error(
            &parts[0].dir,
            "its side files changed since the part was written (sha256 or size differ)".into(),
        ));
    }
    let list = &parts[0].record.tensors;
    let mut writer = CheckpointWriter::new(tmp, template.config.max_shard_size).with_plan(
        list.iter()
            .map(|t| {
                let info = &parts[t.part].ckpt.manifest().tensors[&t.name];
                PlannedEntry {
                    name: t.name.clone(),
                    ndims: info.shape.len(),
                    experts: info.expert_count(),
                }
            })
            .collect(),
    );
    let bytes_total: u64 = list.iter().map(|t| t.source_bytes).sum();
    let (mut tensors, mut totals, mut bytes_done) = (BTreeMap::new(), Totals::default(), 0u64);
    for (i, t) in list.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        let ckpt = &parts[t.part].ckpt;
        let mut info = ckpt.manifest().tensors[&t.name].clone();
        let stored = ckpt.stored_tensors(&t.name)?;
        writer.begin_group(
            &t.name,
            stored.iter().map(|(_, r)| r.bytes.len() as u64).sum(),
        )?;
        for (name, raw) in stored {
            writer.begin_tensor(&name, raw.dtype, raw.shape)?;
            for chunk in raw.bytes.chunks(COPY_CHUNK) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(ConvertError::Interrupted);
                }
                writer.write(chunk)?;
            }
            writer.end_tensor()?;
        }
        // The shard the tensor lands in is the writer's to fill, as in a single run.
        info.shard = String::new();
        add_totals(&mut totals, t.source_bytes, &info);
        tensors.insert(t.name.clone(), info);
        bytes_done += t.source_bytes;
        progress(&Progress {
            done: i + 1,
            total: list.len(),
            bytes_done,
            bytes_total,
            name: &t.name,
        });
    }
    let manifest = Manifest {
        format_minor: Manifest::required_minor(&tensors),
        shards: Vec::new(),
        side_files,
        tensors,
        totals,
        ..template.clone()
    };
    Ok(writer.finish(manifest)?)
}

/// Bytes copied per write of a dense tensor (a cancellation is seen between chunks).
const COPY_CHUNK: usize = 8 << 20;
