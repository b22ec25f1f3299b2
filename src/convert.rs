//! The conversion pipeline: source reader → decomposition workers → ordered shard writer.
//!
//! Workers claim tensors in source order and decompose them in parallel; the calling
//! thread writes results strictly in that order, so the output bytes do not depend on the
//! thread count. A worker may run at most `window` factored tensors ahead of the writer,
//! which bounds the reorder backlog (memory is bounded by `--max-memory` admission).
//! Pass-through tensors (biases, norms: most tensors of a transformer) do not count: with
//! a window of tensor indices, a block of them between two matrices left a worker idle
//! (all-MiniLM-L6-v2 at 2 threads ran at ~1 core).

use crate::budget::{default_budget, Admission};
use crate::decompose::rank::{energy_at, frobenius2, saves};
use crate::decompose::svd::{stored_residual_norm2, StoredFactors};
use crate::decompose::{DecomposeError, Decomposer, Factorization, RankRule, Route};
use crate::error::{ConvertError, Result};
use crate::input::{FloatData, Source};
use crate::journal::{self, Journal, Recovered, ShardRecord};
use crate::select::Selection;
use cersa_loader::dtype::{decode_f64, encode_f32, encode_f64};
use cersa_loader::manifest::{ConvertConfig, Producer, SourceInfo, Totals};
use cersa_loader::{
    factor_names, CheckpointWriter, DenseReason, Dtype, Manifest, TensorInfo, TensorKind,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Dtype of stored factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorDtype {
    /// The source float dtype (BF16 for quantized sources).
    Source,
    /// F32.
    F32,
    /// F16.
    F16,
    /// BF16.
    Bf16,
}

impl FactorDtype {
    /// The option's name (`source`, `f32`, `f16`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            FactorDtype::Source => "source",
            FactorDtype::F32 => "f32",
            FactorDtype::F16 => "f16",
            FactorDtype::Bf16 => "bf16",
        }
    }

    /// The dtype named by the option; `None` for `source`.
    pub fn explicit(self) -> Option<Dtype> {
        (self != FactorDtype::Source).then(|| self.resolve(Dtype::BF16))
    }

    fn resolve(self, dense_dtype: Dtype) -> Dtype {
        match self {
            FactorDtype::Source if dense_dtype.is_factor_float() => dense_dtype,
            FactorDtype::Source => Dtype::BF16,
            FactorDtype::F32 => Dtype::F32,
            FactorDtype::F16 => Dtype::F16,
            FactorDtype::Bf16 => Dtype::BF16,
        }
    }
}

/// Conversion options (validated by the CLI before any work).
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Rank rule (τ and clamps).
    pub rule: RankRule,
    /// Factor dtype.
    pub dtype: FactorDtype,
    /// `--include` globs.
    pub include: Vec<String>,
    /// `--exclude` globs.
    pub exclude: Vec<String>,
    /// Factor even when it saves nothing.
    pub force_factor: bool,
    /// Shard size cap in bytes.
    pub max_shard_size: u64,
    /// Worker threads (≥ 1). Does not change the output.
    pub threads: usize,
    /// Decomposition route.
    pub algorithm: Route,
    /// Continue an interrupted run from its partial directory (see [`crate::journal`]).
    pub resume: bool,
    /// Memory budget in bytes for the tensors in flight (see [`crate::budget`]); `None`
    /// uses [`crate::budget::default_budget`]. Does not change the output.
    pub max_memory: Option<u64>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            rule: RankRule::default(),
            dtype: FactorDtype::Source,
            include: Vec::new(),
            exclude: Vec::new(),
            force_factor: false,
            max_shard_size: 5_000_000_000,
            threads: 1,
            algorithm: Route::Auto,
            resume: false,
            max_memory: None,
        }
    }
}

/// Progress reported to the caller (from the writing thread).
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    /// Tensors written so far.
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// Source bytes of the tensors written so far.
    pub bytes_done: u64,
    /// Source bytes in all.
    pub bytes_total: u64,
    /// The tensor just written.
    pub name: &'a str,
}

/// The result of a conversion, as printed by `cersa convert --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConvertReport {
    /// Wire-format version of this report.
    pub report_version: u32,
    /// The output directory.
    pub out_dir: PathBuf,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Stored params / source params.
    pub param_ratio: f64,
    /// Stored bytes / source bytes.
    pub byte_ratio: f64,
    /// The manifest that was written.
    pub manifest: Manifest,
}

enum Outcome {
    Dense(DenseReason),
    Factored {
        m: usize,
        n: usize,
        rank: usize,
        energy: f64,
        rel_error: f64,
        dtype: Dtype,
        u: Vec<u8>,
        s: Vec<u8>,
        vt: Vec<u8>,
    },
}

impl Outcome {
    /// Bytes the result holds until it is written.
    fn held_bytes(&self) -> u64 {
        match self {
            Outcome::Dense(_) => 0,
            Outcome::Factored { u, s, vt, .. } => (u.len() + s.len() + vt.len()) as u64,
        }
    }
}

struct Shared {
    next_claim: usize,
    next_write: usize,
    /// Finished results with the bytes they hold in `admission`.
    results: HashMap<usize, (Result<Outcome>, u64)>,
    admission: Admission,
    stop: bool,
}

/// Converts `src` into a CERSA directory at `out`. The directory appears only when
/// everything succeeded. The work happens in a sibling `.OUT.cersa-partial` directory with
/// a journal of the closed shards: after a cancellation or an I/O error (disk full) it is
/// kept and the error says so, and `opts.resume` continues from it; after any other error
/// it is removed.
pub fn convert(
    src: &dyn Source,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Manifest> {
    let decomposer = opts.algorithm.decomposer()?;
    let selection = Selection::new(&opts.include, &opts.exclude, src.default_excludes())?;
    check_names(src)?;
    let fingerprint = run_fingerprint(src, opts, decomposer.name())?;
    let (tmp, reuse) = prepare_output(out, opts.resume)?;
    let (mut journal, recovered) = if reuse {
        // Errors here (a journal of another run) leave the partial directory untouched.
        journal::recover(&tmp, &fingerprint, src.tensors().len())?
    } else {
        match Journal::create(&tmp, &fingerprint) {
            Ok(j) => (j, Recovered::default()),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
    };
    let result = run(
        src,
        &tmp,
        opts,
        decomposer.as_ref(),
        &selection,
        progress,
        cancel,
        &mut journal,
        &recovered,
    )
    .and_then(|m| {
        src.check_unchanged()?;
        // The journal is not part of the checkpoint.
        let jpath = tmp.join(journal::JOURNAL_FILE);
        std::fs::remove_file(&jpath).map_err(|e| ConvertError::io(&jpath, "remove", e))?;
        commit(&tmp, out)?;
        Ok(m)
    });
    match result {
        Err(e) if keeps_partial(&e) => Err(ConvertError::Resumable {
            cause: Box::new(e),
            partial: tmp,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
        ok => ok,
    }
}

/// Source names ending in a factor suffix would collide with the stored factors.
fn check_names(src: &dyn Source) -> Result<()> {
    let suffixes = [
        cersa_loader::SUFFIX_U,
        cersa_loader::SUFFIX_S,
        cersa_loader::SUFFIX_VT,
    ];
    for t in src.tensors() {
        if let Some(suffix) = suffixes.iter().find(|s| t.name.ends_with(*s)) {
            return Err(ConvertError::Tensor {
                path: src.file_path(t.file).to_path_buf(),
                tensor: t.name.clone(),
                reason: format!(
                    "name ends in the reserved suffix `{suffix}` (is this already a CERSA checkpoint? \
                     load it with cersa-loader instead of converting it again)"
                ),
            });
        }
    }
    Ok(())
}

/// Errors after which the finished shards are worth keeping: the same command with
/// `--resume` can go on once the cause (Ctrl-C, a full disk) is gone.
fn keeps_partial(e: &ConvertError) -> bool {
    matches!(
        e,
        ConvertError::Interrupted
            | ConvertError::Io { .. }
            | ConvertError::Format(cersa_loader::Error::Io { .. })
    )
}

/// What must be equal for a partial directory to be resumed: the options that shape the
/// output, and the source (file names, sizes, mtimes, tensor list).
fn run_fingerprint(
    src: &dyn Source,
    opts: &ConvertOptions,
    algorithm: &str,
) -> Result<serde_json::Value> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    for (i, f) in src.files().iter().enumerate() {
        let path = src.file_path(i);
        let meta = std::fs::metadata(path).map_err(|e| ConvertError::io(path, "stat", e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos().to_string());
        files.push(serde_json::json!({"file": f.file, "bytes": meta.len(), "mtime_ns": mtime}));
    }
    let mut tensors = Sha256::new();
    for t in src.tensors() {
        tensors.update(format!("{}\t{:?}\t{}\n", t.name, t.shape, t.source_dtype).as_bytes());
    }
    Ok(serde_json::json!({
        "producer_version": env!("CARGO_PKG_VERSION"),
        "energy": opts.rule.energy,
        "min_rank": opts.rule.min_rank,
        "max_rank": opts.rule.max_rank,
        "rank_multiple": opts.rule.rank_multiple,
        "dtype": opts.dtype.as_str(),
        "algorithm": algorithm,
        "force_factor": opts.force_factor,
        "include": opts.include,
        "exclude": opts.exclude,
        "max_shard_size": opts.max_shard_size,
        "source_format": src.format(),
        "source_files": files,
        "tensors_sha256": cersa_loader::writer::hex(&tensors.finalize()),
    }))
}

/// Checks `out` and creates (or, when resuming, reuses) the sibling temporary directory
/// the output is written into. Returns it and whether it holds a run to resume.
pub(crate) fn prepare_output(out: &Path, resume: bool) -> Result<(PathBuf, bool)> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(ConvertError::OutputExists(out.to_path_buf()));
        }
    }
    let name = out.file_name().ok_or_else(|| {
        ConvertError::Options(format!("output path {} has no file name", out.display()))
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| ConvertError::io(&parent, "create directory", e))?;
    let tmp = parent.join(format!(".{}.cersa-partial", name.to_string_lossy()));
    if resume && tmp.join(journal::JOURNAL_FILE).is_file() {
        return Ok((tmp, true));
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| ConvertError::io(&tmp, "remove stale partial output", e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| ConvertError::io(&tmp, "create directory", e))?;
    Ok((tmp, false))
}

pub(crate) fn commit(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        // An empty directory is replaced (rename(2) onto an empty directory is atomic).
        std::fs::remove_dir(out)
            .map_err(|e| ConvertError::io(out, "replace empty directory", e))?;
    }
    std::fs::rename(tmp, out).map_err(|e| ConvertError::io(out, "rename into place", e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Persist the rename; best effort on filesystems without directory fsync.
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    src: &dyn Source,
    tmp: &Path,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
    selection: &Selection,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
    journal: &mut Journal,
    recovered: &Recovered,
) -> Result<Manifest> {
    let metas = src.tensors();
    let total = metas.len();
    let start = recovered.next_tensor();
    let plan: Vec<_> = metas.iter().map(|t| selection.check(t)).collect();
    let threads = opts.threads.max(1);
    let window = 2 * threads;
    // Only tensors that are read and factored allocate; pass-through ones stream.
    let estimates: Vec<u64> = metas
        .iter()
        .zip(&plan)
        .map(|(t, p)| match (p, t.float) {
            (Ok(()), Some(precision)) if !t.shape.is_empty() => {
                let m = t.shape[0];
                let n = t.shape[1..]
                    .iter()
                    .fold(1usize, |a, &d| a.saturating_mul(d));
                decomposer.footprint(m, n, precision)
            }
            _ => 0,
        })
        .collect();
    // heavy_before[i]: factored (allocating) tensors before index i; the window counts them.
    let heavy_before: Vec<usize> = std::iter::once(0)
        .chain(estimates.iter().scan(0usize, |c, &e| {
            *c += usize::from(e > 0);
            Some(*c)
        }))
        .collect();
    let shared = Mutex::new(Shared {
        next_claim: start,
        next_write: start,
        results: HashMap::new(),
        admission: Admission::new(opts.max_memory.unwrap_or_else(default_budget)),
        stop: false,
    });
    let cv = Condvar::new();
    let bytes_total: u64 = metas.iter().map(|t| t.source_bytes).sum();
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());

    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = {
                    let mut g = lock();
                    loop {
                        if g.stop || g.next_claim >= total || cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        if heavy_before[g.next_claim] < heavy_before[g.next_write] + window
                            && g.admission.admits(estimates[g.next_claim])
                        {
                            break;
                        }
                        g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    let estimate = estimates[g.next_claim];
                    g.admission.hold(estimate);
                    g.next_claim += 1;
                    g.next_claim - 1
                };
                let outcome = match plan[i] {
                    Err(reason) => Ok(Outcome::Dense(reason)),
                    Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        process(src, i, opts, decomposer)
                    }))
                    .unwrap_or_else(|_| {
                        Err(ConvertError::Decompose {
                            tensor: src.tensors()[i].name.clone(),
                            source: DecomposeError::Panic,
                        })
                    }),
                };
                let held = outcome.as_ref().map_or(0, Outcome::held_bytes);
                let mut g = lock();
                g.admission.replace(estimates[i], held);
                g.results.insert(i, (outcome, held));
                cv.notify_all();
            });
        }

        let result = write_all(
            src,
            tmp,
            opts,
            decomposer,
            &shared,
            &cv,
            progress,
            cancel,
            bytes_total,
            journal,
            recovered,
        );
        let mut g = lock();
        g.stop = true;
        cv.notify_all();
        drop(g);
        result
    })
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    src: &dyn Source,
    tmp: &Path,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
    shared: &Mutex<Shared>,
    cv: &Condvar,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
    bytes_total: u64,
    journal: &mut Journal,
    recovered: &Recovered,
) -> Result<Manifest> {
    let metas = src.tensors();
    let start = recovered.next_tensor();
    let mut writer = CheckpointWriter::resume(
        tmp,
        opts.max_shard_size,
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
        add_totals(&mut totals, meta, info);
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
        index: recovered.shards.len(),
        first_tensor: start,
        tensors: Vec::new(),
    };
    // A shard opened at tensor i reserves header room for every entry that may still come
    // (dense or factored, whichever is longer), so its data is written in place.
    let mut reserve_from = vec![0u64; metas.len() + 1];
    for (i, meta) in metas.iter().enumerate().rev() {
        use cersa_loader::safetensors::header_entry_bound;
        let (un, sn, vn) = factor_names(&meta.name);
        let factored =
            header_entry_bound(&un, 2) + header_entry_bound(&sn, 1) + header_entry_bound(&vn, 2);
        let dense = header_entry_bound(&meta.name, meta.shape.len());
        reserve_from[i] = reserve_from[i + 1] + factored.max(dense);
    }
    for (i, meta) in metas.iter().enumerate().skip(start) {
        writer.reserve_header(cersa_loader::writer::header_base_bound() + reserve_from[i]);
        // A source rewritten under its memory map is caught between tensors, not only at
        // the end (reading a truncated map would fault).
        src.check_unchanged()?;
        let (outcome, held) = {
            let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(ConvertError::Interrupted);
                }
                if let Some((r, held)) = g.results.remove(&i) {
                    g.next_write = i + 1;
                    cv.notify_all();
                    break (r?, held);
                }
                g = cv
                    .wait_timeout(g, std::time::Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let info = match outcome {
            Outcome::Dense(reason) => {
                let nbytes = meta.numel() * meta.dense_dtype.size() as u64;
                writer.begin_group(&meta.name, nbytes)?;
                journal_closed_shard(&writer, journal, &mut open_shard, i)?;
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
                    reason: Some(reason),
                }
            }
            Outcome::Factored {
                m,
                n,
                rank,
                energy,
                rel_error,
                dtype,
                u,
                s,
                vt,
            } => {
                let nbytes = (u.len() + s.len() + vt.len()) as u64;
                let (un, sn, vn) = factor_names(&meta.name);
                writer.begin_group(&meta.name, nbytes)?;
                journal_closed_shard(&writer, journal, &mut open_shard, i)?;
                writer.write_tensor(&un, dtype, &[m, rank], &u)?;
                writer.write_tensor(&sn, Dtype::F32, &[rank], &s)?;
                writer.write_tensor(&vn, dtype, &[rank, n], &vt)?;
                TensorInfo {
                    kind: TensorKind::Factored,
                    shape: meta.shape.clone(),
                    source_dtype: meta.source_dtype.clone(),
                    stored_dtype: dtype,
                    shard: String::new(),
                    matrix_shape: Some([m, n]),
                    rank: Some(rank),
                    energy: Some(energy),
                    rel_error: Some(rel_error),
                    reason: None,
                }
            }
        };
        // The result's buffers are freed: its bytes no longer count against the budget.
        {
            let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
            g.admission.release(held);
            cv.notify_all();
        }
        add_totals(&mut totals, meta, &info);
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
    let manifest = Manifest {
        format: cersa_loader::FORMAT_NAME.into(),
        format_version: cersa_loader::FORMAT_VERSION,
        producer: Producer {
            name: "cersa".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        config: ConvertConfig {
            energy: opts.rule.energy,
            min_rank: opts.rule.min_rank,
            max_rank: opts.rule.max_rank,
            rank_multiple: opts.rule.rank_multiple,
            dtype: opts.dtype.as_str().into(),
            algorithm: decomposer.name().into(),
            force_factor: opts.force_factor,
            include: opts.include.clone(),
            exclude: opts.exclude.clone(),
            max_shard_size: opts.max_shard_size,
        },
        source: SourceInfo {
            format: src.format().into(),
            files: src.files().to_vec(),
            details: src.details(),
        },
        shards: Vec::new(),
        tensors,
        totals,
    };
    Ok(writer.finish(manifest)?)
}

/// The shard being written: its index and the tensors in it so far.
struct OpenShard {
    index: usize,
    first_tensor: usize,
    tensors: Vec<(String, TensorInfo)>,
}

/// When starting tensor `i`'s group closed the open shard, journals that shard (its file is
/// complete and synced) with the tensors it holds, before any byte of tensor `i` is written.
fn journal_closed_shard(
    writer: &CheckpointWriter,
    journal: &mut Journal,
    open: &mut OpenShard,
    i: usize,
) -> Result<()> {
    if writer.closed_count() <= open.index {
        return Ok(());
    }
    let (_, bytes, sha256) = writer
        .closed_shard(open.index)
        .expect("closed_count says this shard exists");
    journal.record(&ShardRecord {
        index: open.index,
        file: CheckpointWriter::temp_shard_name(open.index),
        bytes,
        sha256: sha256.to_string(),
        first_tensor: open.first_tensor,
        end_tensor: i,
        tensors: std::mem::take(&mut open.tensors),
    })?;
    open.index += 1;
    open.first_tensor = i;
    Ok(())
}

/// Adds tensor `meta`, stored as `info`, to the manifest totals.
fn add_totals(totals: &mut Totals, meta: &crate::input::TensorMeta, info: &TensorInfo) {
    totals.source_params += meta.numel();
    totals.source_bytes += meta.source_bytes;
    match (info.kind, info.matrix_shape, info.rank) {
        (TensorKind::Factored, Some([m, n]), Some(r)) => {
            let (m, n, r) = (m as u64, n as u64, r as u64);
            totals.stored_params += r * (m + n + 1);
            totals.stored_bytes +=
                info.stored_dtype.size() as u64 * r * (m + n) + Dtype::F32.size() as u64 * r;
            totals.factored_tensors += 1;
        }
        _ => {
            totals.stored_params += meta.numel();
            totals.stored_bytes += meta.numel() * info.stored_dtype.size() as u64;
            totals.dense_tensors += 1;
        }
    }
}

/// Reads, checks and factors tensor `i`.
fn process(
    src: &dyn Source,
    i: usize,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
) -> Result<Outcome> {
    let meta = &src.tensors()[i];
    let path = || src.file_path(meta.file).to_path_buf();
    let data = src.read_float(i)?;
    crate::trace::rss("convert: read");
    if let Some((count, first, index)) = data.non_finite() {
        return Err(ConvertError::NonFinite {
            path: path(),
            tensor: meta.name.clone(),
            count,
            first,
            index,
        });
    }
    let m = meta.shape[0];
    let n: usize = meta.shape[1..].iter().product();
    let norm2 = match &data {
        FloatData::F32(v) => frobenius2(v),
        FloatData::F64(v) => frobenius2(v),
    };
    if m == 0 || n == 0 || norm2 == 0.0 {
        return Ok(Outcome::Dense(DenseReason::Zero));
    }
    let f = decomposer
        .factorize_named(&meta.name, &data, m, n, &opts.rule)
        .map_err(|source| ConvertError::Decompose {
            tensor: meta.name.clone(),
            source,
        })?;
    crate::trace::rss("convert: factorized");
    let r = f.rank;
    let energy = energy_at(&f.sigma, f.norm2, r);
    if !opts.force_factor && !saves(r, m, n) {
        return Ok(Outcome::Dense(DenseReason::NoSaving));
    }
    let dtype = opts.dtype.resolve(meta.dense_dtype);
    // Each factor is freed as soon as it is encoded (f32 → any factor dtype rounds once,
    // exactly as from the f64 widening).
    let encode = |v: FloatData| {
        match v {
            FloatData::F32(v) => encode_f32(dtype, &v),
            FloatData::F64(v) => encode_f64(dtype, &v),
        }
        .expect("factor dtypes are float")
    };
    let Factorization { u, s, vt, .. } = f;
    let u = encode(u);
    let vt = encode(vt);
    let s = encode_f64(Dtype::F32, &s).expect("F32 is a float dtype");
    crate::trace::rss("convert: encoded");
    // rel_error is measured on the factors exactly as stored, streamed by row blocks.
    let s_stored = decode_f64(Dtype::F32, &s).expect("F32 is a float dtype");
    let res = stored_residual_norm2(
        &data,
        m,
        n,
        &StoredFactors {
            dtype,
            u: &u,
            s: &s_stored,
            vt: &vt,
        },
    );
    crate::trace::rss("convert: residual");
    drop(data);
    Ok(Outcome::Factored {
        m,
        n,
        rank: r,
        energy,
        rel_error: (res / norm2).sqrt(),
        dtype,
        u,
        s,
        vt,
    })
}
