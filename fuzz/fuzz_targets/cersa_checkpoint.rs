//! The CERSA manifest/shard validator on arbitrary directories: the input is split into a
//! manifest and up to two shards (separator `\0CERSA\0`), written to a temp dir and
//! opened with checksum verification. Opening must never panic; an opened checkpoint
//! must serve `get` and `reconstruct` of every tensor without panicking.
#![no_main]

use cersa_loader::{Checkpoint, OpenOptions};
use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\0CERSA\0";
const SHARDS: [&str; 2] = [
    "cersa-00001-of-00002.safetensors",
    "cersa-00002-of-00002.safetensors",
];

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < 2 {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data);
    let dir = tempfile::tempdir().expect("temp dir");
    // Sizes are fixed up so mutations reach the shard checks instead of stopping at the
    // size comparison (sha256 is not verified for the same reason).
    let manifest = match serde_json::from_slice::<serde_json::Value>(parts[0]) {
        Ok(mut v) => {
            if let Some(shards) = v.get_mut("shards").and_then(|s| s.as_array_mut()) {
                for s in shards {
                    let k = SHARDS
                        .iter()
                        .position(|n| s.get("file") == Some(&(*n).into()));
                    if let (Some(k), Some(obj)) = (k, s.as_object_mut()) {
                        let len = parts.get(k + 1).map_or(0, |p| p.len());
                        obj.insert("bytes".into(), len.into());
                    }
                }
            }
            serde_json::to_vec(&v).expect("value serializes")
        }
        Err(_) => parts[0].to_vec(),
    };
    std::fs::write(dir.path().join("cersa.json"), manifest).expect("write");
    for (name, bytes) in SHARDS.iter().zip(&parts[1..]) {
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    // The validator lists every issue of the same hostile directory; it must not panic either.
    let _ = cersa_loader::validate(dir.path());
    let opts = OpenOptions {
        verify_checksums: false,
    };
    if let Ok(ckpt) = Checkpoint::open_with(dir.path(), opts) {
        let names: Vec<String> = ckpt.names().map(str::to_string).collect();
        for n in &names {
            let _ = ckpt.get(n);
            // Bound the work: reconstruct allocates m·n floats.
            if let Some(info) = ckpt.manifest().tensors.get(n) {
                let numel: usize = info.shape.iter().product();
                if numel <= 1 << 16 {
                    let _ = ckpt.reconstruct(n);
                }
            }
        }
    }
});
