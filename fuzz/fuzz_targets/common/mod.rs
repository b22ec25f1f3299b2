//! Shared by the targets that go through the converter's file readers: a temp directory
//! per input under `TMPDIR` (run.sh sets /dev/shm), and the bounded read of every
//! tensor of an opened source through the `Source` trait.
#![allow(dead_code)]

use cersa::input::Source;

/// Most elements of a tensor that is decoded (bounds the work per input).
pub const MAX_NUMEL: u64 = 1 << 16;

/// A fresh temp directory (removed when dropped, at the end of the input).
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cersa-fuzz-")
        .tempdir()
        .expect("temp dir")
}

/// Splits `data` at `sep` into at most `max` parts (the last holds the rest).
pub fn split<'a>(data: &'a [u8], sep: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + sep.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// Everything a caller of an opened source may ask, for every tensor of at most
/// [`MAX_NUMEL`] elements: its float values (as many as elements) and its dense copy (as
/// many bytes as elements × the dense dtype's size). Errors are fine, panics are not.
pub fn read_all(src: &dyn Source) {
    let _ = src.details();
    let _ = src.default_excludes();
    assert_eq!(src.files().len(), src.catalog().paths.len());
    for i in 0..src.files().len() {
        let _ = src.file_path(i);
    }
    src.check_unchanged()
        .expect("nothing changed the scratch files");
    for (i, meta) in src.tensors().iter().enumerate() {
        assert!(meta.file < src.files().len(), "{}: file index", meta.name);
        let numel = meta
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .expect("a listed tensor's element count fits in u64");
        assert_eq!(numel, meta.numel());
        if numel > MAX_NUMEL {
            continue;
        }
        if meta.float.is_some() {
            if let Ok(v) = src.read_float(i) {
                assert_eq!(v.len() as u64, numel, "{}: read_float length", meta.name);
                let _ = v.non_finite();
            }
        }
        let mut copied = 0u64;
        let ok = src.copy_dense(i, &mut |c: &[u8]| {
            copied += c.len() as u64;
            Ok(())
        });
        if ok.is_ok() {
            assert_eq!(
                copied,
                numel * meta.dense_dtype.size() as u64,
                "{}: copy_dense length",
                meta.name
            );
        }
    }
}

/// Writes `data` as `name` in a fresh scratch directory, opens it with
/// `cersa::input::open` and reads it with [`read_all`].
pub fn open_file_and_read(data: &[u8], name: &str) {
    let dir = scratch_dir();
    let path = dir.path().join(name);
    std::fs::write(&path, data).expect("write");
    if let Ok(src) = cersa::input::open(&path) {
        read_all(src.as_ref());
    }
}
