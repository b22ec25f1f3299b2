//! `verify`: checks a CERSA directory against its manifest and, optionally, its source.
//!
//! Without a source: every shard's size and sha256 match the manifest; every manifest entry
//! has its stored tensors (right shard, dtype and shape); no stray tensors; all factors are
//! finite. With a source: the relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F of every factored
//! tensor is recomputed in f64 from the source and compared with the manifest's `rel_error`,
//! and dense tensors are compared byte for byte with the source.
//!
//! Every failed check is listed (the run does not stop at the first one); errors that make
//! checking impossible (unreadable manifest or source) are returned as `Err`.

use crate::error::Result;
use crate::input::{FloatData, Precision, Source};
use cersa_loader::dtype::decode_f64;
use cersa_loader::manifest::{Manifest, TensorInfo};
use cersa_loader::{factor_names, Checkpoint, Dtype, TensorKind, TensorView, MANIFEST_FILE};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Version of the verify JSON schema.
pub const SCHEMA_VERSION: u32 = 1;

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
    /// A shard's safetensors header is malformed, or the loader rejected the directory.
    Structure,
    /// A tensor the manifest lists is not stored (or not where it says).
    MissingTensor,
    /// A stored tensor has another dtype or shape than the manifest implies.
    DtypeShape,
    /// A stored tensor is not listed in the manifest.
    StrayTensor,
    /// A factor holds NaN or ±Inf.
    NonFinite,
    /// Manifest and source disagree about which tensors exist or their shapes.
    SourceMismatch,
    /// The recomputed relative error differs from the manifest's `rel_error`.
    RelError,
    /// A dense tensor's bytes differ from the source.
    DenseBytes,
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The kind of check.
    pub check: Check,
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

/// Verifies `dir` (and, with `source`, against that checkpoint). `progress(done, total)`
/// counts tensors compared with the source.
pub fn verify(
    dir: &Path,
    source: Option<(&Path, &dyn Source)>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<VerifyReport> {
    let manifest = cersa_loader::read_manifest(dir)?;
    let mut report = VerifyReport {
        schema_version: SCHEMA_VERSION,
        out_dir: dir.to_path_buf(),
        source: source.map(|(p, _)| p.to_path_buf()),
        ok: false,
        counts: Counts::default(),
        failures: Vec::new(),
        skipped: Vec::new(),
    };
    let headers = check_shards(dir, &manifest, &mut report);
    let structure_ok = match &headers {
        Some(h) => check_structure(&manifest, h, &mut report),
        None => false,
    };
    if structure_ok {
        // The loader validates offsets and contiguity too; its verdict is one more check.
        match Checkpoint::open(dir) {
            Ok(ckpt) => {
                check_finite(&ckpt, &mut report);
                if let Some((_, src)) = source {
                    compare_source(&ckpt, src, &mut report, progress)?;
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

/// Stored tensor name → (dtype name, shape) of one shard header.
type HeaderIndex = BTreeMap<String, (String, Vec<u64>)>;

/// Hashes every shard and reads its header. `None` when a shard is missing, of the wrong
/// size, or has an unreadable header (structure checks are then meaningless).
fn check_shards(
    dir: &Path,
    manifest: &Manifest,
    report: &mut VerifyReport,
) -> Option<BTreeMap<String, HeaderIndex>> {
    let mut headers = BTreeMap::new();
    let mut usable = true;
    for info in &manifest.shards {
        let file = Some(info.file.as_str());
        let plain = !(info.file.contains('/')
            || info.file.contains('\\')
            || info.file.starts_with('.')
            || info.file.is_empty());
        if !plain {
            report.failures.push(failure(
                Check::Structure,
                Some(MANIFEST_FILE),
                None,
                format!("shard file name {:?} must be a plain file name", info.file),
            ));
            usable = false;
            continue;
        }
        let path = dir.join(&info.file);
        report.counts.shards += 1;
        let (len, sha) = match cersa_loader::writer::sha256_file(&path) {
            Ok(x) => x,
            Err(e) => {
                report.failures.push(failure(
                    Check::ShardMissing,
                    file,
                    None,
                    format!("cannot read {}: {e}", path.display()),
                ));
                usable = false;
                continue;
            }
        };
        if len != info.bytes {
            report.failures.push(expected_found(
                failure(Check::ShardSize, file, None, "shard size differs".into()),
                info.bytes,
                len,
            ));
            usable = false;
        }
        if !sha.eq_ignore_ascii_case(&info.sha256) {
            report.failures.push(expected_found(
                failure(Check::Sha256, file, None, "shard sha256 differs".into()),
                &info.sha256,
                &sha,
            ));
        }
        match read_header(&path, len) {
            Ok(h) => {
                headers.insert(info.file.clone(), h);
            }
            Err(reason) => {
                report
                    .failures
                    .push(failure(Check::Structure, file, None, reason));
                usable = false;
            }
        }
    }
    usable.then_some(headers)
}

/// Reads only the JSON header of a safetensors shard (names, dtypes, shapes). Offsets are
/// validated later by the loader.
fn read_header(path: &Path, file_len: u64) -> std::result::Result<HeaderIndex, String> {
    #[derive(Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<u64>,
    }
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes)
        .map_err(|_| "file shorter than the 8-byte header length".to_string())?;
    let header_len = u64::from_le_bytes(len_bytes);
    let cap = cersa_loader::safetensors::MAX_HEADER_SIZE;
    if header_len > cap || header_len > file_len.saturating_sub(8) {
        return Err(format!(
            "header length {header_len} exceeds the file ({file_len} bytes) or the {cap}-byte cap"
        ));
    }
    let mut text = vec![0u8; header_len as usize];
    f.read_exact(&mut text).map_err(|e| e.to_string())?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let mut out = HeaderIndex::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(value)
            .map_err(|e| format!("tensor `{name}`: malformed header entry: {e}"))?;
        out.insert(name, (e.dtype, e.shape));
    }
    Ok(out)
}

/// The stored tensors a manifest entry implies: (name, dtype, shape).
fn expected_stored(
    name: &str,
    info: &TensorInfo,
) -> std::result::Result<Vec<(String, Dtype, Vec<u64>)>, String> {
    let shape = |s: &[usize]| s.iter().map(|&d| d as u64).collect::<Vec<_>>();
    match info.kind {
        TensorKind::Dense => Ok(vec![(
            name.to_string(),
            info.stored_dtype,
            shape(&info.shape),
        )]),
        TensorKind::Factored => {
            let [m, n] = info
                .matrix_shape
                .ok_or("factored without matrix_shape".to_string())?;
            let r = info.rank.ok_or("factored without rank".to_string())?;
            let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if info.shape.first() != Some(&m) || numel != m.checked_mul(n) {
                return Err(format!(
                    "matrix_shape [{m}, {n}] does not fit shape {:?}",
                    info.shape
                ));
            }
            if r == 0 || r > m.min(n) {
                return Err(format!("rank {r} outside 1..=min({m}, {n})"));
            }
            let (u, s, vt) = factor_names(name);
            Ok(vec![
                (u, info.stored_dtype, shape(&[m, r])),
                (s, Dtype::F32, shape(&[r])),
                (vt, info.stored_dtype, shape(&[r, n])),
            ])
        }
    }
}

/// Manifest entries ↔ shard headers. True when everything matched.
fn check_structure(
    manifest: &Manifest,
    headers: &BTreeMap<String, HeaderIndex>,
    report: &mut VerifyReport,
) -> bool {
    let before = report.failures.len();
    let mut claimed: BTreeSet<(String, String)> = BTreeSet::new();
    for (name, info) in &manifest.tensors {
        report.counts.tensors += 1;
        let expected = match expected_stored(name, info) {
            Ok(e) => e,
            Err(reason) => {
                report.failures.push(failure(
                    Check::Structure,
                    Some(MANIFEST_FILE),
                    Some(name),
                    reason,
                ));
                continue;
            }
        };
        let Some(header) = headers.get(&info.shard) else {
            report.failures.push(failure(
                Check::MissingTensor,
                Some(MANIFEST_FILE),
                Some(name),
                format!("shard {:?} is not in the shard list", info.shard),
            ));
            continue;
        };
        for (stored, dtype, shape) in expected {
            let file = Some(info.shard.as_str());
            match header.get(&stored) {
                None => {
                    let elsewhere: Vec<&str> = headers
                        .iter()
                        .filter(|(_, h)| h.contains_key(&stored))
                        .map(|(f, _)| f.as_str())
                        .collect();
                    let detail = if elsewhere.is_empty() {
                        "listed in the manifest but not stored".to_string()
                    } else {
                        format!(
                            "manifest says shard {:?}, stored in {elsewhere:?}",
                            info.shard
                        )
                    };
                    report.failures.push(failure(
                        Check::MissingTensor,
                        file,
                        Some(&stored),
                        detail,
                    ));
                }
                Some((found_dtype, found_shape)) => {
                    claimed.insert((info.shard.clone(), stored.clone()));
                    if found_dtype != dtype.as_str() || *found_shape != shape {
                        report.failures.push(expected_found(
                            failure(
                                Check::DtypeShape,
                                file,
                                Some(&stored),
                                "stored dtype/shape differ from the manifest".into(),
                            ),
                            format!("{dtype} {shape:?}"),
                            format!("{found_dtype} {found_shape:?}"),
                        ));
                    }
                }
            }
        }
    }
    for (file, header) in headers {
        for stored in header.keys() {
            if !claimed.contains(&(file.clone(), stored.clone())) {
                report.failures.push(failure(
                    Check::StrayTensor,
                    Some(file),
                    Some(stored),
                    "stored in a shard but not listed in the manifest".into(),
                ));
            }
        }
    }
    report.failures.len() == before
}

/// Every factor (U, σ, Vᵀ) holds finite values.
fn check_finite(ckpt: &Checkpoint, report: &mut VerifyReport) {
    let man = ckpt.manifest();
    let found: Vec<Failure> = man
        .tensors
        .par_iter()
        .filter(|(_, info)| info.kind == TensorKind::Factored)
        .flat_map_iter(|(name, info)| {
            let mut out = Vec::new();
            let Ok(TensorView::Factored(f)) = ckpt.get(name) else {
                return out;
            };
            let (un, sn, vn) = factor_names(name);
            for (stored, raw) in [(un, f.u), (sn, f.s), (vn, f.vt)] {
                let values = decode_f64(raw.dtype, raw.bytes).unwrap_or_default();
                let bad = values.iter().filter(|x| !x.is_finite()).count();
                if bad > 0 {
                    out.push(failure(
                        Check::NonFinite,
                        Some(&info.shard),
                        Some(&stored),
                        format!("{bad} non-finite value(s) of {}", values.len()),
                    ));
                }
            }
            out
        })
        .collect();
    report.failures.extend(found);
}

/// Outcome of comparing one manifest entry with the source.
enum Compared {
    RelError,
    Dense,
}

fn compare_source(
    ckpt: &Checkpoint,
    src: &dyn Source,
    report: &mut VerifyReport,
    progress: &(dyn Fn(usize, usize) + Sync),
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
            let r = compare_one(ckpt, src, &by_name, name, info);
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                total,
            );
            r
        })
        .collect::<Result<Vec<_>>>()?;
    for r in results {
        match r {
            Ok(Compared::RelError) => report.counts.rel_errors_compared += 1,
            Ok(Compared::Dense) => report.counts.dense_compared += 1,
            Err(f) => report.failures.push(f),
        }
    }
    src.check_unchanged()?;
    Ok(())
}

/// Compares one manifest entry with the source. Outer `Err`: reading the source failed;
/// inner `Err`: a failed check.
fn compare_one(
    ckpt: &Checkpoint,
    src: &dyn Source,
    by_name: &HashMap<&str, usize>,
    name: &str,
    info: &TensorInfo,
) -> Result<std::result::Result<Compared, Failure>> {
    let shard = Some(info.shard.as_str());
    let Some(&i) = by_name.get(name) else {
        return Ok(Err(failure(
            Check::SourceMismatch,
            Some(MANIFEST_FILE),
            Some(name),
            "in the manifest but not in the source".into(),
        )));
    };
    let meta = &src.tensors()[i];
    if meta.shape != info.shape {
        return Ok(Err(expected_found(
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
        TensorView::Dense(raw) => {
            let mut offset = 0usize;
            let mut first_diff: Option<usize> = None;
            let mut too_long = false;
            src.copy_dense(i, &mut |chunk| {
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
                return Ok(Err(expected_found(
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
                return Ok(Err(failure(
                    Check::DenseBytes,
                    shard,
                    Some(name),
                    format!("dense tensor bytes differ from the source (first at byte {k})"),
                )));
            }
            Ok(Ok(Compared::Dense))
        }
        TensorView::Factored(f) => {
            let Some(stored_rel) = info.rel_error else {
                return Ok(Err(failure(
                    Check::RelError,
                    Some(MANIFEST_FILE),
                    Some(name),
                    "factored tensor without rel_error".into(),
                )));
            };
            let data = src.read_float(i)?;
            let [m, n] = f.matrix_shape;
            let decode = |raw: cersa_loader::RawTensor<'_>| {
                decode_f64(raw.dtype, raw.bytes).unwrap_or_default()
            };
            let (u, s, vt) = (decode(f.u), decode(f.s), decode(f.vt));
            let rel = relative_error_f64(&data, m, n, &u, &s, &vt);
            let precision = meta.float.unwrap_or(Precision::F32);
            let tol = rel_error_tolerance(info.stored_dtype, precision, stored_rel);
            if !(rel.is_finite() && (rel - stored_rel).abs() <= tol) {
                return Ok(Err(expected_found(
                    failure(
                        Check::RelError,
                        Some(MANIFEST_FILE),
                        Some(name),
                        format!("recomputed ‖W−Ŵ‖_F/‖W‖_F differs from the manifest by more than {tol:.2e}"),
                    ),
                    format!("{rel:.6e} (recomputed)"),
                    format!("{stored_rel:.6e} (manifest)"),
                )));
            }
            Ok(Ok(Compared::RelError))
        }
    }
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
