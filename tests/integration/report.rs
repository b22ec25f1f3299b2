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
    assert_eq!(c.schema_version, 2);
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
