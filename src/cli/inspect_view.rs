//! Terminal tables and CSV of `cersa inspect` (source and CERSA directory).

use super::output::{human, table};
use crate::inspect::groups::GroupRow;
use crate::inspect::{
    expert_ranks, matrices, CheckpointReport, SourceReport, StoredTensor, TensorSpectrum,
};
use clap::ValueEnum;
use std::fmt::Write;

/// How the terminal table groups tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupBy {
    /// One row per module kind (name without layer index).
    Kind,
    /// One row per layer index.
    Layer,
    /// One row per tensor.
    None,
}

fn bytes(n: u64) -> String {
    crate::report::si_text(n, "", "B")
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

fn group_table(rows: &[GroupRow], first: &str, thresholds: &[f64]) -> String {
    let mut header: Vec<String> = [first, "tensors", "matrices", "params", "dense"]
        .map(String::from)
        .into();
    for t in thresholds {
        header.push(format!("rank%@{t}"));
        header.push(format!("bytes@{t}"));
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|g| {
            let mut row = vec![
                g.key.clone(),
                g.tensors.to_string(),
                g.matrices.to_string(),
                human(g.params),
                bytes(g.source_bytes),
            ];
            for a in &g.at_energy {
                row.push(a.mean_rank_fraction.map(pct).unwrap_or_else(|| "-".into()));
                row.push(format!(
                    "{} ({:.2}×)",
                    bytes(a.stored_bytes),
                    a.stored_bytes as f64 / g.source_bytes.max(1) as f64
                ));
            }
            row
        })
        .collect();
    table(&header, &body)
}

/// A source tensor, then its experts (stacked experts tensors): one row each.
fn with_experts(t: &TensorSpectrum) -> impl Iterator<Item = &TensorSpectrum> {
    std::iter::once(t).chain(&t.experts)
}

/// A stored tensor, then its experts (experts entries): one row each.
fn stored_with_experts(t: &StoredTensor) -> impl Iterator<Item = &StoredTensor> {
    std::iter::once(t).chain(&t.experts)
}

/// The rank at threshold index `k`: `r (f%)`, `*` when the factors would not be smaller;
/// for a stacked experts tensor the experts' range and mean fraction, `*` when no expert's
/// factors would be smaller.
fn rank_cell(t: &TensorSpectrum, k: usize) -> String {
    let Some(a) = t.ranks.get(k) else {
        return String::new();
    };
    let star = if a.saves { "" } else { "*" };
    let ranks = || {
        t.experts
            .iter()
            .filter_map(|x| x.ranks.get(k))
            .map(|x| x.rank)
    };
    match (ranks().min(), t.experts.is_empty()) {
        (Some(lo), false) if lo != a.rank => {
            format!("{lo}–{} ({:.0}%){star}", a.rank, 100.0 * a.rank_fraction)
        }
        _ => format!("{} ({:.0}%){star}", a.rank, 100.0 * a.rank_fraction),
    }
}

/// The stored rank: `r (f%)`; for an experts entry the range and median of its factored
/// experts' ranks and how many are factored.
fn stored_rank_cell(t: &StoredTensor) -> String {
    if let Some((lo, med, hi, factored)) = expert_ranks(t) {
        return format!(
            "{lo}–{hi}, median {med} ({factored}/{} factored)",
            t.experts.len()
        );
    }
    t.rank
        .zip(t.rank_fraction)
        .map(|(r, f)| format!("{r} ({:.0}%)", 100.0 * f))
        .unwrap_or_default()
}

/// `cersa inspect SRC` on a terminal.
pub fn source_view(r: &SourceReport, by: GroupBy) -> String {
    let mut out = match by {
        GroupBy::Kind => group_table(&r.by_kind, "module kind", &r.energies),
        GroupBy::Layer => group_table(&r.by_layer, "layer", &r.energies),
        GroupBy::None => {
            let mut header: Vec<String> = [
                "tensor",
                "shape",
                "dtype",
                "σ₁",
                "‖W‖_F",
                "stable",
                "eff.rank",
                "top1%",
            ]
            .map(String::from)
            .into();
            for e in &r.energies {
                header.push(format!("r@{e}"));
            }
            header.push("break-even".into());
            let rows: Vec<Vec<String>> = r
                .tensors
                .iter()
                .filter(|t| t.matrix_shape.is_some())
                .flat_map(with_experts)
                .map(|t| {
                    let mut row = vec![t.name.clone(), format!("{:?}", t.shape), t.dtype.clone()];
                    match &t.metrics {
                        Some(m) => {
                            row.push(format!("{:.3}", m.spectral_norm));
                            row.push(format!("{:.3}", m.frobenius_norm));
                            row.push(format!("{:.1}", m.stable_rank));
                            row.push(format!("{:.1}", m.effective_rank));
                            row.push(pct(m.top1pct_energy));
                        }
                        None => row.extend(vec![String::new(); 5]),
                    }
                    for k in 0..t.ranks.len() {
                        row.push(rank_cell(t, k));
                    }
                    row.push(t.break_even_rank.map(|b| b.to_string()).unwrap_or_default());
                    row
                })
                .collect();
            table(&header, &rows)
        }
    };
    let analysed: usize = r.tensors.iter().map(|t| matrices(t).len()).sum();
    let kept = r
        .tensors
        .iter()
        .filter(|t| t.matrix_shape.is_none())
        .count();
    let stacked = r.tensors.iter().filter(|t| !t.experts.is_empty()).count();
    let _ = writeln!(
        out,
        "\n{} tensors ({} matrices analysed{}, {} kept dense), {} params, {} dense{}",
        r.totals.tensors,
        analysed,
        match stacked {
            0 => String::new(),
            k => format!(", the experts of {k} stacked tensors one by one"),
        },
        kept,
        human(r.totals.params),
        bytes(r.totals.source_bytes),
        if by == GroupBy::None {
            "; * = factors not smaller than the matrix"
        } else {
            ""
        }
    );
    for a in &r.totals.at_energy {
        let _ = writeln!(
            out,
            "τ = {:<5} params {} → {} ({:.3}×)  bytes {} → {} ({:.3}×)",
            a.threshold,
            human(r.totals.params),
            human(a.stored_params),
            a.param_ratio,
            bytes(r.totals.source_bytes),
            bytes(a.stored_bytes),
            a.byte_ratio,
        );
    }
    if let Some(c) = &r.calibration {
        let whitened = r.tensors.iter().filter(|t| t.whitened).count();
        let _ = writeln!(
            out,
            "{whitened} matrices analysed in their output metric (calibration sha256 {}…, \
             damping {}): their τ is a share of output energy",
            c.sha256.get(..12).unwrap_or(&c.sha256),
            c.damping
        );
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn reason_text(r: Option<cersa_loader::DenseReason>) -> String {
    r.and_then(|x| {
        serde_json::to_value(x)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
    })
    .unwrap_or_default()
}

/// `cersa inspect OUT_DIR` on a terminal.
pub fn checkpoint_view(r: &CheckpointReport, by: GroupBy) -> String {
    let mut out = match by {
        GroupBy::Kind => group_table(&r.by_kind, "module kind", &[r.energy]),
        GroupBy::Layer => group_table(&r.by_layer, "layer", &[r.energy]),
        GroupBy::None => {
            let header: Vec<String> = [
                "tensor",
                "kind",
                "shape",
                "dtype",
                "rank",
                "energy",
                "rel_error",
                "storing",
                "bytes",
                "note",
            ]
            .map(String::from)
            .into();
            let rows: Vec<Vec<String>> = r
                .tensors
                .iter()
                .flat_map(stored_with_experts)
                .map(|t| {
                    vec![
                        t.name.clone(),
                        format!("{:?}", t.kind).to_lowercase(),
                        format!("{:?}", t.shape),
                        t.stored_dtype.clone(),
                        stored_rank_cell(t),
                        t.energy.map(|e| format!("{e:.4}")).unwrap_or_default(),
                        t.rel_error.map(|e| format!("{e:.4}")).unwrap_or_default(),
                        share(t.rounding_share),
                        bytes(t.stored_bytes),
                        match t.output_rel_error {
                            Some(e) => format!("whitened, output error {e:.4}"),
                            None => reason_text(t.reason),
                        },
                    ]
                })
                .collect();
            table(&header, &rows)
        }
    };
    let t = &r.totals;
    let _ = writeln!(
        out,
        "\nτ = {}: {} factored, {} dense; params {} → {} ({:.3}×); bytes {} → {} ({:.3}×)",
        r.energy,
        t.factored_tensors,
        t.dense_tensors,
        human(t.source_params),
        human(t.stored_params),
        t.stored_params as f64 / t.source_params.max(1) as f64,
        bytes(t.source_bytes),
        bytes(t.stored_bytes),
        t.stored_bytes as f64 / t.source_bytes.max(1) as f64,
    );
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(header: &[String], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for r in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = r.iter().map(|c| csv_field(c)).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn opt<T: ToString>(x: Option<T>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

/// `cersa inspect SRC --csv`: one row per tensor, rank columns per threshold.
pub fn source_csv(r: &SourceReport) -> String {
    let mut header: Vec<String> = [
        "name",
        "module_kind",
        "layer",
        "shape",
        "dtype",
        "params",
        "source_bytes",
        "m",
        "n",
        "reason",
        "spectral_norm",
        "frobenius_norm",
        "stable_rank",
        "effective_rank",
        "top1pct_energy",
        "break_even_rank",
    ]
    .map(String::from)
    .into();
    for e in &r.energies {
        for c in ["rank", "rank_fraction", "energy", "saves", "stored_bytes"] {
            header.push(format!("{c}@{e}"));
        }
    }
    let rows: Vec<Vec<String>> = r
        .tensors
        .iter()
        .flat_map(with_experts)
        .map(|t| {
            let m = t.metrics.as_ref();
            let mut row = vec![
                t.name.clone(),
                t.module_kind.clone(),
                opt(t.layer),
                t.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x"),
                t.dtype.clone(),
                t.params.to_string(),
                t.source_bytes.to_string(),
                opt(t.matrix_shape.map(|s| s[0])),
                opt(t.matrix_shape.map(|s| s[1])),
                reason_text(t.reason),
                opt(m.map(|m| m.spectral_norm)),
                opt(m.map(|m| m.frobenius_norm)),
                opt(m.map(|m| m.stable_rank)),
                opt(m.map(|m| m.effective_rank)),
                opt(m.map(|m| m.top1pct_energy)),
                opt(t.break_even_rank),
            ];
            for k in 0..r.energies.len() {
                match t.ranks.get(k) {
                    Some(a) => row.extend([
                        a.rank.to_string(),
                        a.rank_fraction.to_string(),
                        a.energy.to_string(),
                        a.saves.to_string(),
                        a.stored_bytes.to_string(),
                    ]),
                    None => row.extend(vec![String::new(); 5]),
                }
            }
            row
        })
        .collect();
    csv(&header, &rows)
}

/// The share of the squared error storing adds (`storing` column), e.g. `+3.1%`.
fn share(s: Option<f64>) -> String {
    s.map(|v| format!("+{:.1}%", 100.0 * v)).unwrap_or_default()
}

/// `cersa inspect OUT_DIR --csv`: one row per tensor.
pub fn checkpoint_csv(r: &CheckpointReport) -> String {
    let header: Vec<String> = [
        "name",
        "module_kind",
        "layer",
        "kind",
        "shape",
        "source_dtype",
        "stored_dtype",
        "rank",
        "rank_fraction",
        "energy",
        "rel_error",
        "truncation_error",
        "rounding_share",
        "reason",
        "params",
        "stored_params",
        "source_bytes",
        "stored_bytes",
    ]
    .map(String::from)
    .into();
    let rows: Vec<Vec<String>> = r
        .tensors
        .iter()
        .flat_map(stored_with_experts)
        .map(|t| {
            vec![
                t.name.clone(),
                t.module_kind.clone(),
                opt(t.layer),
                format!("{:?}", t.kind).to_lowercase(),
                t.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x"),
                t.source_dtype.clone(),
                t.stored_dtype.clone(),
                opt(t.rank),
                opt(t.rank_fraction),
                opt(t.energy),
                opt(t.rel_error),
                opt(t.truncation_error),
                opt(t.rounding_share),
                reason_text(t.reason),
                t.params.to_string(),
                t.stored_params.to_string(),
                opt(t.source_bytes),
                t.stored_bytes.to_string(),
            ]
        })
        .collect();
    csv(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("a.b"), "a.b");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }
}
