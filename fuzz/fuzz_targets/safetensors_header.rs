//! The strict safetensors parser on arbitrary bytes: it must return Ok or Err, never
//! panic, and an accepted header must describe ranges inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = cersa_loader::safetensors::parse(data) {
        let mut end = h.data_start;
        for t in &h.tensors {
            let r = h.file_range(t);
            assert!(r.start <= r.end && r.end <= data.len());
            assert_eq!(r.start, end, "tensors must be contiguous");
            end = r.end;
            let numel: usize = t.shape.iter().product();
            assert_eq!(numel * t.dtype.size(), r.end - r.start);
        }
        assert_eq!(end, data.len());
    }
});
