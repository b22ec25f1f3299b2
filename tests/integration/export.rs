//! `cersa export --to safetensors`: a plain safetensors model directory, the same bytes for
//! any thread count, shards with an index, dtypes as asked, and errors that leave nothing.

use crate::util::*;
use cersa::export::{ExportReport, EXPORT_REPORT_VERSION, INDEX_FILE};
use cersa_loader::adapter::{manifest_sha256, Adapter, Base, LayerInfo, Mode};
use cersa_loader::{Checkpoint, Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// (name → (dtype, shape)) of the safetensors files of an export, read by the safetensors
/// crate (an independent parser), and their total data bytes.
fn exported_sized(dir: &Path) -> (BTreeMap<String, (String, Vec<usize>)>, u64) {
    let mut total = 0;
    let mut out = BTreeMap::new();
    for (name, bytes) in contents(dir) {
        if !name.ends_with(".safetensors") {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (t, view) in st.tensors() {
            total += view.data().len() as u64;
            out.insert(t, (format!("{:?}", view.dtype()), view.shape().to_vec()));
        }
    }
    (out, total)
}

fn exported(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    exported_sized(dir).0
}

#[test]
fn export_is_thread_independent_sharded_and_typed() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let base = dir.path().join("base");
    cersa_ok(&["convert", s(&src), s(&base), "-q", "--dtype", "q8_0"]);
    let man = cersa_loader::read_manifest(&base).unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for (out, threads) in [(&one, "1"), (&two, "2")] {
        let json = cersa_ok(&[
            "export",
            s(&base),
            s(out),
            "--max-shard-size",
            "1MB",
            "--threads",
            threads,
            "--json",
            "-q",
        ]);
        let report: ExportReport = serde_json::from_str(&json).unwrap();
        assert_eq!(report.report_version, EXPORT_REPORT_VERSION);
        assert_eq!(report.tensors, man.tensors.len());
        assert!(report.files.len() > 2, "{:?}", report.files);
        assert_eq!(report.files.last().unwrap().file, INDEX_FILE);
    }
    assert_eq!(contents(&one), contents(&two), "bytes depend on --threads");
    // The index lists every tensor once, in an existing shard, and the total size.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join(INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), man.tensors.len());
    assert!(map
        .values()
        .all(|f| one.join(f.as_str().unwrap()).is_file()));
    let (tensors, total) = exported_sized(&one);
    assert_eq!(index["metadata"]["total_size"], total);
    // Names, shapes and dtypes of the source, though the factors were Q8_0.
    let source = std::fs::read(&src).unwrap();
    let source = safetensors::SafeTensors::deserialize(&source).unwrap();
    assert_eq!(tensors.len(), source.len());
    for (name, view) in source.tensors() {
        let want = (format!("{:?}", view.dtype()), view.shape().to_vec());
        assert_eq!(tensors[&name], want, "{name}");
    }
    // --dtype bf16 casts every float tensor.
    let bf = dir.path().join("bf16");
    cersa_ok(&["export", s(&base), s(&bf), "--dtype", "bf16", "-q"]);
    let floats = |d: &str| ["F32", "BF16"].contains(&d);
    assert!(exported(&bf)
        .values()
        .all(|(d, _)| !floats(d) || d == "BF16"));
    assert!(exported(&bf).values().any(|(d, _)| d == "BF16"));
    assert!(bf.join("model.safetensors").is_file() && !bf.join(INDEX_FILE).exists());
}

#[test]
fn quantized_gguf_sources_export_bf16_factored_tensors() {
    let dir = tmp();
    let base = dir.path().join("base");
    cersa_ok(&["convert", s(&fixture("gguf/kquants.gguf")), s(&base), "-q"]);
    let man = cersa_loader::read_manifest(&base).unwrap();
    let out = dir.path().join("out");
    cersa_ok(&["export", s(&base), s(&out), "-q"]);
    let tensors = exported(&out);
    let mut factored = 0;
    for (name, info) in &man.tensors {
        let (dtype, shape) = &tensors[name];
        assert_eq!(shape, &info.shape, "{name}");
        if info.rank.is_some() {
            factored += 1;
            let want = match Dtype::parse(&info.source_dtype) {
                Some(d) if d.is_factor_float() => d.to_string(),
                _ => "BF16".to_string(),
            };
            assert_eq!(dtype, &want, "{name} ({})", info.source_dtype);
        } else {
            assert_eq!(dtype, &info.stored_dtype.to_string(), "{name}");
        }
    }
    assert!(factored > 0);
}

/// `--to gguf` from a GGUF checkpoint: the JSON report parses into `GgufReport`, the file
/// reads back through cersa's own GGUF reader with every tensor of the checkpoint in its
/// shape, the bytes do not depend on `--threads`, and the manifest lists the metadata file.
#[test]
fn gguf_export_reads_back_and_is_thread_independent() {
    use cersa::export::gguf::GgufReport;
    let dir = tmp();
    let base = dir.path().join("base");
    cersa_ok(&["convert", s(&fixture("gguf/kquants.gguf")), s(&base), "-q"]);
    let man = cersa_loader::read_manifest(&base).unwrap();
    let mut files = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("out{threads}"));
        let json = cersa_ok(&[
            "export",
            s(&base),
            s(&out),
            "--to",
            "gguf",
            "--dtype",
            "q8_0",
            "--threads",
            threads,
            "--json",
            "-q",
        ]);
        let r: GgufReport = serde_json::from_str(&json).unwrap();
        assert_eq!(r.report_version, EXPORT_REPORT_VERSION);
        assert_eq!(r.tensors, man.tensors.len());
        assert_eq!(r.types.values().sum::<usize>(), r.tensors);
        assert!(r.metadata_keys > 0);
        let src = cersa::input::open(&r.file).unwrap();
        let got: BTreeMap<_, _> = src
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        let want: BTreeMap<_, _> = man
            .tensors
            .iter()
            .map(|(n, i)| (n.clone(), i.shape.clone()))
            .collect();
        assert_eq!(got, want);
        files.push(std::fs::read(&r.file).unwrap());
    }
    assert!(files[0] == files[1], "bytes depend on --threads");
    let listed = |m: &cersa_loader::Manifest| {
        m.side_files
            .iter()
            .any(|f| f.file == cersa::side_files::SOURCE_METADATA)
    };
    assert!(listed(&man));
}

#[test]
fn bad_exports_fail_by_name_and_leave_nothing() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let base = dir.path().join("base");
    cersa_ok(&["convert", s(&src), s(&base), "-q", "--energy", "0.8"]);
    // An existing non-empty output is refused and left alone.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    cersa_fails(&["export", s(&base), s(&busy)], 2);
    assert_eq!(std::fs::read(busy.join("keep.txt")).unwrap(), b"mine");
    // An adapter made for another checkpoint.
    let other = dir.path().join("other");
    cersa_ok(&["convert", s(&src), s(&other), "-q", "--energy", "0.7"]);
    let ckpt = Checkpoint::open(&other).unwrap();
    let name = "encoder.layer.0.attention.self.query.weight";
    let TensorView::Factored(f) = ckpt.get(name).unwrap() else {
        panic!("{name} is factored");
    };
    let adapter = Adapter {
        manifest_sha256: manifest_sha256(&other).unwrap(),
        layers: BTreeMap::from([(
            name.to_string(),
            LayerInfo {
                mode: Mode::Scale,
                rank: f.rank,
                matrix_shape: f.matrix_shape,
                base: Base::Factored,
            },
        )]),
        tensors: BTreeMap::from([(format!("{name}.adapter_s"), f.s.to_f32().unwrap())]),
    };
    let path = dir.path().join("adapter.safetensors");
    adapter.write(&path).unwrap();
    let out = dir.path().join("out");
    let err = cersa_fails(&["export", s(&base), s(&out), "--adapter", s(&path)], 2);
    assert!(err.contains("adapter"), "{err}");
    assert!(!out.exists());
    // The same adapter on its own checkpoint is folded in.
    let json = cersa_ok(&[
        "export",
        s(&other),
        s(&out),
        "--adapter",
        s(&path),
        "--json",
    ]);
    let report: ExportReport = serde_json::from_str(&json).unwrap();
    assert_eq!(report.adapted, 1);
    // --to peft: needs --adapter; with it, one module of LoRA rank r (scale mode).
    let err = cersa_fails(
        &["export", s(&other), s(&gone_peft(&dir)), "--to", "peft"],
        2,
    );
    assert!(err.contains("--adapter"), "{err}");
    let lora = dir.path().join("lora");
    let json = cersa_ok(&[
        "export",
        s(&other),
        s(&lora),
        "--to",
        "peft",
        "--adapter",
        s(&path),
        "--json",
    ]);
    let report: cersa::export::peft::PeftReport = serde_json::from_str(&json).unwrap();
    assert_eq!(report.modules.len(), 1);
    assert_eq!(report.modules[0].rank, f.rank);
    assert_eq!(
        report.modules[0].module,
        name.strip_suffix(".weight").unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["rank_pattern"], config["alpha_pattern"]);
    // A truncated shard is named.
    let shard = base.join("cersa-00001-of-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let gone = dir.path().join("gone");
    let err = cersa_fails(&["export", s(&base), s(&gone)], 2);
    assert!(err.contains("cersa-00001-of-00001.safetensors"), "{err}");
    assert!(!gone.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains("cersa-partial").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn gone_peft(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("peft-never")
}
