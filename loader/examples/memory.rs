//! Memory of subspace fine-tuning per mode vs dense + LoRA, for a CERSA directory.
//!
//! ```text
//! cargo run -p cersa-loader --example memory -- CERSA_DIR [K]
//! ```
//! Counts the factored tensors only (dense tensors cost the same either way). Trainable
//! parameters are f32 with an f32 gradient and AdamW's two f32 moments.

use cersa_loader::adapter::Mode;
use cersa_loader::memory::{checkpoint_totals, MemoryUse};
use cersa_loader::Checkpoint;

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 20) as f64)
}

fn row(label: &str, m: &MemoryUse) {
    println!(
        "{label:<22} {:>12} {:>12} {:>12} {:>12}",
        mib(m.frozen),
        mib(m.trainable),
        mib(m.optimizer),
        mib(m.total())
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        return Err("usage: memory CERSA_DIR [K]".into());
    };
    let k: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let ckpt = Checkpoint::open(dir)?;
    println!(
        "{} factored tensors of {dir}, k = {k} (MiB)",
        ckpt.manifest().totals.factored_tensors
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12}",
        "", "frozen", "trainable", "optimizer", "total"
    );
    let mut lora = MemoryUse::default();
    // The paper's core with every component trainable (`checkpoint_totals` caps t at each
    // layer's rank).
    let cersa_full = Mode::Cersa {
        trainable: usize::MAX,
    };
    for mode in [
        Mode::Frozen,
        Mode::Scale,
        Mode::Core { k },
        Mode::Factors,
        cersa_full,
    ] {
        let (cersa, dense) = checkpoint_totals(&ckpt, mode, k as u64);
        let label = match mode {
            Mode::Core { k } => format!("cersa core k={k}"),
            Mode::Cersa { .. } => "cersa paper core".to_string(),
            m => format!("cersa {}", m.name()),
        };
        row(&label, &cersa);
        lora = dense;
    }
    row(&format!("dense + LoRA r={k}"), &lora);
    Ok(())
}
