//! Sharded PyTorch checkpoints (`pytorch_model.bin.index.json` + `pytorch_model-*.bin`, as
//! transformers 4.x wrote them; fixtures/pytorch/make_sharded_fixture.py): read from the
//! directory or the index, they store exactly what the same state dict stores from one
//! `pytorch_model.bin`, and every disagreement between index and shards is an error naming
//! the file and tensor, with exit 2 and no output.

use crate::util::*;
use cersa_loader::Checkpoint;
use std::path::Path;

const SHARDS: [&str; 3] = [
    "pytorch_model-00001-of-00003.bin",
    "pytorch_model-00002-of-00003.bin",
    "pytorch_model-00003-of-00003.bin",
];

#[test]
fn sharded_checkpoint_converts_like_the_single_file() {
    let dir = tmp();
    let whole = dir.path().join("whole");
    let want = convert_stored(&fixture("pytorch/sharded-whole"), &whole);
    assert!(
        want.iter().any(|t| t.0.ends_with(".cersa_u")),
        "something is factored"
    );
    let index = fixture("pytorch/sharded/pytorch_model.bin.index.json");
    for (i, src) in [fixture("pytorch/sharded"), index].iter().enumerate() {
        let out = dir.path().join(format!("out-{i}"));
        assert_eq!(convert_stored(src, &out), want, "from {}", src.display());
        let ckpt = Checkpoint::open(&out).unwrap();
        let m = ckpt.manifest();
        assert_eq!(m.source.format, "pytorch");
        let files: Vec<&str> = m.source.files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(files, SHARDS);
        assert_eq!(m.source.details["index"], "pytorch_model.bin.index.json");
        assert_eq!(m.source.details["layout"], "zip");
        let whole = Checkpoint::open(&whole).unwrap();
        assert_eq!(m.tensors.len(), whole.manifest().tensors.len());
    }
}

/// A copy of the sharded fixture in `dir`.
fn copy_fixture(dir: &Path) {
    for f in SHARDS.iter().chain(["pytorch_model.bin.index.json"].iter()) {
        std::fs::copy(fixture(&format!("pytorch/sharded/{f}")), dir.join(f)).unwrap();
    }
}

#[test]
fn index_and_shards_that_disagree_are_errors() {
    let dir = tmp();
    copy_fixture(dir.path());
    let index = dir.path().join("pytorch_model.bin.index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&index, v.to_string()).unwrap();
    };
    let map = |v: &mut serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
        v["weight_map"].as_object().unwrap().clone()
    };
    // A tensor the index puts in the wrong shard.
    edit(&|v| {
        let m = map(v);
        let (name, _) = m.iter().find(|(_, f)| *f == SHARDS[2]).unwrap();
        v["weight_map"][name.as_str()] = SHARDS[0].into();
    });
    convert_rejects(
        &index,
        &["index says pytorch_model-00001-of-00003.bin, but it is stored in"],
    );
    // A tensor stored in a shard that the index leaves out.
    edit(&|v| {
        let m = map(v);
        let (name, _) = m.iter().find(|(_, f)| *f == SHARDS[1]).unwrap();
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove(name.as_str());
    });
    convert_rejects(&index, &[SHARDS[1], "stored in the shard but missing from"]);
    // A shard name that leaves the directory.
    edit(&|v| {
        let m = map(v);
        let (name, _) = m.iter().next().unwrap();
        v["weight_map"][name.as_str()] = "../elsewhere.bin".into();
    });
    convert_rejects(dir.path(), &["must be relative and stay inside"]);
    // Not an index at all.
    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    convert_rejects(&index, &["not a checkpoint index", "weight_map"]);
    // A missing shard, found from the directory.
    std::fs::write(&index, &original).unwrap();
    std::fs::remove_file(dir.path().join(SHARDS[1])).unwrap();
    convert_rejects(dir.path(), &[SHARDS[1]]);
}

#[test]
fn safetensors_win_over_pytorch_files_in_one_directory() {
    // Hugging Face repos often hold both; the safetensors are read.
    let dir = tmp();
    copy_fixture(dir.path());
    write_f32(
        &dir.path().join("model.safetensors"),
        &[("a.weight", vec![8, 6], noise(1, 48))],
    );
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(dir.path()), s(&out), "-q"]);
    let ckpt = Checkpoint::open(&out).unwrap();
    assert_eq!(ckpt.manifest().source.format, "safetensors");
    assert_eq!(ckpt.manifest().tensors.len(), 1);
}
