//! Write → read round trips through `CheckpointWriter` and `Checkpoint::open`.

use cersa_loader::manifest::{ConvertConfig, Producer, SourceInfo, Totals};
use cersa_loader::writer::{header_base_bound, hex, ClosedShard, PlannedEntry};
use cersa_loader::{
    factor_names, safetensors::header_entry_bound, Checkpoint, CheckpointWriter, DenseReason,
    Dtype, Manifest, OpenOptions, TensorInfo, TensorKind, TensorView,
};
use proptest::prelude::*;
use sha2::Digest;
use std::collections::BTreeMap;

fn manifest(tensors: BTreeMap<String, TensorInfo>) -> Manifest {
    Manifest {
        format: "cersa".into(),
        format_version: 1,
        format_minor: 0,
        producer: Producer {
            name: "test".into(),
            version: "0".into(),
        },
        config: ConvertConfig {
            energy: 0.9,
            min_rank: 1,
            max_rank: None,
            rank_multiple: 1,
            dtype: "source".into(),
            algorithm: "svd".into(),
            force_factor: false,
            include: vec![],
            exclude: vec![],
            max_shard_size: 0,
            rules: vec![],
            calibration: None,
        },
        source: SourceInfo {
            format: "safetensors".into(),
            files: vec![],
            details: Default::default(),
        },
        shards: vec![],
        side_files: vec![],
        tensors,
        totals: Totals::default(),
    }
}

fn dense_info(shape: Vec<usize>, dtype: Dtype) -> TensorInfo {
    TensorInfo {
        kind: TensorKind::Dense,
        shape,
        source_dtype: dtype.to_string(),
        stored_dtype: dtype,
        shard: String::new(),
        matrix_shape: None,
        rank: None,
        energy: None,
        rel_error: None,
        quant: None,
        reason: Some(DenseReason::Excluded),
        rule: None,
        whitening: None,
        experts: None,
    }
}

#[derive(Debug, Clone)]
enum Spec {
    Dense {
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
    Factored {
        m: usize,
        n: usize,
        r: usize,
        u: Vec<f32>,
        s: Vec<f32>,
        vt: Vec<f32>,
    },
}

fn spec() -> impl Strategy<Value = Spec> {
    let dense = (
        prop::sample::select(Dtype::ALL.to_vec()),
        prop::collection::vec(0usize..5, 0..4),
    )
        .prop_flat_map(|(dtype, shape)| {
            let n = shape.iter().product::<usize>() * dtype.size();
            (
                Just(dtype),
                Just(shape),
                prop::collection::vec(any::<u8>(), n),
            )
        })
        .prop_map(|(dtype, shape, bytes)| Spec::Dense {
            dtype,
            shape,
            bytes,
        });
    let factored = (1usize..6, 1usize..6)
        .prop_flat_map(|(m, n)| (Just(m), Just(n), 1..=m.min(n)))
        .prop_flat_map(|(m, n, r)| {
            (
                Just((m, n, r)),
                prop::collection::vec(-1f32..1.0, m * r),
                prop::collection::vec(0f32..2.0, r),
                prop::collection::vec(-1f32..1.0, r * n),
            )
        })
        .prop_map(|((m, n, r), u, s, vt)| Spec::Factored { m, n, r, u, s, vt });
    prop_oneof![dense, factored]
}

fn le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn write_then_read_is_identity(
        specs in prop::collection::vec(spec(), 1..8),
        shard_size in 1u64..400,
        // None, too small for any header (the copy fallback), and room for all entries.
        reserve in prop_oneof![Just(0u64), 1u64..200, Just(u64::MAX)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::new(dir.path(), shard_size);
        let bound = cersa_loader::writer::header_base_bound()
            + (0..specs.len())
                .map(|k| {
                    let (un, sn, vn) = factor_names(&format!("t{k}.weight"));
                    header_entry_bound(&un, 2) + header_entry_bound(&sn, 1) + header_entry_bound(&vn, 2)
                })
                .sum::<u64>();
        let reserve = reserve.min(bound);
        w.reserve_header(reserve);
        let mut tensors = BTreeMap::new();
        for (k, spec) in specs.iter().enumerate() {
            let name = format!("t{k}.weight");
            match spec {
                Spec::Dense { dtype, shape, bytes } => {
                    w.begin_group(&name, bytes.len() as u64).unwrap();
                    w.write_tensor(&name, *dtype, shape, bytes).unwrap();
                    tensors.insert(name, dense_info(shape.clone(), *dtype));
                }
                Spec::Factored { m, n, r, u, s, vt } => {
                    let (un, sn, vn) = factor_names(&name);
                    w.begin_group(&name, 4 * (u.len() + s.len() + vt.len()) as u64).unwrap();
                    w.write_tensor(&un, Dtype::F32, &[*m, *r], &le(u)).unwrap();
                    w.write_tensor(&sn, Dtype::F32, &[*r], &le(s)).unwrap();
                    w.write_tensor(&vn, Dtype::F32, &[*r, *n], &le(vt)).unwrap();
                    tensors.insert(name, TensorInfo {
                        kind: TensorKind::Factored,
                        matrix_shape: Some([*m, *n]),
                        rank: Some(*r),
                        energy: Some(1.0),
                        rel_error: Some(0.0),
                        reason: None,
                        ..dense_info(vec![*m, *n], Dtype::F32)
                    });
                }
            }
        }
        let written = w.finish(manifest(tensors)).unwrap();
        let ckpt = Checkpoint::open_with(dir.path(), OpenOptions { verify_checksums: true }).unwrap();
        prop_assert_eq!(ckpt.manifest(), &written);
        for shard in &written.shards {
            let bytes = std::fs::read(dir.path().join(&shard.file)).unwrap();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            prop_assert_eq!(len % 8, 0);
            if reserve == bound {
                // Room for every entry: the header fills the reservation exactly.
                prop_assert_eq!(8 + len, bound.div_ceil(8) * 8);
            }
        }
        for (k, spec) in specs.iter().enumerate() {
            let name = format!("t{k}.weight");
            match (spec, ckpt.get(&name).unwrap()) {
                (Spec::Dense { dtype, shape, bytes }, TensorView::Dense(t)) => {
                    prop_assert_eq!(t.dtype, *dtype);
                    prop_assert_eq!(t.shape, &shape[..]);
                    prop_assert_eq!(t.bytes, &bytes[..]);
                }
                (Spec::Factored { m, n, r, u, s, vt }, TensorView::Factored(f)) => {
                    prop_assert_eq!(f.rank, *r);
                    prop_assert_eq!(f.u.to_f32().unwrap(), u.clone());
                    prop_assert_eq!(f.s.to_f32().unwrap(), s.clone());
                    prop_assert_eq!(f.vt.to_f32().unwrap(), vt.clone());
                    // reconstruct and apply agree with a naive f64 evaluation of U·diag(s)·Vᵀ.
                    let w = ckpt.reconstruct(&name).unwrap();
                    let x: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.37).sin()).collect();
                    let y = ckpt.apply(&name, &x, 2).unwrap();
                    for i in 0..*m {
                        for j in 0..*n {
                            let want: f64 = (0..*r).map(|q| u[i * r + q] as f64 * s[q] as f64 * vt[q * n + j] as f64).sum();
                            prop_assert!((w.data[i * n + j] as f64 - want).abs() < 1e-5);
                        }
                        for b in 0..2 {
                            let want: f64 = (0..*n).map(|j| {
                                let wij: f64 = (0..*r).map(|q| u[i * r + q] as f64 * s[q] as f64 * vt[q * n + j] as f64).sum();
                                wij * x[b * n + j] as f64
                            }).sum();
                            prop_assert!((y[b * m + i] as f64 - want).abs() < 1e-4, "apply {} vs {}", y[b * m + i], want);
                        }
                    }
                }
                _ => prop_assert!(false, "kind changed for {}", name),
            }
        }
    }
}

#[test]
fn tampered_shard_fails_checksum_and_stray_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::new(dir.path(), 1 << 20);
    w.begin_group("a", 16).unwrap();
    w.write_tensor("a", Dtype::F32, &[2, 2], &[0u8; 16])
        .unwrap();
    let mut tensors = BTreeMap::new();
    tensors.insert("a".to_string(), dense_info(vec![2, 2], Dtype::F32));
    let m = w.finish(manifest(tensors)).unwrap();
    let shard = dir.path().join(&m.shards[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    Checkpoint::open(dir.path()).expect("without checksums the flipped data byte is not seen");
    let err = Checkpoint::open_with(
        dir.path(),
        OpenOptions {
            verify_checksums: true,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");

    // A manifest that forgets a stored tensor: the stray tensor is named.
    let mut m2 = m.clone();
    m2.tensors.clear();
    let mut info = dense_info(vec![2, 2], Dtype::F32);
    info.shard = m.shards[0].file.clone();
    m2.tensors.insert("b".into(), info);
    std::fs::write(
        dir.path().join("cersa.json"),
        serde_json::to_string(&m2).unwrap(),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("`b`") && err.contains("missing from its shard"),
        "{err}"
    );
    // A manifest without the stored tensor: `a` is a stray and is named.
    m2.tensors.clear();
    std::fs::write(
        dir.path().join("cersa.json"),
        serde_json::to_string(&m2).unwrap(),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("`a`") && err.contains("not listed in the manifest"),
        "{err}"
    );
}

/// Writes five dense entries of 24 bytes into 50-byte shards (two per shard), calling
/// `reserve(i, w)` before entry `i`. Returns the shards `begin_group` reported closed and
/// the files' bytes.
fn write_five(
    dir: &std::path::Path,
    mut w: CheckpointWriter,
    reserve: impl Fn(usize, &mut CheckpointWriter),
) -> (Vec<ClosedShard>, Vec<Vec<u8>>) {
    let mut closed = Vec::new();
    let mut tensors = BTreeMap::new();
    for i in 0..5 {
        let name = format!("layer.{i}.bias");
        reserve(i, &mut w);
        closed.extend(w.begin_group(&name, 24).unwrap());
        w.write_tensor(&name, Dtype::F32, &[2, 3], &[i as u8; 24])
            .unwrap();
        tensors.insert(name, dense_info(vec![2, 3], Dtype::F32));
    }
    let m = w.finish(manifest(tensors)).unwrap();
    let files = m
        .shards
        .iter()
        .map(|s| std::fs::read(dir.join(&s.file)).unwrap());
    (closed, files.collect())
}

fn plan_of_five() -> Vec<PlannedEntry> {
    (0..5)
        .map(|i| PlannedEntry {
            name: format!("layer.{i}.bias"),
            ndims: 2,
            experts: 0,
        })
        .collect()
}

/// What a caller reserved before the writer took a plan: every entry still to come,
/// dense or factored, whichever is longer.
fn bound_from(i: usize) -> u64 {
    let rest: u64 = plan_of_five()[i..]
        .iter()
        .map(|e| {
            let (un, sn, vn) = factor_names(&e.name);
            let factored = header_entry_bound(&un, 2)
                + header_entry_bound(&sn, 1)
                + header_entry_bound(&vn, 2);
            factored.max(header_entry_bound(&e.name, e.ndims))
        })
        .sum();
    header_base_bound() + rest
}

#[test]
fn a_plan_reserves_what_callers_computed_and_closed_shards_are_reported() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = CheckpointWriter::new(a.path(), 50).with_plan(plan_of_five());
    let (closed, planned) = write_five(a.path(), w, |_, _| {});
    let (_, manual) = write_five(b.path(), CheckpointWriter::new(b.path(), 50), |i, w| {
        w.reserve_header(bound_from(i))
    });
    assert_eq!(
        planned, manual,
        "same bytes as the caller-computed reservation"
    );
    assert_eq!(planned.len(), 3);
    // begin_group reported each shard it closed (the last one closes in finish).
    assert_eq!(closed.len(), 2);
    for (k, c) in closed.iter().enumerate() {
        assert_eq!(c.index, k);
        assert_eq!(c.file, CheckpointWriter::temp_shard_name(k));
        assert_eq!(c.bytes, planned[k].len() as u64);
        assert_eq!(c.sha256, hex(&sha2::Sha256::digest(&planned[k])));
    }
    // The first header fills its reservation: the data was written in place.
    let len = u64::from_le_bytes(planned[0][..8].try_into().unwrap());
    assert_eq!(8 + len, bound_from(0).div_ceil(8) * 8);
}

#[test]
fn a_group_out_of_plan_order_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::new(dir.path(), 50).with_plan(plan_of_five());
    let err = w.begin_group("layer.1.bias", 24).unwrap_err();
    assert!(err.to_string().contains("`layer.0.bias`"), "{err}");
}
