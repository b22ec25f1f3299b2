//! One tensor's work, on a worker thread: read it as a matrix (or, for a stacked experts
//! tensor, one matrix per expert), factor it, keep it dense when factoring saves nothing,
//! encode the factors in the stored dtype and measure the error of the factors exactly as
//! stored.

use super::ConvertOptions;
use crate::decompose::rank::{energy_at, saves};
use crate::decompose::svd::{stored_residual_norm2, StoredFactors};
use crate::decompose::{Decomposer, Factorization};
use crate::error::{ConvertError, Result};
use crate::input::{FloatData, Source};
use crate::matrix::{read_expert, read_matrix, Matrix};
use crate::rank_rules::{rule_for, ModuleRule, PLAN_RULE};
use crate::select::MatrixView;
use cersa_loader::dtype::{decode_f64, encode_f32, encode_f64};
use cersa_loader::manifest::Whitening;
use cersa_loader::{expert_name, DenseReason, Dtype, FactorEncoding};

/// Encoded factors of one matrix.
pub(super) struct Factored {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) rank: usize,
    pub(super) energy: f64,
    pub(super) rel_error: f64,
    pub(super) enc: FactorEncoding,
    /// The per-module rule that chose the rank (`None`: the global rule).
    pub(super) rule: Option<String>,
    /// How the factors were whitened (`None`: plain truncation).
    pub(super) whitening: Option<Whitening>,
    pub(super) u: Vec<u8>,
    pub(super) s: Vec<u8>,
    pub(super) vt: Vec<u8>,
}

impl Factored {
    fn bytes(&self) -> u64 {
        (self.u.len() + self.s.len() + self.vt.len()) as u64
    }
}

/// One expert of a stacked experts tensor.
pub(super) enum Expert {
    /// Its slice of the tensor's dense bytes, streamed from the source by the writer.
    Dense(DenseReason),
    /// Encoded factors.
    Factored(Factored),
}

/// What the writer stores for one tensor.
pub(super) enum Outcome {
    /// The tensor's own bytes, streamed from the source by the writer.
    Dense(DenseReason),
    /// Encoded factors.
    Factored(Factored),
    /// A stacked experts tensor with at least one expert factored: every expert in order,
    /// with the tensor's energy and relative error over all experts.
    Experts {
        experts: Vec<Expert>,
        energy: f64,
        rel_error: f64,
    },
}

impl Outcome {
    /// Bytes the result holds until it is written.
    pub(super) fn held_bytes(&self) -> u64 {
        match self {
            Outcome::Dense(_) => 0,
            Outcome::Factored(f) => f.bytes(),
            Outcome::Experts { experts, .. } => experts
                .iter()
                .map(|e| match e {
                    Expert::Dense(_) => 0,
                    Expert::Factored(f) => f.bytes(),
                })
                .sum(),
        }
    }
}

/// A matrix's result before it becomes an [`Outcome`] or an [`Expert`].
enum Piece {
    Dense(DenseReason),
    Factored(Factored),
}

/// Reads, checks and factors tensor `i`, viewed as `view` says.
pub(super) fn process(
    src: &dyn Source,
    i: usize,
    view: MatrixView,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
) -> Result<Outcome> {
    let Some(count) = view.experts else {
        let meta = &src.tensors()[i];
        let Some(matrix) = read_matrix(src, i)? else {
            return Ok(Outcome::Dense(DenseReason::Zero));
        };
        return Ok(
            match factor(
                src,
                i,
                &meta.name,
                Some(&meta.name),
                matrix,
                opts,
                decomposer,
            )? {
                Piece::Dense(reason) => Outcome::Dense(reason),
                Piece::Factored(f) => Outcome::Factored(f),
            },
        );
    };
    process_experts(src, i, count, view, opts, decomposer)
}

/// A stacked experts tensor `[E, m, …]`: each expert's `[m, n]` slice is a matrix of its
/// own (own rank, own energy, own saving test; plans name it `NAME.cersa_expert.e`).
fn process_experts(
    src: &dyn Source,
    i: usize,
    count: usize,
    MatrixView { m, n, .. }: MatrixView,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
) -> Result<Outcome> {
    let meta = &src.tensors()[i];
    crate::calibration::refuse_for_experts(opts.calibration.as_deref(), src, i)?;
    let mut pieces = Vec::with_capacity(count);
    let (mut total, mut kept, mut residual) = (0f64, 0f64, 0f64);
    for e in 0..count {
        // One expert in memory at a time (plus the factors of those before it).
        let Some(matrix) = read_expert(src, i, e, count, m, n)? else {
            pieces.push(Piece::Dense(DenseReason::Zero));
            continue;
        };
        let norm2 = matrix.norm2;
        total += norm2;
        let name = expert_name(&meta.name, e);
        let piece = factor(src, i, &name, None, matrix, opts, decomposer)?;
        match &piece {
            Piece::Dense(_) => kept += norm2,
            Piece::Factored(f) => {
                kept += f.energy * norm2;
                residual += f.rel_error * f.rel_error * norm2;
            }
        }
        pieces.push(piece);
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Factored(_))) {
        // Nothing to gain: the tensor stays dense as a whole, for the first reason that is
        // not `zero` (all zero experts: `zero`).
        let reason = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Dense(r) if *r != DenseReason::Zero => Some(*r),
                _ => None,
            })
            .next()
            .unwrap_or(DenseReason::Zero);
        return Ok(Outcome::Dense(reason));
    }
    Ok(Outcome::Experts {
        experts: pieces
            .into_iter()
            .map(|p| match p {
                Piece::Dense(r) => Expert::Dense(r),
                Piece::Factored(f) => Expert::Factored(f),
            })
            .collect(),
        energy: kept / total,
        rel_error: (residual / total).sqrt(),
    })
}

/// Factors matrix `name` (tensor `i` itself, or one of its experts). `whiten_as`: the
/// tensor name calibration statistics are looked up under (`None`: never whitened).
fn factor(
    src: &dyn Source,
    i: usize,
    name: &str,
    whiten_as: Option<&str>,
    Matrix { data, m, n, norm2 }: Matrix,
    opts: &ConvertOptions,
    decomposer: &dyn Decomposer,
) -> Result<Piece> {
    let meta = &src.tensors()[i];
    crate::trace::rss("convert: read");
    let planned = match &opts.plan {
        None => None,
        Some(plan) => match plan.get(name) {
            Some(None) => return Ok(Piece::Dense(DenseReason::Planned)),
            Some(Some(r)) => Some(*r),
            None => {
                return Err(ConvertError::Tensor {
                    path: src.file_path(meta.file).to_path_buf(),
                    tensor: name.to_string(),
                    reason: "the plan has no entry for this selected matrix (made with \
                             another --include/--exclude, or by a cersa without per-expert \
                             plans?)"
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
    let whitening = match (&opts.calibration, whiten_as) {
        (Some(cal), Some(_)) => cal.whitener(src, i, m, n)?,
        _ => None,
    };
    let whitened = whitening
        .as_ref()
        .map(|w| FloatData::F64(w.whiten(&data, m, n)));
    let f = decomposer
        .factorize_named(name, whitened.as_ref().unwrap_or(&data), m, n, &rule)
        .map_err(|source| ConvertError::Decompose {
            tensor: name.to_string(),
            source,
        })?;
    crate::trace::rss("convert: factorized");
    let r = f.rank;
    let energy = energy_at(&f.sigma, f.norm2, r);
    if planned.is_none() && !opts.force_factor && !saves(r, m, n) {
        return Ok(Piece::Dense(DenseReason::NoSaving));
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
    Ok(Piece::Factored(Factored {
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
    }))
}
