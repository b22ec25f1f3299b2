//! Spectrum metrics of one matrix and the module-kind / layer keys of tensor names.

use serde::{Deserialize, Serialize};

/// Scalar summaries of a matrix's singular values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpectrumMetrics {
    /// σ₁, the spectral norm.
    pub spectral_norm: f64,
    /// ‖W‖_F.
    pub frobenius_norm: f64,
    /// ‖W‖_F² / σ₁² (1 ≤ stable rank ≤ rank).
    pub stable_rank: f64,
    /// exp(−Σ pᵢ ln pᵢ) with pᵢ = σᵢ / Σσ (Roy & Vetterli 2007).
    pub effective_rank: f64,
    /// Number of directions in the top 1 %: max(1, ⌈0.01·min(m, n)⌉).
    pub top1pct_directions: usize,
    /// Σ_{i ≤ top1pct_directions} σᵢ² / ‖W‖_F².
    pub top1pct_energy: f64,
}

/// Metrics of `sigma` (all min(m, n) singular values, non-increasing) with ‖W‖_F² = `norm2`.
/// `None` when the matrix is zero.
pub fn spectrum_metrics(sigma: &[f64], norm2: f64) -> Option<SpectrumMetrics> {
    let s1 = *sigma.first()?;
    if !(s1 > 0.0 && norm2 > 0.0) {
        return None;
    }
    let l1: f64 = sigma.iter().map(|s| s.abs()).sum();
    let entropy: f64 = sigma
        .iter()
        .map(|s| s.abs() / l1)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    let k = sigma.len().div_ceil(100).max(1);
    let top: f64 = sigma.iter().take(k).map(|s| s * s).sum();
    Some(SpectrumMetrics {
        spectral_norm: s1,
        frobenius_norm: norm2.sqrt(),
        stable_rank: norm2 / (s1 * s1),
        effective_rank: entropy.exp(),
        top1pct_directions: k,
        top1pct_energy: (top / norm2).clamp(0.0, 1.0),
    })
}

/// Splits a tensor name into (module kind, layer index): the first all-digit segment is the
/// layer; the kind is what follows it with other index segments and a trailing
/// `weight`/`bias` removed (`encoder.layer.3.attention.self.query.weight` →
/// (`attention.self.query`, 3); `blk.7.attn_q.weight` → (`attn_q`, 7)). Names without an
/// index keep their prefix (`embeddings.word_embeddings.weight` → `embeddings.word_embeddings`).
/// Expert `e` of a stacked experts tensor, `NAME.cersa_expert.e`, has the kind and layer of
/// `NAME`.
pub fn kind_and_layer(name: &str) -> (String, Option<usize>) {
    let name = match name.rsplit_once(cersa_loader::manifest::INFIX_EXPERT) {
        Some((base, e)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    };
    let parts: Vec<&str> = name.split('.').collect();
    let is_index = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let first = parts.iter().position(|p| is_index(p));
    let layer = first.and_then(|i| parts.get(i).and_then(|p| p.parse().ok()));
    let rest = match first {
        Some(i) => &parts[i + 1..],
        None => &parts[..],
    };
    let mut kept: Vec<&str> = rest.iter().copied().filter(|p| !is_index(p)).collect();
    if kept.len() > 1 && matches!(kept.last(), Some(&"weight") | Some(&"bias")) {
        kept.pop();
    }
    let kind = if kept.is_empty() {
        name.to_string()
    } else {
        kept.join(".")
    };
    (kind, layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_layers() {
        assert_eq!(
            kind_and_layer("encoder.layer.3.attention.self.query.weight"),
            ("attention.self.query".into(), Some(3))
        );
        assert_eq!(
            kind_and_layer("model.layers.12.self_attn.q_proj.weight"),
            ("self_attn.q_proj".into(), Some(12))
        );
        assert_eq!(
            kind_and_layer("blk.7.attn_q.weight"),
            ("attn_q".into(), Some(7))
        );
        assert_eq!(
            kind_and_layer("model.layers.1.mlp.experts.5.w1.weight"),
            ("mlp.experts.w1".into(), Some(1))
        );
        assert_eq!(
            kind_and_layer("embeddings.word_embeddings.weight"),
            ("embeddings.word_embeddings".into(), None)
        );
        assert_eq!(
            kind_and_layer("blk.2.ffn_up_exps.weight.cersa_expert.11"),
            ("ffn_up_exps".into(), Some(2))
        );
        assert_eq!(
            kind_and_layer("model.layers.3.mlp.experts.down_proj.cersa_expert.0"),
            ("mlp.experts.down_proj".into(), Some(3))
        );
        assert_eq!(kind_and_layer("weight"), ("weight".into(), None));
        assert_eq!(kind_and_layer("h.0.weight"), ("weight".into(), Some(0)));
    }

    #[test]
    fn metrics_of_a_known_spectrum() {
        // σ = (3, 2, 1): ‖W‖_F² = 14.
        let m = spectrum_metrics(&[3.0, 2.0, 1.0], 14.0).unwrap();
        assert_eq!(m.spectral_norm, 3.0);
        assert!((m.stable_rank - 14.0 / 9.0).abs() < 1e-15);
        let p = [0.5f64, 1.0 / 3.0, 1.0 / 6.0];
        let h: f64 = p.iter().map(|p| -p * p.ln()).sum();
        assert!((m.effective_rank - h.exp()).abs() < 1e-12);
        assert_eq!(m.top1pct_directions, 1);
        assert!((m.top1pct_energy - 9.0 / 14.0).abs() < 1e-15);
        // Flat spectrum: effective rank = stable rank = n.
        let flat = spectrum_metrics(&[1.0; 200], 200.0).unwrap();
        assert!((flat.effective_rank - 200.0).abs() < 1e-9);
        assert!((flat.stable_rank - 200.0).abs() < 1e-12);
        assert_eq!(flat.top1pct_directions, 2);
        assert!(spectrum_metrics(&[], 0.0).is_none());
        assert!(spectrum_metrics(&[0.0], 0.0).is_none());
    }
}
