//! GGUF sources: convert and inspect on the committed fixtures (checked against the numpy
//! f64 references of `fixtures/gguf/make_gguf_fixtures.py`), and one malformed-file test
//! per guard of the header parser, each expecting its own error, exit 2 and no output.

use crate::util::*;
use cersa_loader::{Checkpoint, DenseReason, Dtype, TensorKind, TensorView};
use serde_json::Value;

fn reference(file: &str) -> Value {
    let text = std::fs::read_to_string(fixture("gguf/reference.json")).expect("reference.json");
    let all: Value = serde_json::from_str(&text).expect("reference parses");
    all[file].clone()
}

fn sigma(r: &Value) -> (Vec<f64>, f64) {
    let s = r["sigma"].as_array().expect("sigma");
    let s = s.iter().map(|v| v.as_f64().unwrap()).collect();
    (s, r["norm2"].as_f64().unwrap())
}

/// Rank equals the f64 reference, except ±1 where E(r) is within 1e-5 of τ.
fn assert_rank(name: &str, tau: f64, rank: usize, r: &Value) {
    let (s, norm2) = sigma(r);
    let e = |k: usize| s[..k].iter().map(|x| x * x).sum::<f64>() / norm2;
    let exact = (1..=s.len()).find(|&k| e(k) >= tau).unwrap_or(s.len());
    let boundary = rank.abs_diff(exact) == 1 && (e(rank.min(exact)) - tau).abs() < 1e-5;
    assert!(
        rank == exact || boundary,
        "{name} τ={tau}: rank {rank}, numpy f64 says {exact}"
    );
}

fn convert_fixture(file: &str, out: &std::path::Path, extra: &[&str]) -> Checkpoint {
    let src = fixture(&format!("gguf/{file}"));
    let mut args = vec!["convert", s(&src), s(out), "-q"];
    args.extend(extra);
    cersa_ok(&args);
    Checkpoint::open(out).expect("output validates")
}

#[test]
fn mixed_quant_fixture_converts_with_reference_ranks() {
    let dir = tmp();
    let out = dir.path().join("out");
    let ckpt = convert_fixture("minilm-mixed.gguf", &out, &["--energy", "0.9"]);
    let reference = reference("minilm-mixed.gguf");
    let m = ckpt.manifest();
    assert_eq!(m.source.format, "gguf");
    let d = &m.source.details;
    assert_eq!(d["gguf_version"], 3);
    assert_eq!(d["architecture"], "bert");
    assert_eq!(d["name"], "MiniLM excerpt (mixed)");
    assert_eq!(d["tensor_types"]["blk.0.attn_k.weight"], "Q4_1");
    assert_eq!(m.tensors.len(), 8);
    for (name, info) in &m.tensors {
        let r = &reference[name.as_str()];
        assert_eq!(info.source_dtype, r["type"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = serde_json::from_value(r["shape"].clone()).unwrap();
        assert_eq!(info.shape, shape, "{name}: row-major shape");
    }
    // Default GGUF excludes: token_embd*, *_norm*; 1-D biases are not matrices.
    let te = &m.tensors["token_embd.weight"];
    assert_eq!(
        (te.kind, te.reason),
        (TensorKind::Dense, Some(DenseReason::Excluded))
    );
    assert_eq!(te.stored_dtype, Dtype::F16);
    assert_eq!(te.shape, vec![2, 384]);
    assert_eq!(
        m.tensors["blk.0.attn_output_norm.weight"].kind,
        TensorKind::Dense
    );
    for q in ["attn_q", "attn_k", "attn_v", "attn_output"] {
        let name = format!("blk.0.{q}.weight");
        let info = &m.tensors[&name];
        assert_eq!(info.kind, TensorKind::Factored, "{name}");
        // Quantized sources: factors default to BF16.
        assert_eq!(info.stored_dtype, Dtype::BF16, "{name}");
        assert_rank(&name, 0.9, info.rank.unwrap(), &reference[name.as_str()]);
        let (s, norm2) = sigma(&reference[name.as_str()]);
        let e: f64 = s[..info.rank.unwrap()].iter().map(|x| x * x).sum::<f64>() / norm2;
        assert!((info.energy.unwrap() - e).abs() < 1e-5, "{name}: energy");
    }
    // Dense F32 bias: byte-identical to the MiniLM excerpt it was written from.
    let src = std::fs::read(fixture("minilm-excerpt/model.safetensors")).unwrap();
    let h = cersa_loader::safetensors::parse(&src).unwrap();
    let bias = h
        .tensors
        .iter()
        .find(|t| t.name == "encoder.layer.0.attention.self.query.bias")
        .unwrap();
    match ckpt.get("blk.0.attn_q.bias").unwrap() {
        TensorView::Dense(t) => assert_eq!(t.bytes, &src[h.file_range(bias)]),
        other => panic!("bias should be dense: {other:?}"),
    }
}

#[test]
fn v2_alignment_64_fixture_converts() {
    let dir = tmp();
    let out = dir.path().join("out");
    let ckpt = convert_fixture(
        "minilm-q8-align64-v2.gguf",
        &out,
        &["--energy", "0.9", "--threads", "2"],
    );
    let reference = reference("minilm-q8-align64-v2.gguf");
    let m = ckpt.manifest();
    assert_eq!(m.source.details["gguf_version"], 2);
    assert_eq!(m.source.details["alignment"], 64);
    for (name, dtype) in [
        ("blk.0.attn_q.weight", Dtype::BF16),
        ("blk.0.attn_v.weight", Dtype::F16),
        ("blk.0.attn_k.weight", Dtype::BF16),
    ] {
        let info = &m.tensors[name];
        assert_eq!(info.kind, TensorKind::Factored, "{name}");
        assert_eq!(info.stored_dtype, dtype, "{name}");
        assert_rank(name, 0.9, info.rank.unwrap(), &reference[name]);
    }
}

#[test]
fn kquant_fixture_inspect_matches_reference() {
    let json = cersa_ok(&[
        "inspect",
        s(&fixture("gguf/kquants.gguf")),
        "--json",
        "-q",
        "--energy",
        "0.5,0.8,0.9",
    ]);
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["format"], "gguf");
    let reference = reference("kquants.gguf");
    let tensors = report["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 6);
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        assert_eq!(t["dtype"], reference[name]["type"]);
        assert_eq!(t["shape"], serde_json::json!([8, 512]));
        for r in t["ranks"].as_array().unwrap() {
            let tau = r["threshold"].as_f64().unwrap();
            assert_rank(
                name,
                tau,
                r["rank"].as_u64().unwrap() as usize,
                &reference[name],
            );
        }
    }
}

#[test]
fn dtype_f32_dequantizes_dense_quantized_tensors_to_f32() {
    let dir = tmp();
    let out = dir.path().join("out");
    let ckpt = convert_fixture(
        "minilm-mixed.gguf",
        &out,
        &["--exclude", "*", "--dtype", "f32"],
    );
    let m = ckpt.manifest();
    assert_eq!(m.tensors["blk.0.attn_q.weight"].stored_dtype, Dtype::F32);
    // Non-quantized tensors keep their own dtype.
    assert_eq!(m.tensors["token_embd.weight"].stored_dtype, Dtype::F16);
}

// ---- malformed files -------------------------------------------------------------

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

/// Header fields of a GGUF file (magic, version, counts).
fn head(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend(version.to_le_bytes());
    v.extend(n_tensors.to_le_bytes());
    v.extend(n_kv.to_le_bytes());
    v
}

/// One tensor-info record.
fn tinfo(name: &str, ne: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut v = gstr(name);
    v.extend((ne.len() as u32).to_le_bytes());
    ne.iter().for_each(|d| v.extend(d.to_le_bytes()));
    v.extend(ty.to_le_bytes());
    v.extend(offset.to_le_bytes());
    v
}

/// A file with one 4x4 F32 tensor (type 0) described by `info`, data padded to 32.
fn one_tensor(info: Vec<u8>) -> Vec<u8> {
    let mut v = head(3, 1, 0);
    v.extend(info);
    while !v.len().is_multiple_of(32) {
        v.push(0);
    }
    v.extend([0x3f; 64]);
    v
}

/// Runs convert on `bytes` expecting exit 2, an error containing every `needle`, and no
/// output directory.
fn rejects(bytes: &[u8], needles: &[&str]) {
    let dir = tmp();
    let src = dir.path().join("bad.gguf");
    std::fs::write(&src, bytes).unwrap();
    let out = dir.path().join("out");
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(!out.exists(), "no output after an error");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the source is left: {left:?}");
    // inspect refuses the same file with the same error.
    let err = cersa_fails(&["inspect", s(&src), "-q"], 2);
    assert!(err.contains(needles[0]), "inspect: {err}");
}

#[test]
fn valid_minimal_file_is_accepted() {
    // The base of the malformed cases below is itself valid.
    let dir = tmp();
    let src = dir.path().join("ok.gguf");
    std::fs::write(&src, one_tensor(tinfo("a", &[4, 4], 0, 0))).unwrap();
    let json = cersa_ok(&["inspect", s(&src), "--json", "-q"]);
    assert!(json.contains("\"F32\""), "{json}");
}

#[test]
fn bad_magic() {
    let mut b = one_tensor(tinfo("a", &[4, 4], 0, 0));
    b[..4].copy_from_slice(b"GGUX");
    rejects(&b, &["not a GGUF file", "expected \"GGUF\""]);
    rejects(b"GG", &["not a GGUF file"]);
}

#[test]
fn bad_version() {
    let mut b = one_tensor(tinfo("a", &[4, 4], 0, 0));
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    rejects(&b, &["GGUF version 1 is not supported", "32-bit counts"]);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    rejects(
        &b,
        &["GGUF version 50331648 is not supported", "big-endian"],
    );
}

#[test]
fn string_length_bomb() {
    let mut b = head(3, 0, 1);
    b.extend((u64::MAX / 2).to_le_bytes());
    b.extend(b"general.name");
    rejects(
        &b,
        &["metadata key #0: string length 9223372036854775807 exceeds the cap"],
    );
    // Under the cap but beyond the file: truncated, not allocated.
    let mut b = head(3, 0, 1);
    b.extend(gstr("general.name"));
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 20).to_le_bytes());
    rejects(
        &b,
        &["file ends while reading value of metadata `general.name`"],
    );
}

#[test]
fn array_count_bomb() {
    let mut b = head(3, 0, 1);
    b.extend(gstr("tokenizer.ggml.scores"));
    b.extend(9u32.to_le_bytes()); // array
    b.extend(6u32.to_le_bytes()); // of f32
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 64]);
    rejects(
        &b,
        &["metadata `tokenizer.ggml.scores`: array of 1152921504606846976 elements cannot fit"],
    );
}

#[test]
fn tensor_count_beyond_file() {
    let mut b = head(3, 1 << 40, 0);
    b.extend(tinfo("a", &[4, 4], 0, 0));
    rejects(
        &b,
        &["header declares 1099511627776 tensors, but at most 1 can fit"],
    );
    let mut b = head(3, 0, u64::MAX);
    b.extend([0u8; 26]);
    rejects(&b, &["header declares 18446744073709551615 metadata pairs"]);
}

#[test]
fn dims_overflow() {
    let b = one_tensor(tinfo("big", &[1 << 32, 1 << 32, 1 << 32], 0, 0));
    rejects(&b, &["tensor `big`: dimensions", "overflow"]);
    let b = one_tensor(tinfo("deep", &[1, 1, 1, 1, 1], 0, 0));
    rejects(&b, &["tensor `deep`: 5 dimensions (GGUF allows at most 4)"]);
}

#[test]
fn offset_beyond_map() {
    let b = one_tensor(tinfo("a", &[4, 4], 0, 1 << 20));
    rejects(
        &b,
        &[
            "tensor `a`: data at offset 1048576",
            "lies outside the file",
        ],
    );
    // Size beyond the map: 64 bytes of data, 8x8 F32 needs 256.
    let b = one_tensor(tinfo("a", &[8, 8], 0, 0));
    rejects(
        &b,
        &[
            "tensor `a`: data at offset 0 (+256 bytes)",
            "outside the file",
        ],
    );
    let b = one_tensor(tinfo("a", &[4, 4], 0, u64::MAX - 31));
    rejects(&b, &["lies outside the file"]);
    let b = one_tensor(tinfo("a", &[4, 4], 0, 8));
    rejects(
        &b,
        &["tensor `a`: offset 8 is not a multiple of the alignment 32"],
    );
}

/// Two 4×4 F32 tensors `a` at offset 0 and `b` at `b_offset`, data for both plus 64 bytes.
fn two_tensors(b_offset: u64) -> Vec<u8> {
    let mut v = head(3, 2, 0);
    v.extend(tinfo("a", &[4, 4], 0, 0));
    v.extend(tinfo("b", &[4, 4], 0, b_offset));
    while !v.len().is_multiple_of(32) {
        v.push(0);
    }
    v.extend([0x3f; 192]);
    v
}

#[test]
fn tensors_must_lie_where_gguf_readers_put_them() {
    // Both tensors on the same bytes: refused (llama.cpp's reader refuses it too).
    rejects(
        &two_tensors(0),
        &[
            "tensor `b`: data offset 0",
            "puts it at 64",
            "would overlap the tensor before it",
        ],
    );
    // Half-overlapping, and a gap: refused as well.
    rejects(&two_tensors(32), &["tensor `b`: data offset 32", "overlap"]);
    rejects(
        &two_tensors(128),
        &["tensor `b`: data offset 128", "a gap before it"],
    );
    // At the running sum it converts.
    let dir = tmp();
    let src = dir.path().join("ok.gguf");
    std::fs::write(&src, two_tensors(64)).unwrap();
    cersa_ok(&["inspect", s(&src), "-q"]);
}

#[test]
fn unknown_type() {
    let b = one_tensor(tinfo("blk.0.attn_q.weight", &[256, 1], 41, 0));
    rejects(
        &b,
        &[
            "tensor `blk.0.attn_q.weight`: type Q1_0 (type id 41) is not supported",
            "Q4_K",
            "not selected for factoring",
        ],
    );
    let b = one_tensor(tinfo("x", &[4, 4], 999, 0));
    rejects(
        &b,
        &["tensor `x`: type unknown type id 999 is not supported"],
    );
    // A quantized row that is not whole blocks.
    let b = one_tensor(tinfo("x", &[16, 1], 2, 0));
    rejects(
        &b,
        &["row length 16 is not a multiple of the Q4_0 block size 32"],
    );
}

#[test]
fn bad_alignment_and_truncation() {
    let mut b = head(3, 0, 1);
    b.extend(gstr("general.alignment"));
    b.extend(4u32.to_le_bytes());
    b.extend(48u32.to_le_bytes());
    rejects(&b, &["general.alignment 48 must be a power of two"]);
    let b = head(3, 1, 0);
    rejects(&b, &["at most 0 can fit"]);
    let mut b = head(3, 1, 0);
    b.extend(tinfo("a", &[4, 4], 0, 0));
    b.truncate(b.len() - 3);
    rejects(&b, &["file ends while reading offset of tensor `a`"]);
}

#[test]
fn stacked_expert_weights_are_factored_per_expert_unless_excluded() {
    // A Mixtral-style GGUF layer: ffn_up_exps is [4 experts, 24, 16]; attn_q is 2-D.
    let dir = tmp();
    let src = dir.path().join("moe.gguf");
    let exps = noise(7, 4 * 24 * 16);
    let tensors = [
        ("blk.0.ffn_up_exps.weight", vec![4u64, 24, 16], exps.clone()),
        ("blk.0.attn_q.weight", vec![24, 16], noise(8, 24 * 16)),
    ];
    std::fs::write(&src, gguf_bytes(&[], &tensors)).unwrap();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--force-factor"]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let e = &ckpt.manifest().tensors["blk.0.ffn_up_exps.weight"];
    // One [24, 16] matrix per expert (never the [E, m·n] view), each factored (forced).
    assert_eq!(e.kind, TensorKind::Experts);
    assert_eq!(e.matrix_shape, Some([24, 16]));
    for k in 0..4 {
        let x = e.expert(k).unwrap();
        assert_eq!(x.kind, TensorKind::Factored, "expert {k}");
        assert!(x.rank.unwrap() <= 16);
    }
    assert_eq!(
        ckpt.manifest().tensors["blk.0.attn_q.weight"].kind,
        TensorKind::Factored
    );
    // Excluded, they stay dense and byte-identical.
    let out = dir.path().join("out-excluded");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--force-factor",
        "--exclude",
        "*_exps*",
    ]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let e = &ckpt.manifest().tensors["blk.0.ffn_up_exps.weight"];
    assert_eq!(
        (e.kind, e.reason),
        (TensorKind::Dense, Some(DenseReason::Excluded))
    );
    match ckpt.get("blk.0.ffn_up_exps.weight").unwrap() {
        TensorView::Dense(t) => {
            let want: Vec<u8> = exps.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(t.bytes, &want[..]);
        }
        other => panic!("expected dense: {other:?}"),
    }
}
