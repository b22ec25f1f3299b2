//! Stacked mixture-of-experts tensors (format revision 1.3): each expert of an `[E, m, n]`
//! tensor is factored on its own, exactly as the same matrix would be as a 2-D tensor of
//! its own; dense experts keep the source's bytes; one expert is read without the others;
//! verify, export, parts and thread counts treat them like any tensor.

use crate::util::*;
use cersa_loader::{expert_name, Checkpoint, DenseReason, TensorKind, TensorView};
use std::path::Path;

const E: usize = 4;
const M: usize = 24;
const N: usize = 16;

/// Expert `e`: low rank (2 + e) plus a little noise, except expert 2, which is full-rank
/// noise (its factors would save nothing, so it stays dense).
fn expert(e: usize) -> Vec<f32> {
    if e == 2 {
        return noise(77, M * N);
    }
    let r = 2 + e;
    let (a, b) = (noise(10 + e as u64, M * r), noise(20 + e as u64, r * N));
    let small = noise(30 + e as u64, M * N);
    (0..M * N)
        .map(|k| {
            let (i, j) = (k / N, k % N);
            (0..r).map(|t| a[i * r + t] * b[t * N + j]).sum::<f32>() + 0.01 * small[k]
        })
        .collect()
}

/// A safetensors source with the stacked tensor (HF fused naming, no `weight` suffix), the
/// same experts as separate 2-D weights, and an ordinary matrix.
fn write_source(path: &Path) {
    let stacked: Vec<f32> = (0..E).flat_map(expert).collect();
    let mut tensors = vec![(
        "model.layers.0.mlp.experts.gate_up_proj".to_string(),
        vec![E, M, N],
        stacked,
    )];
    for e in 0..E {
        tensors.push((format!("single.{e}.weight"), vec![M, N], expert(e)));
    }
    tensors.push((
        "model.layers.0.attn.q.weight".into(),
        vec![N, N],
        noise(5, N * N),
    ));
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32(path, &refs);
}

const STACKED: &str = "model.layers.0.mlp.experts.gate_up_proj";

#[test]
fn each_expert_is_factored_as_its_own_matrix() {
    let dir = tmp();
    let src = dir.path().join("moe.safetensors");
    write_source(&src);
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--energy", "0.9"]);
    let ckpt = Checkpoint::open(&out).expect("output validates");
    let man = ckpt.manifest();
    assert_eq!(man.format_minor, 3);
    let info = &man.tensors[STACKED];
    assert_eq!(info.kind, TensorKind::Experts);
    assert_eq!(info.matrix_shape, Some([M, N]));
    assert_eq!(info.expert_count(), E);
    let bytes = stored_tensors(&out);
    let stored = |name: &str| {
        bytes
            .iter()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("{name} stored"))
            .clone()
    };
    let (mut kept, mut total, mut residual) = (0f64, 0f64, 0f64);
    for e in 0..E {
        let x = info.expert(e).unwrap();
        let single = &man.tensors[&format!("single.{e}.weight")];
        // The same kind, rank, energy and error as the same matrix on its own, and the
        // very same stored bytes.
        assert_eq!(x.kind, single.kind, "expert {e}");
        assert_eq!(x.rank, single.rank, "expert {e}");
        assert_eq!(x.energy, single.energy, "expert {e}");
        assert_eq!(x.rel_error, single.rel_error, "expert {e}");
        assert_eq!(x.reason, single.reason, "expert {e}");
        let (xe, se) = (expert_name(STACKED, e), format!("single.{e}.weight"));
        let suffixes: &[&str] = match x.kind {
            TensorKind::Factored => &[".cersa_u", ".cersa_s", ".cersa_vt"],
            _ => &[""],
        };
        for suffix in suffixes {
            let (a, b) = (
                stored(&format!("{xe}{suffix}")),
                stored(&format!("{se}{suffix}")),
            );
            assert_eq!((&a.1, &a.2, &a.3), (&b.1, &b.2, &b.3), "{xe}{suffix}");
        }
        // One expert read alone equals the stacked reconstruction's slice.
        let one = ckpt.reconstruct_expert(STACKED, e).unwrap();
        assert_eq!((one.rows, one.cols), (M, N));
        let norm2: f64 = expert(e).iter().map(|&v| f64::from(v).powi(2)).sum();
        total += norm2;
        match x.kind {
            TensorKind::Factored => {
                kept += x.energy.unwrap() * norm2;
                residual += x.rel_error.unwrap().powi(2) * norm2;
            }
            _ => kept += norm2,
        }
    }
    // Expert 2 is full rank: dense, for want of a saving; the others are factored.
    assert_eq!(
        info.expert(2).unwrap().reason,
        Some(DenseReason::NoSaving),
        "{info:?}"
    );
    assert!(matches!(
        ckpt.expert(STACKED, 0).unwrap(),
        TensorView::Factored(_)
    ));
    // The entry's energy and error are the experts' weighted by their squared norms.
    assert!((info.energy.unwrap() - kept / total).abs() < 1e-12);
    assert!((info.rel_error.unwrap() - (residual / total).sqrt()).abs() < 1e-12);
    let whole = ckpt.reconstruct(STACKED).unwrap();
    assert_eq!((whole.rows, whole.cols), (E, M * N));
    for e in 0..E {
        let one = ckpt.reconstruct_expert(STACKED, e).unwrap();
        assert_eq!(&whole.data[e * M * N..(e + 1) * M * N], &one.data[..]);
    }
    // apply_expert computes x·W_eᵀ through the factors.
    let x = noise(3, 2 * N);
    let y = ckpt.apply_expert(STACKED, 1, &x, 2).unwrap();
    let w = ckpt.reconstruct_expert(STACKED, 1).unwrap();
    for b in 0..2 {
        for i in 0..M {
            let want: f32 = (0..N).map(|j| x[b * N + j] * w.data[i * N + j]).sum();
            assert!((y[b * M + i] - want).abs() < 1e-4, "{b},{i}");
        }
    }
    assert!(ckpt.reconstruct_expert(STACKED, E).is_err());
    assert!(ckpt.apply(STACKED, &x, 2).is_err());
    cersa_ok(&["verify", s(&out), "--source", s(&src), "-q"]);
}

#[test]
fn experts_output_is_the_same_for_threads_parts_and_verify_catches_a_changed_expert() {
    let dir = tmp();
    let src = dir.path().join("moe.safetensors");
    write_source(&src);
    let (one, two) = (dir.path().join("t1"), dir.path().join("t2"));
    cersa_ok(&["convert", s(&src), s(&one), "-q", "--threads", "1"]);
    cersa_ok(&["convert", s(&src), s(&two), "-q", "--threads", "2"]);
    assert_eq!(contents(&one), contents(&two));
    // Two parts, assembled: the same bytes.
    let mut parts = Vec::new();
    for i in 0..2 {
        let p = dir.path().join(format!("part-{i}"));
        let spec = format!("{i}/2");
        cersa_ok(&["convert", s(&src), s(&p), "-q", "--part", &spec]);
        parts.push(p);
    }
    let assembled = dir.path().join("assembled");
    cersa_ok(&["assemble", s(&assembled), s(&parts[0]), s(&parts[1]), "-q"]);
    assert_eq!(contents(&one), contents(&assembled));
    // Export: the stacked tensor comes back whole, [E, M, N].
    let exported = dir.path().join("exported");
    cersa_ok(&["export", s(&one), s(&exported), "--to", "safetensors", "-q"]);
    let file = std::fs::read_dir(&exported)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("an exported safetensors file");
    let bytes = std::fs::read(&file).unwrap();
    let h = cersa_loader::safetensors::parse(&bytes).unwrap();
    let t = h.tensors.iter().find(|t| t.name == STACKED).unwrap();
    assert_eq!(t.shape, vec![E, M, N]);
    let values = cersa_loader::dtype::decode_f32(t.dtype, &bytes[h.file_range(t)]).unwrap();
    let ckpt = Checkpoint::open(&one).unwrap();
    let whole = ckpt.reconstruct(STACKED).unwrap();
    for (a, b) in values.iter().zip(&whole.data) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // A changed value in the dense expert: verify --source names that expert.
    let source2 = dir.path().join("moe2.safetensors");
    let mut stacked: Vec<f32> = (0..E).flat_map(expert).collect();
    stacked[2 * M * N + 5] += 1.0;
    let mut list = vec![(STACKED, vec![E, M, N], stacked)];
    let singles: Vec<(String, Vec<f32>)> = (0..E)
        .map(|e| (format!("single.{e}.weight"), expert(e)))
        .collect();
    for (n, v) in &singles {
        list.push((n.as_str(), vec![M, N], v.clone()));
    }
    list.push(("model.layers.0.attn.q.weight", vec![N, N], noise(5, N * N)));
    write_f32(&source2, &list);
    let run = cersa(&["verify", s(&one), "--source", s(&source2)]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stdout);
    assert!(
        err.contains(&expert_name(STACKED, 2)),
        "the dense expert is named: {err}"
    );
}

#[test]
fn gguf_stacked_experts_and_exclusion() {
    let dir = tmp();
    let src = dir.path().join("moe.gguf");
    let stacked: Vec<f32> = (0..E).flat_map(expert).collect();
    let file = gguf_bytes(
        &[],
        &[(
            "blk.0.ffn_up_exps.weight",
            vec![E as u64, M as u64, N as u64],
            stacked,
        )],
    );
    std::fs::write(&src, file).unwrap();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let ckpt = Checkpoint::open(&out).unwrap();
    let info = &ckpt.manifest().tensors["blk.0.ffn_up_exps.weight"];
    assert_eq!(info.kind, TensorKind::Experts);
    assert_eq!(info.shape, vec![E, M, N]);
    let ranks: Vec<Option<usize>> = (0..E).map(|e| info.expert(e).unwrap().rank).collect();
    assert_eq!(ranks[2], None, "the full-rank expert stays dense");
    assert!(ranks[0].is_some() && ranks[3].is_some(), "{ranks:?}");
    // --exclude keeps the stacked tensor dense, as revision 1.2 stored it.
    let kept = dir.path().join("kept");
    cersa_ok(&["convert", s(&src), s(&kept), "-q", "--exclude", "*_exps*"]);
    let ckpt = Checkpoint::open(&kept).unwrap();
    let info = &ckpt.manifest().tensors["blk.0.ffn_up_exps.weight"];
    assert_eq!(info.kind, TensorKind::Dense);
    assert_eq!(ckpt.manifest().format_minor, 0);
}
