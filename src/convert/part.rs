//! Partitioned conversion (`convert --part I/N`): each part converts a deterministic share
//! of the source's tensors into a CERSA directory of its own, with a `cersa-part.json`
//! record; [`crate::assemble`] joins the parts into the bytes one run would have written.
//!
//! The share is the same on every node for the same source and options: tensors are
//! dealt out longest-first (by estimated work) to the least-loaded part, ties broken by
//! source order and part index, so no node needs to talk to another.

use crate::error::{ConvertError, Result};
use crate::input::{Catalog, FloatData, Source};
use crate::select::Selection;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

use super::ConvertOptions;

/// File name of the part record inside a part directory.
pub const PART_FILE: &str = "cersa-part.json";
/// Value of the record's `format` field.
pub const PART_FORMAT: &str = "cersa-part";
/// Version of the record's layout.
pub const PART_VERSION: u32 = 1;
/// Cap on the record's size when it is read back (thousands of tensors are a few MB).
pub const MAX_PART_FILE_BYTES: u64 = 64 << 20;

/// Which share of a conversion a run does: part `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSpec {
    /// 0-based part index, below `count`.
    pub index: usize,
    /// Number of parts (≥ 1).
    pub count: usize,
}

impl std::fmt::Display for PartSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl PartSpec {
    /// A part, checked: `count ≥ 1` and `index < count`.
    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("the number of parts must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "part index {index} is not below the number of parts {count} (indices are 0-based)"
            ));
        }
        Ok(PartSpec { index, count })
    }

    /// Parses `I/N` (0-based I).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not I/N (e.g. 0/4) or `auto`"))?;
        let num = |s: &str, what: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{text:?}: {what} {s:?} is not a whole number"))
        };
        PartSpec::new(num(i, "part index")?, num(n, "number of parts")?)
    }

    /// The part of an array job, from the environment `get` reads.
    ///
    /// Slurm (`SLURM_ARRAY_TASK_ID` set): without `parts`, the whole array is the
    /// conversion: I = ID − `SLURM_ARRAY_TASK_MIN`, N = `SLURM_ARRAY_TASK_COUNT` (the array
    /// must be contiguous with step 1). With `parts`, task ids are part indices (I = ID,
    /// N = `parts`), so some tasks can be rerun alone (`sbatch --array=2,5`): such a
    /// submission is an array of its own whose count is not N. A one-task array that does
    /// not start at 0 is refused without `parts`, as it is most likely such a rerun.
    ///
    /// Kubernetes: I = `JOB_COMPLETION_INDEX`, N = `parts` (the Job's `completions`, which
    /// the pod is not told).
    pub fn from_env(
        get: &dyn Fn(&str) -> Option<String>,
        parts: Option<usize>,
    ) -> std::result::Result<Self, String> {
        let num = |key: &str| -> std::result::Result<Option<usize>, String> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{key}={v:?} is not a whole number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            if let Some(count) = parts {
                return PartSpec::new(id, count)
                    .map_err(|e| format!("SLURM_ARRAY_TASK_ID {id} with --parts {count}: {e}"));
            }
            let need = |key: &str| {
                num(key)?.ok_or_else(|| format!("SLURM_ARRAY_TASK_ID is set but {key} is not"))
            };
            let (min, count) = (
                need("SLURM_ARRAY_TASK_MIN")?,
                need("SLURM_ARRAY_TASK_COUNT")?,
            );
            let max = num("SLURM_ARRAY_TASK_MAX")?;
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
            if step != 1 || max.is_some_and(|max| max.checked_sub(min) != Some(count - 1)) {
                return Err(format!(
                    "the Slurm array is not contiguous (min {min}, max {}, step {step}, {count} \
                     tasks): submit it as --array=0-{} so task K converts part K, or give \
                     --parts N to use task ids as part indices",
                    max.map_or("?".into(), |m| m.to_string()),
                    count.saturating_sub(1)
                ));
            }
            if count == 1 && min != 0 {
                return Err(format!(
                    "a one-task Slurm array starting at {min} looks like a rerun of one part \
                     of a larger array: give --parts N (task ids are then part indices)"
                ));
            }
            let index = id.checked_sub(min).ok_or_else(|| {
                format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
            })?;
            return PartSpec::new(index, count);
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = parts.ok_or(
                "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): give the Job's \
                 completions as --parts N",
            )?;
            return PartSpec::new(index, count);
        }
        Err(
            "no array job in the environment (SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX \
             with --parts N); give --part I/N"
                .into(),
        )
    }
}

/// One source tensor as the part record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartTensor {
    /// Source name.
    pub name: String,
    /// Bytes in the source (for the manifest totals).
    pub source_bytes: u64,
    /// The part that converts it.
    pub part: usize,
}

/// `cersa-part.json`: which share of which run a part directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    /// Always [`PART_FORMAT`].
    pub format: String,
    /// Always [`PART_VERSION`].
    pub version: u32,
    /// This part's 0-based index.
    pub part: usize,
    /// Number of parts.
    pub parts: usize,
    /// sha256 of the run's identity: the options that shape the output, the producer
    /// version, the source's file names and sizes and its tensor table (names, shapes,
    /// dtypes). Parts of one run agree on it.
    pub run_sha256: String,
    /// Every source tensor in conversion order, with the part that converts it.
    pub tensors: Vec<PartTensor>,
}

impl PartRecord {
    /// Reads and checks `dir/cersa-part.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(PART_FILE);
        let bad = |reason: String| ConvertError::Source {
            path: path.clone(),
            reason,
        };
        let len = cersa_loader::regular::open_regular(&path)
            .and_then(|f| f.metadata())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => bad(
                    "missing: this is not a part directory (made by `cersa convert --part`)".into(),
                ),
                _ => ConvertError::io(&path, "open", e),
            })?
            .len();
        if len > MAX_PART_FILE_BYTES {
            return Err(bad(format!(
                "{len} bytes, above the cap of {MAX_PART_FILE_BYTES}"
            )));
        }
        let text = cersa_loader::regular::read_regular(&path)
            .map_err(|e| ConvertError::io(&path, "read", e))?;
        let record: PartRecord = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a cersa part record: {e}")))?;
        if record.format != PART_FORMAT || record.version != PART_VERSION {
            return Err(bad(format!(
                "format {:?} version {}, expected {PART_FORMAT:?} version {PART_VERSION}",
                record.format, record.version
            )));
        }
        if record.parts == 0 || record.part >= record.parts {
            return Err(bad(format!(
                "part {} of {} is not a valid part",
                record.part, record.parts
            )));
        }
        if let Some(t) = record.tensors.iter().find(|t| t.part >= record.parts) {
            return Err(bad(format!(
                "tensor `{}` is assigned to part {}, beyond the {} parts",
                t.name, t.part, record.parts
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(record.tensors.len());
        if let Some(t) = record
            .tensors
            .iter()
            .find(|t| !seen.insert(t.name.as_str()))
        {
            return Err(bad(format!("tensor `{}` is listed twice", t.name)));
        }
        Ok(record)
    }

    /// Writes the record into `dir` (synced).
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        let path = dir.join(PART_FILE);
        let json = serde_json::to_string_pretty(self).expect("a part record serializes") + "\n";
        let mut f =
            std::fs::File::create(&path).map_err(|e| ConvertError::io(&path, "create", e))?;
        f.write_all(json.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| ConvertError::io(&path, "write", e))
    }
}

/// Estimated work of converting each tensor, in arbitrary units (about nanoseconds on one
/// core): reading and writing its bytes, plus for a matrix that may be factored the Gram
/// product and symmetric eigensolver of the default route (2·m·n·k + 10·k³ flops, k =
/// min(m, n), at ~20 flops/ns).
fn work(src: &dyn Source, opts: &ConvertOptions, selection: &Selection) -> Vec<u128> {
    src.tensors()
        .iter()
        .map(|t| {
            let io = u128::from(t.source_bytes);
            let planned_dense = opts
                .plan
                .as_ref()
                .is_some_and(|p| matches!(p.get(&t.name), Some(None)));
            if t.float.is_none() || t.shape.len() < 2 || planned_dense {
                return io;
            }
            if selection.check(t).is_err() {
                return io;
            }
            let view = selection.view(t);
            let (m, n) = (view.m as u128, view.n as u128);
            let k = m.min(n);
            io + view.count() as u128 * (2 * m * n * k + 10 * k * k * k) / 20
        })
        .collect()
}

/// The part that converts each tensor of `src` (longest-processing-time-first dealing).
pub(crate) fn assign(
    src: &dyn Source,
    opts: &ConvertOptions,
    selection: &Selection,
    parts: usize,
) -> Vec<usize> {
    deal(&work(src, opts, selection), parts)
}

/// Deals tensors of the given work to `parts` parts: heaviest first, each to the part with
/// the least work so far (the lowest index among equals).
fn deal(work: &[u128], parts: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..work.len()).collect();
    // Heaviest first; equal work in source order.
    order.sort_by(|&a, &b| work[b].cmp(&work[a]).then(a.cmp(&b)));
    let mut load = vec![0u128; parts.max(1)];
    let mut owner = vec![0usize; work.len()];
    for i in order {
        let (lightest, _) = load
            .iter()
            .enumerate()
            .min_by(|(ia, a), (ib, b)| a.cmp(b).then(ia.cmp(ib)))
            .expect("at least one part");
        owner[i] = lightest;
        load[lightest] += work[i];
    }
    owner
}

/// sha256 of the run's identity (see [`PartRecord::run_sha256`]): the resume fingerprint
/// without the files' modification times, which differ between nodes that hold their own
/// copy of the source.
pub(crate) fn run_sha256(fingerprint: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let mut identity = fingerprint.clone();
    if let Some(files) = identity["source_files"].as_array_mut() {
        for f in files {
            if let Some(f) = f.as_object_mut() {
                f.remove("mtime_ns");
            }
        }
    }
    let text = serde_json::to_string(&identity).expect("JSON values serialize");
    cersa_loader::writer::hex(&Sha256::digest(text.as_bytes()))
}

/// A source seen through one part's share: the same files, only the tensors it owns,
/// in source order.
pub(crate) struct Subset<'a> {
    inner: &'a dyn Source,
    catalog: Catalog,
    /// Index in `inner` of each of this subset's tensors.
    map: Vec<usize>,
}

impl<'a> Subset<'a> {
    /// The tensors of `inner` whose owner is `part`.
    pub(crate) fn new(inner: &'a dyn Source, owner: &[usize], part: usize) -> Self {
        let map: Vec<usize> = (0..owner.len()).filter(|&i| owner[i] == part).collect();
        let whole = inner.catalog();
        let catalog = Catalog {
            format: whole.format,
            files: whole.files.clone(),
            paths: whole.paths.clone(),
            tensors: map.iter().map(|&i| whole.tensors[i].clone()).collect(),
        };
        Subset {
            inner,
            catalog,
            map,
        }
    }
}

impl Source for Subset<'_> {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }
    fn details(&self) -> BTreeMap<String, serde_json::Value> {
        self.inner.details()
    }
    fn gguf_metadata(&self) -> Option<Vec<u8>> {
        self.inner.gguf_metadata()
    }
    fn default_excludes(&self) -> &'static [&'static str] {
        self.inner.default_excludes()
    }
    fn read_float(&self, i: usize) -> Result<FloatData> {
        self.inner.read_float(self.map[i])
    }
    fn copy_dense(&self, i: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.inner.copy_dense(self.map[i], sink)
    }
    fn check_unchanged(&self) -> Result<()> {
        self.inner.check_unchanged()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parses_explicit_parts() {
        assert_eq!(PartSpec::parse("2/4"), Ok(PartSpec { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2", "1/2/3"] {
            assert!(PartSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_slurm_and_kubernetes_indices() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(
            PartSpec::from_env(&env(&slurm), None),
            Ok(PartSpec { index: 2, count: 4 })
        );
        // With --parts, task ids are part indices: a rerun of task 2 of 4 alone.
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "2"),
            ("SLURM_ARRAY_TASK_MAX", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert_eq!(
            PartSpec::from_env(&env(&rerun), Some(4)),
            Ok(PartSpec { index: 2, count: 4 })
        );
        assert!(PartSpec::from_env(&env(&rerun), None)
            .unwrap_err()
            .contains("--parts N"));
        assert!(PartSpec::from_env(&env(&slurm), Some(4)).is_err());
        let gapped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "6"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert!(PartSpec::from_env(&env(&gapped), None)
            .unwrap_err()
            .contains("not contiguous"));
        let k8s = [("JOB_COMPLETION_INDEX", "3")];
        assert_eq!(
            PartSpec::from_env(&env(&k8s), Some(8)),
            Ok(PartSpec { index: 3, count: 8 })
        );
        assert!(PartSpec::from_env(&env(&k8s), None)
            .unwrap_err()
            .contains("--parts"));
        assert!(PartSpec::from_env(&env(&k8s), Some(3)).is_err());
        assert!(PartSpec::from_env(&env(&[]), Some(3))
            .unwrap_err()
            .contains("no array job"));
    }

    #[test]
    fn dealing_balances_and_is_deterministic() {
        // 10, 9, 8, 7, 1, 1 over two parts: 10+7+1 = 18 and 9+8+1 = 18.
        let work = [1, 10, 8, 1, 9, 7];
        let owner = deal(&work, 2);
        assert_eq!(owner, [0, 0, 1, 1, 1, 0]);
        let load = |p| -> u128 { (0..6).filter(|&i| owner[i] == p).map(|i| work[i]).sum() };
        assert_eq!((load(0), load(1)), (18, 18));
        // More parts than tensors: the rest are empty; one part takes everything.
        assert_eq!(deal(&[3, 3], 4), [0, 1]);
        assert_eq!(deal(&work, 1), [0; 6]);
    }

    #[test]
    fn a_record_that_lies_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = PartRecord {
            format: PART_FORMAT.into(),
            version: PART_VERSION,
            part: 1,
            parts: 2,
            run_sha256: "0".repeat(64),
            tensors: vec![
                PartTensor {
                    name: "a".into(),
                    source_bytes: 4,
                    part: 0,
                },
                PartTensor {
                    name: "b".into(),
                    source_bytes: 4,
                    part: 1,
                },
            ],
        };
        good.write(dir.path()).unwrap();
        assert_eq!(PartRecord::read(dir.path()).unwrap(), good);
        let mut cases: Vec<(PartRecord, &str)> = Vec::new();
        let mut r = good.clone();
        r.tensors[1].name = "a".into();
        cases.push((r, "listed twice"));
        let mut r = good.clone();
        r.tensors[0].part = 2;
        cases.push((r, "beyond the 2 parts"));
        let mut r = good.clone();
        r.part = 2;
        cases.push((r, "not a valid part"));
        let mut r = good.clone();
        r.version = 2;
        cases.push((r, "version 2"));
        for (record, needle) in cases {
            record.write(dir.path()).unwrap();
            let err = PartRecord::read(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains(PART_FILE),
                "{needle}: {err}"
            );
        }
        std::fs::write(dir.path().join(PART_FILE), b"{\"format\": 1").unwrap();
        let err = PartRecord::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a cersa part record"), "{err}");
    }

    #[test]
    fn run_identity_ignores_modification_times_only() {
        let a = serde_json::json!({"energy": 0.9, "source_files": [{"file": "m", "bytes": 8, "mtime_ns": "1"}]});
        let mut b = a.clone();
        b["source_files"][0]["mtime_ns"] = "2".into();
        assert_eq!(run_sha256(&a), run_sha256(&b));
        b["source_files"][0]["bytes"] = 9.into();
        assert_ne!(run_sha256(&a), run_sha256(&b));
    }
}
