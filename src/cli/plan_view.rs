//! The terminal summary of `cersa plan`: per module kind, the ranks, the energy reached and
//! the bytes.

use super::output::table;
use crate::inspect::metrics::kind_and_layer;
use crate::plan::Plan;
use crate::report::si_text;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Per module kind: matrices, dense ones, rank range, min and mean E, bytes.
pub fn plan_view(plan: &Plan) -> String {
    #[derive(Default)]
    struct Row {
        matrices: usize,
        dense: usize,
        ranks: Vec<usize>,
        energies: Vec<f64>,
        bytes: u64,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (name, e) in &plan.tensors {
        let row = rows.entry(kind_and_layer(name).0).or_default();
        row.matrices += 1;
        row.bytes += e.bytes;
        row.energies.push(e.energy);
        match e.rank {
            Some(r) => row.ranks.push(r),
            None => row.dense += 1,
        }
    }
    let header: Vec<String> = [
        "module kind",
        "matrices",
        "dense",
        "ranks",
        "E min",
        "E mean",
        "bytes",
    ]
    .map(String::from)
    .into();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(kind, r)| {
            let ranks = match (r.ranks.iter().min(), r.ranks.iter().max()) {
                (Some(a), Some(b)) if a == b => a.to_string(),
                (Some(a), Some(b)) => format!("{a}–{b}"),
                _ => "-".into(),
            };
            let min = r.energies.iter().copied().fold(1.0, f64::min);
            let mean = r.energies.iter().sum::<f64>() / r.energies.len() as f64;
            vec![
                kind.clone(),
                r.matrices.to_string(),
                r.dense.to_string(),
                ranks,
                format!("{min:.4}"),
                format!("{mean:.4}"),
                si_text(r.bytes, "", "B"),
            ]
        })
        .collect();
    let mut out = table(&header, &body);
    let t = &plan.totals;
    let _ = writeln!(
        out,
        "\n{} matrices; stored {} of a {} budget ({:.3}× the source's {}); Σ est. rel_err² = {:.4}",
        t.matrices,
        si_text(t.stored_bytes, "", "B"),
        si_text(t.budget_bytes, "", "B"),
        t.stored_bytes as f64 / t.source_bytes.max(1) as f64,
        si_text(t.source_bytes, "", "B"),
        t.sum_sq_rel_error,
    );
    if t.floor_met == Some(false) {
        let _ = writeln!(
            out,
            "warning: the budget is too small for the energy floor {}; the plan ignores it",
            plan.energy_floor.unwrap_or_default()
        );
    }
    out
}
