//! `verify`: checks a CERSA directory against its manifest and, optionally, its source.
//!
//! Without a source it runs the loader's validator ([`cersa_loader::validate_with`]: every
//! shard's size, sha256 and safetensors layout; every manifest entry's rules and stored
//! tensors, in the right shard with the right dtype and shape; no stray tensors) and checks
//! that all factors are finite. With a source: the relative Frobenius error
//! ‖W − Ŵ‖_F / ‖W‖_F of every factored tensor is recomputed in f64 from the source and
//! compared with the manifest's `rel_error`, and dense tensors are compared byte for byte
//! with the source. With calibration statistics as well (the file a whitened checkpoint
//! was converted with), the output-space error ‖(W − Ŵ)·X‖_F / ‖W·X‖_F of every whitened
//! entry is recomputed from G ([`output_error`]) and compared with the manifest's.
//!
//! Every failed check is listed (the run does not stop at the first one); errors that make
//! checking impossible (unreadable manifest or source, Ctrl-C) are returned as `Err`.

mod experts;
mod output_error;

pub use output_error::output_relative_error;

use crate::calibration::Calibration;
use crate::error::{ConvertError, Result};
use crate::input::{FloatData, Precision, Source};
use cersa_loader::manifest::TensorInfo;
use cersa_loader::{
    Checkpoint, Dtype, Issue, IssueKind, TensorKind, TensorView, ValidateOptions, MANIFEST_FILE,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Version of the verify JSON schema. 2: failures carry `issue`, the loader's
/// [`IssueKind`] (kebab-case) for every check the format validator made.
pub const SCHEMA_VERSION: u32 = 2;

/// What a failed check was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// A shard file is missing or unreadable.
    ShardMissing,
    /// A shard's size differs from the manifest.
    ShardSize,
    /// A shard's sha256 differs from the manifest.
    Sha256,
    /// A shard's safetensors header is malformed, a manifest entry breaks a rule of the
    /// format, or the loader rejected the directory.
    Structure,
    /// A tensor the manifest lists is not stored (or not where it says).
    MissingTensor,
    /// A stored tensor has another dtype or shape than the manifest implies.
    DtypeShape,
    /// A stored tensor is not listed in the manifest (or is stored twice).
    StrayTensor,
    /// A factor holds NaN or ±Inf.
    NonFinite,
    /// Manifest and source disagree about which tensors exist or their shapes.
    SourceMismatch,
    /// The recomputed relative error differs from the manifest's `rel_error`.
    RelError,
    /// A dense tensor's bytes differ from the source.
    DenseBytes,
    /// The calibration file is not the one the checkpoint was converted with (or the
    /// checkpoint was not whitened, or the file lacks a whitened tensor's statistics).
    CalibrationMismatch,
    /// The recomputed output-space error differs from the manifest's `output_rel_error`.
    OutputError,
}

impl Check {
    /// The check a format issue belongs to.
    fn of(kind: IssueKind) -> Check {
        use IssueKind as K;
        match kind {
            K::ShardMissing => Check::ShardMissing,
            K::ShardSize => Check::ShardSize,
            K::Sha256 => Check::Sha256,
            K::TensorMissing | K::WrongShard | K::ShardNotListed => Check::MissingTensor,
            K::DtypeMismatch | K::ShapeMismatch => Check::DtypeShape,
            K::StrayTensor | K::StoredInTwoShards => Check::StrayTensor,
            K::NonFiniteFactor => Check::NonFinite,
            _ => Check::Structure,
        }
    }
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The kind of check.
    pub check: Check,
    /// The rule of the format broken, for the checks the loader's validator made (absent
    /// for the source checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue: Option<IssueKind>,
    /// The file concerned (shard or manifest), relative to the CERSA directory.
    pub file: Option<String>,
    /// The tensor concerned (stored or source name).
    pub tensor: Option<String>,
    /// Expected value, where there is one.
    pub expected: Option<String>,
    /// Found value, where there is one.
    pub found: Option<String>,
    /// Human-readable explanation.
    pub detail: String,
}

impl From<Issue> for Failure {
    fn from(i: Issue) -> Self {
        Failure {
            check: Check::of(i.kind),
            issue: Some(i.kind),
            file: Some(i.file),
            tensor: i.tensor,
            expected: i.expected,
            found: i.found,
            detail: i.detail,
        }
    }
}

/// What was checked, counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Shards hashed.
    pub shards: usize,
    /// Manifest entries checked against the shards.
    pub tensors: usize,
    /// Factored tensors whose rel_error was recomputed from the source.
    pub rel_errors_compared: usize,
    /// Dense tensors compared byte for byte with the source.
    pub dense_compared: usize,
    /// Whitened tensors whose output-space error was recomputed (`--calibration`).
    #[serde(default)]
    pub output_errors_compared: usize,
}

/// `cersa verify --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The CERSA directory.
    pub out_dir: PathBuf,
    /// The source compared against, if any.
    pub source: Option<PathBuf>,
    /// True when every check held.
    pub ok: bool,
    /// What was checked.
    pub counts: Counts,
    /// Every failed check, in a deterministic order (shards, then tensors by name).
    pub failures: Vec<Failure>,
    /// Checks that could not run because an earlier one failed.
    pub skipped: Vec<String>,
}

fn failure(check: Check, file: Option<&str>, tensor: Option<&str>, detail: String) -> Failure {
    Failure {
        check,
        issue: None,
        file: file.map(String::from),
        tensor: tensor.map(String::from),
        expected: None,
        found: None,
        detail,
    }
}

fn expected_found(mut f: Failure, expected: impl ToString, found: impl ToString) -> Failure {
    f.expected = Some(expected.to_string());
    f.found = Some(found.to_string());
    f
}

/// Tolerance on |recomputed − manifest rel_error|. The converter measures the residual of
/// the stored factors in the source's working precision (f32 unless the source is F64), so
/// the bound follows that precision; factors stored in F16/BF16 have larger residuals but
/// are measured exactly as stored, so they need no wider bound than their working precision.
pub fn rel_error_tolerance(stored: Dtype, precision: Precision, rel_error: f64) -> f64 {
    let (abs, rel) = match (precision, stored) {
        (Precision::F64, Dtype::F64) => (1e-9, 1e-6),
        _ => (2e-5, 2e-3),
    };
    abs + rel * rel_error.abs()
}

fn interrupted(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(ConvertError::Interrupted);
    }
    Ok(())
}

/// Verifies `dir` (and, with `source`, against that checkpoint; with `calibration` as
/// well, the output-space errors of whitened entries). `progress(done, total)` counts
/// tensors compared with the source; setting `cancel` stops the run with
/// [`ConvertError::Interrupted`].
pub fn verify(
    dir: &Path,
    source: Option<(&Path, &dyn Source)>,
    calibration: Option<&Calibration>,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<VerifyReport> {
    // An unusable manifest means nothing can be checked: an error, not a verdict.
    let manifest = cersa_loader::read_manifest(dir)?;
    let options = ValidateOptions {
        verify_checksums: true,
        // Checked below on the thread pool.
        check_finite: false,
        cancel: Some(cancel),
    };
    let issues = cersa_loader::validate_with(dir, &options)
        .map_err(|cersa_loader::Interrupted| ConvertError::Interrupted)?;
    if let Some(issue) = issues.iter().find(|i| i.kind.is_manifest_unusable()) {
        // The manifest changed since it was read.
        return Err(cersa_loader::Error::Invalid {
            dir: dir.to_path_buf(),
            issue: Box::new(issue.clone()),
        }
        .into());
    }
    // A shard whose name was rejected is not read.
    let unread = issues
        .iter()
        .filter(|i| {
            matches!(
                i.kind,
                IssueKind::ShardNameNotPlain | IssueKind::ShardListedTwice
            )
        })
        .count();
    // A sha256 mismatch aside, a failed format check makes the values unreadable.
    let structure_ok = issues.iter().all(|i| i.kind == IssueKind::Sha256);
    let mut report = VerifyReport {
        schema_version: SCHEMA_VERSION,
        out_dir: dir.to_path_buf(),
        source: source.map(|(p, _)| p.to_path_buf()),
        ok: false,
        counts: Counts {
            shards: manifest.shards.len().saturating_sub(unread),
            tensors: manifest.tensors.len(),
            ..Counts::default()
        },
        failures: issues.into_iter().map(Failure::from).collect(),
        skipped: Vec::new(),
    };
    if structure_ok {
        // Opened without hashing again: the shards were hashed above.
        match Checkpoint::open(dir) {
            Ok(ckpt) => {
                check_finite(&ckpt, &mut report, cancel)?;
                if let Some((_, src)) = source {
                    let calib = matching_calibration(&ckpt, calibration, &mut report);
                    compare_source(&ckpt, src, calib, &mut report, progress, cancel)?;
                }
            }
            Err(e) => {
                report.failures.push(failure(
                    Check::Structure,
                    Some(MANIFEST_FILE),
                    None,
                    e.to_string(),
                ));
                report.skipped.push("finiteness and source checks".into());
            }
        }
    } else {
        report
            .skipped
            .push("finiteness and source checks (shards unreadable or inconsistent)".into());
    }
    report.ok = report.failures.is_empty();
    Ok(report)
}

/// Every factor (U, σ, Vᵀ) holds finite values (the loader's check, one tensor per task).
fn check_finite(ckpt: &Checkpoint, report: &mut VerifyReport, cancel: &AtomicBool) -> Result<()> {
    let found = ckpt
        .manifest()
        .tensors
        .par_iter()
        .filter(|(_, info)| info.kind != TensorKind::Dense)
        .map(|(name, _)| {
            interrupted(cancel)?;
            Ok(cersa_loader::non_finite_factors(ckpt, name))
        })
        .collect::<Result<Vec<_>>>()?;
    report
        .failures
        .extend(found.into_iter().flatten().map(Failure::from));
    Ok(())
}

/// `calibration` when it is the file the checkpoint's whitened entries were made with; a
/// failure (or a skipped note, without a file) otherwise.
fn matching_calibration<'a>(
    ckpt: &Checkpoint,
    calibration: Option<&'a Calibration>,
    report: &mut VerifyReport,
) -> Option<&'a Calibration> {
    let man = ckpt.manifest();
    let whitened = man
        .tensors
        .values()
        .filter(|t| t.whitening.is_some())
        .count();
    let recorded = man.config.calibration.as_ref();
    let Some(calib) = calibration else {
        if whitened > 0 {
            report.skipped.push(format!(
                "output-space errors of {whitened} whitened tensor(s) (give --calibration, \
                 the statistics file it was converted with)"
            ));
        }
        return None;
    };
    let Some(recorded) = recorded else {
        report.failures.push(failure(
            Check::CalibrationMismatch,
            Some(MANIFEST_FILE),
            None,
            format!(
                "--calibration {} given, but this checkpoint was converted without \
                 calibration statistics",
                calib.path().display()
            ),
        ));
        return None;
    };
    if recorded.sha256 != calib.config.sha256 {
        report.failures.push(expected_found(
            failure(
                Check::CalibrationMismatch,
                Some(MANIFEST_FILE),
                None,
                format!(
                    "{} is not the calibration file this checkpoint was converted with \
                     (sha256 differs); output-space errors not compared",
                    calib.path().display()
                ),
            ),
            &recorded.sha256,
            &calib.config.sha256,
        ));
        return None;
    }
    Some(calib)
}

/// Outcome of comparing one manifest entry with the source.
struct Compared {
    /// True for a dense entry (bytes compared), false for a factored one (rel_error).
    dense: bool,
    /// The rel_error (or the bytes) matched.
    main_ok: bool,
    /// The output-space error was recomputed too.
    output: bool,
    /// Failed checks.
    failures: Vec<Failure>,
}

impl Compared {
    fn failed(f: Failure) -> Self {
        Compared {
            dense: false,
            main_ok: false,
            output: false,
            failures: vec![f],
        }
    }
}

fn compare_source(
    ckpt: &Checkpoint,
    src: &dyn Source,
    calibration: Option<&Calibration>,
    report: &mut VerifyReport,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<()> {
    let man = ckpt.manifest();
    let by_name: HashMap<&str, usize> = src
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    for t in src.tensors() {
        if !man.tensors.contains_key(&t.name) {
            report.failures.push(failure(
                Check::SourceMismatch,
                Some(MANIFEST_FILE),
                Some(&t.name),
                "in the source but not in the manifest".into(),
            ));
        }
    }
    let names: Vec<(&String, &TensorInfo)> = man.tensors.iter().collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let total = names.len();
    let results = names
        .par_iter()
        .map(|(name, info)| {
            interrupted(cancel)?;
            let r = compare_one(ckpt, src, calibration, &by_name, name, info, cancel);
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                total,
            );
            r
        })
        .collect::<Result<Vec<_>>>()?;
    for r in results {
        if r.main_ok {
            if r.dense {
                report.counts.dense_compared += 1;
            } else {
                report.counts.rel_errors_compared += 1;
            }
        }
        report.counts.output_errors_compared += usize::from(r.output);
        report.failures.extend(r.failures);
    }
    src.check_unchanged()?;
    Ok(())
}

/// Compares one manifest entry with the source. `Err`: reading the source failed.
fn compare_one(
    ckpt: &Checkpoint,
    src: &dyn Source,
    calibration: Option<&Calibration>,
    by_name: &HashMap<&str, usize>,
    name: &str,
    info: &TensorInfo,
    cancel: &AtomicBool,
) -> Result<Compared> {
    let shard = Some(info.shard.as_str());
    let Some(&i) = by_name.get(name) else {
        return Ok(Compared::failed(failure(
            Check::SourceMismatch,
            Some(MANIFEST_FILE),
            Some(name),
            "in the manifest but not in the source".into(),
        )));
    };
    let meta = &src.tensors()[i];
    if meta.shape != info.shape {
        return Ok(Compared::failed(expected_found(
            failure(
                Check::SourceMismatch,
                Some(MANIFEST_FILE),
                Some(name),
                "shape differs from the source".into(),
            ),
            format!("{:?}", meta.shape),
            format!("{:?}", info.shape),
        )));
    }
    match ckpt.get(name)? {
        TensorView::Experts(count) => {
            experts::compare_experts(ckpt, src, i, name, info, count, cancel)
        }
        TensorView::Dense(raw) => {
            let mut offset = 0usize;
            let mut first_diff: Option<usize> = None;
            let mut too_long = false;
            src.copy_dense(i, &mut |chunk| {
                interrupted(cancel)?;
                let end = offset.saturating_add(chunk.len());
                match raw.bytes.get(offset..end) {
                    Some(stored) if first_diff.is_none() => {
                        if let Some(k) = stored.iter().zip(chunk).position(|(a, b)| a != b) {
                            first_diff = Some(offset + k);
                        }
                    }
                    Some(_) => {}
                    None => too_long = true,
                }
                offset = end;
                Ok(())
            })?;
            if too_long || offset != raw.bytes.len() {
                return Ok(Compared::failed(expected_found(
                    failure(
                        Check::DenseBytes,
                        shard,
                        Some(name),
                        "dense tensor length differs from the source".into(),
                    ),
                    offset,
                    raw.bytes.len(),
                )));
            }
            if let Some(k) = first_diff {
                return Ok(Compared::failed(failure(
                    Check::DenseBytes,
                    shard,
                    Some(name),
                    format!("dense tensor bytes differ from the source (first at byte {k})"),
                )));
            }
            Ok(Compared {
                dense: true,
                main_ok: true,
                output: false,
                failures: Vec::new(),
            })
        }
        TensorView::Factored(f) => {
            let Some(stored_rel) = info.rel_error else {
                return Ok(Compared::failed(failure(
                    Check::RelError,
                    Some(MANIFEST_FILE),
                    Some(name),
                    "factored tensor without rel_error".into(),
                )));
            };
            let data = src.read_float(i)?;
            let [m, n] = f.matrix_shape;
            // Validated factors decode (quantized ones to their f32 dequantization).
            let (u, s, vt) = f.values_f64().unwrap_or_default();
            let rel = relative_error_f64(&data, m, n, &u, &s, &vt);
            let precision = meta.float.unwrap_or(Precision::F32);
            let tol = rel_error_tolerance(info.stored_dtype, precision, stored_rel);
            let mut out = Compared {
                dense: false,
                main_ok: false,
                output: false,
                failures: Vec::new(),
            };
            if let (Some(white), Some(calib)) = (&info.whitening, calibration) {
                out.output = true;
                if let Some(f) = compare_output(calib, name, white, &data, [m, n], (&u, &s, &vt))? {
                    out.failures.push(f);
                }
            }
            if !(rel.is_finite() && (rel - stored_rel).abs() <= tol) {
                out.failures.push(expected_found(
                    failure(
                        Check::RelError,
                        Some(MANIFEST_FILE),
                        Some(name),
                        format!("recomputed ‖W−Ŵ‖_F/‖W‖_F differs from the manifest by more than {tol:.2e}"),
                    ),
                    format!("{rel:.6e} (recomputed)"),
                    format!("{stored_rel:.6e} (manifest)"),
                ));
            } else {
                out.main_ok = true;
            }
            Ok(out)
        }
    }
}

/// Tolerance on |recomputed − manifest output_rel_error|: both are f64 sums over the same
/// source values and stored factors, measured two ways (here from G itself, at convert time
/// through the damped Cholesky factor less the damping's share, which cancels).
pub fn output_error_tolerance(output_rel_error: f64) -> f64 {
    1e-6 + 1e-4 * output_rel_error.abs()
}

/// The output-space check of one whitened entry: `Some(failure)` when it does not hold.
fn compare_output(
    calib: &Calibration,
    name: &str,
    white: &cersa_loader::manifest::Whitening,
    data: &FloatData,
    [m, n]: [usize; 2],
    (u, s, vt): (&[f64], &[f64], &[f64]),
) -> Result<Option<Failure>> {
    let fail = |detail: String| failure(Check::CalibrationMismatch, None, Some(name), detail);
    let Some(stats) = calib.stats(name)? else {
        return Ok(Some(fail(format!(
            "{} has no statistics for this whitened tensor",
            calib.path().display()
        ))));
    };
    if stats.axis.number() != white.input_axis {
        return Ok(Some(expected_found(
            fail("the statistics' input_axis differs from the manifest's".into()),
            white.input_axis,
            stats.axis.number(),
        )));
    }
    let Some(got) = output_relative_error(data, m, n, u, s, vt, &stats) else {
        return Ok(Some(expected_found(
            fail("the statistics' size does not match the weight's input axis".into()),
            format!("{}", if white.input_axis == 1 { n } else { m }),
            stats.dim,
        )));
    };
    let want = white.output_rel_error;
    let tol = output_error_tolerance(want);
    if got.is_finite() && (got - want).abs() <= tol {
        return Ok(None);
    }
    Ok(Some(expected_found(
        failure(
            Check::OutputError,
            Some(MANIFEST_FILE),
            Some(name),
            format!(
                "recomputed ‖(W−Ŵ)·X‖_F/‖W·X‖_F differs from the manifest by more than {tol:.2e}"
            ),
        ),
        format!("{got:.6e} (recomputed)"),
        format!("{want:.6e} (manifest)"),
    )))
}

/// ‖W − U·diag(s)·Vᵀ‖_F / ‖W‖_F in f64, row by row (W row-major m×n, U m×r, Vᵀ r×n).
pub fn relative_error_f64(
    w: &FloatData,
    m: usize,
    n: usize,
    u: &[f64],
    s: &[f64],
    vt: &[f64],
) -> f64 {
    let r = s.len();
    if u.len() != m * r || vt.len() != r * n || w.len() != m * n {
        return f64::NAN;
    }
    let mut row = vec![0f64; n];
    let mut res = 0f64;
    let mut norm = 0f64;
    for i in 0..m {
        row.iter_mut().for_each(|x| *x = 0.0);
        for k in 0..r {
            let c = u[i * r + k] * s[k];
            row.iter_mut()
                .zip(&vt[k * n..(k + 1) * n])
                .for_each(|(o, v)| *o += c * v);
        }
        let wrow: Vec<f64> = match w {
            FloatData::F32(v) => v[i * n..(i + 1) * n].iter().map(|&x| x.into()).collect(),
            FloatData::F64(v) => v[i * n..(i + 1) * n].to_vec(),
        };
        for (a, b) in wrow.iter().zip(&row) {
            res += (a - b) * (a - b);
            norm += a * a;
        }
    }
    if norm == 0.0 {
        return 0.0;
    }
    (res / norm).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_of_exact_factors_is_zero() {
        // W = u sᵀ v for a rank-1 matrix.
        let u = [0.6, 0.8];
        let s = [2.0];
        let vt = [1.0, 0.0, 0.0];
        let w: Vec<f32> = vec![1.2, 0.0, 0.0, 1.6, 0.0, 0.0];
        let e = relative_error_f64(&FloatData::F32(w), 2, 3, &u, &s, &vt);
        assert!(e < 1e-7, "{e}");
        // Dropping the factor leaves the whole norm: error 1.
        let e = relative_error_f64(
            &FloatData::F64(vec![1.2, 0.0, 0.0, 1.6, 0.0, 0.0]),
            2,
            3,
            &[0.0, 0.0],
            &s,
            &vt,
        );
        assert!((e - 1.0).abs() < 1e-15, "{e}");
    }

    #[test]
    fn mismatched_lengths_are_nan_not_panic() {
        let e = relative_error_f64(&FloatData::F32(vec![1.0; 4]), 2, 2, &[1.0], &[1.0], &[1.0]);
        assert!(e.is_nan());
    }
}
