//! One tensor's work, on a worker thread: read it as a matrix, factor it, keep it dense
//! when factoring saves nothing, encode the factors in the stored dtype and measure the
//! error of the factors exactly as stored.

use super::ConvertOptions;
use crate::decompose::rank::{energy_at, saves};
use crate::decompose::svd::{stored_residual_norm2, StoredFactors};
use crate::decompose::{Decomposer, Factorization};
use crate::error::{ConvertError, Result};
use crate::input::{FloatData, Source};
use crate::matrix::{read_matrix, Matrix};
use crate::rank_rules::{rule_for, ModuleRule, PLAN_RULE};
use cersa_loader::dtype::{decode_f64, encode_f32, encode_f64};
use cersa_loader::manifest::Whitening;
use cersa_loader::{DenseReason, Dtype, FactorEncoding};

/// What the writer stores for one tensor.
pub(super) enum Outcome {
    /// The tensor's own bytes, streamed from the source by the writer.
    Dense(DenseReason),
    /// Encoded factors.
    Factored {
        m: usize,
        n: usize,
        rank: usize,
        energy: f64,
        rel_error: f64,
        enc: FactorEncoding,
        /// The per-module rule that chose the rank (`None`: the global rule).
        rule: Option<String>,
        /// How the factors were whitened (`None`: plain truncation).
        whitening: Option<Whitening>,
        u: Vec<u8>,
        s: Vec<u8>,
        vt: Vec<u8>,
    },
}

impl Outcome {
    /// Bytes the result holds until it is written.
    pub(super) fn held_bytes(&self) -> u64 {
        match self {
            Outcome::Dense(_) => 0,
            Outcome::Factored { u, s, vt, .. } => (u.len() + s.len() + vt.len()) as u64,
        }
    }
}

/// Reads, checks and factors tensor `i`.
pub(super) fn process(
    src: &dyn Source,
    i: usize,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
) -> Result<Outcome> {
    let meta = &src.tensors()[i];
    let Some(Matrix { data, m, n, norm2 }) = read_matrix(src, i)? else {
        return Ok(Outcome::Dense(DenseReason::Zero));
    };
    crate::trace::rss("convert: read");
    let planned = match &opts.plan {
        None => None,
        Some(plan) => match plan.get(&meta.name) {
            Some(None) => return Ok(Outcome::Dense(DenseReason::Planned)),
            Some(Some(r)) => Some(*r),
            None => {
                return Err(ConvertError::Tensor {
                    path: src.file_path(meta.file).to_path_buf(),
                    tensor: meta.name.clone(),
                    reason: "the plan has no entry for this selected matrix (made with \
                             another --include/--exclude?)"
                        .into(),
                })
            }
        },
    };
    let (rule, chosen_by) = match planned {
        Some(r) => (ModuleRule::fixed_rank(r), Some(PLAN_RULE.to_string())),
        None => {
            let (rule, by) = rule_for(&opts.rules, &opts.rule, &meta.name);
            (rule, by.map(ModuleRule::text))
        }
    };
    // With calibration statistics the matrix factored is the whitened A (f64), not W.
    let whitening = match &opts.calibration {
        Some(cal) => cal.whitener(src, i, m, n)?,
        None => None,
    };
    let whitened = whitening
        .as_ref()
        .map(|w| FloatData::F64(w.whiten(&data, m, n)));
    let f = decomposer
        .factorize_named(&meta.name, whitened.as_ref().unwrap_or(&data), m, n, &rule)
        .map_err(|source| ConvertError::Decompose {
            tensor: meta.name.clone(),
            source,
        })?;
    crate::trace::rss("convert: factorized");
    let r = f.rank;
    let energy = energy_at(&f.sigma, f.norm2, r);
    if planned.is_none() && !opts.force_factor && !saves(r, m, n) {
        return Ok(Outcome::Dense(DenseReason::NoSaving));
    }
    let f = match &whitening {
        Some(w) => w.unwhiten(f, m, n),
        None => f,
    };
    let enc = opts.dtype.resolve(meta.dense_dtype);
    // Each factor is freed as soon as it is encoded (f32 → any factor dtype rounds once,
    // exactly as from the f64 widening; quantization takes the values rounded to f32).
    let Factorization { u, s, vt, .. } = f;
    let u = match u {
        FloatData::F32(v) => enc.encode_u(&v, m, r),
        FloatData::F64(v) => enc.encode_u(&v, m, r),
    }
    .expect("factor encodings are float or quantized");
    let vt = match vt {
        FloatData::F32(v) => enc.encode_vt(&v, r, n),
        FloatData::F64(v) => enc.encode_vt(&v, r, n),
    }
    .expect("factor encodings are float or quantized");
    let s = encode_f64(Dtype::F32, &s).expect("F32 is a float dtype");
    crate::trace::rss("convert: encoded");
    // rel_error is measured on the factors exactly as stored, streamed by row blocks;
    // quantized factors are measured on their f32 dequantization (held only meanwhile).
    let s_stored = decode_f64(Dtype::F32, &s).expect("F32 is a float dtype");
    let dequantized = match enc {
        FactorEncoding::Float(_) => None,
        FactorEncoding::Quant(_) => {
            let as_f32 = |v: Option<Vec<f32>>| {
                encode_f32(Dtype::F32, &v.expect("bytes just encoded")).expect("F32 is a float")
            };
            Some((
                as_f32(enc.decode_u(&u, m, r)),
                as_f32(enc.decode_vt(&vt, r, n)),
            ))
        }
    };
    let stored = match &dequantized {
        None => StoredFactors {
            dtype: enc.stored_dtype(),
            u: &u,
            s: &s_stored,
            vt: &vt,
        },
        Some((du, dvt)) => StoredFactors {
            dtype: Dtype::F32,
            u: du,
            s: &s_stored,
            vt: dvt,
        },
    };
    let res = stored_residual_norm2(&data, m, n, &stored);
    let whitening = match (&whitening, &whitened) {
        (Some(w), Some(FloatData::F64(a))) => {
            let (u64s, vt64s) = match &dequantized {
                Some((du, dvt)) => (decode_f64(Dtype::F32, du), decode_f64(Dtype::F32, dvt)),
                None => (
                    decode_f64(enc.stored_dtype(), &u),
                    decode_f64(enc.stored_dtype(), &vt),
                ),
            };
            let (u64s, vt64s) = (
                u64s.expect("factor dtypes are float"),
                vt64s.expect("factor dtypes are float"),
            );
            let out = w.output_rel_error(a, m, n, &u64s, &s_stored, &vt64s, res, norm2);
            Some(Whitening {
                input_axis: w.axis().number(),
                output_rel_error: out,
            })
        }
        _ => None,
    };
    drop(whitened);
    drop(dequantized);
    crate::trace::rss("convert: residual");
    drop(data);
    Ok(Outcome::Factored {
        m,
        n,
        rank: r,
        energy,
        rel_error: (res / norm2).sqrt(),
        enc,
        rule: chosen_by,
        whitening,
        u,
        s,
        vt,
    })
}
