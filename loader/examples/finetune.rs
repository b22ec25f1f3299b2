//! Fine-tunes a CERSA checkpoint inside its principal subspace on CPU (or CUDA with
//! `--features cuda` and `CERSA_DEVICE=cuda`), then saves the adapter.
//!
//! ```text
//! cargo run -p cersa-loader --features candle --example finetune -- [STEPS] [MODE] [ADAPTER_OUT]
//! ```
//! MODE is `core` (k = 4, default), `scale` or `factors`. The model is a generated 2-layer
//! MLP written as a CERSA directory; the task is to regress the outputs of the same MLP
//! with each dense weight perturbed inside its subspace. Prints the loss going down.

#[path = "common/synthetic.rs"]
mod synthetic;
#[path = "common/train.rs"]
mod train;

use cersa_loader::adapter::Mode;
use cersa_loader::candle::adapter_from_varmap;
use cersa_loader::candle::candle_core::Device;
use cersa_loader::candle::candle_nn::VarMap;
use cersa_loader::Checkpoint;

const LAYERS: [synthetic::LayerSpec<'static>; 2] =
    [("mlp.fc1", 96, 64, 24), ("mlp.fc2", 32, 96, 16)];

fn device() -> Result<Device, Box<dyn std::error::Error>> {
    Ok(match std::env::var("CERSA_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().map_or(Ok(300), |s| s.parse())?;
    let mode = match args.get(1).map_or("core", String::as_str) {
        "core" => Mode::Core { k: 4 },
        "scale" => Mode::Scale,
        "factors" => Mode::Factors,
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let device = device()?;
    let tmp = std::env::temp_dir().join(format!("cersa-finetune-{}", std::process::id()));
    let ckpt_dir = tmp.join("mlp.cersa");
    synthetic::write_mlp(&ckpt_dir, &LAYERS, 42)?;
    let ckpt = Checkpoint::open(&ckpt_dir)?;
    let prefixes: Vec<&str> = LAYERS.iter().map(|l| l.0).collect();

    let varmap = VarMap::new();
    let model = train::build(&ckpt, &prefixes, mode, &device, &varmap)?;
    let teacher = train::Teacher::new(&ckpt, &prefixes, 4, 0.3, 7, &device)?;
    let lr = if mode == Mode::Scale { 3e-2 } else { 1e-2 };
    let losses = train::train(&model, &teacher, &varmap, steps, lr, 64, 1, &device)?;
    for (i, loss) in losses.iter().enumerate() {
        if i % 25 == 0 || i + 1 == losses.len() {
            println!("step {i:4}  loss {loss:.6e}");
        }
    }
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "mode {}: loss {first:.4e} -> {last:.4e} ({:.1}x lower) on {device:?}",
            mode.name(),
            first / last
        );
    }
    let layers: Vec<_> = model.layers.iter().collect();
    let adapter = adapter_from_varmap(&ckpt, &layers, &varmap)?;
    let out = args
        .get(2)
        .map_or_else(|| tmp.join("adapter.safetensors"), std::path::PathBuf::from);
    adapter.write(&out)?;
    println!(
        "adapter: {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out)?.len()
    );
    drop(ckpt);
    std::fs::remove_dir_all(&ckpt_dir)?;
    Ok(())
}
