//! `candle_apply DIR ADAPTER NAME ROWS X_F32 Y_F32`: y = CersaLinear(x) in candle on CPU,
//! with the layer's mode and trained tensors taken from ADAPTER (a `cersa-adapter` file,
//! e.g. written by `cersa_torch.save_adapter`; a dense-base layer is the checkpoint's dense
//! W plus the core in the basis the adapter carries), no bias.
//!
//! `X_F32` holds `ROWS × n` little-endian f32 values (row-major); `Y_F32` receives
//! `ROWS × m`. Exposes the candle path to the Python tests, which check that candle and
//! `cersa_torch` give the same outputs for the same adapter
//! (tests/python/test_torch_adapter.py). Exit 2 on any error.

use cersa_loader::adapter::{Adapter, Base};
use cersa_loader::candle::candle_core::{Device, Tensor};
use cersa_loader::candle::candle_nn::{Module, VarMap};
use cersa_loader::candle::{load_adapter_into, CersaLinear};
use cersa_loader::Checkpoint;
use std::process::ExitCode;

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [dir, adapter, name, rows, x_path, y_path] = args else {
        return Err("usage: candle_apply DIR ADAPTER NAME ROWS X_F32 Y_F32".into());
    };
    let rows: usize = rows.parse().map_err(|e| format!("ROWS {rows:?}: {e}"))?;
    let bytes = std::fs::read(x_path).map_err(|e| format!("{x_path}: {e}"))?;
    let x: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ckpt = Checkpoint::open(dir)?;
    let adapter = Adapter::read(std::path::Path::new(adapter))?;
    adapter.check_base(&ckpt)?;
    let info = adapter
        .layers
        .get(name.as_str())
        .ok_or_else(|| format!("the adapter has no layer {name}"))?;
    let n = info.matrix_shape[1];
    if x.len() != rows * n {
        return Err(format!("{x_path}: {} values, expected {rows} × {n}", x.len()).into());
    }
    let device = Device::Cpu;
    let vb = ckpt.to_candle(&device, None);
    let varmap = VarMap::new();
    let layer = match info.base {
        // A layer the checkpoint keeps dense: W plus the core in the adapter's basis.
        Base::Dense => CersaLinear::dense_base(&vb, name, None, &adapter, &varmap)?,
        Base::Factored => CersaLinear::new(&vb, name, None, info.mode, &varmap)?,
    };
    load_adapter_into(&adapter, &[&layer], &varmap)?;
    let y = layer.forward(&Tensor::from_vec(x, (rows, n), &device)?)?;
    let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let out: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(y_path, out).map_err(|e| format!("{y_path}: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle_apply: {e}");
            ExitCode::from(2)
        }
    }
}
