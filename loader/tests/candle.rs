//! Candle integration (feature `candle`): forward equivalence with the reference
//! `Checkpoint::reconstruct`/`apply`, a short fine-tune that must cut the loss by a large
//! factor without touching the frozen factors, and an adapter save/load round trip.

#[path = "../examples/common/synthetic.rs"]
#[allow(dead_code)]
mod synthetic;
#[path = "../examples/common/train.rs"]
mod train;

use cersa_loader::adapter::{Adapter, Mode};
use cersa_loader::candle::candle_core::{DType, Device, Tensor};
use cersa_loader::candle::candle_nn::{Module, VarMap};
use cersa_loader::candle::{adapter_from_varmap, load_adapter_into, CersaLinear};
use cersa_loader::Checkpoint;

const LAYERS: [synthetic::LayerSpec<'static>; 2] =
    [("mlp.fc1", 48, 32, 12), ("mlp.fc2", 16, 48, 8)];
const PREFIXES: [&str; 2] = ["mlp.fc1", "mlp.fc2"];

fn checkpoint() -> (tempfile::TempDir, Checkpoint) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mlp.cersa");
    synthetic::write_mlp(&dir, &LAYERS, 42).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    (tmp, ckpt)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    assert!(
        err <= 1e-5 * scale.max(1.0),
        "{what}: max error {err} (scale {scale})"
    );
}

#[test]
fn every_mode_starts_equal_to_the_reference_reconstruct_and_apply() {
    let (_tmp, ckpt) = checkpoint();
    let device = Device::Cpu;
    let vb = ckpt.to_candle(&device, None);
    let rows = 5;
    let mut rng = synthetic::Rng::new(3);
    for (prefix, m, n, _) in LAYERS {
        let weight = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let x = rng.normals(rows * n, 1.0);
        let w = ckpt.reconstruct(&weight).unwrap();
        let b: Vec<f32> = values(&vb.dense(&bias_name).unwrap());
        // Reference 1: x·Ŵᵀ + b with Ŵ from reconstruct, accumulated in f64.
        let mut want = vec![0f32; rows * m];
        for (idx, out) in want.iter_mut().enumerate() {
            let (i, j) = (idx / m, idx % m);
            let dot: f64 = (0..n)
                .map(|p| f64::from(x[i * n + p]) * f64::from(w.data[j * n + p]))
                .sum();
            *out = (dot + f64::from(b[j])) as f32;
        }
        // Reference 2: the loader's apply (through the factors).
        let applied = ckpt.apply(&weight, &x, rows).unwrap();
        let applied_b: Vec<f32> = applied
            .iter()
            .enumerate()
            .map(|(i, v)| v + b[i % m])
            .collect();
        assert_close(&applied_b, &want, "apply vs reconstruct");
        let r = LAYERS.iter().find(|l| l.0 == prefix).unwrap().3;
        for mode in [
            Mode::Frozen,
            Mode::Scale,
            Mode::Core { k: 3 },
            Mode::Factors,
            Mode::Cersa { trainable: r },
            Mode::Cersa { trainable: 1 },
        ] {
            let varmap = VarMap::new();
            let layer = CersaLinear::new(&vb, &weight, Some(&bias_name), mode, &varmap).unwrap();
            let xt = Tensor::from_vec(x.clone(), (rows, n), &device).unwrap();
            let got = values(&layer.forward(&xt).unwrap());
            assert_close(&got, &want, &format!("{weight} {mode:?}"));
            // Leading batch dimensions are kept.
            let x3 = xt.reshape((1, rows, n)).unwrap();
            assert_eq!(layer.forward(&x3).unwrap().dims(), &[1, rows, m]);
            let trainable = varmap
                .all_vars()
                .iter()
                .map(|v| v.elem_count())
                .sum::<usize>();
            let expected = match mode {
                Mode::Frozen => 0,
                Mode::Scale => r,
                Mode::Core { k } => 2 * r * k,
                Mode::Factors => r * (m + n),
                Mode::Cersa { trainable } => trainable * trainable,
            };
            assert_eq!(trainable, expected, "{mode:?}");
        }
    }
    // Dtype cast on load: a bf16 request rounds the factors.
    let bf = ckpt
        .to_candle(&device, Some(DType::BF16))
        .factors("mlp.fc1.weight")
        .unwrap();
    assert_eq!(bf.u.dtype(), DType::BF16);
    assert!(CersaLinear::new(&vb, "mlp.fc1.bias", None, Mode::Frozen, &VarMap::new()).is_err());
}

#[test]
fn finetune_cuts_the_loss_and_leaves_frozen_factors_alone() {
    let (tmp, ckpt) = checkpoint();
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let model = train::build(&ckpt, &PREFIXES, Mode::Core { k: 4 }, &device, &varmap).unwrap();
    let teacher = train::Teacher::new(&ckpt, &PREFIXES, 4, 0.3, 7, &device).unwrap();
    let frozen_before: Vec<Vec<f32>> = model
        .layers
        .iter()
        .flat_map(|l| l.frozen_tensors())
        .map(|t| values(&t))
        .collect();
    assert_eq!(frozen_before.len(), 6, "V, Uᵀ, σ of two layers");
    let losses = train::train(&model, &teacher, &varmap, 200, 1e-2, 64, 1, &device).unwrap();
    let first = losses[0];
    let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!(
        "core k=4: loss {first:.4e} -> {last:.4e} ({:.0}x)",
        first / last
    );
    assert!(
        first > 0.0 && last < first / 100.0,
        "loss {first} -> {last}"
    );
    let frozen_after: Vec<Vec<f32>> = model
        .layers
        .iter()
        .flat_map(|l| l.frozen_tensors())
        .map(|t| values(&t))
        .collect();
    assert_eq!(frozen_before, frozen_after, "frozen factors changed");
    // And they still equal the checkpoint's bytes (V = (V_rᵀ)ᵀ).
    let vb = ckpt.to_candle(&device, None);
    let f = vb.factors("mlp.fc1.weight").unwrap();
    assert_eq!(frozen_before[0], values(&f.vt.t().unwrap()));

    // Adapter round trip: a fresh model with the saved adapter computes the same outputs,
    // and the adapter's product form (used by `cersa merge`) is the trained layer.
    let layers: Vec<&CersaLinear> = model.layers.iter().collect();
    let adapter = adapter_from_varmap(&ckpt, &layers, &varmap).unwrap();
    let path = tmp.path().join("adapter.safetensors");
    adapter.write(&path).unwrap();
    let read = Adapter::read(&path).unwrap();
    assert_eq!(read, adapter);
    read.check_base(&ckpt).unwrap();
    let varmap2 = VarMap::new();
    let model2 = train::build(&ckpt, &PREFIXES, Mode::Core { k: 4 }, &device, &varmap2).unwrap();
    load_adapter_into(&read, &model2.layers.iter().collect::<Vec<_>>(), &varmap2).unwrap();
    let mut rng = synthetic::Rng::new(9);
    let x = Tensor::from_vec(rng.normals(4 * 32, 1.0), (4, 32), &device).unwrap();
    assert_eq!(
        values(&model.forward(&x).unwrap()),
        values(&model2.forward(&x).unwrap())
    );
    let (left, right, q) = read.adapted_product(&ckpt, "mlp.fc1.weight").unwrap();
    let xs = values(&x);
    let y1 = values(&model.layers[0].forward(&x).unwrap());
    let b = values(&vb.dense("mlp.fc1.bias").unwrap());
    let (m, n) = (48, 32);
    for (idx, y) in y1.iter().enumerate() {
        let (i, j) = (idx / m, idx % m);
        let mut acc = f64::from(b[j]);
        for t in 0..q {
            let xr: f64 = (0..n)
                .map(|p| f64::from(xs[i * n + p]) * right[t * n + p])
                .sum();
            acc += xr * left[j * q + t];
        }
        assert!((acc as f32 - y).abs() < 1e-4 * (1.0 + acc.abs() as f32));
    }
    // A tampered identity is refused.
    let mut other = read.clone();
    other.manifest_sha256 = "0".repeat(64);
    assert!(other.check_base(&ckpt).is_err());
}

#[test]
fn scale_and_factors_modes_train_too() {
    let (_tmp, ckpt) = checkpoint();
    let device = Device::Cpu;
    // Scale mode can only follow a spectrum change (k = 0: diagonal E); factors mode a
    // subspace change of rank 4.
    for (mode, k, lr) in [(Mode::Scale, 0, 3e-2), (Mode::Factors, 4, 1e-2)] {
        let teacher = train::Teacher::new(&ckpt, &PREFIXES, k, 0.3, 7, &device).unwrap();
        let varmap = VarMap::new();
        let model = train::build(&ckpt, &PREFIXES, mode, &device, &varmap).unwrap();
        let losses = train::train(&model, &teacher, &varmap, 200, lr, 64, 1, &device).unwrap();
        let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
        eprintln!("{mode:?}: loss {:.4e} -> {last:.4e}", losses[0]);
        assert!(last < losses[0] / 20.0, "{mode:?}: {} -> {last}", losses[0]);
    }
}

/// One expert of a stacked experts tensor (format revision 1.3; the `experts` test vector:
/// an F16-factored, a dense and a Q8_0-factored expert) loads alone and equals the
/// reference `reconstruct_expert`; `all()` lists every expert's stored tensors.
#[test]
fn experts_load_one_at_a_time() {
    use cersa_loader::candle::CandleExpert;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../formats/vectors/valid/experts");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let device = Device::Cpu;
    let vb = ckpt.to_candle(&device, Some(DType::F32));
    let name = "blk.0.ffn_up_exps.weight";
    let mut kinds = Vec::new();
    for e in 0..3 {
        let want = ckpt.reconstruct_expert(name, e).unwrap();
        let got = match vb.expert(name, e).unwrap() {
            CandleExpert::Dense(t) => {
                kinds.push("dense");
                assert_eq!(t.dims(), &[6, 5, 8]);
                values(&t)
            }
            CandleExpert::Factored(f) => {
                kinds.push("factored");
                let us = f.u.broadcast_mul(&f.s.unsqueeze(0).unwrap()).unwrap();
                values(&us.matmul(&f.vt).unwrap())
            }
        };
        assert_close(&got, &want.data, &format!("expert {e}"));
    }
    assert_eq!(kinds, ["factored", "dense", "factored"]);
    assert!(vb.expert(name, 3).is_err());
    assert!(vb.dense(name).is_err() && vb.factors(name).is_err());
    let all = vb.all().unwrap();
    assert!(all.contains_key("blk.0.ffn_up_exps.weight.cersa_expert.1"));
    assert!(all.contains_key("blk.0.ffn_up_exps.weight.cersa_expert.2.cersa_vt"));
    assert!(!all.contains_key(name));
}
