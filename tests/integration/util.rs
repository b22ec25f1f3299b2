//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cersa")
}

/// Path of a committed fixture, relative to `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Runs `cersa ARGS`, returning its output.
pub fn cersa(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run cersa")
}

/// Runs `cersa ARGS` and asserts exit 0; returns stdout.
pub fn cersa_ok(args: &[&str]) -> String {
    let out = cersa(args);
    assert!(
        out.status.success(),
        "cersa {args:?} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `cersa ARGS` expecting exit code `code`; returns stderr.
pub fn cersa_fails(args: &[&str], code: i32) -> String {
    let out = cersa(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "cersa {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// `p` as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes a safetensors file of F32 matrices given as (name, shape, values).
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                n.to_string(),
                cersa_loader::Dtype::F32,
                shape.clone(),
                bytes,
            )
        })
        .collect();
    cersa_loader::safetensors::write_file(path, &Default::default(), &list).expect("write fixture");
}

/// Deterministic pseudo-random f32 values (xorshift), for synthetic matrices.
pub fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Every stored tensor of a CERSA directory, sorted by name: (name, dtype, shape, bytes).
pub fn stored_tensors(out: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let ckpt = cersa_loader::Checkpoint::open(out).expect("output validates");
    let mut all = Vec::new();
    for shard in &ckpt.manifest().shards {
        let bytes = std::fs::read(out.join(&shard.file)).unwrap();
        let h = cersa_loader::safetensors::parse(&bytes).unwrap();
        for t in &h.tensors {
            let data = bytes[h.file_range(t)].to_vec();
            all.push((t.name.clone(), t.dtype.to_string(), t.shape.clone(), data));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// A metadata pair: key, GGUF value type, value bytes.
pub type Kv = (&'static str, u32, Vec<u8>);

/// A GGUF string: u64 length, then the bytes.
pub fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

/// A GGUF v3 file of F32 tensors `(name, row-major shape, values)`, alignment 32.
pub fn gguf_bytes(kvs: &[Kv], tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend((tensors.len() as u64).to_le_bytes());
    v.extend((kvs.len() as u64).to_le_bytes());
    for (key, ty, value) in kvs {
        v.extend(gstr(key));
        v.extend(ty.to_le_bytes());
        v.extend(value);
    }
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        v.extend(gstr(name));
        v.extend((shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        shape.iter().rev().for_each(|d| v.extend(d.to_le_bytes()));
        v.extend(0u32.to_le_bytes());
        v.extend(offset.to_le_bytes());
        offset += (values.len() as u64 * 4).next_multiple_of(32);
    }
    for (_, _, values) in tensors {
        while !v.len().is_multiple_of(32) {
            v.push(0);
        }
        values.iter().for_each(|x| v.extend(x.to_le_bytes()));
    }
    v
}

/// Runs convert on `src` (a file, or a directory whose output goes inside it) expecting
/// exit 2, every needle in the error, and no output directory.
pub fn convert_rejects(src: &Path, needles: &[&str]) {
    let out = match src.is_dir() {
        true => src.join("out"),
        false => src.with_file_name("out"),
    };
    let err = cersa_fails(&["convert", s(src), s(&out), "-q"], 2);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(!out.exists(), "no output after an error");
}

/// Converts `src` into `out` and returns its stored tensors.
pub fn convert_stored(src: &Path, out: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    cersa_ok(&["convert", s(src), s(out), "-q"]);
    stored_tensors(out)
}

/// All files of a directory, sorted by name, with their bytes.
pub fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Runs `cersa convert SRC OUT -q EXTRA…` with files capped at 16 KiB (`ulimit -f 32`
/// counts 512-byte blocks) and SIGXFSZ ignored (inherited through exec), so a write past the
/// cap fails with EFBIG; returns the exit code and stderr.
pub fn convert_with_16k_file_cap(src: &Path, out: &Path, extra: &str) -> (Option<i32>, String) {
    let script = format!(
        "trap '' XFSZ; ulimit -f 32; exec '{}' convert '{}' '{}' -q {extra}",
        bin(),
        s(src),
        s(out)
    );
    let output = Command::new("sh").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

/// A source of 48 matrices 512×512 f32 (48 MiB): seconds of work on one thread, so a
/// signal sent a few hundred milliseconds in lands mid-run even on a fast idle machine.
pub fn slow_source(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    let names: Vec<String> = (0..48).map(|l| format!("layer.{l:02}.weight")).collect();
    let tensors: Vec<_> = (names.iter().zip(1..))
        .map(|(name, seed)| (name.as_str(), vec![512, 512], noise(seed, 512 * 512)))
        .collect();
    write_f32(&path, &tensors);
    path
}
