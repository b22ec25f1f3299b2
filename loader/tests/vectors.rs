//! The CERSA v1 test vectors of `formats/vectors/` (spec §7), written by
//! `formats/vectors/make_vectors.py` independently of this crate's writer.

use cersa_loader::{validate, Checkpoint, Error, IssueKind, OpenOptions, TensorView};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn vectors(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../formats/vectors")
        .join(kind);
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn open(dir: &Path) -> cersa_loader::Result<Checkpoint> {
    Checkpoint::open_with(
        dir,
        OpenOptions {
            verify_checksums: true,
        },
    )
}

/// `expected_issues.json` of an invalid vector (see `make_vectors.py`).
#[derive(Deserialize)]
struct ExpectedIssues {
    validate: Vec<IssueKind>,
    open: Option<FirstIssue>,
}

#[derive(Deserialize)]
struct FirstIssue {
    kind: IssueKind,
    file: String,
    tensor: Option<String>,
}

#[test]
fn invalid_vectors_give_exactly_their_expected_issues() {
    let cases = vectors("invalid");
    assert!(cases.len() >= 30, "only {} invalid vectors", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case.join("expected_issues.json"))
            .unwrap_or_else(|e| panic!("{}: expected_issues.json: {e}", case.display()));
        let expected: ExpectedIssues = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: expected_issues.json: {e}", case.display()));
        let name = case.display();
        match std::panic::catch_unwind(|| validate(case)) {
            Err(_) => failures.push(format!("{name}: validate panicked")),
            Ok(issues) => {
                let kinds: Vec<IssueKind> = issues.iter().map(|i| i.kind).collect();
                if kinds != expected.validate {
                    failures.push(format!(
                        "{name}: validate gave {kinds:?}, expected {:?}\n{issues:#?}",
                        expected.validate
                    ));
                }
            }
        }
        match (std::panic::catch_unwind(|| open(case)), &expected.open) {
            (Err(_), _) => failures.push(format!("{name}: reader panicked")),
            (Ok(Ok(_)), None) => {}
            (Ok(Ok(_)), Some(_)) => failures.push(format!("{name}: opened without error")),
            (Ok(Err(e)), None) => failures.push(format!("{name}: open failed: {e}")),
            (Ok(Err(Error::Invalid { issue, .. })), Some(want)) => {
                let msg = issue.to_string();
                if issue.kind != want.kind || issue.file != want.file || issue.tensor != want.tensor
                {
                    failures.push(format!(
                        "{name}: open stopped at {:?} in {} (tensor {:?}), expected {:?} in {} \
                         (tensor {:?}): {msg}",
                        issue.kind, issue.file, issue.tensor, want.kind, want.file, want.tensor
                    ));
                }
                // The message says where: the file, and the tensor where there is one.
                let tensor = want.tensor.as_deref().map(|t| format!("`{t}`"));
                for part in [Some(want.file.clone()), tensor].into_iter().flatten() {
                    if !msg.contains(&part) {
                        failures.push(format!("{name}: message {msg:?} lacks {part:?}"));
                    }
                }
            }
            (Ok(Err(e)), Some(_)) => failures.push(format!("{name}: not an issue: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_vectors_have_no_issue() {
    for case in &vectors("valid") {
        let issues = validate(case);
        assert!(issues.is_empty(), "{}: {issues:#?}", case.display());
    }
}

#[test]
fn valid_vectors_reconstruct_to_expected_values() {
    let cases = vectors("valid");
    assert!(cases.len() >= 3);
    for case in &cases {
        let ckpt = open(case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let text = std::fs::read_to_string(case.join("expected.json")).expect("expected.json");
        let expected: Value = serde_json::from_str(&text).expect("expected.json parses");
        let tensors = expected["tensors"].as_object().expect("tensors object");
        let names: Vec<&str> = ckpt.names().collect();
        let mut want: Vec<&str> = tensors.keys().map(String::as_str).collect();
        want.sort();
        assert_eq!(names, want, "{}", case.display());
        for (name, e) in tensors {
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            let values: Vec<f64> = e["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().expect("number"))
                .collect();
            let got: Vec<f32> = if shape.len() >= 2 {
                let m = ckpt.reconstruct(name).expect("reconstruct");
                assert_eq!(m.rows, shape[0], "{name}");
                assert_eq!(m.rows * m.cols, values.len(), "{name}");
                m.data
            } else {
                match ckpt.get(name).expect("get") {
                    TensorView::Dense(t) => t.to_f32().expect("float tensor"),
                    _ => panic!("{name}: 1-D tensor stored factored"),
                }
            };
            assert_eq!(got.len(), values.len(), "{}: {name}", case.display());
            let scale = values.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&values).enumerate() {
                // f32 accumulation in the reader vs numpy f64 on the same stored values.
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-5 * scale,
                    "{}: {name}[{i}] = {g}, numpy says {w}",
                    case.display()
                );
            }
            let kind = e["kind"].as_str().expect("kind");
            let stored_kind = match ckpt.get(name).expect("get") {
                TensorView::Dense(_) => "dense",
                TensorView::Factored(_) => "factored",
                TensorView::Experts(_) => "experts",
            };
            assert_eq!(stored_kind, kind, "{name}");
        }
    }
}

/// A copy of valid vector `case` in a temporary directory.
fn copy_of(case: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(case).expect("vector dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().expect("file name");
        std::fs::copy(&path, dir.path().join(name)).expect("copy");
    }
    dir
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Damaged copies of the valid vectors: `validate` never panics, and `open` (with
    /// checksums) stops at exactly the first issue `validate` lists.
    #[test]
    fn open_stops_at_the_first_issue_validate_lists(
        case in 0usize..4,
        file in 0usize..3,
        at in 0.0f64..1.0,
        edit in 0u8..3,
        byte in proptest::prelude::any::<u8>(),
    ) {
        let cases = vectors("valid");
        let dir = copy_of(&cases[case % cases.len()]);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .expect("copy")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.file_name().is_some_and(|n| n != "expected.json"))
            .collect();
        files.sort();
        let target = &files[file % files.len()];
        let mut bytes = std::fs::read(target).expect("read");
        let pos = ((bytes.len() as f64) * at) as usize;
        match edit {
            0 => bytes.truncate(pos),
            1 => {
                if let Some(b) = bytes.get_mut(pos) {
                    *b = byte;
                }
            }
            _ => bytes.insert(pos.min(bytes.len()), byte),
        }
        std::fs::write(target, &bytes).expect("write");
        let issues = validate(dir.path());
        let structural: Vec<_> = issues
            .iter()
            .filter(|i| i.kind != IssueKind::NonFiniteFactor)
            .collect();
        match open(dir.path()) {
            Ok(_) => proptest::prop_assert!(structural.is_empty(), "{issues:#?}"),
            Err(Error::Invalid { issue, .. }) => {
                proptest::prop_assert_eq!(Some(&*issue), issues.first(), "{:#?}", issues)
            }
            Err(e) => proptest::prop_assert!(false, "not an issue: {e}"),
        }
    }
}

#[test]
fn a_directory_without_manifest_is_one_issue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issues = validate(dir.path());
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(issues[0].kind, IssueKind::ManifestUnreadable);
    assert!(issues[0].kind.is_manifest_unusable());
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("cersa.json") && err.contains("is this a CERSA directory?"),
        "{err}"
    );
    // Issues serialize with the kebab-case kind the vectors use.
    let json = serde_json::to_value(&issues[0]).expect("serializes");
    assert_eq!(json["kind"], "manifest-unreadable");
}
