//! Tests of the `cuda` route. With a CUDA device they compare it with f64 references (the
//! f64 SVD of the same matrix, numpy's σ of the MiniLM excerpt) through the shared checks of
//! decompose/tests.rs; without one (here, CI) they assert the route's no-device error.

use super::super::tests::{
    check_minilm, check_synthetic, orthogonality_error, reference_sigma, synth,
};
use super::{device_name, Cuda, UNAVAILABLE};
use crate::decompose::{DecomposeError, Decomposer, RankRule, Route};
use crate::input::FloatData;

/// True with a usable device; otherwise asserts that every entry point reports it clearly.
fn device_or_clear_error() -> bool {
    match device_name() {
        Ok(name) => {
            eprintln!("cuda route tests on {name}");
            true
        }
        Err(e) => {
            let unavailable = |e: &DecomposeError| {
                matches!(
                    e,
                    DecomposeError::Unavailable {
                        route: Route::Cuda,
                        ..
                    }
                ) && e.to_string().starts_with(UNAVAILABLE)
            };
            assert!(unavailable(&e), "unclear error: {e}");
            let w = FloatData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            let f = Cuda.factorize(&w, 2, 3, &RankRule::default());
            let err = f.expect_err("factorize without a device must fail");
            assert!(unavailable(&err), "factorize: {err}");
            let err = Cuda
                .singular_values(&w, 2, 3)
                .expect_err("singular_values without a device must fail");
            assert!(unavailable(&err), "singular_values: {err}");
            eprintln!("no CUDA device; checked the error instead: {e}");
            false
        }
    }
}

#[test]
fn cuda_route_is_registered() {
    let route = Route::Cuda
        .decomposer()
        .expect("cuda route with the feature");
    assert_eq!(route.name(), "cuda");
}

#[test]
fn cuda_matches_f64_reference_on_synthetic_spectra() {
    if !device_or_clear_error() {
        return;
    }
    let routes: Vec<Box<dyn Decomposer>> = vec![Box::new(Cuda)];
    check_synthetic(&routes, &[(96, 64), (48, 120), (300, 200), (150, 400)]);
}

#[test]
fn cuda_matches_numpy_on_minilm() {
    if !device_or_clear_error() {
        return;
    }
    check_minilm(&[Box::new(Cuda) as Box<dyn Decomposer>]);
}

#[test]
fn cuda_values_and_orthogonality_are_f64_grade() {
    if !device_or_clear_error() {
        return;
    }
    for (m, n) in [(400, 256), (256, 400)] {
        let k = m.min(n);
        let sigma: Vec<f64> = (0..k).map(|j| ((j + 1) as f64).powf(-1.0)).collect();
        let w = synth(m, n, &sigma, 5);
        let refs = reference_sigma(&w, m, n);
        let data = FloatData::F32(w);
        let sv = Cuda.singular_values(&data, m, n).expect("σ");
        let worst = sv
            .iter()
            .zip(&refs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        // f64 Gram: absolute σ error ≈ √ε₆₄·σ₁ at worst (tiny σ), far below 1e-6·σ₁.
        assert!(worst <= 1e-6 * refs[0], "{m}×{n}: max |Δσ| = {worst:e}");
        let rule = RankRule {
            energy: 0.99,
            ..Default::default()
        };
        let f = Cuda.factorize(&data, m, n, &rule).expect("factorize");
        let eu = orthogonality_error(&f.u.to_f64(), m, f.rank, false);
        let ev = orthogonality_error(&f.vt.to_f64(), n, f.rank, true);
        assert!(
            eu <= 1e-5 && ev <= 1e-5,
            "{m}×{n}: UᵀU−I {eu:e}, VᵀV−I {ev:e}"
        );
    }
}

#[test]
fn cuda_is_deterministic_across_threads() {
    if !device_or_clear_error() {
        return;
    }
    let (m, n) = (320, 192);
    let sigma: Vec<f64> = (0..n).map(|j| ((j + 1) as f64).powf(-0.5)).collect();
    let data = FloatData::F32(synth(m, n, &sigma, 9));
    let rule = RankRule::default();
    let first = Cuda.factorize(&data, m, n, &rule).expect("first");
    // Several workers sharing the device at once must each get the same bits.
    let others: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Cuda.factorize(&data, m, n, &rule).expect("thread")))
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    for f in others {
        assert_eq!(f.rank, first.rank);
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&f.u.to_f64(), &first.u.to_f64()) && same(&f.vt.to_f64(), &first.vt.to_f64()));
        assert!(same(&f.s, &first.s));
        assert!(same(&f.sigma, &first.sigma));
    }
}
