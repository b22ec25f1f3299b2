//! The ordered writer loop: takes results in source order, streams dense tensors from the
//! source, writes factors, journals every shard the writer closes, and assembles the
//! manifest.

use super::process::{Expert, Factored, Outcome};
use super::schedule::{Job, Results};
use super::Progress;
use crate::error::{ConvertError, Result};
use crate::input::{Source, TensorMeta};
use crate::journal::{self, Journal, Recovered, ShardRecord};
use crate::rank_rules::{ModuleRule, PLAN_RULE};
use crate::storage::Stored;
use cersa_loader::manifest::{ConvertConfig, Producer, SourceInfo, Totals};
use cersa_loader::writer::{ClosedShard, PlannedEntry};
use cersa_loader::{
    expert_name, factor_names, CheckpointWriter, Dtype, ExpertInfo, Manifest, TensorInfo,
    TensorKind,
};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// The shard being written: its first tensor and the manifest entries in it so far.
struct OpenShard {
    first_tensor: usize,
    tensors: Vec<(String, TensorInfo)>,
}

impl OpenShard {
    /// Journals `closed` (complete and synced) with the tensors it holds, before any byte
    /// of tensor `i` is written; tensor `i` opens the next shard.
    fn journal(&mut self, closed: ClosedShard, i: usize, journal: &mut Journal) -> Result<()> {
        journal.record(&ShardRecord {
            index: closed.index,
            file: closed.file,
            bytes: closed.bytes,
            sha256: closed.sha256,
            first_tensor: self.first_tensor,
            end_tensor: i,
            tensors: std::mem::take(&mut self.tensors),
        })?;
        self.first_tensor = i;
        Ok(())
    }
}

/// Writes every tensor from the first one `recovered` does not hold, in source order.
pub(super) fn write_all(
    job: &Job,
    results: &Results,
    progress: &mut dyn FnMut(&Progress),
    journal: &mut Journal,
    recovered: &Recovered,
) -> Result<Manifest> {
    let (src, tmp, cancel) = (job.src, job.tmp, job.cancel);
    let metas = src.tensors();
    let start = recovered.next_tensor();
    let bytes_total: u64 = metas.iter().map(|t| t.source_bytes).sum();
    let mut writer = CheckpointWriter::resume(
        tmp,
        job.opts.max_shard_size,
        recovered
            .shards
            .iter()
            .map(|r| (tmp.join(&r.file), r.bytes, r.sha256.clone()))
            .collect(),
        &recovered
            .shards
            .iter()
            .map(|r| r.tensors.iter().map(|(n, _)| n.clone()).collect())
            .collect::<Vec<_>>(),
    )
    // Every tensor may be stored dense or factored: the writer reserves header room for
    // the longer, so each shard's data is written in place.
    .with_plan(
        metas
            .iter()
            .map(|t| PlannedEntry {
                name: t.name.clone(),
                ndims: t.shape.len(),
                experts: match job.selection.check(t) {
                    Ok(()) => job.selection.view(t).experts.unwrap_or(0),
                    Err(_) => 0,
                },
            })
            .collect(),
    );
    let mut tensors = BTreeMap::new();
    let mut totals = Totals::default();
    let mut bytes_done = 0u64;
    // Tensors finished by the interrupted run count as written.
    for (meta, (name, info)) in metas
        .iter()
        .zip(recovered.shards.iter().flat_map(|r| &r.tensors))
    {
        if *name != meta.name {
            return Err(ConvertError::Tensor {
                path: tmp.join(journal::JOURNAL_FILE),
                tensor: name.clone(),
                reason: format!("journal lists it where the source has `{}`", meta.name),
            });
        }
        add_totals(&mut totals, meta.source_bytes, info);
        bytes_done += meta.source_bytes;
        tensors.insert(name.clone(), info.clone());
    }
    if start > 0 {
        progress(&Progress {
            done: start,
            total: metas.len(),
            bytes_done,
            bytes_total,
            name: &metas[start - 1].name,
        });
    }
    let mut open_shard = OpenShard {
        first_tensor: start,
        tensors: Vec::new(),
    };
    for (i, meta) in metas.iter().enumerate().skip(start) {
        // A source rewritten under its memory map is caught between tensors, not only at
        // the end (reading a truncated map would fault).
        src.check_unchanged()?;
        let (outcome, held) = results.take(i)?;
        let info = match outcome {
            Outcome::Dense(reason) => {
                let nbytes = meta.numel() * meta.dense_dtype.size() as u64;
                if let Some(closed) = writer.begin_group(&meta.name, nbytes)? {
                    open_shard.journal(closed, i, journal)?;
                }
                writer.begin_tensor(&meta.name, meta.dense_dtype, &meta.shape)?;
                src.copy_dense(i, &mut |chunk| {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(ConvertError::Interrupted);
                    }
                    writer.write(chunk).map_err(ConvertError::from)
                })?;
                writer.end_tensor()?;
                TensorInfo {
                    kind: TensorKind::Dense,
                    shape: meta.shape.clone(),
                    source_dtype: meta.source_dtype.clone(),
                    stored_dtype: meta.dense_dtype,
                    shard: String::new(),
                    matrix_shape: None,
                    rank: None,
                    energy: None,
                    rel_error: None,
                    quant: None,
                    reason: Some(reason),
                    rule: None,
                    whitening: None,
                    experts: None,
                }
            }
            Outcome::Factored(f) => {
                let nbytes = f.bytes_total();
                if let Some(closed) = writer.begin_group(&meta.name, nbytes)? {
                    open_shard.journal(closed, i, journal)?;
                }
                write_factors(&mut writer, &meta.name, &f)?;
                factored_info(meta, f)
            }
            Outcome::Experts {
                experts,
                energy,
                rel_error,
            } => {
                let [m, n] = experts_matrix(meta);
                let slice = (m * n * meta.dense_dtype.size()) as u64;
                let nbytes = experts
                    .iter()
                    .map(|e| match e {
                        Expert::Dense(_) => slice,
                        Expert::Factored(f) => f.bytes_total(),
                    })
                    .sum();
                if let Some(closed) = writer.begin_group(&meta.name, nbytes)? {
                    open_shard.journal(closed, i, journal)?;
                }
                write_experts(&mut writer, src, i, &experts, slice, cancel)?;
                let rule = experts.iter().find_map(|e| match e {
                    Expert::Factored(f) => f.rule.clone(),
                    Expert::Dense(_) => None,
                });
                TensorInfo {
                    kind: TensorKind::Experts,
                    shape: meta.shape.clone(),
                    source_dtype: meta.source_dtype.clone(),
                    stored_dtype: meta.dense_dtype,
                    shard: String::new(),
                    matrix_shape: Some([m, n]),
                    rank: None,
                    energy: Some(energy),
                    rel_error: Some(rel_error),
                    quant: None,
                    reason: None,
                    rule,
                    whitening: None,
                    experts: Some(
                        experts
                            .into_iter()
                            .map(|e| expert_info(meta.dense_dtype, e))
                            .collect(),
                    ),
                }
            }
        };
        results.release(held);
        add_totals(&mut totals, meta.source_bytes, &info);
        open_shard.tensors.push((meta.name.clone(), info.clone()));
        if tensors.insert(meta.name.clone(), info).is_some() {
            return Err(ConvertError::Tensor {
                path: src.file_path(meta.file).to_path_buf(),
                tensor: meta.name.clone(),
                reason: "tensor name appears twice in the source".into(),
            });
        }
        bytes_done += meta.source_bytes;
        progress(&Progress {
            done: i + 1,
            total: metas.len(),
            bytes_done,
            bytes_total,
            name: &meta.name,
        });
    }
    Ok(writer.finish(manifest(job, tensors, totals))?)
}

impl Factored {
    /// Bytes of the three stored factors.
    fn bytes_total(&self) -> u64 {
        (self.u.len() + self.s.len() + self.vt.len()) as u64
    }
}

/// Writes the three factor tensors of `f` under the names of entry (or expert) `name`.
fn write_factors(writer: &mut CheckpointWriter, name: &str, f: &Factored) -> Result<()> {
    let dtype = f.enc.stored_dtype();
    let u_shape = f.enc.u_shape(f.m, f.rank).expect("encoded, so it fits");
    let vt_shape = f.enc.vt_shape(f.rank, f.n).expect("encoded, so it fits");
    let (un, sn, vn) = factor_names(name);
    writer.write_tensor(&un, dtype, &u_shape, &f.u)?;
    writer.write_tensor(&sn, Dtype::F32, &[f.rank], &f.s)?;
    writer.write_tensor(&vn, dtype, &vt_shape, &f.vt)?;
    Ok(())
}

/// The manifest entry of a tensor stored as factors `f`.
fn factored_info(meta: &TensorMeta, f: Factored) -> TensorInfo {
    TensorInfo {
        kind: TensorKind::Factored,
        shape: meta.shape.clone(),
        source_dtype: meta.source_dtype.clone(),
        stored_dtype: f.enc.stored_dtype(),
        shard: String::new(),
        matrix_shape: Some([f.m, f.n]),
        rank: Some(f.rank),
        energy: Some(f.energy),
        rel_error: Some(f.rel_error),
        quant: f.enc.quant(),
        reason: None,
        rule: f.rule,
        whitening: f.whitening,
        experts: None,
    }
}

/// The manifest record of one expert (dense experts keep the tensor's dense dtype).
fn expert_info(dense_dtype: Dtype, e: Expert) -> ExpertInfo {
    match e {
        Expert::Dense(reason) => ExpertInfo {
            kind: TensorKind::Dense,
            stored_dtype: dense_dtype,
            quant: None,
            rank: None,
            energy: None,
            rel_error: None,
            reason: Some(reason),
        },
        Expert::Factored(f) => ExpertInfo {
            kind: TensorKind::Factored,
            stored_dtype: f.enc.stored_dtype(),
            quant: f.enc.quant(),
            rank: Some(f.rank),
            energy: Some(f.energy),
            rel_error: Some(f.rel_error),
            reason: None,
        },
    }
}

/// [m, n] of one expert of stacked experts tensor `meta` ([E, m, …]).
fn experts_matrix(meta: &TensorMeta) -> [usize; 2] {
    [meta.shape[1], meta.shape[2..].iter().product()]
}

/// Writes the experts of tensor `i` in order: a dense expert as its `slice` bytes of the
/// tensor's dense copy (streamed from the source once, byte-identical to a dense entry's
/// bytes), a factored one as its factors.
fn write_experts(
    writer: &mut CheckpointWriter,
    src: &dyn Source,
    i: usize,
    experts: &[Expert],
    slice: u64,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let meta = &src.tensors()[i];
    let dense_shape = &meta.shape[1..];
    let write_factored = |writer: &mut CheckpointWriter, e: usize| -> Result<()> {
        if let Some(Expert::Factored(f)) = experts.get(e) {
            write_factors(writer, &expert_name(&meta.name, e), f)?;
        }
        Ok(())
    };
    if experts.iter().all(|e| matches!(e, Expert::Factored(_))) {
        // Nothing to copy: the source is not read again.
        return (0..experts.len()).try_for_each(|e| write_factored(writer, e));
    }
    // Position in the dense copy; expert `pos / slice` is the one being passed.
    let mut pos = 0u64;
    src.copy_dense(i, &mut |mut chunk| {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        while !chunk.is_empty() {
            let e = (pos / slice) as usize;
            let offset = pos % slice;
            let take = chunk.len().min((slice - offset) as usize);
            match experts.get(e) {
                Some(Expert::Dense(_)) => {
                    if offset == 0 {
                        let name = expert_name(&meta.name, e);
                        writer.begin_tensor(&name, meta.dense_dtype, dense_shape)?;
                    }
                    writer.write(&chunk[..take])?;
                    if offset + take as u64 == slice {
                        writer.end_tensor()?;
                    }
                }
                Some(Expert::Factored(_)) if offset == 0 => write_factored(writer, e)?,
                _ => {}
            }
            pos += take as u64;
            chunk = &chunk[take..];
        }
        Ok(())
    })?;
    if pos != slice * experts.len() as u64 {
        return Err(ConvertError::Tensor {
            path: src.file_path(meta.file).to_path_buf(),
            tensor: meta.name.clone(),
            reason: format!(
                "its dense copy has {pos} bytes, expected {}",
                slice * experts.len() as u64
            ),
        });
    }
    Ok(())
}

/// The manifest of this run (shards and each tensor's shard are filled by the writer).
fn manifest(job: &Job, tensors: BTreeMap<String, TensorInfo>, totals: Totals) -> Manifest {
    let (src, opts) = (job.src, job.opts);
    Manifest {
        format: cersa_loader::FORMAT_NAME.into(),
        format_version: cersa_loader::FORMAT_VERSION,
        format_minor: Manifest::required_minor(&tensors),
        producer: Producer {
            name: "cersa".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        config: ConvertConfig {
            energy: opts.rule.energy,
            min_rank: opts.rule.min_rank,
            max_rank: opts.rule.max_rank,
            rank_multiple: opts.rule.rank_multiple,
            dtype: opts.dtype.to_string(),
            algorithm: job.decomposer.name().into(),
            force_factor: opts.force_factor,
            include: opts.include.clone(),
            exclude: opts.exclude.clone(),
            max_shard_size: opts.max_shard_size,
            // A plan replaces the rules; its entries record `rule: "plan"`.
            rules: match opts.plan {
                Some(_) => vec![PLAN_RULE.to_string()],
                None => opts.rules.iter().map(ModuleRule::text).collect(),
            },
            calibration: opts.calibration.as_ref().map(|c| c.config.clone()),
        },
        source: SourceInfo {
            format: src.format().into(),
            files: src.files().to_vec(),
            details: src.details(),
        },
        shards: Vec::new(),
        side_files: job.side_files.to_vec(),
        tensors,
        totals,
    }
}

/// Adds a tensor of `source_bytes` in the source, stored as `info`, to the manifest totals.
pub(crate) fn add_totals(totals: &mut Totals, source_bytes: u64, info: &TensorInfo) {
    totals.source_params += info.shape.iter().map(|&d| d as u64).product::<u64>();
    totals.source_bytes += source_bytes;
    let stored = Stored::of(info);
    totals.stored_params += stored.params;
    totals.stored_bytes += stored.bytes;
    match info.kind {
        TensorKind::Factored | TensorKind::Experts => totals.factored_tensors += 1,
        TensorKind::Dense => totals.dense_tensors += 1,
    }
}
