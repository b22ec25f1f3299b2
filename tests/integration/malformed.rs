//! Malformed safetensors sources and awkward weights through the real binary: every case
//! exits 2 with an error naming the file, the tensor (where there is one) and the cause,
//! without a panic and without leaving an output (or partial output) directory behind.
//! Bytes are assembled by hand here, not with our writer.

use crate::util::*;
use cersa_loader::{Checkpoint, DenseReason, TensorKind};
use std::path::Path;

/// A safetensors file from a raw header (not padded) and data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

/// Every entry in `dir`, for "nothing left behind" messages.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Converts `bytes` (written as `model.safetensors`) and asserts a clean failure whose
/// message contains every string of `expect` and the source file name.
fn assert_rejected(case: &str, bytes: &[u8], expect: &[&str]) {
    let dir = tmp();
    let src = dir.path().join("model.safetensors");
    std::fs::write(&src, bytes).unwrap();
    let out = dir.path().join("out");
    let stderr = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(!stderr.contains("panicked"), "{case}: panic: {stderr}");
    assert!(stderr.contains("model.safetensors"), "{case}: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "{case}: {e:?} not in {stderr}");
    }
    assert_eq!(
        listing(dir.path()),
        vec!["model.safetensors".to_string()],
        "{case}: output left behind"
    );
}

const X8: &str = r#""x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;

#[test]
fn malformed_safetensors_sources_are_rejected() {
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty file", vec![], vec!["too short"]),
        ("truncated length", vec![8, 0, 0], vec!["too short"]),
        (
            "header length beyond file",
            {
                let mut v = 4096u64.to_le_bytes().to_vec();
                v.extend(b"{}");
                v
            },
            vec!["past the end"],
        ),
        (
            "header over cap",
            {
                let mut v = (200u64 << 20).to_le_bytes().to_vec();
                v.extend(b"{}      ");
                v
            },
            vec!["exceeds the 100000000-byte cap"],
        ),
        (
            "header length u64::MAX",
            {
                let mut v = u64::MAX.to_le_bytes().to_vec();
                v.extend(b"{}      ");
                v
            },
            vec!["exceeds the"],
        ),
        (
            "truncated JSON",
            raw_file(r#"{"x":{"dtype":"F32","#, &[]),
            vec!["not valid JSON"],
        ),
        (
            "header is an array",
            raw_file("[1,2]", &[]),
            vec!["not valid JSON"],
        ),
        (
            "metadata not a string map",
            raw_file(r#"{"__metadata__":{"a":1}}"#, &[]),
            vec!["not valid JSON"],
        ),
        (
            "entry missing data_offsets",
            raw_file(r#"{"x":{"dtype":"F32","shape":[2]}}"#, &[0; 8]),
            vec!["not valid JSON", "x", "data_offsets"],
        ),
        (
            "offsets out of bounds",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "outside the 8-byte data section"],
        ),
        (
            "begin after end",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "outside"],
        ),
        (
            "overlapping tensors",
            raw_file(
                &format!(r#"{{{X8},"y":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#),
                &[0; 12],
            ),
            vec!["`y`", "contiguous"],
        ),
        (
            "gap between tensors",
            raw_file(
                &format!(r#"{{{X8},"y":{{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}}}"#),
                &[0; 16],
            ),
            vec!["`y`", "data starts at 12, expected 8"],
        ),
        (
            "data not covered",
            raw_file(&format!("{{{X8}}}"), &[0; 20]),
            vec!["12 bytes after the last tensor"],
        ),
        (
            "dtype-size mismatch",
            raw_file(
                r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "span 8 bytes but dtype and shape need 4"],
        ),
        (
            "shape product overflow",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "overflows"],
        ),
        (
            "byte size overflow",
            raw_file(
                r#"{"x":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "overflows"],
        ),
        (
            "negative dimension",
            raw_file(
                r#"{"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["not valid JSON", "x"],
        ),
        (
            "duplicate names",
            raw_file(
                &format!(r#"{{{X8},"x":{{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}}}"#),
                &[0; 16],
            ),
            vec!["`x` appears twice"],
        ),
        (
            "unknown dtype",
            raw_file(
                r#"{"x":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["`x`", "unsupported dtype `Q4_K`"],
        ),
    ];
    assert!(cases.len() >= 20);
    for (case, bytes, expect) in &cases {
        assert_rejected(case, bytes, expect);
    }
}

#[test]
fn index_naming_a_file_outside_the_directory_is_rejected() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a.weight":"../secret.safetensors"}}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let stderr = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(
        stderr.contains("must be relative and stay inside"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Non-finite values in a selected matrix: exit 2, naming file, tensor and value.
#[test]
fn non_finite_weights_in_each_float_dtype_fail() {
    // F32 +Inf, F16 NaN (0x7e00), BF16 -Inf (0xff80), F64 NaN.
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "F32",
            "inf",
            {
                let mut v: Vec<u8> = noise(1, 16).iter().flat_map(|x| x.to_le_bytes()).collect();
                v[20..24].copy_from_slice(&f32::INFINITY.to_le_bytes());
                v
            },
            "inf at flat index 5",
        ),
        (
            "F16",
            "nan",
            {
                let mut v = [0x00u8, 0x3c].repeat(16);
                v[6..8].copy_from_slice(&[0x00, 0x7e]);
                v
            },
            "NaN at flat index 3",
        ),
        (
            "BF16",
            "-inf",
            {
                let mut v = [0x80u8, 0x3f].repeat(16);
                v[0..2].copy_from_slice(&[0x80, 0xff]);
                v
            },
            "-inf at flat index 0",
        ),
        (
            "F64",
            "nan",
            {
                let mut v: Vec<u8> = (0..16).flat_map(|i| (i as f64).to_le_bytes()).collect();
                v[120..128].copy_from_slice(&f64::NAN.to_le_bytes());
                v
            },
            "NaN at flat index 15",
        ),
    ];
    for (dtype, what, data, expect) in cases {
        let header = format!(
            r#"{{"bad.weight":{{"dtype":"{dtype}","shape":[4,4],"data_offsets":[0,{}]}}}}"#,
            data.len()
        );
        let dir = tmp();
        let src = dir.path().join("model.safetensors");
        std::fs::write(&src, raw_file(&header, &data)).unwrap();
        let out = dir.path().join("out");
        let stderr = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
        assert!(
            stderr.contains("model.safetensors"),
            "{dtype} {what}: {stderr}"
        );
        assert!(stderr.contains("`bad.weight`"), "{dtype} {what}: {stderr}");
        assert!(stderr.contains("non-finite"), "{dtype} {what}: {stderr}");
        assert!(stderr.contains(expect), "{dtype} {what}: {stderr}");
        assert_eq!(listing(dir.path()), vec!["model.safetensors".to_string()]);
    }
}

/// All-zero, 1×1 and zero-sized matrices are valid input: stored dense with the right
/// reason, byte-identical, and the checkpoint opens.
#[test]
fn degenerate_matrices_are_stored_dense() {
    let dir = tmp();
    let src = dir.path().join("model.safetensors");
    let header = concat!(
        r#"{"empty.weight":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"#,
        r#""empty2.weight":{"dtype":"F32","shape":[3,0,2],"data_offsets":[0,0]},"#,
        r#""one.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"#,
        r#""zero.weight":{"dtype":"F32","shape":[8,8],"data_offsets":[4,260]}}"#
    );
    let mut data = 2.5f32.to_le_bytes().to_vec();
    data.extend([0u8; 256]);
    std::fs::write(&src, raw_file(header, &data)).unwrap();
    let out = dir.path().join("out");
    // force_factor must not factor a zero matrix either.
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--force-factor"]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let m = ckpt.manifest();
    let reason = |n: &str| {
        let t = &m.tensors[n];
        assert_eq!(t.kind, TensorKind::Dense, "{n}");
        t.reason
    };
    assert_eq!(reason("empty.weight"), Some(DenseReason::Zero));
    assert_eq!(reason("empty2.weight"), Some(DenseReason::Zero));
    assert_eq!(reason("zero.weight"), Some(DenseReason::Zero));
    // 1×1 with force_factor is factored (rank 1); without it, no saving.
    assert_eq!(m.tensors["one.weight"].kind, TensorKind::Factored);
    let w = ckpt.reconstruct("one.weight").unwrap();
    assert_eq!(w.data, vec![2.5]);
    let out2 = dir.path().join("out2");
    cersa_ok(&["convert", s(&src), s(&out2), "-q"]);
    let ckpt = Checkpoint::open(&out2).unwrap();
    assert_eq!(
        ckpt.manifest().tensors["one.weight"].reason,
        Some(DenseReason::NoSaving)
    );
    let z = ckpt.reconstruct("zero.weight").unwrap();
    assert_eq!((z.rows, z.cols), (8, 8));
    assert!(z.data.iter().all(|v| *v == 0.0));
    assert_eq!(ckpt.reconstruct("empty2.weight").unwrap().data.len(), 0);
}
