//! The conversion pipeline: source reader → decomposition workers → ordered shard writer.
//!
//! Data flows one way through small rooms:
//! - `out_dir`: the sibling `.OUT.cersa-partial` directory the run writes into, and the
//!   rename that makes `OUT` appear (or replace a CERSA directory, `--overwrite`);
//! - `schedule`: workers claim tensors in source order within an admission window and
//!   the memory budget, and hand their results to the writer;
//! - `process`: one tensor's work (read, check, factor, encode, measure the error);
//! - `write`: the calling thread writes results strictly in source order, journals each
//!   shard the writer closes, and assembles the manifest.
//!
//! The output bytes do not depend on the thread count or the memory budget.

mod out_dir;
pub mod part;
mod process;
mod schedule;
mod write;

pub(crate) use out_dir::{commit, prepare_output};
pub(crate) use write::add_totals;

use crate::calibration::Calibration;
use crate::decompose::{RankRule, Route};
use crate::error::{ConvertError, Result};
use crate::input::Source;
use crate::journal::{self, Journal, Recovered};
use crate::rank_rules::ModuleRule;
use crate::select::Selection;
use cersa_loader::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub use crate::storage::FactorDtype;

/// Conversion options (validated by the CLI before any work).
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Rank rule (τ and clamps) of the tensors no per-module rule matches.
    pub rule: RankRule,
    /// Per-module rules (`--energy GLOB=TAU`, `--rank GLOB=N`); the first match wins.
    pub rules: Vec<ModuleRule>,
    /// A budget plan (`--plan`, `--budget`): every selected matrix's rank, or `None` for
    /// dense; it replaces the rank rules and the saving test.
    pub plan: Option<BTreeMap<String, Option<usize>>>,
    /// Calibration statistics (`--calibration`): weights they cover are truncated in the
    /// output metric ([`crate::decompose::whiten`]); the damping δ is in their config.
    pub calibration: Option<std::sync::Arc<Calibration>>,
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
    /// Replace an existing CERSA directory at the output path once the new one is complete
    /// (anything else there is refused and left alone).
    pub overwrite: bool,
    /// Memory budget in bytes for the tensors in flight (see [`crate::budget`]); `None`
    /// uses [`crate::budget::default_budget`]. Does not change the output.
    pub max_memory: Option<u64>,
    /// Convert only this part's share of the tensors (`--part I/N`) into a part directory
    /// for [`crate::assemble`].
    pub part: Option<part::PartSpec>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            rule: RankRule::default(),
            rules: Vec::new(),
            plan: None,
            calibration: None,
            dtype: FactorDtype::Source,
            include: Vec::new(),
            exclude: Vec::new(),
            force_factor: false,
            max_shard_size: 5_000_000_000,
            threads: 1,
            algorithm: Route::Auto,
            resume: false,
            overwrite: false,
            max_memory: None,
            part: None,
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
    /// The manifest that was written (of the part's tensors only, with `--part`).
    pub manifest: Manifest,
    /// The part converted (`--part`); absent for a whole conversion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<part::PartSpec>,
}

impl ConvertReport {
    /// The report of a conversion (or assembly) into `out_dir` that wrote `manifest`.
    pub fn new(out_dir: PathBuf, seconds: f64, manifest: Manifest) -> Self {
        let t = &manifest.totals;
        ConvertReport {
            report_version: 1,
            out_dir,
            seconds,
            param_ratio: t.stored_params as f64 / t.source_params.max(1) as f64,
            byte_ratio: t.stored_bytes as f64 / t.source_bytes.max(1) as f64,
            manifest,
            part: None,
        }
    }
}

/// Converts `src` into a CERSA directory at `out`. The directory appears only when
/// everything succeeded. The work happens in a sibling `.OUT.cersa-partial` directory with
/// a journal of the closed shards: after a cancellation or an I/O error (disk full) it is
/// kept and the error says so, and `opts.resume` continues from it; after any other error
/// it is removed.
///
/// With `opts.part`, only that part's share of the tensors is converted, and the directory
/// also holds a `cersa-part.json` ([`part::PartRecord`]) for `cersa assemble`.
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
    if let Some(cal) = &opts.calibration {
        cal.check_source(src)?;
    }
    let mut fingerprint = run_fingerprint(src, opts, decomposer.name())?;
    // A part converts its share of the whole source, checked above as a whole.
    let subset;
    let (src, part_record): (&dyn Source, _) = match opts.part {
        None => (src, None),
        Some(spec) => {
            let owner = part::assign(src, opts, &selection, spec.count);
            let record = part::PartRecord {
                format: part::PART_FORMAT.into(),
                version: part::PART_VERSION,
                part: spec.index,
                parts: spec.count,
                run_sha256: part::run_sha256(&fingerprint),
                tensors: src
                    .tensors()
                    .iter()
                    .zip(&owner)
                    .map(|(t, &p)| part::PartTensor {
                        name: t.name.clone(),
                        source_bytes: t.source_bytes,
                        part: p,
                    })
                    .collect(),
            };
            fingerprint["part"] = spec.to_string().into();
            subset = part::Subset::new(src, &owner, spec.index);
            (&subset, Some(record))
        }
    };
    if let Some(record) = &part_record {
        if opts.resume && finished_part(out, record) {
            // A requeued array task whose part is already complete: nothing to do.
            return Ok(cersa_loader::checkpoint::read_manifest(out)?);
        }
    }
    let staging = prepare_output(out, opts.resume, opts.overwrite)?;
    let tmp = staging.partial.clone();
    let (mut journal, recovered) = if staging.resumable {
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
    // Copied again on resume (the same bytes as an uninterrupted run), before any tensor
    // work so a refused side file fails fast.
    let result = match crate::side_files::source_dir(src) {
        Some(dir) => crate::side_files::copy_side_files(&dir, &tmp),
        None => Ok(Vec::new()),
    };
    let result = result.and_then(|mut files| {
        if let Some(bytes) = src.gguf_metadata() {
            let name = crate::side_files::SOURCE_METADATA;
            let file = crate::side_files::write_generated(&tmp, name, &bytes)?;
            crate::side_files::insert_side_file(&mut files, file);
        }
        Ok(files)
    });
    let result = result.and_then(|side_files| {
        let job = schedule::Job {
            src,
            tmp: &tmp,
            opts,
            decomposer: decomposer.as_ref(),
            selection: &selection,
            cancel,
            side_files: &side_files,
        };
        schedule::run(&job, progress, &mut journal, &recovered)
    });
    let result = result.and_then(|m| {
        src.check_unchanged()?;
        if let Some(record) = &part_record {
            record.write(&tmp)?;
        }
        // The journal is not part of the checkpoint.
        let jpath = tmp.join(journal::JOURNAL_FILE);
        std::fs::remove_file(&jpath).map_err(|e| ConvertError::io(&jpath, "remove", e))?;
        commit(&staging, out)?;
        Ok(m)
    });
    match result {
        Err(e) if keeps_partial(&e) && tmp.exists() => Err(ConvertError::Resumable {
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

/// Whether `out` is the finished part directory of `record`'s run and part.
fn finished_part(out: &Path, record: &part::PartRecord) -> bool {
    out.join(cersa_loader::MANIFEST_FILE).is_file()
        && part::PartRecord::read(out).is_ok_and(|found| found == *record)
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
    let mut fingerprint = serde_json::json!({
        "producer_version": env!("CARGO_PKG_VERSION"),
        "energy": opts.rule.energy,
        "min_rank": opts.rule.min_rank,
        "max_rank": opts.rule.max_rank,
        "rank_multiple": opts.rule.rank_multiple,
        "dtype": opts.dtype.to_string(),
        "algorithm": algorithm,
        "force_factor": opts.force_factor,
        "include": opts.include,
        "exclude": opts.exclude,
        "max_shard_size": opts.max_shard_size,
        "source_format": src.format(),
        "source_files": files,
        "tensors_sha256": cersa_loader::writer::hex(&tensors.finalize()),
    });
    if let Some(plan) = &opts.plan {
        fingerprint["plan"] = serde_json::to_value(plan).expect("a map of ranks serializes");
    }
    if !opts.rules.is_empty() {
        // Only when given, so partial directories of runs without rules still resume.
        fingerprint["rules"] = opts.rules.iter().map(ModuleRule::text).collect();
    }
    if let Some(c) = &opts.calibration {
        fingerprint["calibration"] =
            serde_json::json!({"sha256": c.config.sha256, "damping": c.config.damping});
    }
    Ok(fingerprint)
}
