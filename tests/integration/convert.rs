//! `cersa convert` end to end, checked against the fixtures' numpy f64 references.

use crate::util::*;
use cersa_loader::{Checkpoint, DenseReason, Dtype, TensorKind, TensorView};
use serde_json::Value;
use std::collections::BTreeMap;

fn reference(rel: &str) -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(fixture(rel)).expect("reference.json");
    serde_json::from_str(&text).expect("reference parses")
}

/// Source tensors of a fixture as (dtype, shape, bytes).
fn source_tensors(rel: &str) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture(rel)).expect("fixture");
    let h = cersa_loader::safetensors::parse(&bytes).expect("fixture parses");
    h.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                (t.dtype, t.shape.clone(), bytes[h.file_range(t)].to_vec()),
            )
        })
        .collect()
}

/// Rank equals the f64 reference, except ±1 where E(r) is within 1e-5 of τ.
fn assert_rank_matches(name: &str, tau: f64, rank: usize, reference: &Value) {
    let sigma: Vec<f64> = reference["sigma"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let norm2 = reference["norm2"].as_f64().unwrap();
    let mut cum = 0.0;
    let mut exact = sigma.len();
    for (i, s) in sigma.iter().enumerate() {
        cum += s * s;
        if cum / norm2 >= tau {
            exact = i + 1;
            break;
        }
    }
    if rank != exact {
        let e = |r: usize| sigma[..r].iter().map(|s| s * s).sum::<f64>() / norm2;
        let boundary = rank.abs_diff(exact) == 1 && (e(rank.min(exact)) - tau).abs() < 1e-5;
        assert!(
            boundary,
            "{name} τ={tau}: rank {rank}, numpy f64 says {exact}"
        );
    }
}

#[test]
fn minilm_excerpt_matches_numpy_reference() {
    let dir = tmp();
    let reference = reference("minilm-excerpt/reference.json");
    let sources = source_tensors("minilm-excerpt/model.safetensors");
    for tau in ["0.5", "0.9", "0.95"] {
        let out = dir.path().join(format!("out-{tau}"));
        cersa_ok(&[
            "convert",
            s(&fixture("minilm-excerpt/model.safetensors")),
            s(&out),
            "--energy",
            tau,
            "-q",
        ]);
        let ckpt = Checkpoint::open(&out).expect("output validates");
        let tau: f64 = tau.parse().unwrap();
        let mut factored = 0;
        for (name, info) in &ckpt.manifest().tensors {
            let (dtype, shape, bytes) = &sources[name];
            assert_eq!(&info.shape, shape);
            match ckpt.get(name).unwrap() {
                TensorView::Dense(t) => {
                    assert_eq!(
                        t.bytes,
                        &bytes[..],
                        "{name}: dense tensors are byte-identical"
                    );
                    assert_eq!(t.dtype, *dtype);
                }
                TensorView::Factored(f) => {
                    factored += 1;
                    assert_rank_matches(name, tau, f.rank, &reference[name]);
                    let energy = info.energy.unwrap();
                    assert!(energy >= tau - 1e-6, "{name}: energy {energy} < τ {tau}");
                    // rel_error recomputed here from the stored factors and the source bytes.
                    let w = cersa_loader::dtype::decode_f32(*dtype, bytes).unwrap();
                    let what = ckpt.reconstruct(name).unwrap();
                    let num: f64 = w
                        .iter()
                        .zip(&what.data)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum();
                    let den: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
                    let rel = (num / den).sqrt();
                    assert!(
                        (rel - info.rel_error.unwrap()).abs() < 1e-4,
                        "{name}: {rel} vs manifest {}",
                        info.rel_error.unwrap()
                    );
                    // Dropping energy 1-E leaves exactly sqrt(1-E) relative error (Eckart–Young).
                    assert!(
                        (rel - (1.0 - energy).sqrt()).abs() < 1e-3,
                        "{name}: rel {rel} energy {energy}"
                    );
                }
                TensorView::Experts(_) => panic!("{name}: MiniLM has no experts"),
            }
        }
        assert!(
            factored >= if tau < 0.95 { 6 } else { 3 },
            "τ={tau}: only {factored} factored"
        );
    }
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let mut outputs = Vec::new();
    for threads in ["1", "2", "5", "8"] {
        let out = dir.path().join(format!("t{threads}"));
        cersa_ok(&[
            "convert",
            s(&src),
            s(&out),
            "--threads",
            threads,
            "--max-shard-size",
            "2MB",
            "-q",
        ]);
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() > 3, "several shards expected");
        outputs.push(
            files
                .iter()
                .map(|f| std::fs::read(f).unwrap())
                .collect::<Vec<_>>(),
        );
    }
    for (k, o) in outputs.iter().enumerate().skip(1) {
        assert!(o == &outputs[0], "output {k} differs from --threads 1");
    }
}

#[test]
fn mixed_dtypes_shapes_and_reasons() {
    let dir = tmp();
    let out = dir.path().join("out");
    let reference = reference("mixed/reference.json");
    cersa_ok(&[
        "convert",
        s(&fixture("mixed/model.safetensors")),
        s(&out),
        "-q",
    ]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let t = &ckpt.manifest().tensors;
    let kind = |n: &str| (t[n].kind, t[n].reason);
    assert_eq!(
        kind("layers.0.zero.weight"),
        (TensorKind::Dense, Some(DenseReason::Zero))
    );
    assert_eq!(
        kind("layers.0.row.weight"),
        (TensorKind::Dense, Some(DenseReason::NoSaving))
    );
    assert_eq!(
        kind("layers.0.f32.bias"),
        (TensorKind::Dense, Some(DenseReason::NotAMatrix))
    );
    assert_eq!(
        kind("layers.0.ids"),
        (TensorKind::Dense, Some(DenseReason::NonFloat))
    );
    assert_eq!(
        kind("layers.0.mask"),
        (TensorKind::Dense, Some(DenseReason::NonFloat))
    );
    assert_eq!(
        kind("embed_tokens.weight"),
        (TensorKind::Dense, Some(DenseReason::Excluded))
    );
    for (name, dtype) in [
        ("layers.0.f64.weight", Dtype::F64),
        ("layers.0.f32.weight", Dtype::F32),
        ("layers.0.f16.weight", Dtype::F16),
        ("layers.0.bf16.weight", Dtype::BF16),
        ("layers.0.conv.weight", Dtype::F32),
    ] {
        let info = &t[name];
        assert_eq!(info.kind, TensorKind::Factored, "{name}");
        assert_eq!(
            info.stored_dtype, dtype,
            "{name}: --dtype source keeps the dtype"
        );
        assert_rank_matches(name, 0.9, info.rank.unwrap(), &reference[name]);
    }
    assert_eq!(t["layers.0.conv.weight"].matrix_shape, Some([16, 72]));
    assert_eq!(t["layers.0.conv.weight"].shape, vec![16, 8, 3, 3]);

    // --dtype forces the factor dtype; --force-factor factors the 1×n row.
    let out2 = dir.path().join("out2");
    cersa_ok(&[
        "convert",
        s(&fixture("mixed/model.safetensors")),
        s(&out2),
        "--dtype",
        "bf16",
        "--force-factor",
        "-q",
    ]);
    let ckpt = Checkpoint::open(&out2).unwrap();
    let t = &ckpt.manifest().tensors;
    assert_eq!(t["layers.0.f64.weight"].stored_dtype, Dtype::BF16);
    assert_eq!(t["layers.0.row.weight"].kind, TensorKind::Factored);
    assert_eq!(t["layers.0.row.weight"].rank, Some(1));
}

#[test]
fn full_energy_keeps_full_rank_and_reconstructs() {
    let dir = tmp();
    let src = dir.path().join("m.safetensors");
    write_f32(&src, &[("a.weight", vec![12, 20], noise(7, 240))]);
    let out = dir.path().join("out");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "--energy",
        "1.0",
        "--force-factor",
        "-q",
    ]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let info = &ckpt.manifest().tensors["a.weight"];
    assert_eq!(info.rank, Some(12));
    assert!(info.rel_error.unwrap() < 1e-5, "{:?}", info.rel_error);
    let w = noise(7, 240);
    let what = ckpt.reconstruct("a.weight").unwrap();
    for (a, b) in w.iter().zip(&what.data) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn non_finite_weights_fail_without_output() {
    let dir = tmp();
    let src = dir.path().join("m.safetensors");
    let mut v = noise(1, 64);
    v[17] = f32::NAN;
    write_f32(
        &src,
        &[
            ("ok.weight", vec![8, 8], noise(2, 64)),
            ("bad.weight", vec![8, 8], v),
        ],
    );
    let out = dir.path().join("out");
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(
        err.contains("bad.weight") && err.contains("NaN") && err.contains("m.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only the source remains: {leftovers:?}");
    // Excluded, the same tensor is passed through unchanged.
    cersa_ok(&["convert", s(&src), s(&out), "--exclude", "bad*", "-q"]);
}

#[test]
fn existing_output_and_bad_flags_are_errors() {
    let dir = tmp();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let src = fixture("mixed/model.safetensors");
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");
    let out2 = dir.path().join("out2");
    for bad in [
        &["--energy", "0"][..],
        &["--energy", "1.5"],
        &["--rank-multiple", "0"],
        &["--max-shard-size", "12XB"],
        &["--min-rank", "9", "--max-rank", "3"],
    ] {
        let mut args = vec!["convert", s(&src), s(&out2)];
        args.extend_from_slice(bad);
        cersa_fails(&args, 2);
        assert!(!out2.exists());
    }
    let err = cersa_fails(
        &[
            "convert",
            s(&dir.path().join("missing.safetensors")),
            s(&out2),
        ],
        2,
    );
    assert!(err.contains("missing.safetensors"), "{err}");
}

#[test]
fn sharded_source_with_index() {
    let dir = tmp();
    let a = noise(3, 32 * 24);
    let b = noise(4, 24 * 40);
    write_f32(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[("l.0.q.weight", vec![32, 24], a.clone())],
    );
    write_f32(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[
            ("l.1.q.weight", vec![24, 40], b),
            ("l.1.q.bias", vec![24], noise(5, 24)),
        ],
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "l.0.q.weight": "model-00001-of-00002.safetensors",
        "l.1.q.weight": "model-00002-of-00002.safetensors",
        "l.1.q.bias": "model-00002-of-00002.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    for src in [
        dir.path().to_path_buf(),
        dir.path().join("model.safetensors.index.json"),
    ] {
        let out = tmp();
        let out = out.path().join("o");
        cersa_ok(&["convert", s(&src), s(&out), "--energy", "0.5", "-q"]);
        let ckpt = Checkpoint::open(&out).unwrap();
        let m = ckpt.manifest();
        assert_eq!(m.tensors.len(), 3);
        assert_eq!(m.source.files.len(), 2);
        assert_eq!(m.source.files[0].file, "model-00001-of-00002.safetensors");
    }
    // An index naming a tensor no shard holds is an error that names it.
    let index = serde_json::json!({"weight_map": {"ghost.weight": "model-00001-of-00002.safetensors", "l.0.q.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let out = dir.path().join("never");
    let err = cersa_fails(&["convert", s(dir.path()), s(&out), "-q"], 2);
    assert!(err.contains("ghost.weight"), "{err}");
}

#[test]
fn inspect_json_round_trips_into_typed_reports() {
    let src = fixture("minilm-excerpt/model.safetensors");
    let text = cersa_ok(&["inspect", s(&src), "--json", "-q", "--energy", "0.9,0.95"]);
    let report: cersa::inspect::SourceReport =
        serde_json::from_str(&text).expect("source report parses");
    assert_eq!(report.schema_version, cersa::inspect::SCHEMA_VERSION);
    assert_eq!(report.energies, vec![0.9, 0.95]);
    let reference = reference("minilm-excerpt/reference.json");
    let mut analysed = 0;
    for t in &report.tensors {
        if let Some(r) = t.ranks.first() {
            analysed += 1;
            assert_rank_matches(&t.name, 0.9, r.rank, &reference[&t.name]);
        }
    }
    assert_eq!(analysed, 6);
    assert_eq!(serde_json::to_string_pretty(&report).unwrap() + "\n", text);

    let dir = tmp();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let text = cersa_ok(&["inspect", s(&out), "--json"]);
    let report: cersa::inspect::CheckpointReport =
        serde_json::from_str(&text).expect("checkpoint report parses");
    assert_eq!(report.kind, "cersa");
    assert_eq!(report.tensors.len(), 18);
    let human = cersa_ok(&["inspect", s(&out), "--group", "none"]);
    assert!(human.contains("encoder.layer.0.intermediate.dense.weight"));
}

#[test]
fn convert_json_report_parses() {
    let dir = tmp();
    let out = dir.path().join("out");
    let text = cersa_ok(&[
        "convert",
        s(&fixture("mixed/model.safetensors")),
        s(&out),
        "--json",
        "-q",
    ]);
    let report: cersa::convert::ConvertReport = serde_json::from_str(&text).unwrap();
    assert_eq!(report.manifest, cersa_loader::read_manifest(&out).unwrap());
    assert!(report.param_ratio < 1.0);
}

#[test]
fn reserved_suffixes_in_source_names_are_rejected() {
    let dir = tmp();
    let src = dir.path().join("m.safetensors");
    write_f32(
        &src,
        &[
            ("x.weight", vec![4, 4], noise(1, 16)),
            ("x.weight.cersa_u", vec![4, 1], noise(2, 4)),
        ],
    );
    let out = dir.path().join("out");
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(
        err.contains("x.weight.cersa_u") && err.contains("reserved suffix"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Names in `dir`, sorted.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn second_run_replaces_a_cersa_directory_only_with_overwrite() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let first = std::fs::read(out.join("cersa.json")).unwrap();
    // The README's first command, run again: refused without the flag, output untouched.
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(out.join("cersa.json")).unwrap(), first);
    // With it, the new output replaces the old one, and no sibling is left behind.
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--overwrite",
        "--energy",
        "0.5",
    ]);
    let ckpt = Checkpoint::open(&out).expect("replaced output validates");
    assert_eq!(ckpt.manifest().config.energy, 0.5);
    assert_eq!(listing(dir.path()), ["out"]);
    // The same run twice gives the same bytes as a fresh one.
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--overwrite"]);
    assert_eq!(std::fs::read(out.join("cersa.json")).unwrap(), first);
    // A failing run leaves the previous output in place.
    let bad = dir.path().join("bad.safetensors");
    write_f32(
        &bad,
        &[("w.weight", vec![2, 2], vec![1.0, f32::NAN, 0.0, 1.0])],
    );
    cersa_fails(&["convert", s(&bad), s(&out), "-q", "--overwrite"], 2);
    assert_eq!(std::fs::read(out.join("cersa.json")).unwrap(), first);
    assert_eq!(listing(dir.path()), ["bad.safetensors", "out"]);
}

#[test]
fn overwrite_refuses_a_directory_that_is_not_cersa() {
    let dir = tmp();
    let src = fixture("mixed/model.safetensors");
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("keep.txt"), "x").unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("cersa.json"), r#"{"format": "something-else"}"#).unwrap();
    for out in [&mine, &other] {
        let err = cersa_fails(&["convert", s(&src), s(out), "-q", "--overwrite"], 2);
        assert!(err.contains("refusing to replace"), "{err}");
    }
    assert_eq!(listing(&mine), ["keep.txt"]);
    assert_eq!(std::fs::read_to_string(mine.join("keep.txt")).unwrap(), "x");
    assert_eq!(listing(&other), ["cersa.json"]);
    assert_eq!(listing(dir.path()), ["mine", "other"]);
}
