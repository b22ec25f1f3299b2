//! The energy rank rule (formats/cersa-v1.md §4.5–4.6).

/// Rank options.
#[derive(Debug, Clone, PartialEq)]
pub struct RankRule {
    /// Energy threshold τ in (0, 1].
    pub energy: f64,
    /// Lower clamp.
    pub min_rank: usize,
    /// Upper clamp (`None`: none).
    pub max_rank: Option<usize>,
    /// Round up to a multiple of this (≥ 1).
    pub rank_multiple: usize,
}

impl Default for RankRule {
    fn default() -> Self {
        RankRule {
            energy: 0.90,
            min_rank: 1,
            max_rank: None,
            rank_multiple: 1,
        }
    }
}

/// Squared Frobenius norm in f64 (the rule's denominator).
pub fn frobenius2<T: Copy + Into<f64>>(values: &[T]) -> f64 {
    // Pairwise-by-chunks summation keeps the f64 rounding error negligible for 1e9 entries.
    values
        .chunks(4096)
        .map(|c| {
            c.iter()
                .map(|&x| {
                    let v: f64 = x.into();
                    v * v
                })
                .sum::<f64>()
        })
        .sum()
}

/// Smallest r with Σ_{i≤r} σᵢ² / norm2 ≥ τ; `sigma.len()` if rounding keeps the sum below τ.
pub fn energy_rank(sigma: &[f64], norm2: f64, tau: f64) -> usize {
    let mut cum = 0.0f64;
    for (i, s) in sigma.iter().enumerate() {
        cum += s * s;
        if cum / norm2 >= tau {
            return i + 1;
        }
    }
    sigma.len()
}

/// Retained energy of the first `r` values, clamped to [0, 1].
pub fn energy_at(sigma: &[f64], norm2: f64, r: usize) -> f64 {
    if norm2 <= 0.0 {
        return 0.0;
    }
    let cum: f64 = sigma.iter().take(r).map(|s| s * s).sum();
    (cum / norm2).clamp(0.0, 1.0)
}

impl RankRule {
    /// Final rank for singular values `sigma` (non-increasing) of an m×n matrix.
    pub fn rank(&self, sigma: &[f64], norm2: f64, m: usize, n: usize) -> usize {
        let k = m.min(n);
        let mut r = energy_rank(sigma, norm2, self.energy)
            .min(k)
            .max(if k > 0 { 1 } else { 0 });
        if sigma.len() < k && r == sigma.len() && energy_at(sigma, norm2, r) < self.energy {
            // A partial spectrum that never reached τ: the exact rank is unknown, so keep all.
            r = k;
        }
        r = r.max(self.min_rank);
        if let Some(max) = self.max_rank {
            r = r.min(max);
        }
        let mult = self.rank_multiple.max(1);
        r = r.div_ceil(mult) * mult;
        r.min(k)
    }
}

/// True when storing rank-r factors (u, s, vt) takes fewer elements than the m×n matrix.
pub fn saves(r: usize, m: usize, n: usize) -> bool {
    (r as u128) * (m as u128 + n as u128 + 1) < (m as u128) * (n as u128)
}

/// Break-even rank: the largest r that still saves, i.e. r·(m+n+1) < m·n.
pub fn break_even_rank(m: usize, n: usize) -> usize {
    let mn = m as u128 * n as u128;
    let per = m as u128 + n as u128 + 1;
    if mn == 0 {
        return 0;
    }
    ((mn - 1) / per) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_rule_edges() {
        let s = [3.0, 2.0, 1.0];
        let n2 = 14.0;
        assert_eq!(energy_rank(&s, n2, 0.5), 1); // 9/14 = 0.64
        assert_eq!(energy_rank(&s, n2, 0.9), 2); // 13/14 = 0.93
        assert_eq!(energy_rank(&s, n2, 1.0), 3);
        let rule = RankRule {
            energy: 1.0,
            ..Default::default()
        };
        assert_eq!(rule.rank(&s, n2, 3, 5), 3);
        // rounding leaves the sum below the norm: full rank, not more
        assert_eq!(rule.rank(&s, n2 * (1.0 + 1e-12), 3, 5), 3);
        let rule = RankRule {
            energy: 0.5,
            min_rank: 2,
            ..Default::default()
        };
        assert_eq!(rule.rank(&s, n2, 3, 5), 2);
        let rule = RankRule {
            energy: 0.5,
            rank_multiple: 8,
            ..Default::default()
        };
        assert_eq!(rule.rank(&s, n2, 3, 5), 3, "multiple capped at min(m, n)");
        let rule = RankRule {
            energy: 1.0,
            max_rank: Some(2),
            ..Default::default()
        };
        assert_eq!(rule.rank(&s, n2, 3, 5), 2);
        // 1×n: rank 1
        assert_eq!(RankRule::default().rank(&[5.0], 25.0, 1, 7), 1);
    }

    #[test]
    fn saving_test() {
        assert!(!saves(1, 1, 7)); // 1·9 ≥ 7
        assert!(saves(1, 4, 4)); // 9 < 16
        assert!(!saves(2, 4, 4)); // 18 ≥ 16
        assert_eq!(break_even_rank(4, 4), 1);
        assert_eq!(break_even_rank(384, 384), 191);
        for (m, n) in [(384, 1536), (7, 3), (1000, 1000)] {
            let b = break_even_rank(m, n);
            assert!(saves(b, m, n) || b == 0);
            assert!(!saves(b + 1, m, n));
        }
    }
}
