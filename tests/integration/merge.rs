//! `cersa merge`: the route the user chose (default: the base manifest's), the versioned
//! `--json` report, and an output that appears only when complete.

use crate::util::*;
use cersa::merge::{MergeOptions, MergeReport, MERGE_REPORT_VERSION};
use cersa_loader::adapter::{manifest_sha256, Adapter, Base, LayerInfo, Mode};
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
                base: Base::Factored,
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

/// A `core` adapter (k = 2) of `LAYER` as a dense-base layer with an arbitrary rank-3
/// basis, and the update U·(A·B)ᵀ·Vᵀ it defines, spelled out in f64.
fn dense_core_adapter(base: &Path, shape: [usize; 2]) -> (Adapter, Vec<f64>) {
    let ([m, n], r, k) = (shape, 3, 2);
    let info = LayerInfo {
        mode: Mode::Core { k },
        rank: r,
        matrix_shape: [m, n],
        base: Base::Dense,
    };
    let tensors: BTreeMap<String, Vec<f32>> = info
        .tensors(LAYER)
        .into_iter()
        .enumerate()
        .map(|(i, (t, shape))| (t, noise(40 + i as u64, shape.iter().product())))
        .collect();
    let t = |s: &str| -> Vec<f64> {
        tensors[&format!("{LAYER}.{s}")]
            .iter()
            .map(|&v| f64::from(v))
            .collect()
    };
    let (u, vt, a, b) = (
        t("adapter_u"),
        t("adapter_vt"),
        t("adapter_a"),
        t("adapter_b"),
    );
    let mut update = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..r {
                for q in 0..r {
                    // ΔM[p, q] = (A·B)ᵀ[p, q] = Σ_l A[q, l]·B[l, p]
                    let dm: f64 = (0..k).map(|l| a[q * k + l] * b[l * r + p]).sum();
                    update[i * n + j] += u[i * r + p] * dm * vt[q * n + j];
                }
            }
        }
    }
    let adapter = Adapter {
        manifest_sha256: manifest_sha256(base).unwrap(),
        layers: BTreeMap::from([(LAYER.to_string(), info)]),
        tensors,
    };
    (adapter, update)
}

#[test]
fn merge_folds_a_dense_base_adapter_into_the_dense_tensor() {
    let dir = tmp();
    let base = dir.path().join("base");
    let src = fixture("minilm-excerpt/model.safetensors");
    // At τ = 0.99 the query matrix saves nothing: stored dense (`no-saving`).
    cersa_ok(&["convert", s(&src), s(&base), "-q", "--energy", "0.99"]);
    let ckpt = Checkpoint::open(&base).unwrap();
    let TensorView::Dense(t) = ckpt.get(LAYER).unwrap() else {
        panic!("{LAYER} is dense at τ = 0.99");
    };
    let w: Vec<f64> = t.to_f32().unwrap().into_iter().map(f64::from).collect();
    let (adapter, update) = dense_core_adapter(&base, [384, 384]);
    let path = dir.path().join("adapter.safetensors");
    adapter.write(&path).unwrap();

    let out = dir.path().join("merged");
    let text = cersa_ok(&["merge", "--json", s(&base), s(&path), s(&out)]);
    let report: MergeReport = serde_json::from_str(&text).unwrap();
    assert_eq!(report.layers.len(), 1);
    assert!(report.layers[0].dense && report.layers[0].new_rank == 3);
    let merged = Checkpoint::open(&out).unwrap();
    let TensorView::Dense(got) = merged.get(LAYER).unwrap() else {
        panic!("the merged {LAYER} stays dense");
    };
    assert_eq!((got.dtype, got.shape), (t.dtype, t.shape));
    let got = got.to_f32().unwrap();
    let scale = update.iter().fold(0f64, |a, v| a.max(v.abs()));
    assert!(scale > 1e-3, "the update is not empty");
    for (i, g) in got.iter().enumerate() {
        let want = w[i] + update[i];
        // One f32 rounding of W + ΔW.
        assert!(
            (f64::from(*g) - want).abs() <= 1e-7 * want.abs().max(1.0),
            "{i}"
        );
    }
    // Every other tensor is copied byte for byte.
    for name in ckpt.names().filter(|n| *n != LAYER) {
        if let (TensorView::Dense(a), TensorView::Dense(b)) =
            (ckpt.get(name).unwrap(), merged.get(name).unwrap())
        {
            assert_eq!(a.bytes, b.bytes, "{name}");
        }
    }

    // A basis of the wrong shape, or a dense-base adapter on a factored layer, is refused.
    let (mut wrong, _) = dense_core_adapter(&base, [384, 383]);
    wrong.manifest_sha256 = manifest_sha256(&base).unwrap();
    let bad = dir.path().join("wrong.safetensors");
    wrong.write(&bad).unwrap();
    let err = cersa_fails(&["merge", s(&base), s(&bad), s(&dir.path().join("x"))], 2);
    assert!(
        err.contains("dense float [384, 383] matrix") && err.contains(LAYER),
        "{err}"
    );
    let factored = dir.path().join("factored");
    cersa_ok(&["convert", s(&src), s(&factored), "-q", "--energy", "0.5"]);
    let (mut other, _) = dense_core_adapter(&factored, [384, 384]);
    other.manifest_sha256 = manifest_sha256(&factored).unwrap();
    other.write(&bad).unwrap();
    let err = cersa_fails(
        &["merge", s(&factored), s(&bad), s(&dir.path().join("y"))],
        2,
    );
    assert!(err.contains("trained on a dense layer"), "{err}");
}
