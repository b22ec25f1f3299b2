//! The strict GGUF header parser (`cersa::input::gguf::header::parse`) on arbitrary bytes:
//! Ok or Err, never a panic. An accepted header must list tensors whose byte ranges lie in
//! the input, hold exactly their element count in whole blocks of their type, start at the
//! running sum of the padded sizes before them, and dequantize to as many values as
//! elements. An accepted file is then written to a temp file (a part of a split model
//! named `model-NNNNN-of-CCCCC.gguf` from its split keys, as llama.cpp names parts), opened
//! with `cersa::input::open` and every tensor of at most 2^16 elements read through `Source`.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use cersa::input::gguf::ggml::dequantize;
use cersa::input::gguf::header::{parse, MAX_TENSORS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = parse(data) else { return };
    assert!(h.version == 2 || h.version == 3);
    assert!(h.alignment.is_power_of_two());
    assert_eq!(h.data_start % h.alignment, 0);
    assert!(h.tensors.len() as u64 <= MAX_TENSORS);
    if let Some(s) = h.split {
        assert!(s.no < s.count);
    }
    // Offsets relative to the data section: the running sum of the padded sizes.
    let mut expected = 0u128;
    let mut names = std::collections::HashSet::new();
    for t in &h.tensors {
        assert!(names.insert(t.name.as_str()), "{}: listed twice", t.name);
        assert!(t.ne.len() <= 4, "{}: dims", t.name);
        let r = &t.range;
        assert!(
            r.start <= r.end && r.end <= data.len(),
            "{}: range {r:?}",
            t.name
        );
        let offset = r.start as u128 - h.data_start as u128;
        assert_eq!(offset, expected, "{}: offset", t.name);
        assert_eq!(offset % h.alignment as u128, 0, "{}: alignment", t.name);
        let (block, block_bytes) = t.ty.block();
        let ne0 = t.ne.first().copied().unwrap_or(1) as u128;
        assert_eq!(ne0 % block as u128, 0, "{}: partial block", t.name);
        let numel: u128 = t.ne.iter().map(|&d| d as u128).product();
        let bytes = numel / block as u128 * block_bytes as u128;
        assert_eq!(r.len() as u128, bytes, "{}: byte size", t.name);
        expected = (offset + bytes).next_multiple_of(h.alignment as u128);
        if numel <= common::MAX_NUMEL as u128 {
            let mut out = Vec::new();
            dequantize(t.ty, &data[r.clone()], &mut out);
            assert_eq!(out.len() as u128, numel, "{}: dequantized length", t.name);
        }
    }
    // A part of a split model is named as llama.cpp names parts, so opening it reaches
    // the split checks (its sibling parts are absent).
    let name = match h.split {
        Some(s) if s.count > 1 => format!("model-{:05}-of-{:05}.gguf", s.no + 1, s.count),
        _ => "model.gguf".to_string(),
    };
    common::open_file_and_read(data, &name);
});
