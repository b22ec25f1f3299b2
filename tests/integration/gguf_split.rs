//! Split GGUF models (llama.cpp `gguf-split`, gguf-py `split_max_*`): the parts read as one
//! model from any of them, give the same stored tensors as the unsplit file, and every
//! inconsistency between parts is an error naming the part, with exit 2 and no output.
//! (tests/python/test_gguf_split.py checks files split by gguf-py itself.)

use crate::util::*;
use cersa_loader::Checkpoint;
use std::path::Path;

/// `split.no`, `split.count` (u16) and `split.tensors.count` (i32), as gguf-py writes them.
fn split_kvs(no: u16, count: u16, total: i32) -> Vec<Kv> {
    vec![
        ("split.no", 2, no.to_le_bytes().to_vec()),
        ("split.count", 2, count.to_le_bytes().to_vec()),
        ("split.tensors.count", 5, total.to_le_bytes().to_vec()),
    ]
}

/// Four tensors: three matrices with a spread spectrum and a bias.
fn model() -> Vec<(&'static str, Vec<u64>, Vec<f32>)> {
    let matrix = |seed: u64, m: usize, n: usize| -> Vec<f32> {
        let w = noise(seed, m * n);
        (0..m * n).map(|i| w[i] / ((i % n) as f32 + 1.0)).collect()
    };
    vec![
        ("blk.0.attn_q.weight", vec![48, 32], matrix(1, 48, 32)),
        ("blk.0.attn_q.bias", vec![48], noise(2, 48)),
        ("blk.0.ffn_up.weight", vec![64, 32], matrix(3, 64, 32)),
        ("blk.1.attn_q.weight", vec![32, 40], matrix(4, 32, 40)),
    ]
}

/// Writes `model()` whole as `dir/whole.gguf` and split as `dir/m-0000i-of-00003.gguf`
/// (tensors 2 + 1 + 1, architecture keys in the first part only, as gguf-py does).
fn write_model(dir: &Path) {
    let t = model();
    let arch: Vec<Kv> = vec![("general.architecture", 8, gstr("llama"))];
    std::fs::write(dir.join("whole.gguf"), gguf_bytes(&arch, &t)).unwrap();
    let parts: [&[_]; 3] = [&t[..2], &t[2..3], &t[3..]];
    for (i, tensors) in parts.iter().enumerate() {
        let mut kvs = if i == 0 { arch.clone() } else { vec![] };
        kvs.extend(split_kvs(i as u16, 3, 4));
        let name = format!("m-{:05}-of-00003.gguf", i + 1);
        std::fs::write(dir.join(name), gguf_bytes(&kvs, tensors)).unwrap();
    }
}

#[test]
fn split_parts_convert_like_the_whole_file_from_any_part() {
    let dir = tmp();
    write_model(dir.path());
    let whole = dir.path().join("out-whole");
    let want = convert_stored(&dir.path().join("whole.gguf"), &whole);
    assert!(
        want.iter().any(|t| t.0.ends_with(".cersa_u")),
        "something is factored"
    );
    for part in [1, 3] {
        let src = dir.path().join(format!("m-{part:05}-of-00003.gguf"));
        let out = dir.path().join(format!("out-{part}"));
        assert_eq!(convert_stored(&src, &out), want, "from part {part}");
        let ckpt = Checkpoint::open(&out).unwrap();
        let m = ckpt.manifest();
        let files: Vec<&str> = m.source.files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "m-00001-of-00003.gguf",
                "m-00002-of-00003.gguf",
                "m-00003-of-00003.gguf"
            ]
        );
        assert_eq!(m.source.details["split_count"], 3);
        assert_eq!(m.source.details["architecture"], "llama");
        let whole_manifest = Checkpoint::open(&whole).unwrap();
        let whole_tensors = &whole_manifest.manifest().tensors;
        assert_eq!(m.tensors.len(), whole_tensors.len());
        for (name, info) in &m.tensors {
            let w = &whole_tensors[name];
            assert_eq!(
                (info.kind, info.rank, info.energy),
                (w.kind, w.rank, w.energy)
            );
        }
    }
    // inspect reads the split model too, with the whole file's ranks.
    let a = cersa_ok(&["inspect", s(&dir.path().join("whole.gguf")), "--json", "-q"]);
    let b = cersa_ok(&[
        "inspect",
        s(&dir.path().join("m-00002-of-00003.gguf")),
        "--json",
        "-q",
    ]);
    let ranks = |j: &str| -> Vec<(String, serde_json::Value)> {
        let v: serde_json::Value = serde_json::from_str(j).unwrap();
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap().to_string(), t["ranks"].clone()))
            .collect()
    };
    assert_eq!(ranks(&a), ranks(&b));
}

#[test]
fn missing_or_inconsistent_parts_are_errors_naming_the_part() {
    let dir = tmp();
    write_model(dir.path());
    let part = |i: usize| dir.path().join(format!("m-{i:05}-of-00003.gguf"));
    let t = model();

    // A part that is not there.
    let gone = dir.path().join("gone.gguf");
    std::fs::rename(part(2), &gone).unwrap();
    convert_rejects(
        &part(1),
        &[
            "m-00002-of-00003.gguf",
            "part 2 of 3 of the split model is missing",
        ],
    );
    std::fs::rename(&gone, part(2)).unwrap();

    // A part renamed out of the pattern: the others cannot be found.
    let odd = dir.path().join("first.gguf");
    std::fs::copy(part(1), &odd).unwrap();
    convert_rejects(
        &odd,
        &["first.gguf", "does not follow PREFIX-00001-of-00003.gguf"],
    );

    // A part whose keys disagree with its place.
    let keep = std::fs::read(part(3)).unwrap();
    std::fs::write(part(3), gguf_bytes(&split_kvs(2, 4, 4), &t[3..])).unwrap();
    convert_rejects(
        &part(1),
        &[
            "m-00003-of-00003.gguf",
            "expected part 3 of 3",
            "part 3 of 4",
        ],
    );
    std::fs::write(part(3), gguf_bytes(&[], &t[3..])).unwrap();
    convert_rejects(&part(1), &["m-00003-of-00003.gguf", "not a split part"]);

    // The same tensor in two parts.
    std::fs::write(part(3), gguf_bytes(&split_kvs(2, 3, 4), &t[2..3])).unwrap();
    convert_rejects(
        &part(1),
        &["m-00003-of-00003.gguf", "blk.0.ffn_up.weight", "also in"],
    );

    // A tensor count that the parts do not add up to.
    std::fs::write(part(3), gguf_bytes(&split_kvs(2, 3, 5), &t[3..])).unwrap();
    convert_rejects(&part(1), &["split.tensors.count says 5", "hold 4"]);
    std::fs::write(part(3), keep).unwrap();

    // split.no beyond split.count.
    std::fs::write(part(2), gguf_bytes(&split_kvs(3, 3, 4), &t[2..3])).unwrap();
    convert_rejects(
        &part(2),
        &["split.no 3 and split.count 3 do not name a part"],
    );
}

#[test]
fn a_directory_of_gguf_parts_points_to_the_file() {
    let dir = tmp();
    write_model(dir.path());
    std::fs::remove_file(dir.path().join("whole.gguf")).unwrap();
    let err = cersa_fails(&["inspect", s(dir.path()), "-q"], 2);
    assert!(
        err.contains("GGUF models are read from their .gguf file, or any part of a split one"),
        "{err}"
    );
}
