//! Times the f32 eigendecomposition with vectors of k×k Gram matrices, one thread: faer's
//! `self_adjoint_evd` (all k vectors back-transformed) vs cersa's `symmetric_eig` +
//! `leading_vectors(r)` (src/linalg/symeig.rs), r = 28 % of k (the rank fraction of the
//! power-law benchmark matrices at τ = 0.9), best of 3 runs each, and the largest
//! difference of their eigenvalues relative to λ₁.
//!
//! Usage: bench_symeig [--reduction auto|faer|blocked] [k…] (default 1024 2048 4096).
//! `--reduction faer` (or `blocked`) forces cersa's tridiagonalization to faer's unblocked
//! one (or the blocked one of src/linalg/tridiag_blocked.rs) at every order, for an A/B of
//! the two; `auto` (default) is what the routes use.

use cersa::linalg::symeig::{symmetric_eig_with, Tridiagonalization};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::{Mat, Par};
use std::time::Instant;

fn best_of<R>(runs: usize, mut f: impl FnMut() -> R) -> (f64, R) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("at least one run"))
}

fn main() -> anyhow::Result<()> {
    let mut reduction = Tridiagonalization::Auto;
    let mut sizes: Vec<usize> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--reduction" {
            reduction = match args.next().as_deref() {
                Some("auto") => Tridiagonalization::Auto,
                Some("faer") => Tridiagonalization::Unblocked,
                Some("blocked") => Tridiagonalization::Blocked,
                other => anyhow::bail!("--reduction auto|faer|blocked, not {other:?}"),
            };
        } else {
            sizes.push(a.parse()?);
        }
    }
    if sizes.is_empty() {
        sizes = vec![1024, 2048, 4096];
    }
    println!("k\tr\tfaer EVD s\tsymeig + leading r s\tspeed-up\tmax |Δλ|/λ₁");
    for n in sizes {
        let r = n * 28 / 100;
        // A deterministic, spread spectrum (columns scaled by j^-0.7), every entry non-zero.
        let x = Mat::<f32>::from_fn(n, n, |i, j| {
            (((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0 - 0.5) / ((1 + j) as f32).powf(0.7)
        });
        let g = x.transpose() * &x;
        let (faer_s, want) = best_of(3, || {
            let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f32>(
                n,
                ComputeEigenvectors::Yes,
                Par::Seq,
                Default::default(),
            ));
            let mut s = faer::diag::Diag::<f32>::zeros(n);
            let mut u = Mat::<f32>::zeros(n, n);
            self_adjoint_evd(
                g.as_ref(),
                s.as_mut(),
                Some(u.as_mut()),
                Par::Seq,
                MemStack::new(&mut mem),
                Default::default(),
            )
            .expect("evd");
            s.column_vector()
                .iter()
                .rev()
                .map(|&v| v as f64)
                .collect::<Vec<_>>()
        });
        let (ours_s, got) = best_of(3, || {
            let eig = symmetric_eig_with(g.clone(), reduction).expect("symeig");
            let lambda = eig.lambda.clone();
            let v = eig.leading_vectors(r).expect("vectors");
            assert_eq!(v.ncols(), r);
            lambda
        });
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max)
            / want[0];
        println!(
            "{n}\t{r}\t{faer_s:.3}\t{ours_s:.3}\t{:.2}×\t{err:.1e}",
            faer_s / ours_s
        );
    }
    Ok(())
}
