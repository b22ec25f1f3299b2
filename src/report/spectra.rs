//! Singular-value spectra on a log scale for a few representative layers (first, middle,
//! last), one line per module kind.

use super::svg::{color, legend, Frame};
use super::{MatrixSpectrum, ReportModel};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Up to three layers: first, middle and last (or the tensors outside layers if none).
fn representative_layers(model: &ReportModel) -> Vec<Option<usize>> {
    let layers: BTreeSet<Option<usize>> = model.matrices.iter().map(|m| m.layer).collect();
    let numbered: Vec<usize> = layers.iter().filter_map(|l| *l).collect();
    if numbered.is_empty() {
        return layers.into_iter().take(1).collect();
    }
    let mut pick = vec![
        numbered[0],
        numbered[numbered.len() / 2],
        numbered[numbered.len() - 1],
    ];
    pick.dedup();
    pick.into_iter().map(Some).collect()
}

/// One panel per representative layer.
pub(crate) fn spectra(model: &ReportModel) -> String {
    let kinds: BTreeSet<&str> = model.matrices.iter().map(|m| m.kind.as_str()).collect();
    let kind_color: BTreeMap<&str, &str> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, color(i)))
        .collect();
    let mut out = String::new();
    for layer in representative_layers(model) {
        let ms: Vec<&MatrixSpectrum> = model
            .matrices
            .iter()
            .filter(|m| m.layer == layer && m.sigma.iter().any(|s| *s > 0.0))
            .collect();
        if ms.is_empty() {
            continue;
        }
        let positive = ms
            .iter()
            .flat_map(|m| m.sigma.iter().copied())
            .filter(|s| *s > 0.0);
        let (lo, hi) = positive.fold((f64::INFINITY, 0f64), |(a, b), s| (a.min(s), b.max(s)));
        let max_len = ms.iter().map(|m| m.sigma.len()).max().unwrap_or(1);
        let f = Frame {
            width: 460.0,
            height: 300.0,
            left: 56.0,
            right: 150.0,
            top: 24.0,
            bottom: 40.0,
            x: (1.0, max_len.max(2) as f64),
            y: (
                lo.log10().floor(),
                hi.log10().ceil().max(lo.log10().floor() + 1.0),
            ),
            log_y: true,
        };
        let name = layer.map_or("outside layers".to_string(), |l| format!("layer {l}"));
        f.open(&mut out, &format!("Singular values, {name}"));
        let _ = write!(
            out,
            r#"<text x="56" y="14" font-weight="bold">{name}</text>"#
        );
        let ticks: Vec<(f64, String)> = (0..=4)
            .map(|k| {
                let v = 1.0 + (max_len.max(2) - 1) as f64 * k as f64 / 4.0;
                (v, format!("{}", v.round()))
            })
            .collect();
        f.axes(&mut out, "index i", "σᵢ", &ticks);
        let mut entries = Vec::new();
        for m in &ms {
            let col = kind_color.get(m.kind.as_str()).copied().unwrap_or("#000");
            let pts: Vec<(f64, f64)> = m
                .sigma
                .iter()
                .enumerate()
                .filter(|(_, s)| **s > 0.0)
                .map(|(i, s)| ((i + 1) as f64, *s))
                .collect();
            f.line(&mut out, &pts, col, false);
            entries.push((m.kind.clone(), col.to_string()));
        }
        entries.dedup();
        legend(&mut out, f.width - f.right + 10.0, f.top + 10.0, &entries);
        out.push_str("</svg>");
    }
    out
}
