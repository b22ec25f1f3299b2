//! `cersa report`: one self-contained HTML file (inline SVG, no script, no external
//! resources) that shows a checkpoint's spectra to help choose τ.
//!
//! Input is either a source (every singular value, from `inspect_source` with
//! `keep_singular_values`) or a CERSA directory (the stored σ_r of each factored tensor; its
//! ‖W‖_F² follows from the manifest's energy, so the energy curves stop at the kept rank).

mod energy;
mod heatmap;
mod memory;
mod spectra;
pub mod svg;
mod table;

use crate::error::{ConvertError, Result};
use crate::inspect::groups::GroupRow;
use crate::inspect::{CheckpointReport, SourceReport};
use cersa_loader::{Checkpoint, TensorKind, TensorView};
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use svg::esc;

/// The spectrum of one matrix as the plots need it.
#[derive(Debug, Clone)]
pub struct MatrixSpectrum {
    /// Tensor name.
    pub name: String,
    /// Module kind.
    pub kind: String,
    /// Layer index.
    pub layer: Option<usize>,
    /// min(m, n).
    pub min_dim: usize,
    /// Leading singular values (all of them for a source, σ_r for a CERSA directory).
    pub sigma: Vec<f64>,
    /// ‖W‖_F².
    pub norm2: f64,
    /// Rank fraction per threshold.
    pub rank_fraction: Vec<f64>,
}

/// One row of the per-tensor table.
#[derive(Debug, Clone)]
pub struct TableRow {
    /// Cells, already formatted.
    pub cells: Vec<String>,
}

/// Everything the report shows.
#[derive(Debug, Clone)]
pub struct ReportModel {
    /// Page title (the input path).
    pub title: String,
    /// `source` or `cersa`.
    pub input_kind: &'static str,
    /// Thresholds τ.
    pub energies: Vec<f64>,
    /// Analysed (or factored) matrices.
    pub matrices: Vec<MatrixSpectrum>,
    /// Sums per module kind (one `at_energy` per threshold).
    pub by_kind: Vec<GroupRow>,
    /// Total bytes dense.
    pub source_bytes: u64,
    /// Total bytes stored per threshold.
    pub stored_bytes: Vec<u64>,
    /// Per-tensor table header.
    pub table_header: Vec<String>,
    /// Per-tensor table rows.
    pub table_rows: Vec<TableRow>,
    /// Settings known to break the model's function ([`crate::inspect::function_warnings`],
    /// [`crate::inspect::source_warnings`]), shown above the plots.
    pub warnings: Vec<String>,
}

/// The model of a source report (it must hold singular values).
pub fn model_from_source(title: &str, r: &SourceReport) -> ReportModel {
    // A stacked experts tensor shows each expert's spectrum.
    let matrices = r
        .tensors
        .iter()
        .flat_map(crate::inspect::matrices)
        .filter(|t| t.matrix_shape.is_some() && !t.singular_values.is_empty())
        .map(|t| {
            let [m, n] = t.matrix_shape.unwrap_or([0, 0]);
            let f = t.metrics.as_ref().map_or(0.0, |x| x.frobenius_norm);
            MatrixSpectrum {
                name: t.name.clone(),
                kind: t.module_kind.clone(),
                layer: t.layer,
                min_dim: m.min(n),
                sigma: t.singular_values.clone(),
                norm2: f * f,
                rank_fraction: t.ranks.iter().map(|k| k.rank_fraction).collect(),
            }
        })
        .collect();
    let mut header: Vec<String> = [
        "tensor", "kind", "layer", "shape", "dtype", "σ₁", "stable", "eff.rank",
    ]
    .map(String::from)
    .into();
    // With calibration statistics the ranks of whitened matrices are of output energy.
    let calibrated = r.calibration.is_some();
    if calibrated {
        header.push("metric".into());
    }
    for e in &r.energies {
        header.push(format!("rank@{e}"));
    }
    header.push("dense".into());
    for e in &r.energies {
        header.push(format!("bytes@{e}"));
    }
    let table_rows = r
        .tensors
        .iter()
        .flat_map(|t| std::iter::once(t).chain(&t.experts))
        .map(|t| {
            let m = t.metrics.as_ref();
            let mut cells = vec![
                t.name.clone(),
                t.module_kind.clone(),
                t.layer.map(|l| l.to_string()).unwrap_or_default(),
                format!("{:?}", t.shape),
                t.dtype.clone(),
                m.map(|m| format!("{:.3}", m.spectral_norm))
                    .unwrap_or_default(),
                m.map(|m| format!("{:.1}", m.stable_rank))
                    .unwrap_or_default(),
                m.map(|m| format!("{:.1}", m.effective_rank))
                    .unwrap_or_default(),
            ];
            if calibrated {
                let metric = match (&t.metrics, t.whitened) {
                    (None, _) => "",
                    (Some(_), true) => "output",
                    (Some(_), false) => "weight",
                };
                cells.push(metric.into());
            }
            for k in 0..r.energies.len() {
                cells.push(
                    t.ranks
                        .get(k)
                        .map(|a| {
                            format!(
                                "{} ({:.0}%){}",
                                a.rank,
                                100.0 * a.rank_fraction,
                                if a.saves { "" } else { "*" }
                            )
                        })
                        .unwrap_or_default(),
                );
            }
            cells.push(t.source_bytes.to_string());
            for k in 0..r.energies.len() {
                cells.push(
                    t.ranks
                        .get(k)
                        .map_or(t.source_bytes, |a| a.stored_bytes)
                        .to_string(),
                );
            }
            TableRow { cells }
        })
        .collect();
    ReportModel {
        title: title.to_string(),
        input_kind: "source",
        energies: r.energies.clone(),
        matrices,
        by_kind: r.by_kind.clone(),
        source_bytes: r.totals.source_bytes,
        stored_bytes: r.totals.at_energy.iter().map(|a| a.stored_bytes).collect(),
        table_header: header,
        table_rows,
        warnings: r.warnings.clone(),
    }
}

/// The model of a CERSA directory: stored σ_r of every factored tensor. Once `cancel` is
/// set no further tensor is read and the result is [`ConvertError::Interrupted`].
pub fn model_from_checkpoint(
    title: &str,
    ckpt: &Checkpoint,
    r: &CheckpointReport,
    cancel: &AtomicBool,
) -> Result<ReportModel> {
    let mut matrices = Vec::new();
    for t in &r.tensors {
        if cancel.load(Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        match t.kind {
            TensorKind::Factored => matrices.extend(stored_spectrum(ckpt, t, ckpt.get(&t.name)?)?),
            // Each factored expert's own σ (NAME.cersa_expert.e.cersa_s).
            TensorKind::Experts => {
                for (e, x) in t.experts.iter().enumerate() {
                    if x.kind == TensorKind::Factored {
                        matrices.extend(stored_spectrum(ckpt, x, ckpt.expert(&t.name, e)?)?);
                    }
                }
            }
            _ => {}
        }
    }
    // Whitened checkpoints: their energy is of the layer outputs, and the output-space
    // error is what the model feels.
    let whitened = r.tensors.iter().any(|t| t.output_rel_error.is_some());
    let mut header: Vec<String> = [
        "tensor",
        "kind",
        "layer",
        "shape",
        "stored",
        "rank",
        if whitened {
            "energy (output if whitened)"
        } else {
            "energy"
        },
        "rel_error",
        "storing adds",
        "dense",
        "stored bytes",
    ]
    .map(String::from)
    .into();
    if whitened {
        header.insert(8, "output rel_error".into());
    }
    let table_rows = r
        .tensors
        .iter()
        .flat_map(|t| std::iter::once(t).chain(&t.experts))
        .map(|t| TableRow {
            cells: with_output_error(
                whitened,
                t,
                vec![
                    t.name.clone(),
                    t.module_kind.clone(),
                    t.layer.map(|l| l.to_string()).unwrap_or_default(),
                    format!("{:?}", t.shape),
                    format!("{:?} {}", t.kind, t.stored_dtype).to_lowercase(),
                    match crate::inspect::expert_ranks(t) {
                        Some((lo, med, hi, factored)) => format!(
                            "{lo}–{hi}, median {med} ({factored}/{} factored)",
                            t.experts.len()
                        ),
                        None => t
                            .rank
                            .zip(t.rank_fraction)
                            .map(|(k, f)| format!("{k} ({:.0}%)", 100.0 * f))
                            .unwrap_or_default(),
                    },
                    t.energy.map(|e| format!("{e:.4}")).unwrap_or_default(),
                    t.rel_error.map(|e| format!("{e:.4}")).unwrap_or_default(),
                    t.rounding_share
                        .map(|v| format!("{:.1}% of err²", 100.0 * v))
                        .unwrap_or_default(),
                    t.source_bytes.map(|b| b.to_string()).unwrap_or_default(),
                    t.stored_bytes.to_string(),
                ],
            ),
        })
        .collect();
    Ok(ReportModel {
        title: title.to_string(),
        input_kind: "cersa",
        energies: vec![r.energy],
        matrices,
        by_kind: r.by_kind.clone(),
        source_bytes: r.totals.source_bytes,
        stored_bytes: vec![r.totals.stored_bytes],
        table_header: header,
        table_rows,
        warnings: r.warnings.clone(),
    })
}

/// The spectrum of stored tensor (or expert) `t` from its stored σ_r (`view`: its stored
/// form; `None` unless factored). ‖W‖_F² follows from the manifest's energy.
fn stored_spectrum(
    ckpt: &Checkpoint,
    t: &crate::inspect::StoredTensor,
    view: TensorView<'_>,
) -> Result<Option<MatrixSpectrum>> {
    let TensorView::Factored(f) = view else {
        return Ok(None);
    };
    let sigma: Vec<f64> =
        cersa_loader::dtype::decode_f64(f.s.dtype, f.s.bytes).ok_or_else(|| {
            ConvertError::Tensor {
                path: ckpt.dir().to_path_buf(),
                tensor: t.name.clone(),
                reason: "cersa_s is not a float tensor".into(),
            }
        })?;
    let kept: f64 = sigma.iter().map(|s| s * s).sum();
    let energy = t.energy.unwrap_or(1.0);
    let [m, n] = f.matrix_shape;
    Ok(Some(MatrixSpectrum {
        name: t.name.clone(),
        kind: t.module_kind.clone(),
        layer: t.layer,
        min_dim: m.min(n),
        sigma,
        norm2: if energy > 0.0 { kept / energy } else { kept },
        rank_fraction: t.rank_fraction.into_iter().collect(),
    }))
}

/// The checkpoint table's cells with the output-error column (after rel_error) when the
/// checkpoint has whitened entries.
fn with_output_error(
    whitened: bool,
    t: &crate::inspect::StoredTensor,
    mut cells: Vec<String>,
) -> Vec<String> {
    if whitened {
        let cell = t
            .output_rel_error
            .map(|e| format!("{e:.4}"))
            .unwrap_or_default();
        cells.insert(8, cell);
    }
    cells
}

/// `n` with an SI prefix: `1.78{sep}M{unit}`, `41.7{sep}k{unit}`, `812{sep}{unit}`. One
/// rule for the terminal (`1.78M` counts, `1.78MB` bytes) and this report (`1.78 MB`).
pub fn si_text(n: u64, sep: &str, unit: &str) -> String {
    let x = n as f64;
    let (value, prefix, digits) = if x >= 1e9 {
        (x / 1e9, "G", 2)
    } else if x >= 1e6 {
        (x / 1e6, "M", 2)
    } else if x >= 1e3 {
        (x / 1e3, "k", 1)
    } else {
        return format!("{n}{sep}{unit}");
    };
    format!("{value:.digits$}{sep}{prefix}{unit}")
}

/// Bytes as text.
pub(crate) fn bytes_text(n: u64) -> String {
    si_text(n, " ", "B")
}

/// Renders the whole HTML page.
pub fn render_html(model: &ReportModel) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cersa report: {t}</title>
<style>
body{{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}}
h1{{font-size:1.4em}} h2{{font-size:1.15em;margin-top:1.6em}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} th{{background:#f3f3f3;position:sticky;top:0}}
.plots{{display:flex;flex-wrap:wrap;gap:12px}} .note{{color:#555;font-size:13px}}
.warning{{background:#fff3cd;border:1px solid #e0b400;padding:6px 10px;font-size:14px}}
</style></head><body>
<h1>cersa report: {t}</h1>
"#,
        t = esc(&model.title)
    );
    let _ = writeln!(
        out,
        r#"<p class="note">Input: {} · {} matrices · thresholds τ = {} · generated by cersa {}</p>"#,
        model.input_kind,
        model.matrices.len(),
        model
            .energies
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        env!("CARGO_PKG_VERSION"),
    );
    for w in &model.warnings {
        let _ = writeln!(out, r#"<p class="warning">Warning: {}</p>"#, esc(w));
    }
    out.push_str("<h2>Memory: dense vs CERSA</h2>\n<ul>");
    for (tau, stored) in model.energies.iter().zip(&model.stored_bytes) {
        let _ = write!(
            out,
            "<li>τ = {tau}: {} → {} ({:.3}×)</li>",
            bytes_text(model.source_bytes),
            bytes_text(*stored),
            *stored as f64 / model.source_bytes.max(1) as f64
        );
    }
    out.push_str("</ul>\n<div class=\"plots\" id=\"memory\">");
    out.push_str(&memory::memory_bars(model));
    out.push_str(
        "</div>\n<h2>Cumulative energy by module kind</h2>\n<div class=\"plots\" id=\"energy\">",
    );
    out.push_str(&energy::energy_curves(model));
    out.push_str("</div>\n<h2>Rank fraction at τ (layers × module kinds)</h2>\n<div class=\"plots\" id=\"heatmap\">");
    for k in 0..model.energies.len() {
        out.push_str(&heatmap::heatmap(model, k));
    }
    out.push_str(
        "</div>\n<h2>Singular-value spectra (log scale)</h2>\n<div class=\"plots\" id=\"spectra\">",
    );
    out.push_str(&spectra::spectra(model));
    out.push_str("</div>\n<h2>Tensors</h2>\n");
    out.push_str(&table::tensor_table(model));
    out.push_str("</body></html>\n");
    out
}

/// Writes `html` to `path` atomically (temporary sibling, then rename), so a failed run
/// never leaves a half-written report.
pub fn write_report(path: &std::path::Path, html: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report.html".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, html).map_err(|e| ConvertError::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ConvertError::io(path, "rename", e)
    })
}

#[cfg(test)]
mod tests {
    use super::si_text;

    #[test]
    fn si_text_for_counts_terminal_bytes_and_report_bytes() {
        assert_eq!(si_text(0, "", ""), "0");
        assert_eq!(si_text(812, "", ""), "812");
        assert_eq!(si_text(812, " ", "B"), "812 B");
        assert_eq!(si_text(41_700, "", "B"), "41.7kB");
        assert_eq!(si_text(1_780_000, "", ""), "1.78M");
        assert_eq!(si_text(7_107_024, " ", "B"), "7.11 MB");
        assert_eq!(si_text(5_000_000_000, "", "B"), "5.00GB");
    }
}
