//! `--algorithm lapack` (cargo feature `lapack`): byte-identical output for any `--threads`
//! with the feature (OpenBLAS pinned to one thread per call), a clear error without it.

#[cfg(not(feature = "lapack"))]
use crate::util::cersa_fails;
#[cfg(feature = "lapack")]
use crate::util::cersa_ok;
use crate::util::{fixture, s, tmp};

#[cfg(feature = "lapack")]
#[test]
fn lapack_output_is_identical_for_threads_1_and_2() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("t{threads}"));
        cersa_ok(&[
            "convert",
            s(&src),
            s(&out),
            "--algorithm",
            "lapack",
            "--threads",
            threads,
            "-q",
        ]);
        let manifest = std::fs::read_to_string(out.join("cersa.json")).expect("manifest");
        assert!(manifest.contains("\"lapack\""), "algorithm recorded");
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .expect("out dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(files.len() >= 2, "manifest and at least one shard");
        outputs.push(
            files
                .iter()
                .map(|f| {
                    (
                        f.file_name().map(|n| n.to_owned()),
                        std::fs::read(f).expect("read"),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        outputs[0] == outputs[1],
        "--threads 2 output differs from --threads 1"
    );
}

#[cfg(not(feature = "lapack"))]
#[test]
fn lapack_without_the_feature_is_a_clear_error() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let err = cersa_fails(
        &[
            "convert",
            s(&src),
            s(&dir.path().join("out")),
            "--algorithm",
            "lapack",
            "-q",
        ],
        2,
    );
    assert!(err.contains("feature `lapack`"), "{err}");
    // Nothing that looks like a finished output is left behind.
    assert!(!dir.path().join("out/cersa.json").exists());
}
