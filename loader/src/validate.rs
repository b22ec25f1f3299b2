//! The one validator of the CERSA format: every rule of `formats/cersa-v1.md` that can be
//! checked without the source checkpoint.
//!
//! [`validate`] lists every [`Issue`] it can find; [`crate::Checkpoint::open`] runs the same
//! checks in the same order and stops at the first. Every size read from a file is hostile:
//! the checks use checked arithmetic and `get(..)`, and never panic.

use crate::checkpoint::{Checkpoint, Shard, MAX_MANIFEST_SIZE};
use crate::dtype::{decode_f64, Dtype};
use crate::encoding::FactorEncoding;
use crate::issue::{Issue, IssueKind};
use crate::manifest::{
    expert_name, factor_names, Manifest, TensorInfo, TensorKind, FORMAT_MINOR, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_FILE,
};
use crate::mmap::MappedFile;
use crate::safetensors;
use crate::writer::hex;
use crate::TensorView;
use sha2::{Digest, Sha256};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// What [`validate_with`] checks beyond the structure.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidateOptions<'a> {
    /// Compare every shard's sha256 with the manifest (reads every byte).
    pub verify_checksums: bool,
    /// Check that every factor is finite (reads every factor; runs only when the structure
    /// is sound, a sha256 mismatch aside).
    pub check_finite: bool,
    /// Stop with [`Interrupted`] once this is set (checked between hashed chunks and
    /// between tensors).
    pub cancel: Option<&'a AtomicBool>,
}

/// [`validate_with`] stopped because its cancel flag was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Every issue of the CERSA directory `dir`, checksums and factor values included, in a
/// deterministic order: the manifest, each shard in manifest order, the manifest entries by
/// name, stray tensors, then values. Empty when `dir` is a valid checkpoint.
pub fn validate(dir: &Path) -> Vec<Issue> {
    let options = ValidateOptions {
        verify_checksums: true,
        check_finite: true,
        cancel: None,
    };
    // Without a cancel flag nothing interrupts the run.
    validate_with(dir, &options).unwrap_or_default()
}

/// Like [`validate`], with the checks of `options`.
pub fn validate_with(dir: &Path, options: &ValidateOptions<'_>) -> Result<Vec<Issue>, Interrupted> {
    let mut run = Run {
        dir,
        options: *options,
        all: true,
        issues: Vec::new(),
    };
    match run.checks() {
        Ok(_) | Err(Halt::First) => Ok(run.issues),
        Err(Halt::Interrupted) => Err(Interrupted),
    }
}

/// Opens `dir` with the checks of `open`: stops at the first issue.
pub(crate) fn open_checked(dir: &Path, verify_checksums: bool) -> Result<Checkpoint, Box<Issue>> {
    let mut run = Run {
        dir,
        options: ValidateOptions {
            verify_checksums,
            ..ValidateOptions::default()
        },
        all: false,
        issues: Vec::new(),
    };
    let outcome = run.checks();
    if let Some(issue) = run.issues.into_iter().next() {
        return Err(Box::new(issue));
    }
    match outcome {
        Ok(Some(ckpt)) => Ok(ckpt),
        // Unreachable: without an issue the checks build the checkpoint, and `open` has no
        // cancel flag. An error rather than a panic all the same.
        _ => Err(Box::new(Issue::new(
            IssueKind::ManifestUnreadable,
            MANIFEST_FILE,
            "internal error: validation ended without a verdict",
        ))),
    }
}

/// The non-finite values of the factors of `name` (none for a dense tensor): one issue per
/// factor that holds NaN or ±Inf. [`validate`] runs it on every factored tensor; callers
/// with their own thread pool can run it per tensor.
pub fn non_finite_factors(ckpt: &Checkpoint, name: &str) -> Vec<Issue> {
    match ckpt.get(name) {
        Ok(TensorView::Factored(f)) => non_finite_in(ckpt, name, name, &f),
        Ok(TensorView::Experts(count)) => (0..count)
            .filter_map(|e| match ckpt.expert(name, e) {
                Ok(TensorView::Factored(f)) => {
                    Some(non_finite_in(ckpt, name, &expert_name(name, e), &f))
                }
                _ => None,
            })
            .flatten()
            .collect(),
        _ => Vec::new(),
    }
}

/// The non-finite values of factors `f` stored under `stored` (entry `name`).
fn non_finite_in(
    ckpt: &Checkpoint,
    name: &str,
    stored: &str,
    f: &crate::Factors<'_>,
) -> Vec<Issue> {
    let shard = ckpt
        .manifest()
        .tensors
        .get(name)
        .map(|info| info.shard.as_str())
        .unwrap_or(MANIFEST_FILE);
    let (un, sn, vn) = factor_names(stored);
    let mut out = Vec::new();
    let [m, n] = f.matrix_shape;
    let quant = f.encoding.quant();
    for (stored, raw, len) in [(un, f.u, m), (sn, f.s, 0), (vn, f.vt, n)] {
        // Decoded in blocks so a large factor does not need an f64 copy of itself;
        // quantized factors row by row (a non-finite f16 scale).
        let (mut bad, mut total) = (0usize, 0usize);
        match (quant, raw.shape) {
            (Some(q), [_, row_bytes]) if len > 0 => {
                let mut values = Vec::with_capacity(len);
                for row in raw.bytes.chunks(*row_bytes.max(&1)) {
                    values.clear();
                    q.dequantize_row(row, len, &mut values);
                    bad += values.iter().filter(|x| !x.is_finite()).count();
                    total += values.len();
                }
            }
            _ => {
                let block = raw.dtype.size() * 65536;
                for chunk in raw.bytes.chunks(block.max(1)) {
                    let values = decode_f64(raw.dtype, chunk).unwrap_or_default();
                    bad += values.iter().filter(|x| !x.is_finite()).count();
                    total += values.len();
                }
            }
        }
        if bad > 0 {
            out.push(
                Issue::new(
                    IssueKind::NonFiniteFactor,
                    shard,
                    format!("{bad} non-finite value(s) of {total}"),
                )
                .tensor(&stored),
            );
        }
    }
    out
}

/// Reads and parses `dir/cersa.json`; the issue says why it is unusable.
pub(crate) fn load_manifest(dir: &Path) -> Result<Manifest, Box<Issue>> {
    let path = dir.join(MANIFEST_FILE);
    let issue = |kind, detail: String| Box::new(Issue::new(kind, MANIFEST_FILE, detail));
    let unreadable = |e: std::io::Error| {
        let detail = format!("cannot read the manifest: {e}");
        issue(IssueKind::ManifestUnreadable, detail)
    };
    let len = crate::regular::check_regular(&path)
        .map_err(unreadable)?
        .len();
    if len > MAX_MANIFEST_SIZE {
        return Err(Box::new(
            Issue::new(
                IssueKind::ManifestTooLarge,
                MANIFEST_FILE,
                "invalid CERSA manifest: larger than the cap",
            )
            .expected_found(
                format!("≤ {MAX_MANIFEST_SIZE} bytes"),
                format!("{len} bytes"),
            ),
        ));
    }
    let text = crate::regular::read_regular(&path).map_err(unreadable)?;
    parse_manifest(&text)
}

/// Parses the text of a `cersa.json` and checks its format, version and revision (what
/// [`crate::read_manifest`] does after reading the file); the issue says why it is unusable.
/// Public (hidden) for the in-process fuzz targets.
#[doc(hidden)]
pub fn parse_manifest(text: &[u8]) -> Result<Manifest, Box<Issue>> {
    let issue = |kind, detail: String| Box::new(Issue::new(kind, MANIFEST_FILE, detail));
    // A rule on a field's value: the issue with what the rule wants and what was found.
    let rule = |kind, detail, expected: String, found: String| {
        Box::new(Issue::new(kind, MANIFEST_FILE, detail).expected_found(expected, found))
    };
    let manifest: Manifest = serde_json::from_slice(text).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => IssueKind::ManifestInvalid,
            _ => IssueKind::ManifestNotJson,
        };
        issue(kind, format!("invalid CERSA manifest: {e}"))
    })?;
    let (format, version) = (&manifest.format, manifest.format_version);
    if format != FORMAT_NAME {
        return Err(rule(
            IssueKind::WrongFormat,
            format!("format is {format:?}, expected \"{FORMAT_NAME}\""),
            FORMAT_NAME.into(),
            format.clone(),
        ));
    }
    if version != FORMAT_VERSION {
        return Err(rule(
            IssueKind::UnsupportedVersion,
            format!(
                "format_version {version} is not supported (this reader knows {FORMAT_VERSION})"
            ),
            FORMAT_VERSION.to_string(),
            version.to_string(),
        ));
    }
    if manifest.format_minor > FORMAT_MINOR {
        let minor = manifest.format_minor;
        return Err(rule(
            IssueKind::UnsupportedVersion,
            format!(
                "format revision 1.{minor} is not supported (this reader knows up to \
                 1.{FORMAT_MINOR}): the checkpoint needs a newer reader"
            ),
            format!("format_minor ≤ {FORMAT_MINOR}"),
            minor.to_string(),
        ));
    }
    Ok(manifest)
}

/// The stored names entry `name` claims when its rules are broken (so its tensors are
/// not also reported as stray).
fn claimed_names(name: &str, info: &TensorInfo) -> Vec<String> {
    match info.kind {
        TensorKind::Dense => vec![name.to_string()],
        TensorKind::Factored => {
            let (u, s, vt) = factor_names(name);
            vec![u, s, vt]
        }
        TensorKind::Experts => (0..info.expert_count())
            .flat_map(|e| {
                let base = expert_name(name, e);
                let (u, s, vt) = factor_names(&base);
                [base, u, s, vt]
            })
            .collect(),
    }
}

/// (E, m, n) of stacked experts entry `name` (format revision 1.3): at least 3 dimensions,
/// one `experts` entry per index of the first, `matrix_shape` `[d1, d2·…]`, and no expert of
/// kind `experts`. Public (hidden) for the in-process fuzz targets.
#[doc(hidden)]
pub fn experts_dims(name: &str, info: &TensorInfo) -> Result<(usize, usize, usize), Box<Issue>> {
    let bad = |detail: String| {
        Box::new(Issue::new(IssueKind::ExpertsInvalid, MANIFEST_FILE, detail).tensor(name))
    };
    let Some(experts) = &info.experts else {
        return Err(bad("kind experts without an experts list".into()));
    };
    let [e, m, rest @ ..] = info.shape.as_slice() else {
        return Err(bad(format!(
            "shape {:?} has fewer than 3 dimensions",
            info.shape
        )));
    };
    if rest.is_empty() {
        return Err(bad(format!(
            "shape {:?} has fewer than 3 dimensions",
            info.shape
        )));
    }
    let n = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(n) = n.filter(|n| m.checked_mul(*n).is_some()) else {
        return Err(bad(format!("shape {:?} overflows", info.shape)));
    };
    if experts.len() != *e {
        return Err(bad(format!(
            "{} experts listed for a first dimension of {e}",
            experts.len()
        )));
    }
    if info.matrix_shape != Some([*m, n]) {
        return Err(bad(format!(
            "matrix_shape {:?} is not [{m}, {n}], the view of one expert of shape {:?}",
            info.matrix_shape, info.shape
        )));
    }
    if let Some(i) = experts.iter().position(|x| x.kind == TensorKind::Experts) {
        return Err(bad(format!("expert {i} is of kind experts")));
    }
    Ok((*e, *m, n))
}

/// (m, n, r) of factored entry `name`, or every rule of a factored entry it breaks
/// (never empty). Public (hidden) for the in-process fuzz targets.
#[doc(hidden)]
pub fn factored_dims(name: &str, info: &TensorInfo) -> Result<(usize, usize, usize), Vec<Issue>> {
    let rule = |kind, detail: String| Issue::new(kind, MANIFEST_FILE, detail).tensor(name);
    let mut issues = Vec::new();
    if info.matrix_shape.is_none() {
        issues.push(rule(
            IssueKind::FactoredWithoutMatrixShape,
            "factored without matrix_shape".into(),
        ));
    }
    if info.rank.is_none() {
        issues.push(rule(
            IssueKind::FactoredWithoutRank,
            "factored without rank".into(),
        ));
    }
    let (Some([m, n]), Some(r)) = (info.matrix_shape, info.rank) else {
        return Err(issues);
    };
    let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if info.shape.len() < 2 || numel != m.checked_mul(n) || info.shape.first() != Some(&m) {
        issues.push(rule(
            IssueKind::MatrixShapeMismatch,
            format!(
                "matrix_shape [{m}, {n}] does not fit shape {:?}",
                info.shape
            ),
        ));
    }
    if r == 0 || r > m.min(n) {
        issues.push(
            rule(
                IssueKind::RankOutOfRange,
                format!("rank {r} outside 1..=min({m}, {n})"),
            )
            .expected_found(format!("1..={}", m.min(n)), r),
        );
    }
    if let Some(q) = info.quant {
        if info.stored_dtype != Dtype::U8 {
            issues.push(
                rule(
                    IssueKind::QuantStoredDtype,
                    format!("factors quantized as {q} must be stored as U8 rows"),
                )
                .expected_found("U8", info.stored_dtype),
            );
        } else if q.row_bytes(m.max(n)).is_none() {
            issues.push(rule(
                IssueKind::QuantStoredDtype,
                format!("{q} rows of {} values overflow", m.max(n)),
            ));
        }
    } else if !info.stored_dtype.is_factor_float() {
        issues.push(
            rule(
                IssueKind::FactorDtypeNotFloat,
                format!("factor dtype {} is not a float type", info.stored_dtype),
            )
            .expected_found("F16, BF16, F32 or F64", info.stored_dtype),
        );
    }
    if let Some(w) = &info.whitening {
        if w.input_axis > 1 || !(w.output_rel_error.is_finite() && w.output_rel_error >= 0.0) {
            issues.push(rule(
                IssueKind::WhiteningInvalid,
                format!(
                    "whitening: input_axis {} must be 0 or 1 and output_rel_error {} finite \
                     and ≥ 0",
                    w.input_axis, w.output_rel_error
                ),
            ));
        }
    }
    if issues.is_empty() {
        Ok((m, n, r))
    } else {
        Err(issues)
    }
}

/// Why the checks ended early.
enum Halt {
    /// The caller wanted only the first issue.
    First,
    /// The cancel flag was set.
    Interrupted,
}

/// One validation run over a directory.
struct Run<'a> {
    dir: &'a Path,
    options: ValidateOptions<'a>,
    /// List every issue (`validate`) or stop at the first (`open`).
    all: bool,
    issues: Vec<Issue>,
}

/// A stored tensor a manifest entry implies: (name, dtype, shape).
type Expected = (String, Dtype, Vec<usize>);

impl Run<'_> {
    fn push(&mut self, issue: Issue) -> Result<(), Halt> {
        self.issues.push(issue);
        if self.all {
            Ok(())
        } else {
            Err(Halt::First)
        }
    }

    fn cancelled(&self) -> Result<(), Halt> {
        match self.options.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(Halt::Interrupted),
            _ => Ok(()),
        }
    }

    /// Runs every check; the checkpoint when the structure is sound (no issue but sha256).
    /// The side files are checked last and only by [`validate`]: `open` reads tensors,
    /// which do not depend on them.
    fn checks(&mut self) -> Result<Option<Checkpoint>, Halt> {
        let manifest = match load_manifest(self.dir) {
            Ok(m) => m,
            Err(issue) => {
                self.push(*issue)?;
                return Ok(None);
            }
        };
        let side_files = manifest.side_files.clone();
        let shard_files: HashSet<String> = manifest.shards.iter().map(|s| s.file.clone()).collect();
        let ckpt = self.tensor_checks(manifest)?;
        if self.all {
            self.side_files(&side_files, &shard_files)?;
        }
        Ok(ckpt)
    }

    /// Each listed side file: a plain name listed once (not the manifest's or a shard's),
    /// present as a regular file of the listed size and (with checksums) sha256.
    fn side_files(
        &mut self,
        files: &[crate::manifest::SideFile],
        shard_files: &HashSet<String>,
    ) -> Result<(), Halt> {
        let mut seen = HashSet::new();
        for info in files {
            let file = info.file.as_str();
            let plain = !(file.is_empty()
                || file.contains('/')
                || file.contains('\\')
                || file.starts_with('.'));
            let detail = if !plain {
                Some(format!("side file name {file:?} must be a plain file name"))
            } else if file == MANIFEST_FILE || shard_files.contains(file) {
                Some(format!(
                    "side file {file:?} is also the manifest or a shard"
                ))
            } else if !seen.insert(file) {
                Some(format!("side file {file:?} listed twice"))
            } else {
                None
            };
            if let Some(detail) = detail {
                self.push(Issue::new(
                    IssueKind::SideFileNameInvalid,
                    MANIFEST_FILE,
                    detail,
                ))?;
                continue;
            }
            let path = self.dir.join(file);
            let missing = |why: String| Issue::new(IssueKind::SideFileMissing, file, why);
            // A FIFO or device under the name is reported, never opened.
            let len = match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => meta.len(),
                Ok(_) => {
                    self.push(missing("the side file is not a regular file".into()))?;
                    continue;
                }
                Err(e) => {
                    self.push(missing(format!("cannot read the side file: {e}")))?;
                    continue;
                }
            };
            if len != info.bytes {
                self.push(
                    Issue::new(IssueKind::SideFileMismatch, file, "side file size mismatch")
                        .expected_found(info.bytes, len),
                )?;
                continue;
            }
            if self.options.verify_checksums {
                self.cancelled()?;
                let found = match crate::writer::sha256_file(&path) {
                    Ok((_, sha)) => sha,
                    Err(e) => {
                        self.push(missing(format!("cannot read the side file: {e}")))?;
                        continue;
                    }
                };
                if !found.eq_ignore_ascii_case(&info.sha256) {
                    self.push(
                        Issue::new(
                            IssueKind::SideFileMismatch,
                            file,
                            "side file sha256 mismatch",
                        )
                        .expected_found(&info.sha256, found),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The manifest's shards and entries; the checkpoint when they are sound.
    fn tensor_checks(&mut self, manifest: Manifest) -> Result<Option<Checkpoint>, Halt> {
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut shard_of_file = BTreeMap::new();
        // Stored tensor name → (shard index, entry index in that shard's header).
        let mut index: HashMap<String, (usize, usize)> = HashMap::new();
        for (k, info) in manifest.shards.iter().enumerate() {
            let shard = self.shard(k, info, &mut shard_of_file)?;
            if let Some(shard) = &shard {
                for (i, t) in shard.header.tensors.iter().enumerate() {
                    let first = match index.entry(t.name.clone()) {
                        Entry::Vacant(v) => {
                            v.insert((k, i));
                            continue;
                        }
                        Entry::Occupied(o) => o.get().0,
                    };
                    let first = manifest.shards.get(first).map_or("?", |s| s.file.as_str());
                    self.push(
                        Issue::new(
                            IssueKind::StoredInTwoShards,
                            &info.file,
                            "stored in more than one shard",
                        )
                        .tensor(&t.name)
                        .expected_found(first, &info.file),
                    )?;
                }
            }
            shards.push(shard);
        }
        let claimed = self.entries(&manifest, &shards, &shard_of_file, &index)?;
        // Without an issue so far every claimed name was found stored, so equal counts mean
        // no stray (the scan below is then skipped: `open` on a valid checkpoint).
        let no_stray = self.issues.is_empty() && claimed.len() == index.len();
        for (info, shard) in manifest.shards.iter().zip(&shards) {
            if no_stray {
                break;
            }
            let Some(shard) = shard else { continue };
            let mut stray: Vec<&str> = shard
                .header
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| !claimed.contains(*n))
                .collect();
            stray.sort_unstable();
            for name in stray {
                self.push(
                    Issue::new(
                        IssueKind::StrayTensor,
                        &info.file,
                        "stored in a shard but not listed in the manifest",
                    )
                    .tensor(name),
                )?;
            }
        }
        if self.issues.iter().any(|i| i.kind != IssueKind::Sha256) {
            return Ok(None);
        }
        let Some(shards) = shards.into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let ckpt = Checkpoint::from_checked(self.dir.to_path_buf(), manifest, shards, index);
        if self.options.check_finite {
            let names: Vec<&String> = ckpt
                .manifest()
                .tensors
                .iter()
                .filter(|(_, info)| info.kind != TensorKind::Dense)
                .map(|(name, _)| name)
                .collect();
            for name in names {
                self.cancelled()?;
                for issue in non_finite_factors(&ckpt, name) {
                    self.push(issue)?;
                }
            }
        }
        Ok(Some(ckpt))
    }

    /// Shard `k` of the shard list: its name, size, sha256 and safetensors layout. `None`
    /// when its header cannot be used.
    fn shard(
        &mut self,
        k: usize,
        info: &crate::manifest::ShardInfo,
        shard_of_file: &mut BTreeMap<String, usize>,
    ) -> Result<Option<Shard>, Halt> {
        let file = info.file.as_str();
        // Recorded even when rejected below, so the entries naming this shard are not also
        // reported as naming an unlisted one; the first listing wins.
        let first_listing = !shard_of_file.contains_key(file);
        if first_listing {
            shard_of_file.insert(file.to_string(), k);
        }
        let plain = !(file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file.starts_with('.'));
        let rejected = if !plain {
            Some((
                IssueKind::ShardNameNotPlain,
                format!("shard file name {file:?} must be a plain file name"),
            ))
        } else if !first_listing {
            Some((
                IssueKind::ShardListedTwice,
                format!("shard {file:?} listed twice"),
            ))
        } else {
            None
        };
        if let Some((kind, detail)) = rejected {
            self.push(Issue::new(kind, MANIFEST_FILE, detail))?;
            return Ok(None);
        }
        let path = self.dir.join(file);
        let missing = |e: String| {
            Issue::new(
                IssueKind::ShardMissing,
                file,
                format!("cannot read the shard: {e}"),
            )
        };
        // A FIFO or device under the name is reported, never opened.
        let len = match crate::regular::check_regular(&path) {
            Ok(meta) => meta.len(),
            Err(e) => {
                self.push(missing(e.to_string()))?;
                return Ok(None);
            }
        };
        if len != info.bytes {
            self.push(
                Issue::new(IssueKind::ShardSize, file, "size mismatch")
                    .expected_found(info.bytes, len),
            )?;
        }
        // SAFETY (of the contract): CERSA shards are written once and never modified in
        // place; see `MappedFile::open`.
        #[allow(unsafe_code)]
        let map = match unsafe { MappedFile::open(&path) } {
            Ok(map) => map,
            Err(e) => {
                self.push(missing(e.to_string()))?;
                return Ok(None);
            }
        };
        if self.options.verify_checksums {
            let found = self.sha256(&map)?;
            if !found.eq_ignore_ascii_case(&info.sha256) {
                self.push(
                    Issue::new(IssueKind::Sha256, file, "sha256 mismatch")
                        .expected_found(&info.sha256, found),
                )?;
            }
        }
        let mut problems = Vec::new();
        let header = safetensors::parse_reporting(map.bytes(), &mut problems, self.all);
        for p in problems {
            self.push(Issue::safetensors(file, p))?;
        }
        Ok(header.map(|header| Shard { path, map, header }))
    }

    /// Lowercase hex sha256 of a mapped shard, in blocks (pages are dropped from the
    /// resident set after hashing, and the cancel flag is polled between blocks).
    fn sha256(&self, map: &MappedFile) -> Result<String, Halt> {
        const BLOCK: usize = 8 << 20;
        let mut h = Sha256::new();
        for (i, chunk) in map.bytes().chunks(BLOCK).enumerate() {
            self.cancelled()?;
            h.update(chunk);
            let start = i * BLOCK;
            map.release(start..start + chunk.len());
        }
        Ok(hex(&h.finalize()))
    }

    /// Every manifest entry against its rules and its shard. Returns the stored names the
    /// entries claim.
    fn entries(
        &mut self,
        manifest: &Manifest,
        shards: &[Option<Shard>],
        shard_of_file: &BTreeMap<String, usize>,
        index: &HashMap<String, (usize, usize)>,
    ) -> Result<HashSet<String>, Halt> {
        // A stored tensor claimed by two entries (dense `a.cersa_u` next to factored `a`)
        // must not let a stray one pass unnoticed.
        let mut claimed = HashSet::new();
        for (name, info) in &manifest.tensors {
            self.cancelled()?;
            let k = shard_of_file.get(&info.shard).copied();
            if k.is_none() {
                self.push(
                    Issue::new(
                        IssueKind::ShardNotListed,
                        MANIFEST_FILE,
                        format!("shard {:?} is not in the shard list", info.shard),
                    )
                    .tensor(name),
                )?;
            }
            let expected = self.expected_stored(name, info)?;
            // Only against a shard whose header could be read.
            let shard = k.and_then(|k| shards.get(k)?.as_ref().map(|_| k));
            if let (Some(k), Some(expected)) = (shard, &expected) {
                for e in expected {
                    self.stored(manifest, shards, index, k, e)?;
                }
            }
            let names = match expected {
                Some(expected) => expected.into_iter().map(|e| e.0).collect(),
                None => claimed_names(name, info),
            };
            for stored in names {
                if claimed.contains(&stored) {
                    self.push(
                        Issue::new(
                            IssueKind::ClaimedTwice,
                            MANIFEST_FILE,
                            "stored tensor claimed by two manifest entries",
                        )
                        .tensor(&stored),
                    )?;
                }
                claimed.insert(stored);
            }
        }
        Ok(claimed)
    }

    /// The stored tensors entry `name` implies, or `None` (after reporting) when it breaks
    /// a rule of factored entries.
    fn expected_stored(
        &mut self,
        name: &str,
        info: &TensorInfo,
    ) -> Result<Option<Vec<Expected>>, Halt> {
        if info.experts.is_some() != (info.kind == TensorKind::Experts) {
            self.push(
                Issue::new(
                    IssueKind::ExpertsInvalid,
                    MANIFEST_FILE,
                    format!("an entry of kind {:?} with an experts list", info.kind),
                )
                .tensor(name),
            )?;
            return Ok(None);
        }
        Ok(Some(match info.kind {
            TensorKind::Dense => vec![(name.to_string(), info.stored_dtype, info.shape.clone())],
            TensorKind::Experts => {
                if let Err(issue) = experts_dims(name, info) {
                    self.push(*issue)?;
                    return Ok(None);
                }
                let mut all = Vec::new();
                for e in 0..info.expert_count() {
                    let expert = info.expert(e).expect("experts_dims checked the count");
                    match self.expected_stored(&expert_name(name, e), &expert)? {
                        Some(v) => all.extend(v),
                        None => return Ok(None),
                    }
                }
                all
            }
            TensorKind::Factored => match factored_dims(name, info) {
                Ok((m, n, r)) => {
                    let (u, s, vt) = factor_names(name);
                    let enc = FactorEncoding::of(info);
                    // factored_dims checked that the quantized row sizes do not overflow.
                    let u_shape = enc.u_shape(m, r).expect("checked by factored_dims");
                    let vt_shape = enc.vt_shape(r, n).expect("checked by factored_dims");
                    vec![
                        (u, info.stored_dtype, u_shape.to_vec()),
                        (s, Dtype::F32, vec![r]),
                        (vt, info.stored_dtype, vt_shape.to_vec()),
                    ]
                }
                Err(issues) => {
                    for issue in issues {
                        self.push(issue)?;
                    }
                    return Ok(None);
                }
            },
        }))
    }

    /// One stored tensor of an entry whose shard is `k`: where it is, its dtype and shape.
    fn stored(
        &mut self,
        manifest: &Manifest,
        shards: &[Option<Shard>],
        index: &HashMap<String, (usize, usize)>,
        k: usize,
        (stored, dtype, shape): &Expected,
    ) -> Result<(), Halt> {
        let file = |k: usize| manifest.shards.get(k).map_or("?", |s| s.file.as_str());
        let Some(&(sk, i)) = index.get(stored) else {
            return self.push(
                Issue::new(
                    IssueKind::TensorMissing,
                    file(k),
                    "listed in the manifest but missing from its shard",
                )
                .tensor(stored),
            );
        };
        if sk != k {
            return self.push(
                Issue::new(
                    IssueKind::WrongShard,
                    file(sk),
                    format!("manifest says shard {:?}", file(k)),
                )
                .tensor(stored)
                .expected_found(file(k), file(sk)),
            );
        }
        let Some(e) = shards
            .get(sk)
            .and_then(Option::as_ref)
            .and_then(|s| s.header.tensors.get(i))
        else {
            return Ok(()); // the index only points at entries of parsed headers
        };
        if e.dtype != *dtype {
            self.push(
                Issue::new(
                    IssueKind::DtypeMismatch,
                    file(k),
                    "stored dtype differs from the manifest",
                )
                .tensor(stored)
                .expected_found(dtype, e.dtype),
            )?;
        }
        if e.shape != *shape {
            self.push(
                Issue::new(
                    IssueKind::ShapeMismatch,
                    file(k),
                    "stored shape differs from the manifest",
                )
                .tensor(stored)
                .expected_found(format!("{shape:?}"), format!("{:?}", e.shape)),
            )?;
        }
        Ok(())
    }
}
