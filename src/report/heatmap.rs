//! Heatmap of rank fraction at one τ: layers (rows) × module kinds (columns).

use super::svg::{esc, ramp};
use super::ReportModel;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// The heatmap at threshold index `k`.
pub(crate) fn heatmap(model: &ReportModel, k: usize) -> String {
    let tau = model.energies.get(k).copied().unwrap_or(f64::NAN);
    let kinds: BTreeSet<&str> = model.matrices.iter().map(|m| m.kind.as_str()).collect();
    let kinds: Vec<&str> = kinds.into_iter().collect();
    let mut cells: BTreeMap<(Option<usize>, &str), Vec<f64>> = BTreeMap::new();
    for m in &model.matrices {
        if let Some(f) = m.rank_fraction.get(k) {
            cells
                .entry((m.layer, m.kind.as_str()))
                .or_default()
                .push(*f);
        }
    }
    let mut layers: Vec<Option<usize>> = cells.keys().map(|(l, _)| *l).collect();
    layers.dedup();
    layers.sort_by_key(|l| (l.is_none(), *l));
    let cell_w = 46.0;
    let cell_h = 18.0_f64.min(560.0 / layers.len().max(1) as f64).max(4.0);
    let left = 48.0;
    let top = 130.0;
    let width = left + cell_w * kinds.len() as f64 + 80.0;
    // Tall enough for the colour scale (11 steps of 10 px) even with a single layer.
    let height = (top + cell_h * layers.len() as f64 + 30.0).max(top + 125.0);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="11"><title>Rank fraction at τ = {tau}</title><rect width="{width}" height="{height}" fill="white"/><text x="4" y="14" font-weight="bold">τ = {tau}</text>"#
    );
    for (c, kind) in kinds.iter().enumerate() {
        let x = left + cell_w * (c as f64 + 0.5);
        let _ = write!(
            out,
            r#"<text transform="translate({x:.1} {:.1}) rotate(-60)">{}</text>"#,
            top - 4.0,
            esc(kind)
        );
    }
    for (r, layer) in layers.iter().enumerate() {
        let y = top + cell_h * r as f64;
        if cell_h >= 9.0 || r % 5 == 0 {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 4.0,
                y + cell_h * 0.75,
                layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
            );
        }
        for (c, kind) in kinds.iter().enumerate() {
            let Some(v) = cells.get(&(*layer, *kind)) else {
                continue;
            };
            let f = v.iter().sum::<f64>() / v.len() as f64;
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{y:.1}" width="{cell_w}" height="{cell_h:.1}" fill="{}"><title>layer {} · {} · {:.1}%</title></rect>"#,
                left + cell_w * c as f64,
                ramp(f),
                layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                esc(kind),
                100.0 * f
            );
            if cell_h >= 12.0 {
                let _ = write!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{}">{:.0}</text>"#,
                    left + cell_w * (c as f64 + 0.5),
                    y + cell_h * 0.72,
                    if f > 0.45 { "white" } else { "black" },
                    100.0 * f
                );
            }
        }
    }
    // Colour scale.
    let sx = left + cell_w * kinds.len() as f64 + 20.0;
    for s in 0..=10 {
        let _ = write!(
            out,
            r#"<rect x="{sx:.1}" y="{:.1}" width="14" height="10" fill="{}"/>"#,
            top + 10.0 * s as f64,
            ramp(s as f64 / 10.0)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}">0%</text><text x="{:.1}" y="{:.1}">100%</text></svg>"#,
        sx + 18.0,
        top + 9.0,
        sx + 18.0,
        top + 109.0
    );
    out
}
