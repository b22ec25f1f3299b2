//! A stacked experts tensor `[E, m, …]` in a source report: each expert's `[m, n]` slice
//! analysed as a matrix of its own (formats/cersa-v1.md §4 "Selection"), and the tensor's
//! sums over them.

use super::{fill, InspectOptions, RankAtEnergy, TensorSpectrum};
use crate::decompose::Decomposer;
use crate::error::{ConvertError, Result};
use crate::input::Source;
use crate::matrix::{read_expert, Matrix};
use crate::select::MatrixView;
use crate::storage::Stored;
use cersa_loader::{expert_name, DenseReason};
use rayon::prelude::*;

/// Analyses every expert of stacked experts tensor `i` (viewed as `view`) into
/// `spec.experts`, and sets `spec`'s matrix view (one expert's) and its per-τ sums.
pub(super) fn analyse(
    src: &dyn Source,
    i: usize,
    view: MatrixView,
    opts: &InspectOptions,
    decomposer: &dyn Decomposer,
    spec: &mut TensorSpectrum,
) -> Result<()> {
    let t = &src.tensors()[i];
    crate::calibration::refuse_for_experts(opts.calibration.as_deref(), src, i)?;
    let (count, m, n) = (view.count(), view.m, view.n);
    let slice = m * n;
    // Every expert slice holds the same number of whole rows, so the source bytes divide.
    let source_bytes = t.source_bytes / count.max(1) as u64;
    let base = spec.clone();
    let experts = (0..count)
        .into_par_iter()
        .map(|e| {
            // One expert read at a time per worker, as convert does.
            let matrix = read_expert(src, i, e, count, m, n)?;
            let name = expert_name(&t.name, e);
            // The tensor's own (not yet analysed) entry, for one expert's slice.
            let mut x = TensorSpectrum {
                name: name.clone(),
                shape: t.shape[1..].to_vec(),
                params: slice as u64,
                source_bytes,
                ..base.clone()
            };
            let Some(Matrix { data, norm2, .. }) = matrix else {
                x.reason = Some(DenseReason::Zero);
                return Ok((x, 0.0));
            };
            let sigma = decomposer.singular_values(&data, m, n).map_err(|source| {
                ConvertError::Decompose {
                    tensor: name,
                    source,
                }
            })?;
            fill(&mut x, sigma, norm2, m, n, t.dense_dtype, opts);
            Ok((x, norm2))
        })
        .collect::<Result<Vec<_>>>()?;
    if experts
        .iter()
        .all(|(x, _)| x.reason == Some(DenseReason::Zero))
    {
        spec.reason = Some(DenseReason::Zero);
        return Ok(());
    }
    spec.matrix_shape = Some([m, n]);
    spec.break_even_rank = Some(crate::decompose::rank::break_even_rank(m, n));
    let dense = Stored::dense(slice as u64, t.dense_dtype).bytes;
    spec.ranks = (0..opts.energies.len())
        .map(|k| sums(&experts, k, opts.energies[k], dense))
        .collect();
    spec.experts = experts.into_iter().map(|(x, _)| x).collect();
    Ok(())
}

/// The tensor's entry at threshold `tau` (index `k`), from its experts (each with its
/// ‖W_e‖²; `dense`: the bytes of one expert stored dense):
/// `rank` the largest expert rank, `rank_fraction` the mean over the analysed experts,
/// `energy` Σ E_e·‖W_e‖² / Σ ‖W_e‖², `factored_params` Σ r_e·(m+n+1), `saves` whether any
/// expert saves, `stored_bytes` the sum over all experts (each dense where its factors do not
/// save, zero experts dense).
fn sums(experts: &[(TensorSpectrum, f64)], k: usize, tau: f64, dense: u64) -> RankAtEnergy {
    let analysed: Vec<(&RankAtEnergy, f64)> = experts
        .iter()
        .filter_map(|(x, w)| x.ranks.get(k).map(|a| (a, *w)))
        .collect();
    let total: f64 = analysed.iter().map(|(_, w)| w).sum();
    let zero = (experts.len() - analysed.len()) as u64;
    RankAtEnergy {
        threshold: tau,
        rank: analysed.iter().map(|(a, _)| a.rank).max().unwrap_or(0),
        rank_fraction: analysed.iter().map(|(a, _)| a.rank_fraction).sum::<f64>()
            / analysed.len().max(1) as f64,
        energy: analysed.iter().map(|(a, w)| a.energy * w).sum::<f64>() / total,
        factored_params: analysed.iter().map(|(a, _)| a.factored_params).sum(),
        saves: analysed.iter().any(|(a, _)| a.saves),
        stored_bytes: analysed.iter().map(|(a, _)| a.stored_bytes).sum::<u64>() + zero * dense,
    }
}
