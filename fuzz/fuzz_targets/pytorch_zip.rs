//! The zip layout of `torch.save` (`cersa::input::pytorch::zip::read_zip`, our own
//! central-directory parser) on arbitrary bytes: Ok or Err, never a panic; every storage
//! of an accepted archive lies inside the input. An accepted archive is then written to a
//! temp file, opened with `cersa::input::open` (views checked against storages, nested
//! dicts flattened) and every tensor of at most 2^16 elements read through `Source`.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_root, storages)) = cersa::input::pytorch::zip::read_zip(data) else {
        return;
    };
    for (key, r) in &storages {
        assert!(
            r.start <= r.end && r.end <= data.len(),
            "storage {key}: {r:?}"
        );
    }
    common::open_file_and_read(data, "model.pt");
});
