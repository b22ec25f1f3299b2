//! Times f64 symmetric eigenvalues (no vectors) of k×k Gram matrices: faer's one-stage EVD
//! vs cersa's two-stage reduction (src/decompose/twostage.rs) and cersa's one-stage path
//! (symeig: blocked reduction from k = 1536, root-free QL), one thread each, and prints
//! their largest differences from faer's relative to λ₁.
//!
//! Usage: bench_twostage [k…] (default 1024 2048 4096)

use faer::Mat;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![1024, 2048, 4096];
    }
    println!(
        "k\tone-stage s\ttwo-stage s\tspeed-up\tmax |Δλ|/λ₁\tcersa one-stage s\tits max |Δλ|/λ₁"
    );
    for n in sizes {
        // A deterministic, spread spectrum (columns scaled by j^-1/2), every entry non-zero.
        let x = Mat::<f64>::from_fn(n, n, |i, j| {
            (((i * 7919 + j * 104_729) % 1000) as f64 / 1000.0 - 0.5) / ((1 + j) as f64).sqrt()
        });
        let g = x.transpose() * &x;
        let start = Instant::now();
        // faer's one-stage EVD without vectors (the clone of g is inside the timing: ms).
        let want =
            cersa::linalg::symeig::faer_eigenvalues(g.clone()).map_err(|e| anyhow::anyhow!(e))?;
        let one = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let two_stage = cersa::linalg::twostage::symmetric_eigenvalues(g.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        let two = start.elapsed().as_secs_f64();
        let err = max_rel_diff(&two_stage, &want);
        // cersa's one-stage path (blocked reduction from k = 1536, then root-free QL).
        let start = Instant::now();
        let blocked = cersa::linalg::symeig::symmetric_eigenvalues(g.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        let bl = start.elapsed().as_secs_f64();
        let err_b = max_rel_diff(&blocked, &want);
        println!(
            "{n}\t{one:.3}\t{two:.3}\t{:.2}×\t{err:.1e}\t{bl:.3}\t{err_b:.1e}",
            one / two
        );
    }
    Ok(())
}

/// max |got − want| / want[0] (want non-increasing: relative to λ₁).
fn max_rel_diff(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max)
        / want[0]
}
