//! Times each decomposition route on every 2-D tensor of a safetensors file, and the
//! single-thread faer GEMM of the same size, for bench/run.sh.
//!
//! Usage: bench_decompose FILE [--routes svd,gram,randomized] [--tau 0.9] [--cap SECONDS]
//! [--gemm off]
//! (built with `--features lapack` / `cuda`, the default routes add `lapack` / `cuda`; cuda
//! is timed after a warm-up).
//! Prints one tab-separated line per (tensor, route): name m n route rank seconds gflops,
//! and per tensor `gemm` (one thread) and `gemm-all-cores` lines: the rate of
//! C[m,k] = W[m,n]·B[n,k], k = min(m, n) (not with `--gemm off`).
//!
//! "gflops" of a route is the nominal dense-SVD work 4·m·n·k − 4/3·k³ (Householder
//! bidiagonalization, Golub & Van Loan) divided by its time: one yardstick for every route.

use cersa::decompose::{Decomposer, RankRule, Route};
use cersa::input::{open, FloatData};
use faer::{Accum, Mat, MatRef, Par};
use std::time::Instant;

/// The route named `name` (as `--algorithm` spells it).
fn by_name(name: &str) -> anyhow::Result<Box<dyn Decomposer>> {
    let route = Route::from_name(name).ok_or_else(|| anyhow::anyhow!("unknown route {name}"))?;
    Ok(route.decomposer()?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_decompose FILE"))?;
    // Builds with the `cuda` / `lapack` features also time those routes by default.
    let mut routes = "svd,gram,randomized".to_string();
    if cfg!(feature = "lapack") {
        // Built with `--features lapack`: time LAPACK gesdd (system OpenBLAS) too.
        routes.push_str(",lapack");
    }
    if cfg!(feature = "cuda") {
        routes.push_str(",cuda");
    }
    let mut tau = 0.9;
    let mut cap = 120.0f64;
    let mut gemm = true;
    let mut i = 2;
    while i + 1 < args.len() {
        match args[i].as_str() {
            "--routes" => routes = args[i + 1].clone(),
            "--tau" => tau = args[i + 1].parse()?,
            "--cap" => cap = args[i + 1].parse()?,
            "--gemm" => gemm = args[i + 1] != "off",
            other => anyhow::bail!("unknown option {other}"),
        }
        i += 2;
    }
    let src = open(std::path::Path::new(file))?;
    let rule = RankRule {
        energy: tau,
        ..Default::default()
    };
    #[cfg(feature = "cuda")]
    if routes.split(',').any(|r| r == "cuda") {
        // Open the device and load the libraries' kernels before timing: one small matrix
        // outside the measurement, so per-matrix times exclude the one-off start-up.
        let name = cersa::decompose::cuda::device_name().map_err(|e| anyhow::anyhow!(e))?;
        let warm = FloatData::F32((0..64 * 48).map(|i| ((i * 37) % 101) as f32).collect());
        by_name("cuda")?
            .factorize(&warm, 64, 48, &rule)
            .map_err(|e| anyhow::anyhow!(e))?;
        println!("# cuda device: {name}");
    }
    // Smallest first: a route that exceeded the cap is skipped for the larger matrices.
    let mut order: Vec<usize> = (0..src.tensors().len())
        .filter(|&t| src.tensors()[t].shape.len() == 2)
        .collect();
    order.sort_by_key(|&t| src.tensors()[t].shape.iter().product::<usize>());
    let mut over_cap: Vec<String> = Vec::new();
    for t in order {
        let meta = &src.tensors()[t];
        let (m, n) = (meta.shape[0], meta.shape[1]);
        let k = m.min(n);
        let data = src.read_float(t)?;
        let nominal = 4.0 * (m * n * k) as f64 - 4.0 / 3.0 * (k as f64).powi(3);
        for route in routes.split(',') {
            if over_cap.iter().any(|r| r == route) {
                continue;
            }
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
                over_cap.push(route.to_string());
            }
        }
        if let (true, FloatData::F32(w)) = (gemm, &data) {
            let a = MatRef::from_column_major_slice(w, n, m).transpose();
            let b = Mat::<f32>::from_fn(n, k, |i, j| ((i * 7 + j * 13) % 17) as f32 - 8.0);
            let mut c = Mat::<f32>::zeros(m, k);
            // One thread (what each route gets: cersa parallelizes across tensors) and all
            // cores (the machine's GEMM limit).
            let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
            for (label, par) in [("gemm", Par::Seq), ("gemm-all-cores", Par::rayon(cores))] {
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let start = Instant::now();
                    faer::linalg::matmul::matmul(
                        c.as_mut(),
                        Accum::Replace,
                        a,
                        b.as_ref(),
                        1.0,
                        par,
                    );
                    best = best.min(start.elapsed().as_secs_f64());
                }
                let flops = 2.0 * (m * n * k) as f64;
                println!(
                    "{}\t{m}\t{n}\t{label}\t-\t{best:.4}\t{:.2}",
                    meta.name,
                    flops / best / 1e9
                );
            }
        }
    }
    Ok(())
}
