//! Peak memory does not grow with the checkpoint: ~1 GiB of pass-through tensors convert
//! with a peak RSS (VmHWM of the child) far below the data size.

use crate::util::*;
use cersa_loader::Dtype;
use std::io::Write;
use std::process::Command;

#[test]
fn gigabyte_of_pass_through_stays_under_400_mib() {
    let dir = tmp();
    let src = dir.path().join("big.safetensors");
    // 8 × 128 MiB embedding-like tensors (excluded by default) + one small factored matrix.
    let rows = 32 * 1024;
    let cols = 1024;
    let mut list: Vec<(String, Dtype, Vec<usize>, usize)> = (0..8)
        .map(|k| {
            (
                format!("embed.{k}.weight"),
                Dtype::F32,
                vec![rows, cols],
                rows * cols * 4,
            )
        })
        .collect();
    list.push((
        "layer.q.weight".into(),
        Dtype::F32,
        vec![64, 64],
        64 * 64 * 4,
    ));
    let header = cersa_loader::safetensors::serialize_header(&Default::default(), &list);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        f.write_all(&header).unwrap();
        let chunk: Vec<u8> = noise(9, 1 << 20)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for _ in 0..8 * (rows * cols * 4) / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
        // A rank-2 matrix, so it is factored.
        let (a, b) = (noise(10, 128), noise(11, 128));
        let small: Vec<u8> = (0..64 * 64)
            .map(|k| a[k / 64] * b[k % 64] + a[64 + k / 64] * b[64 + k % 64])
            .flat_map(|x| x.to_le_bytes())
            .collect();
        f.write_all(&small).unwrap();
    }
    let out = dir.path().join("out");
    let run = Command::new(bin())
        .args([
            "convert",
            s(&src),
            s(&out),
            "-q",
            "--max-shard-size",
            "300MB",
        ])
        .env("CERSA_PRINT_PEAK_RSS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let kib: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("cersa-peak-rss: "))
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS line in {stderr}"));
    eprintln!(
        "peak RSS converting 1 GiB of pass-through: {} MiB",
        kib / 1024
    );
    assert!(kib < 400 * 1024, "peak RSS {} MiB ≥ 400 MiB", kib / 1024);
    let ckpt = cersa_loader::Checkpoint::open(&out).unwrap();
    assert!(ckpt.manifest().shards.len() >= 4);
    assert_eq!(ckpt.manifest().totals.factored_tensors, 1);
}
