//! `cersa report` and the grouped/CSV forms of `cersa inspect`.

use crate::util::*;
use cersa::inspect::{CheckpointReport, SourceReport};

/// Plot sections whose body holds an SVG with drawn marks.
fn plot_sections(html: &str) -> Vec<&'static str> {
    ["memory", "energy", "heatmap", "spectra"]
        .into_iter()
        .filter(|id| {
            let open = format!("<div class=\"plots\" id=\"{id}\">");
            html.split(&open)
                .nth(1)
                .and_then(|rest| rest.split("</div>").next())
                .is_some_and(|body| {
                    body.contains("<svg")
                        && (body.contains("<path d=\"M") || body.contains("<rect x="))
                })
        })
        .collect()
}

#[test]
fn report_of_source_and_of_cersa_dir_is_self_contained() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let html_path = dir.path().join("src.html");
    cersa_ok(&["report", s(&src), "-o", s(&html_path), "-q"]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_eq!(
        plot_sections(&html),
        ["memory", "energy", "heatmap", "spectra"]
    );
    assert!(!html.contains("<script"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    // Every matrix kind of layer 0 appears, and every tensor has a table row.
    for kind in ["attention.self.query", "intermediate.dense", "output.dense"] {
        assert!(html.contains(kind), "{kind}");
    }
    assert_eq!(html.matches("<tr>").count(), 1 + 18);
    // No temporary file left next to the report.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);

    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let html_path = dir.path().join("cersa.html");
    cersa_ok(&["report", s(&out), "-o", s(&html_path), "-q"]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_eq!(
        plot_sections(&html),
        ["memory", "energy", "heatmap", "spectra"]
    );
    // Writing into a missing directory is an error, and leaves nothing.
    cersa_fails(
        &[
            "report",
            s(&out),
            "-o",
            s(&dir.path().join("no/such/r.html")),
            "-q",
        ],
        2,
    );
}

#[test]
fn inspect_groups_csv_and_checkpoint_totals() {
    let src = fixture("minilm-excerpt/model.safetensors");
    let by_kind = cersa_ok(&["inspect", s(&src), "-q"]);
    let by_layer = cersa_ok(&["inspect", s(&src), "-q", "--group", "layer"]);
    let json = cersa_ok(&["inspect", s(&src), "-q", "--json"]);
    let r: SourceReport = serde_json::from_str(&json).unwrap();
    // The default table has one row per kind plus header and totals, not one per tensor.
    for g in &r.by_kind {
        assert!(by_kind.contains(&g.key), "{}", g.key);
    }
    assert!(by_kind.lines().count() < r.tensors.len());
    assert!(by_kind.contains("τ = 0.9") && by_layer.contains("τ = 0.99"));
    assert!(r.tensors.iter().all(|t| t.singular_values.is_empty()));
    let csv = cersa_ok(&["inspect", s(&src), "-q", "--csv"]);
    assert_eq!(csv.lines().count(), 1 + r.tensors.len());

    let dir = tmp();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let c: CheckpointReport =
        serde_json::from_str(&cersa_ok(&["inspect", s(&out), "--json"])).unwrap();
    assert_eq!(c.schema_version, cersa::inspect::SCHEMA_VERSION);
    let stored: u64 = c.tensors.iter().map(|t| t.stored_bytes).sum();
    assert_eq!(stored, c.totals.stored_bytes);
    let kinds: u64 = c.by_kind.iter().map(|g| g.at_energy[0].stored_bytes).sum();
    assert_eq!(kinds, c.totals.stored_bytes);
    let source: u64 = c.tensors.iter().map(|t| t.source_bytes.unwrap()).sum();
    assert_eq!(source, c.totals.source_bytes);
    let csv = cersa_ok(&["inspect", s(&out), "--csv"]);
    assert_eq!(csv.lines().count(), 1 + c.tensors.len());
    assert!(csv.starts_with("name,module_kind,layer,kind,"));
}

#[test]
fn ctrl_c_stops_inspect_and_report_with_an_error_and_no_file() {
    use std::process::{Command, Stdio};
    let dir = tmp();
    let src = slow_source(dir.path());
    let html = dir.path().join("r.html");
    for args in [
        vec!["inspect", s(&src), "-q", "--threads", "1", "--json"],
        vec!["report", s(&src), "-o", s(&html), "-q", "--threads", "1"],
    ] {
        let child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            // Only possible on a machine far faster than the source is sized for; the file
            // a finished report writes is then legitimate.
            eprintln!("{}: the run won the race against the signal", args[0]);
            let _ = std::fs::remove_file(&html);
            continue;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("error:") && stderr.contains("interrupted"),
            "{stderr}"
        );
        assert!(output.stdout.is_empty(), "no half report on stdout");
    }
    assert!(!html.exists(), "no report file after Ctrl-C");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_set_cancel_flag_stops_inspect_and_report_before_any_tensor() {
    use std::sync::atomic::AtomicBool;
    let src = fixture("minilm-excerpt/model.safetensors");
    let source = cersa::input::open(&src).unwrap();
    let opts = cersa::inspect::InspectOptions {
        energies: vec![0.9],
        include: vec![],
        exclude: vec![],
        keep_singular_values: false,
        calibration: None,
    };
    let route = cersa::decompose::Route::Auto.decomposer().unwrap();
    let cancelled = AtomicBool::new(true);
    let err = cersa::inspect::inspect_source(
        source.as_ref(),
        &opts,
        route.as_ref(),
        &|_, _| {},
        &cancelled,
    )
    .unwrap_err();
    assert!(matches!(err, cersa::ConvertError::Interrupted), "{err}");

    let dir = tmp();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let ckpt = cersa_loader::Checkpoint::open(&out).unwrap();
    let report = cersa::inspect::inspect_checkpoint(&ckpt);
    let err = cersa::report::model_from_checkpoint("t", &ckpt, &report, &cancelled).unwrap_err();
    assert!(matches!(err, cersa::ConvertError::Interrupted), "{err}");
    cersa::report::model_from_checkpoint("t", &ckpt, &report, &AtomicBool::new(false)).unwrap();
}

#[test]
fn inspect_uses_the_chosen_route() {
    let src = fixture("mixed/model.safetensors");
    let auto: SourceReport =
        serde_json::from_str(&cersa_ok(&["inspect", s(&src), "-q", "--json"])).unwrap();
    let svd: SourceReport = serde_json::from_str(&cersa_ok(&[
        "inspect",
        s(&src),
        "-q",
        "--json",
        "--algorithm",
        "svd",
    ]))
    .unwrap();
    // Both routes are exact: the same ranks.
    let ranks = |r: &SourceReport| -> Vec<Vec<usize>> {
        r.tensors
            .iter()
            .map(|t| t.ranks.iter().map(|a| a.rank).collect())
            .collect()
    };
    assert_eq!(ranks(&auto), ranks(&svd));
    let err = cersa_fails(&["inspect", s(&src), "-q", "--algorithm", "nope"], 2);
    assert!(
        err.contains("invalid value 'nope' for '--algorithm"),
        "{err}"
    );
}
