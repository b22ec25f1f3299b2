//! `apply DIR NAME ROWS X_F32 Y_F32`: y = x · Wᵀ through `Checkpoint::apply`.
//!
//! `X_F32` holds `ROWS × n` little-endian f32 values (row-major); `Y_F32` receives
//! `ROWS × m` of them. Exposes the Rust reference path to other languages' tests
//! (tests/python/test_torch_loader.py). Exit 2 on any error.

use cersa_loader::Checkpoint;
use std::process::ExitCode;

fn run(args: &[String]) -> Result<(), String> {
    let [dir, name, rows, x_path, y_path] = args else {
        return Err("usage: apply DIR NAME ROWS X_F32 Y_F32".into());
    };
    let rows: usize = rows.parse().map_err(|e| format!("ROWS {rows:?}: {e}"))?;
    let bytes = std::fs::read(x_path).map_err(|e| format!("{x_path}: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "{x_path}: {} bytes is not a whole number of f32",
            bytes.len()
        ));
    }
    let x: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let y = ckpt.apply(name, &x, rows).map_err(|e| e.to_string())?;
    let out: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(y_path, out).map_err(|e| format!("{y_path}: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
