//! The CERSA manifest parser of cersa-loader (`validate::parse_manifest`: serde types,
//! format, version and revision) on arbitrary bytes, then the per-entry rules of factored
//! entries (`validate::factored_dims`) and the factor layout they imply. Never a panic;
//! an accepted manifest serializes and parses back equal (the writer's output is read by
//! the same code), and for every entry `factored_dims` accepts, the shard shapes of U and
//! Vᵀ (`FactorEncoding::u_shape`/`vt_shape`, `expect`ed by the validator) exist.
#![no_main]

use cersa_loader::encoding::FactorEncoding;
use cersa_loader::validate::{factored_dims, parse_manifest};
use cersa_loader::{Manifest, TensorKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = match parse_manifest(data) {
        Ok(m) => m,
        Err(issue) => {
            let _ = issue.to_string();
            return;
        }
    };
    let text = serde_json::to_vec(&m).expect("a manifest serializes");
    let back = parse_manifest(&text).expect("a written manifest parses back");
    assert_eq!(back, m, "round trip");
    let _ = Manifest::required_minor(&m.tensors);
    for (name, info) in &m.tensors {
        let _ = info.factor_type();
        let enc = FactorEncoding::of(info);
        assert_eq!(enc.quant(), info.quant);
        if info.kind != TensorKind::Factored {
            continue;
        }
        match factored_dims(name, info) {
            Ok((rows, cols, r)) => {
                assert!(r >= 1 && r <= rows.min(cols));
                let u = enc
                    .u_shape(rows, r)
                    .expect("U shape checked by factored_dims");
                let vt = enc
                    .vt_shape(r, cols)
                    .expect("Vt shape checked by factored_dims");
                assert!(u.contains(&r) && vt[0] == r);
                let _ = enc.factor_bytes(rows, cols, r);
            }
            Err(issues) => {
                assert!(!issues.is_empty());
                for i in &issues {
                    let _ = i.to_string();
                }
            }
        }
    }
});
