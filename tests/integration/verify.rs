//! `cersa verify`: clean conversions pass; a flipped shard byte, a tampered rel_error, a
//! stray tensor and a missing shard are each caught and listed.

use crate::util::*;
use cersa::verify::{Check, VerifyReport};
use cersa_loader::IssueKind;
use std::path::{Path, PathBuf};

/// A source with one factored matrix (low rank plus noise), one dense vector and one
/// small matrix that stays dense; converted at τ = 0.9.
fn converted(dir: &Path) -> (PathBuf, PathBuf) {
    let (m, n) = (48usize, 40usize);
    let a = noise(1, m * 3);
    let b = noise(2, 3 * n);
    let e = noise(3, m * n);
    let mut w = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let low: f32 = (0..3).map(|k| a[i * 3 + k] * b[k * n + j]).sum();
            w[i * n + j] = 4.0 * low + 0.05 * e[i * n + j];
        }
    }
    let src = dir.join("model.safetensors");
    write_f32(
        &src,
        &[
            ("layer.0.proj.weight", vec![m, n], w),
            ("layer.0.proj.bias", vec![m], noise(4, m)),
            ("layer.0.tiny.weight", vec![2, 3], noise(5, 6)),
        ],
    );
    let out = dir.join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--energy", "0.9", "-q"]);
    (src, out)
}

fn report(args: &[&str], code: i32) -> VerifyReport {
    let out = cersa(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "cersa {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verify --json parses into VerifyReport")
}

/// Rewrites `out`'s manifest through `edit`; returns the original text.
fn edit_manifest(out: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mpath = out.join("cersa.json");
    let original = std::fs::read_to_string(&mpath).unwrap();
    let mut man: serde_json::Value = serde_json::from_str(&original).unwrap();
    edit(&mut man);
    std::fs::write(&mpath, serde_json::to_string_pretty(&man).unwrap()).unwrap();
    original
}

fn shard(out: &Path) -> PathBuf {
    out.join("cersa-00001-of-00001.safetensors")
}

#[test]
fn clean_conversion_passes_with_and_without_source() {
    let dir = tmp();
    let (src, out) = converted(dir.path());
    let r = report(&["verify", s(&out), "--json", "-q"], 0);
    assert!(r.ok && r.failures.is_empty(), "{r:?}");
    assert_eq!(r.counts.shards, 1);
    assert_eq!(r.counts.tensors, 3);
    let r = report(&["verify", s(&out), "--source", s(&src), "--json", "-q"], 0);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.counts.rel_errors_compared, 1);
    assert_eq!(r.counts.dense_compared, 2);
    let text = cersa_ok(&["verify", s(&out), "--source", s(&src), "-q"]);
    assert!(text.starts_with("OK:"), "{text}");
}

#[test]
fn flipped_shard_byte_is_caught() {
    let dir = tmp();
    let (src, out) = converted(dir.path());
    let path = shard(&out);
    let mut bytes = std::fs::read(&path).unwrap();
    // The last byte of the data section is the sign/exponent byte of the last stored value:
    // flipping its top exponent bit changes the value by a factor of about 2^128.
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let r = report(&["verify", s(&out), "--json", "-q"], 1);
    assert!(!r.ok);
    let sha: Vec<_> = r
        .failures
        .iter()
        .filter(|f| f.check == Check::Sha256)
        .collect();
    assert_eq!(sha.len(), 1, "{r:?}");
    assert_eq!(
        sha[0].file.as_deref(),
        Some("cersa-00001-of-00001.safetensors")
    );
    assert_ne!(sha[0].expected, sha[0].found);
    // With the source, the changed value itself is found as well.
    let r = report(&["verify", s(&out), "--source", s(&src), "--json", "-q"], 1);
    assert!(
        r.failures.iter().any(|f| matches!(
            f.check,
            Check::DenseBytes | Check::RelError | Check::NonFinite
        )),
        "{r:?}"
    );
    let text = String::from_utf8(cersa(&["verify", s(&out), "-q"]).stdout).unwrap();
    assert!(text.contains("FAIL sha256"), "{text}");
}

#[test]
fn tampered_rel_error_is_caught_against_the_source() {
    let dir = tmp();
    let (src, out) = converted(dir.path());
    let mpath = out.join("cersa.json");
    let mut man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let t = &mut man["tensors"]["layer.0.proj.weight"];
    let true_rel = t["rel_error"].as_f64().expect("factored with rel_error");
    // The recomputed value must agree with the untouched manifest (independent f64 path).
    t["rel_error"] = serde_json::json!(true_rel * 0.8);
    std::fs::write(&mpath, serde_json::to_string_pretty(&man).unwrap()).unwrap();
    // The manifest is not hashed: structure checks still pass without the source.
    report(&["verify", s(&out), "--json", "-q"], 0);
    let r = report(&["verify", s(&out), "--source", s(&src), "--json", "-q"], 1);
    assert_eq!(r.failures.len(), 1, "{r:?}");
    let f = &r.failures[0];
    assert_eq!(f.check, Check::RelError);
    assert_eq!(f.tensor.as_deref(), Some("layer.0.proj.weight"));
    let recomputed: f64 = f
        .expected
        .as_deref()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (recomputed - true_rel).abs() < 1e-5,
        "{recomputed} vs {true_rel}"
    );
}

#[test]
fn stray_and_missing_tensors_and_shards_are_listed() {
    let dir = tmp();
    let (_src, out) = converted(dir.path());
    let mpath = out.join("cersa.json");
    let original = std::fs::read_to_string(&mpath).unwrap();
    // Drop one dense entry from the manifest: its stored tensor becomes a stray.
    let mut man: serde_json::Value = serde_json::from_str(&original).unwrap();
    man["tensors"]
        .as_object_mut()
        .unwrap()
        .remove("layer.0.proj.bias");
    // Claim a wrong shape for the small dense matrix.
    man["tensors"]["layer.0.tiny.weight"]["shape"] = serde_json::json!([3, 2]);
    std::fs::write(&mpath, serde_json::to_string(&man).unwrap()).unwrap();
    let r = report(&["verify", s(&out), "--json", "-q"], 1);
    let checks: Vec<Check> = r.failures.iter().map(|f| f.check).collect();
    assert!(checks.contains(&Check::StrayTensor), "{r:?}");
    assert!(checks.contains(&Check::DtypeShape), "{r:?}");
    // A missing shard is a failed check, not a crash.
    std::fs::write(&mpath, &original).unwrap();
    std::fs::remove_file(shard(&out)).unwrap();
    let r = report(&["verify", s(&out), "--json", "-q"], 1);
    assert_eq!(r.failures[0].check, Check::ShardMissing, "{r:?}");
    // No manifest at all: an error (exit 2), not a verdict.
    cersa_fails(&["verify", s(dir.path()), "-q"], 2);
}

#[test]
fn every_format_issue_is_listed_with_its_kind() {
    let dir = tmp();
    let (_src, out) = converted(dir.path());
    // Three independent faults: a rank outside 1..=min(m, n), a wrong dense shape, and a
    // dense entry dropped (its stored tensor becomes a stray).
    edit_manifest(&out, |man| {
        man["tensors"]["layer.0.proj.weight"]["rank"] = serde_json::json!(0);
        man["tensors"]["layer.0.tiny.weight"]["shape"] = serde_json::json!([3, 2]);
        man["tensors"]
            .as_object_mut()
            .unwrap()
            .remove("layer.0.proj.bias");
    });
    let r = report(&["verify", s(&out), "--json", "-q"], 1);
    assert_eq!(r.schema_version, cersa::verify::SCHEMA_VERSION);
    let found: Vec<(Check, Option<IssueKind>)> =
        r.failures.iter().map(|f| (f.check, f.issue)).collect();
    assert_eq!(
        found,
        [
            (Check::Structure, Some(IssueKind::RankOutOfRange)),
            (Check::DtypeShape, Some(IssueKind::ShapeMismatch)),
            (Check::StrayTensor, Some(IssueKind::StrayTensor)),
        ],
        "{r:?}"
    );
    // The same issues, in the same order, as the loader's validator gives.
    let issues = cersa_loader::validate(&out);
    let kinds: Vec<_> = issues.iter().map(|i| Some(i.kind)).collect();
    assert_eq!(kinds, found.iter().map(|f| f.1).collect::<Vec<_>>());
    assert_eq!(r.failures[1].expected.as_deref(), Some("[3, 2]"));
    assert_eq!(r.failures[1].found.as_deref(), Some("[2, 3]"));
}

#[test]
fn a_set_cancel_flag_stops_verify() {
    let dir = tmp();
    let (_src, out) = converted(dir.path());
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let r = cersa::verify::verify(&out, None, None, &|_, _| {}, &cancel);
    assert!(matches!(r, Err(cersa::ConvertError::Interrupted)), "{r:?}");
}
