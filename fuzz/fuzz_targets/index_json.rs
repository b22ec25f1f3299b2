//! Hugging Face checkpoint indexes (src/input/index.rs, through `cersa::input::open`): the
//! input is an index JSON and up to three shards (separator `\0CERSA\0`), written to a
//! temp dir as `model.safetensors.index.json` + `model-0000k-of-00003.safetensors`, or,
//! when the index text mentions `.bin"`, as `pytorch_model.bin.index.json` +
//! `pytorch_model-0000k-of-00003.bin`. The index and the directory are opened (shard names
//! must stay inside the directory, every indexed tensor must be in the shard the index
//! names and every stored one indexed) and every tensor of at most 2^16 elements read
//! through `Source`. Never a panic.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\0CERSA\0";

fuzz_target!(|data: &[u8]| {
    let parts = common::split(data, SEP, 4);
    let pytorch = parts[0].windows(5).any(|w| w == b".bin\"");
    let (index, shard) = if pytorch {
        ("pytorch_model.bin.index.json", "pytorch_model")
    } else {
        ("model.safetensors.index.json", "model")
    };
    let ext = if pytorch { "bin" } else { "safetensors" };
    let dir = common::scratch_dir();
    std::fs::write(dir.path().join(index), parts[0]).expect("write");
    for (k, bytes) in parts[1..].iter().enumerate() {
        let name = format!("{shard}-{:05}-of-00003.{ext}", k + 1);
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    if let Ok(src) = cersa::input::open(&dir.path().join(index)) {
        common::read_all(src.as_ref());
    }
    if let Ok(src) = cersa::input::open(dir.path()) {
        common::read_all(src.as_ref());
    }
});
