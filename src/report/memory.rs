//! Bars of memory per module kind, dense vs CERSA at each τ, and the total.

use super::svg::{color, esc, legend};
use super::{bytes_text, ReportModel};
use std::fmt::Write;

/// The memory bar chart (horizontal bars, one group per kind plus the total).
pub(crate) fn memory_bars(model: &ReportModel) -> String {
    let mut groups: Vec<(String, u64, Vec<u64>)> = model
        .by_kind
        .iter()
        .map(|g| {
            (
                g.key.clone(),
                g.source_bytes,
                g.at_energy.iter().map(|a| a.stored_bytes).collect(),
            )
        })
        .collect();
    groups.insert(
        0,
        (
            "TOTAL".to_string(),
            model.source_bytes,
            model.stored_bytes.clone(),
        ),
    );
    let bars = 1 + model.energies.len();
    let bar_h = 9.0;
    let group_h = bar_h * bars as f64 + 8.0;
    let left = 230.0;
    let plot_w = 420.0;
    let top = 10.0;
    let width = left + plot_w + 190.0;
    let height = top + group_h * groups.len() as f64 + 20.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" viewBox="0 0 {width} {height:.0}" role="img" font-family="sans-serif" font-size="11"><title>Memory per module kind, dense vs CERSA</title><rect width="{width}" height="{height:.0}" fill="white"/>"#
    );
    for (gi, (key, dense, stored)) in groups.iter().enumerate() {
        // Each group is scaled to its own dense size so small kinds stay readable; labels
        // carry the absolute numbers.
        let scale = plot_w / (*dense).max(1) as f64;
        let y0 = top + group_h * gi as f64;
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end"{}>{}</text>"#,
            left - 6.0,
            y0 + group_h / 2.0,
            if gi == 0 {
                r#" font-weight="bold""#
            } else {
                ""
            },
            esc(key)
        );
        let values = std::iter::once(*dense).chain(stored.iter().copied());
        for (bi, v) in values.enumerate() {
            let y = y0 + bar_h * bi as f64;
            let w = (v as f64 * scale).max(0.5);
            let col = if bi == 0 { "#999" } else { color(bi - 1) };
            let _ = write!(
                out,
                r#"<rect x="{left}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{col}"/><text x="{:.1}" y="{:.1}" font-size="9">{}</text>"#,
                bar_h - 1.0,
                left + w + 4.0,
                y + bar_h - 1.5,
                esc(&if bi == 0 {
                    bytes_text(v)
                } else {
                    format!(
                        "{} ({:.2}×)",
                        bytes_text(v),
                        v as f64 / (*dense).max(1) as f64
                    )
                })
            );
        }
    }
    let mut entries = vec![("dense".to_string(), "#999".to_string())];
    for (k, tau) in model.energies.iter().enumerate() {
        entries.push((format!("CERSA τ={tau}"), color(k).to_string()));
    }
    legend(&mut out, left + plot_w + 70.0, top + 12.0, &entries);
    out.push_str("</svg>");
    out
}
