//! A small generated MLP written as a CERSA checkpoint, for the candle examples and tests.
//!
//! Each weight is built as an exact SVD W = U·diag(σ)·Vᵀ (U, V random orthonormal by
//! Gram–Schmidt in f64, σ geometric), so the directory is a valid CERSA v1 checkpoint
//! without needing the converter's SVD.

use cersa_loader::manifest::{ConvertConfig, Producer, SourceFile, SourceInfo, TensorInfo, Totals};
use cersa_loader::{CheckpointWriter, DenseReason, Dtype, Manifest, TensorKind};
use std::collections::BTreeMap;
use std::path::Path;

/// splitmix64 → uniform / normal, seeded: the fixture is the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn normals(&mut self, len: usize, scale: f64) -> Vec<f32> {
        (0..len).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// `cols` orthonormal columns of length `rows`, row-major [rows, cols].
pub fn orthonormal(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f64> {
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(cols);
    while q.len() < cols {
        let mut v: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for c in &q {
                let d: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(a, b)| *a -= d * b);
            }
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-6 {
            q.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    let mut out = vec![0f64; rows * cols];
    for (j, c) in q.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            out[i * cols + j] = *v;
        }
    }
    out
}

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One factored layer: (name prefix, m = out, n = in, rank r).
pub type LayerSpec<'a> = (&'a str, usize, usize, usize);

/// Writes an MLP of `layers` (each `PREFIX.weight` factored with F32 factors and a dense
/// `PREFIX.bias`) as a CERSA directory at `dir` (created; must not exist).
pub fn write_mlp(dir: &Path, layers: &[LayerSpec<'_>], seed: u64) -> cersa_loader::Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| cersa_loader::Error::Io {
        path: dir.to_path_buf(),
        op: "create",
        source,
    })?;
    let mut rng = Rng::new(seed);
    let mut writer = CheckpointWriter::new(dir, 1 << 30);
    let mut tensors = BTreeMap::new();
    let mut totals = Totals::default();
    let mut sorted: Vec<_> = layers.to_vec();
    sorted.sort();
    for (prefix, m, n, r) in sorted {
        let u = orthonormal(&mut rng, m, r);
        let v = orthonormal(&mut rng, n, r);
        let s: Vec<f32> = (0..r)
            .map(|i| (2.0 * 0.9f64.powi(i as i32)) as f32)
            .collect();
        let u32s: Vec<f32> = u.iter().map(|&x| x as f32).collect();
        let mut vt = vec![0f32; r * n];
        for i in 0..n {
            for k in 0..r {
                vt[k * n + i] = v[i * r + k] as f32;
            }
        }
        let bias = rng.normals(m, 0.1);
        let weight = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let (un, sn, vn) = cersa_loader::factor_names(&weight);
        // Manifest order (sorted names) is the write order: bias before weight.
        writer.begin_group(&bias_name, (m * 4) as u64)?;
        writer.write_tensor(&bias_name, Dtype::F32, &[m], &le(&bias))?;
        writer.begin_group(&weight, (4 * (m * r + r + r * n)) as u64)?;
        writer.write_tensor(&un, Dtype::F32, &[m, r], &le(&u32s))?;
        writer.write_tensor(&sn, Dtype::F32, &[r], &le(&s))?;
        writer.write_tensor(&vn, Dtype::F32, &[r, n], &le(&vt))?;
        let base = TensorInfo {
            kind: TensorKind::Dense,
            shape: vec![m],
            source_dtype: "F32".into(),
            stored_dtype: Dtype::F32,
            shard: String::new(),
            matrix_shape: None,
            rank: None,
            energy: None,
            rel_error: None,
            quant: None,
            reason: Some(DenseReason::NotAMatrix),
            rule: None,
            whitening: None,
            experts: None,
        };
        tensors.insert(bias_name, base.clone());
        tensors.insert(
            weight,
            TensorInfo {
                kind: TensorKind::Factored,
                shape: vec![m, n],
                matrix_shape: Some([m, n]),
                rank: Some(r),
                energy: Some(1.0),
                rel_error: Some(0.0),
                reason: None,
                ..base
            },
        );
        totals.source_params += (m * n + m) as u64;
        totals.source_bytes += 4 * (m * n + m) as u64;
        totals.stored_params += (m * r + r + r * n + m) as u64;
        totals.stored_bytes += 4 * (m * r + r + r * n + m) as u64;
        totals.factored_tensors += 1;
        totals.dense_tensors += 1;
    }
    let manifest = Manifest {
        format: cersa_loader::FORMAT_NAME.into(),
        format_version: cersa_loader::FORMAT_VERSION,
        format_minor: 0,
        producer: Producer {
            name: "cersa-loader synthetic MLP".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        config: ConvertConfig {
            energy: 1.0,
            min_rank: 1,
            max_rank: None,
            rank_multiple: 1,
            dtype: "f32".into(),
            algorithm: "svd".into(),
            force_factor: false,
            include: vec![],
            exclude: vec![],
            max_shard_size: 1 << 30,
            rules: vec![],
            calibration: None,
        },
        source: SourceInfo {
            format: "synthetic".into(),
            files: vec![SourceFile {
                file: "synthetic".into(),
                bytes: totals.source_bytes,
            }],
            details: BTreeMap::new(),
        },
        shards: vec![],
        side_files: vec![],
        tensors,
        totals,
    };
    writer.finish(manifest)?;
    Ok(())
}
