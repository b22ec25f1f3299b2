//! Sums of inspect rows by module kind and by layer index.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One group at one threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAtEnergy {
    /// τ.
    pub threshold: f64,
    /// Elements stored at τ (factors where they save, the rest dense).
    pub stored_params: u64,
    /// Bytes stored at τ.
    pub stored_bytes: u64,
    /// Mean rank / min(m, n) over the group's analysed matrices (`null`: none).
    pub mean_rank_fraction: Option<f64>,
    /// Matrices whose factors save memory at τ.
    pub saving_matrices: usize,
}

/// Sums over the tensors of one module kind or one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    /// Module kind (`attention.self.query`), or layer index as text (`"3"`), or `"-"` for
    /// tensors outside any layer.
    pub key: String,
    /// Tensors.
    pub tensors: usize,
    /// Analysed (or factored) matrices.
    pub matrices: usize,
    /// Elements.
    pub params: u64,
    /// Bytes dense (as in the source).
    pub source_bytes: u64,
    /// One entry per threshold.
    pub at_energy: Vec<GroupAtEnergy>,
}

/// What a tensor contributes to its groups at one threshold.
pub(crate) struct At {
    pub stored_params: u64,
    pub stored_bytes: u64,
    /// r / min(m, n) of each of its matrices (one, or one per expert).
    pub rank_fractions: Vec<f64>,
    /// How many of its matrices save memory at τ.
    pub saving: usize,
}

/// What a tensor contributes to its groups.
pub(crate) struct Contribution<'a> {
    pub kind: &'a str,
    pub layer: Option<usize>,
    pub params: u64,
    pub source_bytes: u64,
    /// Analysed (or factored) matrices: 0, 1, or one per expert of a stacked tensor.
    pub matrices: usize,
    /// Per threshold; empty when not analysed (then stored dense).
    pub at: Vec<At>,
}

/// Groups by kind (sorted by source bytes, largest first, then name) and by layer
/// (numerically, tensors outside layers last).
pub(crate) fn group(
    thresholds: &[f64],
    rows: &[Contribution<'_>],
) -> (Vec<GroupRow>, Vec<GroupRow>) {
    let mut by_kind: BTreeMap<String, Vec<&Contribution<'_>>> = BTreeMap::new();
    let mut by_layer: BTreeMap<Option<usize>, Vec<&Contribution<'_>>> = BTreeMap::new();
    for r in rows {
        by_kind.entry(r.kind.to_string()).or_default().push(r);
        by_layer.entry(r.layer).or_default().push(r);
    }
    let mut kinds: Vec<GroupRow> = by_kind
        .into_iter()
        .map(|(k, v)| sum(k, thresholds, &v))
        .collect();
    kinds.sort_by(|a, b| b.source_bytes.cmp(&a.source_bytes).then(a.key.cmp(&b.key)));
    let mut layers: Vec<(Option<usize>, GroupRow)> = by_layer
        .into_iter()
        .map(|(l, v)| {
            let key = l.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
            (l, sum(key, thresholds, &v))
        })
        .collect();
    // None sorts first in a BTreeMap; tensors outside layers go last.
    layers.sort_by_key(|(l, _)| (l.is_none(), *l));
    (kinds, layers.into_iter().map(|(_, g)| g).collect())
}

fn sum(key: String, thresholds: &[f64], rows: &[&Contribution<'_>]) -> GroupRow {
    let at_energy = thresholds
        .iter()
        .enumerate()
        .map(|(k, &tau)| {
            let mut out = GroupAtEnergy {
                threshold: tau,
                stored_params: 0,
                stored_bytes: 0,
                mean_rank_fraction: None,
                saving_matrices: 0,
            };
            let mut fractions = Vec::new();
            for r in rows {
                match r.at.get(k) {
                    Some(a) => {
                        out.stored_params += a.stored_params;
                        out.stored_bytes += a.stored_bytes;
                        fractions.extend(&a.rank_fractions);
                        out.saving_matrices += a.saving;
                    }
                    None => {
                        out.stored_params += r.params;
                        out.stored_bytes += r.source_bytes;
                    }
                }
            }
            if !fractions.is_empty() {
                out.mean_rank_fraction =
                    Some(fractions.iter().sum::<f64>() / fractions.len() as f64);
            }
            out
        })
        .collect();
    GroupRow {
        key,
        tensors: rows.len(),
        matrices: rows.iter().map(|r| r.matrices).sum(),
        params: rows.iter().map(|r| r.params).sum(),
        source_bytes: rows.iter().map(|r| r.source_bytes).sum(),
        at_energy,
    }
}
