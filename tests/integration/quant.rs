//! `convert --dtype q8_0|q5_0|q4_0`: quantized factors (spec §2 "Quantized factors").
//! Bit-equality with gguf-py's quantizer and rel_error against numpy f64 are checked in
//! `tests/python/test_quant.py`; here: the same ranks as float factors, readers and
//! `verify` accept the output, the errors order by bits, and what an old reader sees.

use crate::util::*;
use cersa::inspect::CheckpointReport;
use cersa_loader::{Checkpoint, IssueKind, Quant, TensorView};

fn convert(dir: &std::path::Path, dtype: &str, threads: &str) -> std::path::PathBuf {
    let out = dir.join(format!("{dtype}-{threads}"));
    let src = fixture("minilm-excerpt/model.safetensors");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--dtype",
        dtype,
        "--threads",
        threads,
    ]);
    out
}

#[test]
fn quantized_factors_keep_ranks_and_pass_verify() {
    let dir = tmp();
    let f32_dir = convert(dir.path(), "f32", "2");
    let reference = Checkpoint::open(&f32_dir).unwrap();
    let mut mean_error = Vec::new();
    for (dtype, quant) in [
        ("q8_0", Quant::Q8_0),
        ("q5_0", Quant::Q5_0),
        ("q4_0", Quant::Q4_0),
    ] {
        let out = convert(dir.path(), dtype, "2");
        let ckpt = Checkpoint::open(&out).unwrap();
        let man = ckpt.manifest();
        assert_eq!(man.format_minor, 1);
        assert_eq!(man.config.dtype, dtype);
        assert!(cersa_loader::validate(&out).is_empty());
        let mut errors = Vec::new();
        for (name, info) in &man.tensors {
            let base = &reference.manifest().tensors[name];
            assert_eq!(info.kind, base.kind, "{name}");
            assert_eq!(info.rank, base.rank, "{name}");
            let TensorView::Factored(f) = ckpt.get(name).unwrap() else {
                assert_eq!(info.quant, None);
                continue;
            };
            assert_eq!(info.quant, Some(quant));
            let [m, n] = f.matrix_shape;
            let r = f.rank;
            assert_eq!(f.u.shape, [r, m.div_ceil(32) * quant.block_bytes()]);
            assert_eq!(f.vt.shape, [r, n.div_ceil(32) * quant.block_bytes()]);
            // Quantization adds to the truncation's error, never much at these bits.
            let (rel, base_rel) = (info.rel_error.unwrap(), base.rel_error.unwrap());
            assert!(
                rel >= base_rel - 1e-6 && rel < base_rel + 0.05,
                "{name}: {rel} {base_rel}"
            );
            errors.push(rel);
            // The dequantized factors are close to the float ones, column by column.
            let (u, _, vt) = f.values().unwrap();
            let TensorView::Factored(g) = reference.get(name).unwrap() else {
                unreachable!("same kind");
            };
            let (gu, _, gvt) = g.values().unwrap();
            let worst = u
                .iter()
                .zip(&gu)
                .chain(vt.iter().zip(&gvt))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = match quant {
                Quant::Q8_0 => 0.01,
                _ => 0.1,
            };
            assert!(worst < bound, "{name} {dtype}: {worst}");
            // apply() goes through the dequantized factors.
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).cos()).collect();
            assert_eq!(ckpt.apply(name, &x, 1).unwrap().len(), m);
        }
        mean_error.push(errors.iter().sum::<f64>() / errors.len() as f64);
        let verdict = cersa_ok(&["verify", s(&out), "--source", s(&fixture("minilm-excerpt"))]);
        assert!(verdict.contains("6 rel_error(s) recomputed"), "{verdict}");
        let report: CheckpointReport =
            serde_json::from_str(&cersa_ok(&["inspect", s(&out), "--json"])).unwrap();
        for t in report.tensors.iter().filter(|t| t.rank.is_some()) {
            assert_eq!(t.stored_dtype, quant.as_str());
            let share = t.rounding_share.unwrap();
            assert!((0.0..1.0).contains(&share), "{}: {share}", t.name);
        }
    }
    assert!(mean_error[0] < mean_error[1] && mean_error[1] < mean_error[2]);
}

#[test]
fn quantized_output_is_identical_for_any_thread_count() {
    let dir = tmp();
    let one = convert(dir.path(), "q4_0", "1");
    let two = convert(dir.path(), "q4_0", "2");
    for file in ["cersa.json", "cersa-00001-of-00001.safetensors"] {
        assert_eq!(
            std::fs::read(one.join(file)).unwrap(),
            std::fs::read(two.join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn a_reader_without_quant_support_refuses_rather_than_misreads() {
    // A 1.0 reader ignores the unknown `quant` field: drop it and the factored entries'
    // U8 stored_dtype breaks §2, so the checkpoint is refused, never read as floats.
    let dir = tmp();
    let out = convert(dir.path(), "q8_0", "2");
    let path = out.join("cersa.json");
    let mut man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for t in man["tensors"].as_object_mut().unwrap().values_mut() {
        t.as_object_mut().unwrap().remove("quant");
    }
    man.as_object_mut().unwrap().remove("format_minor");
    std::fs::write(&path, serde_json::to_vec_pretty(&man).unwrap()).unwrap();
    let issues = cersa_loader::validate(&out);
    assert!(!issues.is_empty());
    assert!(
        issues
            .iter()
            .all(|i| i.kind == IssueKind::FactorDtypeNotFloat),
        "{issues:?}"
    );
    let verdict = cersa(&["verify", s(&out)]);
    assert_eq!(verdict.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verdict.stdout);
    assert!(text.contains("U8"), "{text}");

    // A newer revision than this reader knows is refused with a clear error.
    man["format_minor"] = (cersa_loader::manifest::FORMAT_MINOR + 1).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&man).unwrap()).unwrap();
    let err = cersa_loader::Checkpoint::open(&out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("newer"), "{err}");
}

#[test]
fn per_module_rules_choose_ranks_first_match_first() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let out = dir.path().join("rules");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--energy",
        "*attention.self*=0.95",
        "--rank",
        "*attention.self.query*=8",
        "--energy",
        "0.8",
        "--rank",
        "*intermediate*=16",
    ]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let man = ckpt.manifest();
    assert_eq!(man.config.energy, 0.8);
    assert_eq!(
        man.config.rules,
        [
            "--energy *attention.self*=0.95",
            "--rank *attention.self.query*=8",
            "--rank *intermediate*=16"
        ]
    );
    // Independent reference: the numpy f64 ranks at each τ (fixtures/…/reference.json).
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("minilm-excerpt/reference.json")).unwrap())
            .unwrap();
    let numpy_rank = |name: &str, tau: &str| reference[name]["ranks"][tau]["rank"].as_u64();
    let mut seen = 0;
    for (name, t) in &man.tensors {
        if t.reason == Some(cersa_loader::DenseReason::NoSaving) {
            // τ = 0.95 needs more than the break-even rank 191 of a 384×384 matrix.
            assert!(name.contains("attention.self"), "{name}");
            assert!(numpy_rank(name, "0.95").unwrap() > 191, "{name}");
            seen += 1;
        }
        let Some(r) = t.rank else { continue };
        seen += 1;
        let (want_rule, want_rank) = if name.contains("attention.self") {
            // The query layer matches the first rule too: first match wins.
            (
                Some("--energy *attention.self*=0.95"),
                numpy_rank(name, "0.95"),
            )
        } else if name.contains("intermediate") {
            (Some("--rank *intermediate*=16"), Some(16))
        } else {
            (None, numpy_rank(name, "0.8"))
        };
        assert_eq!(t.rule.as_deref(), want_rule, "{name}");
        assert_eq!(Some(r as u64), want_rank, "{name}");
    }
    assert_eq!(seen, 6);
    let err = cersa_fails(
        &[
            "convert",
            s(&src),
            s(&dir.path().join("x")),
            "--energy",
            "0.9",
            "--energy",
            "0.8",
        ],
        2,
    );
    assert!(err.contains("twice"), "{err}");
    let err = cersa_fails(
        &[
            "convert",
            s(&src),
            s(&dir.path().join("y")),
            "--rank",
            "*q*",
        ],
        2,
    );
    assert!(err.contains("GLOB=VALUE"), "{err}");
}
