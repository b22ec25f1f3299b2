//! Whitened conversions (`convert --calibration`) seen by the other commands: `verify
//! --source SRC --calibration FILE` recomputes every whitened tensor's output-space error
//! from the statistics (the wrong statistics file, a plain checkpoint and a tampered
//! `output_rel_error` are each caught); `inspect` and `report` show the output error and
//! warn at settings measured to break the model.

use crate::util::*;
use cersa::verify::{Check, VerifyReport};
use cersa_loader::{Checkpoint, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const T: usize = 300;

/// Layer inputs of width `d` with unequal scales per feature (as real activations have).
fn inputs(seed: u64, d: usize) -> Vec<f64> {
    noise(seed, T * d)
        .iter()
        .enumerate()
        .map(|(k, &x)| f64::from(x) * 3.0 / (1.0 + (k % d) as f64))
        .collect()
}

fn gram(x: &[f64], d: usize) -> Vec<f32> {
    let mut g = vec![0f64; d * d];
    for row in x.chunks_exact(d) {
        for a in 0..d {
            for b in 0..d {
                g[a * d + b] += row[a] * row[b];
            }
        }
    }
    g.into_iter().map(|v| v as f32).collect()
}

/// A calibration file (docs/calibration.md) for the two weights of [`source`].
fn calibration(path: &Path, x_proj: &[f64], x_conv: &[f64]) {
    let doc = serde_json::json!({
        "version": 1,
        "model": null,
        "text": {"sequences": 1, "tokens": T},
        "weights": {
            "layer.0.proj.weight": {"stat": "g.proj", "input_axis": 1},
            "layer.0.conv.weight": {"stat": "g.conv", "input_axis": 0},
        }
    });
    let meta: BTreeMap<String, String> = [
        ("format".to_string(), "cersa-calibration".to_string()),
        ("version".to_string(), "1".to_string()),
        ("cersa_calibration".to_string(), doc.to_string()),
    ]
    .into();
    let t = |name: &str, d: usize, g: Vec<f32>| {
        (
            name.to_string(),
            cersa_loader::Dtype::F32,
            vec![d, d],
            g.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )
    };
    cersa_loader::safetensors::write_file(
        path,
        &meta,
        &[
            t("g.conv", 40, gram(x_conv, 40)),
            t("g.proj", 40, gram(x_proj, 40)),
        ],
    )
    .unwrap();
}

/// Low rank plus noise, m×n.
fn matrix(seed: u64, m: usize, n: usize) -> Vec<f32> {
    let a = noise(seed, m * 4);
    let b = noise(seed + 1, 4 * n);
    let e = noise(seed + 2, m * n);
    (0..m * n)
        .map(|k| {
            let (i, j) = (k / n, k % n);
            let low: f32 = (0..4).map(|c| a[i * 4 + c] * b[c * n + j]).sum();
            3.0 * low + 0.2 * e[k]
        })
        .collect()
}

/// `proj` stored [out, in] = 48×40 (input axis 1), `conv` stored [in, out] = 40×48 (axis 0).
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("model.safetensors");
    write_f32(
        &src,
        &[
            ("layer.0.proj.weight", vec![48, 40], matrix(10, 48, 40)),
            ("layer.0.conv.weight", vec![40, 48], matrix(20, 40, 48)),
            ("layer.0.proj.bias", vec![48], noise(30, 48)),
        ],
    );
    src
}

fn report(args: &[&str], code: i32) -> VerifyReport {
    let out = cersa(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "cersa {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verify --json parses into VerifyReport")
}

/// ‖(W − Ŵ)·X‖_F / ‖W·X‖_F from the explicit inputs (rows of `x`), by the definition.
fn output_error_by_definition(
    w: &[f32],
    what: &[f64],
    m: usize,
    n: usize,
    x: &[f64],
    axis: u8,
) -> f64 {
    let (mut res, mut norm) = (0.0f64, 0.0f64);
    for row in x.chunks_exact(if axis == 1 { n } else { m }) {
        // axis 1: y = W·x (x of width n); axis 0: y = x·W (x of width m).
        let outs = if axis == 1 { m } else { n };
        for o in 0..outs {
            let (mut y, mut yh) = (0.0f64, 0.0f64);
            for (k, &xk) in row.iter().enumerate() {
                let idx = if axis == 1 { o * n + k } else { k * n + o };
                y += f64::from(w[idx]) * xk;
                yh += what[idx] * xk;
            }
            res += (y - yh) * (y - yh);
            norm += y * y;
        }
    }
    (res / norm).sqrt()
}

/// (source, calibration file, whitened conversion at `tau`) in `dir`.
fn whitened(dir: &Path, tau: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let src = source(dir);
    let calib = dir.join("calib.safetensors");
    calibration(&calib, &inputs(1, 40), &inputs(2, 40));
    let out = dir.join(format!("white-{tau}"));
    let args = [
        "convert",
        s(&src),
        s(&out),
        "--energy",
        tau,
        "--calibration",
        s(&calib),
        "-q",
    ];
    cersa_ok(&args);
    (src, calib, out)
}

#[test]
fn whitened_output_errors_are_recomputed_and_tampering_is_caught() {
    let dir = tmp();
    let (src, calib, out) = whitened(dir.path(), "0.9");
    let (xp, xc) = (inputs(1, 40), inputs(2, 40));

    // The manifest's output errors are those of the definition on the explicit inputs.
    let ckpt = Checkpoint::open(&out).unwrap();
    let weights = [
        (
            "layer.0.proj.weight",
            48usize,
            40usize,
            &xp,
            1u8,
            matrix(10, 48, 40),
        ),
        ("layer.0.conv.weight", 40, 48, &xc, 0, matrix(20, 40, 48)),
    ];
    for (name, m, n, x, axis, w) in &weights {
        let info = &ckpt.manifest().tensors[*name];
        let white = info.whitening.as_ref().expect("whitened entry");
        assert_eq!(white.input_axis, *axis, "{name}");
        let TensorView::Factored(f) = ckpt.get(name).unwrap() else {
            panic!("{name} is factored");
        };
        let (u, s, vt) = f.values_f64().unwrap();
        let r = s.len();
        let what: Vec<f64> = (0..m * n)
            .map(|k| {
                (0..r)
                    .map(|c| u[(k / n) * r + c] * s[c] * vt[c * n + k % n])
                    .sum()
            })
            .collect();
        let want = output_error_by_definition(w, &what, *m, *n, x, *axis);
        assert!(
            (white.output_rel_error - want).abs() < 1e-5 * want.max(1.0),
            "{name}: manifest {} vs definition {want}",
            white.output_rel_error
        );
    }
    drop(ckpt);

    let r = report(
        &[
            "verify",
            s(&out),
            "--source",
            s(&src),
            "--calibration",
            s(&calib),
            "--json",
            "-q",
        ],
        0,
    );
    assert!(r.ok && r.failures.is_empty(), "{r:?}");
    assert_eq!(r.counts.output_errors_compared, 2, "{r:?}");
    assert_eq!(r.counts.rel_errors_compared, 2, "{r:?}");
    let text = cersa_ok(&[
        "verify",
        s(&out),
        "--source",
        s(&src),
        "--calibration",
        s(&calib),
        "-q",
    ]);
    assert!(
        text.contains("2 output-space error(s) recomputed"),
        "{text}"
    );

    // Without the statistics the output check is listed as skipped, not passed silently.
    let r = report(&["verify", s(&out), "--source", s(&src), "--json", "-q"], 0);
    assert_eq!(r.counts.output_errors_compared, 0);
    assert!(
        r.skipped.iter().any(|k| k.contains("2 whitened tensor(s)")),
        "{r:?}"
    );

    // Statistics of other inputs: refused as a mismatch, no output errors compared.
    let other = dir.path().join("other.safetensors");
    calibration(&other, &inputs(3, 40), &xc);
    let r = report(
        &[
            "verify",
            s(&out),
            "--source",
            s(&src),
            "--calibration",
            s(&other),
            "--json",
            "-q",
        ],
        1,
    );
    let checks: Vec<Check> = r.failures.iter().map(|f| f.check).collect();
    assert_eq!(checks, [Check::CalibrationMismatch], "{r:?}");
    assert_eq!(r.counts.output_errors_compared, 0);

    // A tampered output error is caught on that tensor only.
    let mpath = out.join("cersa.json");
    let original = std::fs::read_to_string(&mpath).unwrap();
    let mut man: serde_json::Value = serde_json::from_str(&original).unwrap();
    let e = &mut man["tensors"]["layer.0.conv.weight"]["whitening"]["output_rel_error"];
    *e = serde_json::json!(e.as_f64().unwrap() * 1.05);
    std::fs::write(&mpath, serde_json::to_string_pretty(&man).unwrap()).unwrap();
    let r = report(
        &[
            "verify",
            s(&out),
            "--source",
            s(&src),
            "--calibration",
            s(&calib),
            "--json",
            "-q",
        ],
        1,
    );
    let found: Vec<(Check, Option<&str>)> = r
        .failures
        .iter()
        .map(|f| (f.check, f.tensor.as_deref()))
        .collect();
    assert_eq!(
        found,
        [(Check::OutputError, Some("layer.0.conv.weight"))],
        "{r:?}"
    );
    std::fs::write(&mpath, original).unwrap();

    // A plain conversion has nothing the statistics could check: a mismatch, said so.
    let plain = dir.path().join("plain");
    cersa_ok(&["convert", s(&src), s(&plain), "--energy", "0.9", "-q"]);
    let r = report(
        &[
            "verify",
            s(&plain),
            "--source",
            s(&src),
            "--calibration",
            s(&calib),
            "--json",
            "-q",
        ],
        1,
    );
    assert_eq!(r.failures.len(), 1, "{r:?}");
    assert_eq!(r.failures[0].check, Check::CalibrationMismatch);
    assert!(
        r.failures[0].detail.contains("without calibration"),
        "{r:?}"
    );

    // --calibration needs --source (clap refuses it before any work: exit 2).
    cersa_fails(&["verify", s(&out), "--calibration", s(&calib)], 2);
}

fn warnings(args: &[&str]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&cersa_ok(args)).unwrap();
    serde_json::from_value(v["warnings"].clone().take()).unwrap_or_default()
}

#[test]
fn inspect_and_report_warn_where_the_setting_breaks_the_model() {
    let dir = tmp();
    let (src, _calib, out) = whitened(dir.path(), "0.9");
    // Whitened at 0.9: the output-energy warning, not the plain one.
    let w = warnings(&["inspect", s(&out), "--json"]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("2 whitened matrices keep less than 0.99"),
        "{w:?}"
    );
    let r: cersa::inspect::CheckpointReport =
        serde_json::from_str(&cersa_ok(&["inspect", s(&out), "--json"])).unwrap();
    assert!(
        r.tensors
            .iter()
            .filter(|t| t.output_rel_error.is_some())
            .count()
            == 2
    );
    let html_path = dir.path().join("white.html");
    cersa_ok(&["report", s(&out), "-o", s(&html_path), "-q"]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        html.contains("<th>output rel_error</th>"),
        "no output-error column"
    );
    assert!(html.contains(r#"<p class="warning">Warning: 2 whitened matrices"#));

    // Plain at 0.9 warns about plain truncation; at 0.995 (and whitened at 0.995) nothing.
    let plain = dir.path().join("plain");
    cersa_ok(&["convert", s(&src), s(&plain), "--energy", "0.9", "-q"]);
    let w = warnings(&["inspect", s(&plain), "--json"]);
    assert!(
        w.len() == 1 && w[0].contains("with plain truncation"),
        "{w:?}"
    );
    let (_, _, white_hi) = whitened(&dir.path().join("hi"), "0.995");
    let plain_hi = dir.path().join("plain-hi");
    cersa_ok(&["convert", s(&src), s(&plain_hi), "--energy", "0.995", "-q"]);
    for d in [&white_hi, &plain_hi] {
        assert_eq!(warnings(&["inspect", s(d), "--json"]), Vec::<String>::new());
        let html_path = dir.path().join("hi.html");
        cersa_ok(&["report", s(d), "-o", s(&html_path), "-q"]);
        assert!(!std::fs::read_to_string(&html_path)
            .unwrap()
            .contains("class=\"warning\""));
    }

    // A source inspected (or reported) at plain thresholds below 0.99 says so too.
    let w = warnings(&["inspect", s(&src), "--energy", "0.9,0.995", "--json"]);
    assert!(
        w.len() == 1 && w[0].contains("τ = 0.9 (below 0.99)"),
        "{w:?}"
    );
    assert!(warnings(&["inspect", s(&src), "--energy", "0.995", "--json"]).is_empty());
    let text = cersa_ok(&["inspect", s(&src), "--energy", "0.9"]);
    assert!(
        text.contains("warning: plain truncation at τ = 0.9"),
        "{text}"
    );
    cersa_ok(&[
        "report",
        s(&src),
        "--energy",
        "0.9",
        "-o",
        s(&html_path),
        "-q",
    ]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains(r#"<p class="warning">Warning: plain truncation at τ = 0.9"#));
}

/// A `scale` adapter of `layer` in `base` (σ scaled by 1.0, 0.9, 0.8, …: the spectrum's
/// shape changes, so the re-truncated rank can too).
fn scale_adapter(base: &Path, layer: &str, path: &Path) {
    use cersa_loader::adapter::{manifest_sha256, Adapter, Base, LayerInfo, Mode};
    let ckpt = Checkpoint::open(base).unwrap();
    let TensorView::Factored(f) = ckpt.get(layer).unwrap() else {
        panic!("{layer} is factored");
    };
    let sigma = f.s.to_f32().unwrap();
    let adapter = Adapter {
        manifest_sha256: manifest_sha256(base).unwrap(),
        layers: BTreeMap::from([(
            layer.to_string(),
            LayerInfo {
                mode: Mode::Scale,
                rank: f.rank,
                matrix_shape: f.matrix_shape,
                base: Base::Factored,
            },
        )]),
        tensors: BTreeMap::from([(
            format!("{layer}.adapter_s"),
            sigma
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 - 0.1 * i as f32))
                .collect(),
        )]),
    };
    adapter.write(path).unwrap();
}

#[test]
fn merge_re_truncates_whitened_layers_in_the_output_metric() {
    let dir = tmp();
    let (_src, calib, base) = whitened(dir.path(), "0.9");
    let adapter = dir.path().join("adapter.safetensors");
    for (layer, x, axis) in [
        ("layer.0.proj.weight", inputs(1, 40), 1u8),
        ("layer.0.conv.weight", inputs(2, 40), 0),
    ] {
        scale_adapter(&base, layer, &adapter);
        // W' = U·diag(adapter_s)·Vᵀ of the base, in f64.
        let ckpt = Checkpoint::open(&base).unwrap();
        let TensorView::Factored(f) = ckpt.get(layer).unwrap() else {
            unreachable!()
        };
        let [m, n] = f.matrix_shape;
        let (u, sig, vt) = f.values_f64().unwrap();
        let r = sig.len();
        let s2: Vec<f64> = sig
            .iter()
            .enumerate()
            .map(|(i, &v)| f64::from(v as f32 * (1.0 - 0.1 * i as f32)))
            .collect();
        let w_adapted: Vec<f32> = (0..m * n)
            .map(|k| {
                let v: f64 = (0..r)
                    .map(|c| u[(k / n) * r + c] * s2[c] * vt[c * n + k % n])
                    .sum();
                v as f32
            })
            .collect();
        drop(ckpt);

        // Without the statistics: refused before any output, naming the layer.
        let out = dir.path().join(format!("merged-{axis}"));
        let err = cersa_fails(&["merge", s(&base), s(&adapter), s(&out)], 2);
        assert!(
            err.contains(layer) && err.contains("--calibration"),
            "{err}"
        );
        assert!(!out.exists());
        // Another statistics file: refused (sha256).
        let other = dir.path().join("other.safetensors");
        calibration(&other, &inputs(3, 40), &inputs(4, 40));
        let err = cersa_fails(
            &[
                "merge",
                s(&base),
                s(&adapter),
                s(&out),
                "--calibration",
                s(&other),
            ],
            2,
        );
        assert!(err.contains("not the calibration file"), "{err}");

        let text = cersa_ok(&[
            "merge",
            "--json",
            s(&base),
            s(&adapter),
            s(&out),
            "--calibration",
            s(&calib),
        ]);
        let report: cersa::merge::MergeReport = serde_json::from_str(&text).unwrap();
        let merged = Checkpoint::open(&out).unwrap();
        let info = &merged.manifest().tensors[layer];
        let white = info.whitening.as_ref().expect("still whitened");
        assert_eq!(white.input_axis, axis);
        assert!(info.energy.unwrap() >= 0.9, "{info:?}");
        assert_eq!(
            report.layers[0].output_rel_error,
            Some(white.output_rel_error)
        );
        // The recorded output error is the definition's on the explicit inputs, for W'.
        let TensorView::Factored(g) = merged.get(layer).unwrap() else {
            panic!("{layer} is factored after merging");
        };
        let (u, s, vt) = g.values_f64().unwrap();
        let r = s.len();
        let what: Vec<f64> = (0..m * n)
            .map(|k| {
                (0..r)
                    .map(|c| u[(k / n) * r + c] * s[c] * vt[c * n + k % n])
                    .sum()
            })
            .collect();
        let want = output_error_by_definition(&w_adapted, &what, m, n, &x, axis);
        // W' was rounded to f32 here; the merge used it in f64.
        assert!(
            (white.output_rel_error - want).abs() < 1e-4 * want.max(1e-2),
            "{layer}: manifest {} vs definition {want}",
            white.output_rel_error
        );
    }
}

fn spectra(args: &[&str]) -> cersa::inspect::SourceReport {
    serde_json::from_str(&cersa_ok(args)).expect("inspect --json parses into SourceReport")
}

#[test]
fn inspect_and_plan_with_calibration_work_in_the_output_metric_convert_truncates_in() {
    let dir = tmp();
    let (src, calib, white) = whitened(dir.path(), "0.95");
    let manifest = Checkpoint::open(&white).unwrap().manifest().clone();
    let recorded = manifest.config.calibration.clone().expect("whitened");
    let names = ["layer.0.proj.weight", "layer.0.conv.weight"];

    // inspect --calibration: the rank and energy convert --calibration chose, per matrix.
    let r = spectra(&[
        "inspect",
        s(&src),
        "--energy",
        "0.95",
        "--calibration",
        s(&calib),
        "--json",
    ]);
    assert_eq!(
        r.calibration.as_ref().map(|c| &c.sha256),
        Some(&recorded.sha256)
    );
    let plain = spectra(&["inspect", s(&src), "--energy", "0.95", "--json"]);
    for name in names {
        let t = r.tensors.iter().find(|t| t.name == name).unwrap();
        let info = &manifest.tensors[name];
        assert!(t.whitened, "{name}");
        assert_eq!(Some(t.ranks[0].rank), info.rank, "{name}");
        let e = info.energy.unwrap();
        assert!((t.ranks[0].energy - e).abs() < 1e-9, "{name}: {t:?} vs {e}");
        // The plain spectrum is another one (the inputs' scales differ per feature).
        let p = plain.tensors.iter().find(|t| t.name == name).unwrap();
        assert!(!p.whitened);
        assert_ne!(p.metrics, t.metrics, "{name}");
    }
    assert!(
        r.warnings[0].contains("whitened truncation at τ = 0.95"),
        "{:?}",
        r.warnings
    );
    let text = cersa_ok(&[
        "inspect",
        s(&src),
        "--energy",
        "0.99",
        "--calibration",
        s(&calib),
    ]);
    assert!(
        text.contains("2 matrices analysed in their output metric"),
        "{text}"
    );

    // plan --calibration records the statistics; convert --plan applies its ranks with them
    // and the energies it reaches are the plan's (output energies).
    let plan_path = dir.path().join("plan.json");
    cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.6x",
        "--calibration",
        s(&calib),
        "-o",
        s(&plan_path),
        "-q",
    ]);
    let plan: cersa::plan::Plan =
        serde_json::from_slice(&std::fs::read(&plan_path).unwrap()).unwrap();
    assert_eq!(
        plan.calibration.as_ref().map(|c| &c.sha256),
        Some(&recorded.sha256)
    );
    let out = dir.path().join("planned");
    let err = cersa_fails(
        &["convert", s(&src), s(&out), "--plan", s(&plan_path), "-q"],
        2,
    );
    assert!(err.contains("the plan was made with statistics"), "{err}");
    assert!(!out.exists());
    let plain_plan = dir.path().join("plain-plan.json");
    cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.6x",
        "-o",
        s(&plain_plan),
        "-q",
    ]);
    let err = cersa_fails(
        &[
            "convert",
            s(&src),
            s(&out),
            "--plan",
            s(&plain_plan),
            "--calibration",
            s(&calib),
            "-q",
        ],
        2,
    );
    assert!(
        err.contains("the plan was made with no calibration"),
        "{err}"
    );
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "--plan",
        s(&plan_path),
        "--calibration",
        s(&calib),
        "-q",
    ]);
    let budgeted = dir.path().join("budgeted");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&budgeted),
        "--budget",
        "0.6x",
        "--calibration",
        s(&calib),
        "-q",
    ]);
    for dir in [&out, &budgeted] {
        let m = Checkpoint::open(dir).unwrap().manifest().clone();
        for name in names {
            let (e, info) = (&plan.tensors[name], &m.tensors[name]);
            assert!(info.whitening.is_some(), "{name}");
            assert_eq!(e.rank, info.rank, "{name}");
            if e.rank.is_some() {
                assert!((e.energy - info.energy.unwrap()).abs() < 1e-9, "{name}");
            }
        }
        assert!(m.totals.stored_bytes <= plan.totals.budget_bytes);
    }
}

/// Whitened truncation with block-quantized factors: the manifest's output error is that of
/// the factors as stored (dequantized), recomputed from the explicit inputs, and `verify
/// --calibration` agrees; quantization adds error on top of truncation, never removes it.
#[test]
fn whitened_q8_0_factors_record_the_output_error_as_stored() {
    let dir = tmp();
    let (src, calib, f32_out) = whitened(dir.path(), "0.9");
    let out = dir.path().join("white-q8");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "--energy",
        "0.9",
        "--calibration",
        s(&calib),
        "--dtype",
        "q8_0",
        "-q",
    ]);
    let (ckpt, plain) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&f32_out).unwrap(),
    );
    let x = inputs(1, 40);
    let name = "layer.0.proj.weight";
    let (info, f32_info) = (
        &ckpt.manifest().tensors[name],
        &plain.manifest().tensors[name],
    );
    assert_eq!(
        info.rank, f32_info.rank,
        "quantization does not change the rank"
    );
    let TensorView::Factored(f) = ckpt.get(name).unwrap() else {
        panic!("{name} is factored");
    };
    let (u, sv, vt) = f.values_f64().unwrap();
    let (m, n, r) = (48, 40, sv.len());
    let what: Vec<f64> = (0..m * n)
        .map(|k| {
            (0..r)
                .map(|c| u[(k / n) * r + c] * sv[c] * vt[c * n + k % n])
                .sum()
        })
        .collect();
    let want = output_error_by_definition(&matrix(10, m, n), &what, m, n, &x, 1);
    let got = info.whitening.as_ref().unwrap().output_rel_error;
    assert!(
        (got - want).abs() < 1e-5 * want.max(1.0),
        "manifest {got} vs {want}"
    );
    let unquantized = f32_info.whitening.as_ref().unwrap().output_rel_error;
    assert!(got >= unquantized * (1.0 - 1e-9), "{got} < {unquantized}");
    drop((ckpt, plain));
    let r = report(
        &[
            "verify",
            s(&out),
            "--source",
            s(&src),
            "--calibration",
            s(&calib),
            "--json",
            "-q",
        ],
        0,
    );
    assert!(r.ok && r.counts.output_errors_compared == 2, "{r:?}");
}
