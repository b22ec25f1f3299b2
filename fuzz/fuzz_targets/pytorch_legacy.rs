//! The legacy (pre-1.6) `torch.save` layout (`cersa::input::pytorch::legacy::read_legacy`:
//! magic, protocol and sys_info pickles, the state dict, the storage key list, then the
//! storages) on arbitrary bytes: Ok or Err, never a panic; every storage of an accepted file
//! lies inside the input, in key-list order without overlap. An accepted file is then
//! opened with `cersa::input::open` and every tensor of at most 2^16 elements read.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_root, storages)) = cersa::input::pytorch::legacy::read_legacy(data) else {
        return;
    };
    let mut ranges: Vec<_> = storages.values().cloned().collect();
    ranges.sort_by_key(|r| r.start);
    for w in ranges.windows(2) {
        assert!(w[0].end <= w[1].start, "storages overlap: {ranges:?}");
    }
    for r in &ranges {
        assert!(r.start <= r.end && r.end <= data.len(), "storage {r:?}");
    }
    common::open_file_and_read(data, "model.pt");
});
