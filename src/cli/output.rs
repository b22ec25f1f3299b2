//! Human-readable tables for the terminal.

use crate::convert::ConvertReport;
use crate::inspect::{CheckpointReport, SourceReport};
use std::fmt::Write;

fn human(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Renders rows with left-aligned first column and right-aligned others.
fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        for (k, (c, w)) in cells.iter().zip(&width).enumerate() {
            if k == 0 {
                let _ = write!(out, "{c:<w$}");
            } else {
                let _ = write!(out, "  {c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, header);
    for r in rows {
        line(&mut out, r);
    }
    out
}

/// `cersa convert` summary.
pub fn convert_summary(r: &ConvertReport) -> String {
    let t = &r.manifest.totals;
    format!(
        "wrote {} ({} shard(s)) in {:.1}s\n\
         tensors: {} factored, {} dense\n\
         params:  {} → {} ({:.3}×)\n\
         bytes:   {} → {} ({:.3}×)\n\
         energy threshold τ = {}\n",
        r.out_dir.display(),
        r.manifest.shards.len(),
        r.seconds,
        t.factored_tensors,
        t.dense_tensors,
        human(t.source_params),
        human(t.stored_params),
        r.param_ratio,
        human(t.source_bytes),
        human(t.stored_bytes),
        r.byte_ratio,
        r.manifest.config.energy,
    )
}

/// `cersa inspect SRC` table.
pub fn source_table(r: &SourceReport) -> String {
    let mut header = vec!["tensor".to_string(), "shape".into(), "dtype".into()];
    for e in &r.energies {
        header.push(format!("r@{e}"));
    }
    header.push("break-even".into());
    let rows: Vec<Vec<String>> = r
        .tensors
        .iter()
        .filter(|t| t.matrix_shape.is_some())
        .map(|t| {
            let mut row = vec![t.name.clone(), format!("{:?}", t.shape), t.dtype.clone()];
            for k in &t.ranks {
                row.push(format!(
                    "{} ({:.0}%){}",
                    k.rank,
                    100.0 * k.rank_fraction,
                    if k.saves { "" } else { "*" }
                ));
            }
            row.push(t.break_even_rank.map(|b| b.to_string()).unwrap_or_default());
            row
        })
        .collect();
    let mut out = table(&header, &rows);
    let dense = r.tensors.len() - rows.len();
    let _ = writeln!(
        out,
        "\n{} tensors ({} matrices analysed, {} kept dense), {} params; * = factors not smaller than the matrix",
        r.totals.tensors,
        rows.len(),
        dense,
        human(r.totals.params)
    );
    for a in &r.totals.at_energy {
        let _ = writeln!(
            out,
            "τ = {:<5} stored params {} of {} ({:.3}×)",
            a.threshold,
            human(a.stored_params),
            human(r.totals.params),
            a.param_ratio
        );
    }
    out
}

/// `cersa inspect OUT_DIR` table.
pub fn checkpoint_table(r: &CheckpointReport) -> String {
    let header: Vec<String> = [
        "tensor",
        "kind",
        "shape",
        "dtype",
        "rank",
        "energy",
        "rel_error",
        "note",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let rows: Vec<Vec<String>> = r
        .tensors
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                format!("{:?}", t.kind).to_lowercase(),
                format!("{:?}", t.shape),
                t.stored_dtype.clone(),
                t.rank
                    .zip(t.rank_fraction)
                    .map(|(r, f)| format!("{r} ({:.0}%)", 100.0 * f))
                    .unwrap_or_default(),
                t.energy.map(|e| format!("{e:.4}")).unwrap_or_default(),
                t.rel_error.map(|e| format!("{e:.4}")).unwrap_or_default(),
                t.reason
                    .map(|x| {
                        serde_json::to_value(x)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    let t = &r.totals;
    let _ = writeln!(
        out,
        "\nτ = {}: {} factored, {} dense; params {} → {} ({:.3}×); bytes {} → {}",
        r.energy,
        t.factored_tensors,
        t.dense_tensors,
        human(t.source_params),
        human(t.stored_params),
        t.stored_params as f64 / t.source_params.max(1) as f64,
        human(t.source_bytes),
        human(t.stored_bytes),
    );
    out
}
