//! Cumulative energy (Σ_{i≤r} σᵢ² / ‖W‖_F²) against rank fraction r / min(m, n), one line per
//! module kind (the mean over its matrices), with the τ lines marked.

use super::svg::{color, esc, legend, Frame};
use super::ReportModel;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Grid points on the rank-fraction axis.
const GRID: usize = 200;

/// Mean cumulative energy of `matrices` at each grid fraction; `None` where no matrix has
/// singular values that far (CERSA directories keep only σ_r).
pub(crate) fn mean_curve(matrices: &[&super::MatrixSpectrum]) -> Vec<(f64, f64)> {
    let cums: Vec<Vec<f64>> = matrices
        .iter()
        .map(|m| {
            let mut acc = 0.0;
            std::iter::once(0.0)
                .chain(m.sigma.iter().map(|s| {
                    acc += s * s;
                    if m.norm2 > 0.0 {
                        (acc / m.norm2).min(1.0)
                    } else {
                        0.0
                    }
                }))
                .collect()
        })
        .collect();
    (0..=GRID)
        .filter_map(|g| {
            let x = g as f64 / GRID as f64;
            let vals: Vec<f64> = matrices
                .iter()
                .zip(&cums)
                .filter_map(|(m, c)| {
                    let r = (x * m.min_dim as f64).ceil() as usize;
                    c.get(r).copied()
                })
                .collect();
            (!vals.is_empty()).then(|| (x, vals.iter().sum::<f64>() / vals.len() as f64))
        })
        .collect()
}

/// The energy plot.
pub(crate) fn energy_curves(model: &ReportModel) -> String {
    let mut by_kind: BTreeMap<&str, Vec<&super::MatrixSpectrum>> = BTreeMap::new();
    for m in &model.matrices {
        by_kind.entry(&m.kind).or_default().push(m);
    }
    let f = Frame {
        width: 760.0,
        height: 420.0,
        left: 56.0,
        right: 220.0,
        top: 16.0,
        bottom: 40.0,
        x: (0.0, 1.0),
        y: (0.0, 1.0),
        log_y: false,
    };
    let mut out = String::new();
    f.open(
        &mut out,
        "Cumulative energy vs rank fraction per module kind",
    );
    let ticks: Vec<(f64, String)> = (0..=5)
        .map(|k| (k as f64 / 5.0, format!("{}%", k * 20)))
        .collect();
    f.axes(&mut out, "rank / min(m, n)", "cumulative energy", &ticks);
    for tau in &model.energies {
        f.line(&mut out, &[(0.0, *tau), (1.0, *tau)], "#888", true);
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="#555">τ={}</text>"##,
            f.px(0.0) + 4.0,
            f.py(*tau) - 3.0,
            esc(&tau.to_string())
        );
    }
    let mut entries = Vec::new();
    for (i, (kind, ms)) in by_kind.iter().enumerate() {
        let pts = mean_curve(ms);
        f.line(&mut out, &pts, color(i), false);
        entries.push((format!("{kind} ({})", ms.len()), color(i).to_string()));
    }
    legend(&mut out, f.width - f.right + 12.0, f.top + 10.0, &entries);
    out.push_str("</svg>");
    out
}
