//! The CERSA v1 test vectors of `formats/vectors/` (spec §6), written by
//! `formats/vectors/make_vectors.py` independently of this crate's writer.

use cersa_loader::{Checkpoint, OpenOptions, TensorView};
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

#[test]
fn invalid_vectors_give_their_expected_error() {
    let cases = vectors("invalid");
    assert!(cases.len() >= 30, "only {} invalid vectors", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let expected =
            std::fs::read_to_string(case.join("expected_error.txt")).expect("expected_error.txt");
        let lines: Vec<&str> = expected.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !lines.is_empty(),
            "{}: empty expected_error.txt",
            case.display()
        );
        match std::panic::catch_unwind(|| open(case)) {
            Err(_) => failures.push(format!("{}: reader panicked", case.display())),
            Ok(Ok(_)) => failures.push(format!("{}: opened without error", case.display())),
            Ok(Err(e)) => {
                let msg = e.to_string();
                for line in &lines {
                    if !msg.contains(line) {
                        failures.push(format!(
                            "{}: error {msg:?} does not contain {line:?}",
                            case.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
                    TensorView::Factored(_) => panic!("{name}: 1-D tensor stored factored"),
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
            let is_factored = matches!(ckpt.get(name).expect("get"), TensorView::Factored(_));
            assert_eq!(is_factored, kind == "factored", "{name}");
        }
    }
}
