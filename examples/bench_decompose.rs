//! Times each decomposition route on every 2-D tensor of a safetensors file, and the
//! single-thread faer GEMM of the same size, for bench/run.sh.
//!
//! Usage: bench_decompose FILE [--routes svd,gram,randomized] [--tau 0.9] [--cap SECONDS]
//! (the default routes add `lapack` when built with `--features lapack`)
//! Prints one tab-separated line per (tensor, route): name m n route rank seconds gflops,
//! and per tensor a `gemm` line: the rate of C[m,k] = W[m,n]·B[n,k], k = min(m, n).
//!
//! "gflops" of a route is the nominal dense-SVD work 4·m·n·k − 4/3·k³ (Householder
//! bidiagonalization, Golub & Van Loan) divided by its time: one yardstick for every route.

use cersa::decompose::{by_name, RankRule};
use cersa::input::{open, FloatData};
use faer::{Accum, Mat, MatRef, Par};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_decompose FILE"))?;
    let mut routes = "svd,gram,randomized".to_string();
    if cfg!(feature = "lapack") {
        // Built with `--features lapack`: time LAPACK gesdd (system OpenBLAS) too.
        routes.push_str(",lapack");
    }
    let mut tau = 0.9;
    let mut cap = 120.0f64;
    let mut i = 2;
    while i + 1 < args.len() {
        match args[i].as_str() {
            "--routes" => routes = args[i + 1].clone(),
            "--tau" => tau = args[i + 1].parse()?,
            "--cap" => cap = args[i + 1].parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
        i += 2;
    }
    let src = open(std::path::Path::new(file))?;
    let rule = RankRule {
        energy: tau,
        ..Default::default()
    };
    for (t, meta) in src.tensors().iter().enumerate() {
        if meta.shape.len() != 2 {
            continue;
        }
        let (m, n) = (meta.shape[0], meta.shape[1]);
        let k = m.min(n);
        let data = src.read_float(t)?;
        let nominal = 4.0 * (m * n * k) as f64 - 4.0 / 3.0 * (k as f64).powi(3);
        for route in routes.split(',') {
            let d = by_name(route)?;
            let start = Instant::now();
            let f = d
                .factorize_named(&meta.name, &data, m, n, &rule)
                .map_err(|e| anyhow::anyhow!(e))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}\t{m}\t{n}\t{route}\t{}\t{secs:.4}\t{:.2}",
                meta.name,
                f.rank,
                nominal / secs / 1e9
            );
            if secs > cap {
                break;
            }
        }
        if let FloatData::F32(w) = &data {
            let a = MatRef::from_column_major_slice(w, n, m).transpose();
            let b = Mat::<f32>::from_fn(n, k, |i, j| ((i * 7 + j * 13) % 17) as f32 - 8.0);
            let mut c = Mat::<f32>::zeros(m, k);
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let start = Instant::now();
                faer::linalg::matmul::matmul(
                    c.as_mut(),
                    Accum::Replace,
                    a,
                    b.as_ref(),
                    1.0,
                    Par::Seq,
                );
                best = best.min(start.elapsed().as_secs_f64());
            }
            let flops = 2.0 * (m * n * k) as f64;
            println!(
                "{}\t{m}\t{n}\tgemm\t-\t{best:.4}\t{:.2}",
                meta.name,
                flops / best / 1e9
            );
        }
    }
    Ok(())
}
