//! The `lapack` route beyond the shared route tests (which run it on every synthetic
//! spectrum and the MiniLM excerpt when the feature is on): f64 data runs `dgesdd`
//! and matches an independent f64 SVD (faer) to f64 accuracy.

use super::rank::{energy_at, frobenius2, RankRule};
use super::svd::FaerSvd;
use super::tests::{spectra, synth};
use super::{Decomposer, Route};
use crate::input::FloatData;

#[test]
fn lapack_f64_matches_f64_reference() {
    let route = Route::Lapack.decomposer().expect("route");
    for (m, n) in [(80, 48), (40, 72)] {
        let k = m.min(n);
        for (label, sigma) in spectra(k) {
            let w: Vec<f64> = synth(m, n, &sigma, 5).iter().map(|&x| x as f64).collect();
            let data = FloatData::F64(w.clone());
            let refs = FaerSvd.singular_values(&data, m, n).expect("faer");
            let got = route.singular_values(&data, m, n).expect("lapack σ");
            assert_eq!(got.len(), k, "{label}");
            for (a, b) in got.iter().zip(&refs) {
                assert!(
                    (a - b).abs() <= 1e-12 * refs[0],
                    "{label} {m}×{n}: σ {a} vs {b}"
                );
            }
            let norm2 = frobenius2(&w);
            for tau in [0.5, 0.9, 0.99] {
                let rule = RankRule {
                    energy: tau,
                    ..Default::default()
                };
                let f = route.factorize(&data, m, n, &rule).expect("factorize");
                let ref_rank = rule.rank(&refs, norm2, m, n);
                assert_eq!(f.rank, ref_rank, "{label} {m}×{n} τ={tau}");
                let r = f.rank;
                let (fu, fvt) = (f.u.to_f64(), f.vt.to_f64());
                // f64 factors: orthonormal and optimal to f64 accuracy.
                for c1 in 0..r {
                    for c2 in 0..=c1 {
                        let du: f64 = (0..m).map(|i| fu[i * r + c1] * fu[i * r + c2]).sum();
                        let dv: f64 = (0..n).map(|j| fvt[c1 * n + j] * fvt[c2 * n + j]).sum();
                        let t = if c1 == c2 { 1.0 } else { 0.0 };
                        assert!((du - t).abs() < 1e-12 && (dv - t).abs() < 1e-12, "{label}");
                    }
                }
                let res = super::svd::residual_norm2(&data, m, n, &fu, &f.s, &fvt) / norm2;
                let optimal = 1.0 - energy_at(&refs, norm2, r);
                assert!(
                    (res - optimal).abs() <= 1e-10,
                    "{label} τ={tau}: residual {res:e} vs optimal {optimal:e}"
                );
            }
        }
    }
}

#[test]
fn lapack_handles_degenerate_shapes() {
    let route = Route::Lapack.decomposer().expect("route");
    let rule = RankRule::default();
    // 1×n and n×1.
    for (m, n) in [(1, 5), (5, 1)] {
        let w: Vec<f32> = (0..m * n).map(|i| (i as f32) - 1.5).collect();
        let f = route
            .factorize(&FloatData::F32(w.clone()), m, n, &rule)
            .expect("factorize");
        assert_eq!(f.rank, 1);
        let norm: f64 = frobenius2(&w).sqrt();
        assert!(
            (f.s[0] - norm).abs() <= 1e-5 * norm,
            "{m}×{n}: {} vs {norm}",
            f.s[0]
        );
    }
    // The zero matrix: finite factors, no NaN.
    let f = route
        .factorize(&FloatData::F32(vec![0.0; 12]), 3, 4, &rule)
        .expect("zero");
    assert!(f
        .s
        .iter()
        .chain(f.u.to_f64().iter())
        .chain(f.vt.to_f64().iter())
        .all(|x| x.is_finite()));
}
