//! `verify --source` for a stacked experts entry (format revision 1.3): each dense expert's
//! bytes against its slice of the source's dense copy, each factored expert's `rel_error`
//! recomputed from its slice of the source, and the entry's `rel_error` over all experts.

use super::{
    expected_found, failure, interrupted, rel_error_tolerance, relative_error_f64, Check, Compared,
};
use crate::error::Result;
use crate::input::{Precision, Source};
use cersa_loader::manifest::TensorInfo;
use cersa_loader::{expert_name, Checkpoint, Dtype, TensorView, MANIFEST_FILE};
use std::sync::atomic::AtomicBool;

/// Compares experts entry `name` (tensor `i` of `src`) with the source.
pub(super) fn compare_experts(
    ckpt: &Checkpoint,
    src: &dyn Source,
    i: usize,
    name: &str,
    info: &TensorInfo,
    count: usize,
    cancel: &AtomicBool,
) -> Result<Compared> {
    let shard = Some(info.shard.as_str());
    let mut out = Compared {
        dense: false,
        main_ok: false,
        output: false,
        failures: Vec::new(),
    };
    let views = (0..count)
        .map(|e| ckpt.expert(name, e))
        .collect::<cersa_loader::Result<Vec<_>>>()?;
    // Dense experts: their bytes are the matching slices of the source's dense copy.
    let dense: Vec<(usize, &[u8])> = views
        .iter()
        .enumerate()
        .filter_map(|(e, v)| match v {
            TensorView::Dense(raw) => Some((e, raw.bytes)),
            _ => None,
        })
        .collect();
    if !dense.is_empty() {
        let slice = (info.matrix_shape.map_or(0, |[m, n]| m * n) * info.stored_dtype.size()) as u64;
        let mut first_diff: Option<(usize, u64)> = None;
        let mut pos = 0u64;
        src.copy_dense(i, &mut |chunk| {
            interrupted(cancel)?;
            for (e, stored) in &dense {
                let (lo, hi) = (*e as u64 * slice, (*e as u64 + 1) * slice);
                let (from, to) = (lo.max(pos), hi.min(pos + chunk.len() as u64));
                if from >= to || first_diff.is_some() {
                    continue;
                }
                let got = &chunk[(from - pos) as usize..(to - pos) as usize];
                let want = stored.get((from - lo) as usize..(to - lo) as usize);
                if want != Some(got) {
                    first_diff = Some((*e, from - lo));
                }
            }
            pos += chunk.len() as u64;
            Ok(())
        })?;
        if pos != slice * count as u64 {
            out.failures.push(expected_found(
                failure(
                    Check::DenseBytes,
                    shard,
                    Some(name),
                    "the source's dense copy does not have the experts' size".into(),
                ),
                slice * count as u64,
                pos,
            ));
        } else if let Some((e, k)) = first_diff {
            out.failures.push(failure(
                Check::DenseBytes,
                shard,
                Some(&expert_name(name, e)),
                format!("dense expert bytes differ from the source (first at byte {k})"),
            ));
        }
    }
    // Factored experts: rel_error recomputed per expert, and over the whole tensor.
    let precision = src.tensors()[i].float.unwrap_or(Precision::F32);
    let [m, n] = info.matrix_shape.unwrap_or([0, 0]);
    let (mut total, mut residual) = (0f64, 0f64);
    for (e, view) in views.iter().enumerate() {
        interrupted(cancel)?;
        let part = src.read_float_part(i, e, count)?;
        let norm2: f64 = part.to_f64().iter().map(|x| x * x).sum();
        total += norm2;
        let TensorView::Factored(f) = view else {
            continue;
        };
        let stored_name = expert_name(name, e);
        let expert = info.expert(e).expect("validated experts list");
        let (u, s, vt) = f.values_f64().unwrap_or_default();
        let rel = relative_error_f64(&part, m, n, &u, &s, &vt);
        residual += rel * rel * norm2;
        let Some(stored_rel) = expert.rel_error else {
            out.failures.push(failure(
                Check::RelError,
                Some(MANIFEST_FILE),
                Some(&stored_name),
                "factored expert without rel_error".into(),
            ));
            continue;
        };
        let tol = rel_error_tolerance(expert.stored_dtype, precision, stored_rel);
        if !(rel.is_finite() && (rel - stored_rel).abs() <= tol) {
            out.failures.push(expected_found(
                failure(
                    Check::RelError,
                    Some(MANIFEST_FILE),
                    Some(&stored_name),
                    format!(
                        "recomputed ‖W−Ŵ‖_F/‖W‖_F of the expert differs from the manifest by \
                         more than {tol:.2e}"
                    ),
                ),
                format!("{rel:.6e} (recomputed)"),
                format!("{stored_rel:.6e} (manifest)"),
            ));
        }
    }
    let rel = if total > 0.0 {
        (residual / total).sqrt()
    } else {
        0.0
    };
    match info.rel_error {
        // A sum of the experts' errors: the loosest tolerance of a single one.
        Some(stored)
            if (rel - stored).abs() <= rel_error_tolerance(Dtype::F32, Precision::F32, stored) => {}
        stored => out.failures.push(expected_found(
            failure(
                Check::RelError,
                Some(MANIFEST_FILE),
                Some(name),
                "recomputed ‖W−Ŵ‖_F/‖W‖_F over all experts differs from the manifest".into(),
            ),
            format!("{rel:.6e} (recomputed)"),
            format!("{stored:?} (manifest)"),
        )),
    }
    out.main_ok = out.failures.is_empty();
    Ok(out)
}
