//! `cersa merge`: the route the user chose (default: the base manifest's), the versioned
//! `--json` report, and an output that appears only when complete.

use crate::util::*;
use cersa::merge::{MergeOptions, MergeReport, MERGE_REPORT_VERSION};
use cersa_loader::adapter::{manifest_sha256, Adapter, LayerInfo, Mode};
use cersa_loader::{Checkpoint, TensorView};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

const LAYER: &str = "encoder.layer.0.attention.self.query.weight";

/// Converts the MiniLM excerpt into `dir/base` with `extra` flags and writes a `scale`
/// adapter of its query layer (σ scaled by 1.1, 1.2, …) to `dir/adapter.safetensors`.
fn base_and_adapter(dir: &Path, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base");
    let src = fixture("minilm-excerpt/model.safetensors");
    let mut args = vec!["convert", s(&src), s(&base), "-q", "--energy", "0.8"];
    args.extend_from_slice(extra);
    cersa_ok(&args);
    let ckpt = Checkpoint::open(&base).unwrap();
    let TensorView::Factored(f) = ckpt.get(LAYER).unwrap() else {
        panic!("{LAYER} is factored at τ = 0.8");
    };
    let sigma = f.s.to_f32().unwrap();
    let scaled = sigma
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.1 + 0.1 * i as f32))
        .collect();
    let adapter = Adapter {
        manifest_sha256: manifest_sha256(&base).unwrap(),
        layers: BTreeMap::from([(
            LAYER.to_string(),
            LayerInfo {
                mode: Mode::Scale,
                rank: f.rank,
                matrix_shape: f.matrix_shape,
            },
        )]),
        tensors: BTreeMap::from([(format!("{LAYER}.adapter_s"), scaled)]),
    };
    let path = dir.join("adapter.safetensors");
    adapter.write(&path).unwrap();
    (base, path)
}

#[test]
fn merge_json_is_versioned_and_uses_the_base_route_by_default() {
    let dir = tmp();
    let (base, adapter) = base_and_adapter(dir.path(), &["--algorithm", "gram"]);
    let out = dir.path().join("merged");
    let text = cersa_ok(&["merge", "--json", s(&base), s(&adapter), s(&out)]);
    let report: MergeReport = serde_json::from_str(&text).expect("typed merge report");
    assert_eq!(report.report_version, MERGE_REPORT_VERSION);
    assert_eq!(
        report.algorithm, "gram",
        "the base manifest's config.algorithm"
    );
    assert_eq!(report.out_dir, out);
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.layers[0].name, LAYER);
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(&report.totals, &merged.manifest().totals);
    assert_eq!(
        merged.manifest().source.details["merged_algorithm"],
        serde_json::json!("gram")
    );
    // The report round-trips through its own wire format.
    let again: MergeReport =
        serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(again, report);

    // --algorithm overrides the recorded route; --overwrite replaces the merged output.
    let text = cersa_ok(&[
        "merge",
        "--json",
        "--algorithm",
        "svd",
        "--overwrite",
        s(&base),
        s(&adapter),
        s(&out),
    ]);
    let report: MergeReport = serde_json::from_str(&text).unwrap();
    assert_eq!(report.algorithm, "svd");
    let err = cersa_fails(&["merge", s(&base), s(&adapter), s(&out)], 2);
    assert!(err.contains("already exists"), "{err}");
    let err = cersa_fails(
        &[
            "merge",
            "--algorithm",
            "nope",
            s(&base),
            s(&adapter),
            s(&dir.path().join("x")),
        ],
        2,
    );
    assert!(
        err.contains("invalid value 'nope' for '--algorithm"),
        "{err}"
    );
}

#[test]
fn interrupted_merge_leaves_no_output() {
    let dir = tmp();
    let (base, adapter) = base_and_adapter(dir.path(), &[]);
    let out = dir.path().join("merged");
    let err = cersa::merge::merge(
        &base,
        &adapter,
        &out,
        &MergeOptions::default(),
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(err, cersa::ConvertError::Interrupted), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("merged"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
