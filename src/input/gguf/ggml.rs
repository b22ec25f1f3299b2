//! GGML tensor types (as stored in GGUF) and their dequantization to f32.
//!
//! Every formula follows gguf-py's `gguf.quants` (`dequantize_blocks`) operation by
//! operation, in f32, with the same rounding steps (a product and a sum are two roundings;
//! Rust never fuses them), so the results are bit-equal to `gguf.quants.dequantize`.
//! gguf-py has no Q8_K dequantizer; ours follows ggml's `dequantize_row_q8_K`
//! (`y = d · q`, `d` an f32). `tests/python/test_gguf_dequant.py` checks all of them.
//!
//! This module is the dispatcher: it knows the types and calls the decoders (`quants`,
//! `codebook_quants`, `grid_quants`), which know nothing of it and share only `block`.

use super::block::{f16_at, QK_K};
use super::codebook_quants as cb;
use super::grid_quants as iq;
use super::quants as q;

/// The GGML tensor types this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    F64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
    NVFP4,
    TQ1_0,
    TQ2_0,
    IQ2_XXS,
    IQ2_XS,
    IQ2_S,
    IQ3_XXS,
    IQ3_S,
    IQ1_S,
    IQ1_M,
    I8,
    I16,
    I32,
    I64,
}

/// GGML type ids of the types this crate reads.
const IDS: [(u32, GgmlType); 32] = {
    use GgmlType::*;
    [
        (0, F32),
        (1, F16),
        (2, Q4_0),
        (3, Q4_1),
        (6, Q5_0),
        (7, Q5_1),
        (8, Q8_0),
        (10, Q2_K),
        (11, Q3_K),
        (12, Q4_K),
        (13, Q5_K),
        (14, Q6_K),
        (15, Q8_K),
        (16, IQ2_XXS),
        (17, IQ2_XS),
        (18, IQ3_XXS),
        (19, IQ1_S),
        (20, IQ4_NL),
        (21, IQ3_S),
        (22, IQ2_S),
        (23, IQ4_XS),
        (29, IQ1_M),
        (34, TQ1_0),
        (35, TQ2_0),
        (39, MXFP4),
        (40, NVFP4),
        (24, I8),
        (25, I16),
        (26, I32),
        (27, I64),
        (28, F64),
        (30, BF16),
    ]
};

/// The GGML types that hold one plain value per element, and their dtypes.
const PLAIN: [(GgmlType, cersa_loader::Dtype); 8] = {
    use cersa_loader::Dtype as D;
    use GgmlType::*;
    [
        (F32, D::F32),
        (F16, D::F16),
        (BF16, D::BF16),
        (F64, D::F64),
        (I8, D::I8),
        (I16, D::I16),
        (I32, D::I32),
        (I64, D::I64),
    ]
};

/// The float and quantized types that decode to f32, for error messages.
pub const SUPPORTED: &str =
    "F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, \
     IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0, TQ2_0, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S \
     (and I8, I16, I32, I64 copied as integers)";

impl GgmlType {
    /// The type with GGML id `id`, if this crate reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        IDS.iter().find(|(i, _)| *i == id).map(|(_, t)| *t)
    }

    /// The GGML type id (`ggml_type` in ggml.h, `GGMLQuantizationType` in gguf-py).
    pub fn id(self) -> u32 {
        IDS.iter()
            .find(|(_, t)| *t == self)
            .map(|(i, _)| *i)
            .expect("every type has an id")
    }

    /// GGML name (`Q4_K`, ...), as gguf-py spells it.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            F64 => "F64",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ2_S => "IQ2_S",
            IQ3_XXS => "IQ3_XXS",
            IQ3_S => "IQ3_S",
            IQ1_S => "IQ1_S",
            IQ1_M => "IQ1_M",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
        }
    }

    /// (elements per block, bytes per block), as in gguf-py's `GGML_QUANT_SIZES`.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q2_K => (QK_K, QK_K / 16 + QK_K / 4 + 2 + 2),
            Q3_K => (QK_K, QK_K / 8 + QK_K / 4 + 12 + 2),
            Q4_K => (QK_K, 2 + 2 + 12 + QK_K / 2),
            Q5_K => (QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
            Q6_K => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ4_NL => (32, 2 + 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 64 + QK_K / 2),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            TQ1_0 => (QK_K, (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2),
            TQ2_0 => (QK_K, QK_K / 4 + 2),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        }
    }

    /// True for the block-quantized types (dense copies are re-encoded, not copied).
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// The type stored for `dtype`, for the plain (non-block) dtypes GGML has.
    pub fn of_dtype(dtype: cersa_loader::Dtype) -> Option<Self> {
        PLAIN.iter().find(|(_, d)| *d == dtype).map(|(t, _)| *t)
    }

    /// The dtype of a plain (non-block) type, the inverse of [`GgmlType::of_dtype`].
    pub fn plain_dtype(self) -> Option<cersa_loader::Dtype> {
        PLAIN.iter().find(|(t, _)| *t == self).map(|(_, d)| *d)
    }

    /// True for the types that decode to floats.
    pub fn is_float(self) -> bool {
        !matches!(
            self,
            GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64
        )
    }
}

/// Name of a GGML type id this crate does not read (for error messages).
pub fn unsupported_name(id: u32) -> String {
    let known = match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        31..=33 => "Q4_0_N_M (repacked, removed from ggml)",
        36..=38 => "IQ4_NL_N_M (repacked, removed from ggml)",
        41 => "Q1_0",
        _ => return format!("unknown type id {id}"),
    };
    format!("{known} (type id {id})")
}

/// Dequantizes whole blocks of type `t` from `bytes`, appending f32 values to `out`.
///
/// `bytes.len()` must be a multiple of the block size in bytes (the caller checks this
/// against the tensor shape); a trailing partial block is ignored. Integer types are
/// converted exactly where f32 can hold them (callers use them only as integers).
pub fn dequantize(t: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let (_, bsize) = t.block();
    let blocks = bytes.chunks_exact(bsize);
    out.reserve(blocks.len() * t.block().0);
    use GgmlType::*;
    match t {
        F32 => out.extend(blocks.map(|c| f32::from_le_bytes(c.try_into().expect("4-byte block")))),
        F16 => out.extend(blocks.map(|c| f16_at(c, 0))),
        // gguf-py: (int16 as int32 << 16).view(float32): the bits moved up, NaN payloads
        // kept (half's bf16::to_f32 would set the quiet bit).
        BF16 => out.extend(
            blocks.map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        F64 => out
            .extend(blocks.map(|c| f64::from_le_bytes(c.try_into().expect("8-byte block")) as f32)),
        I8 => out.extend(blocks.map(|c| c[0] as i8 as f32)),
        I16 => out.extend(blocks.map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)),
        I32 => out.extend(blocks.map(|c| i32::from_le_bytes(c.try_into().expect("4")) as f32)),
        I64 => out.extend(blocks.map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f32)),
        Q4_0 => blocks.for_each(|b| q::q4_0(b, out)),
        Q4_1 => blocks.for_each(|b| q::q4_1(b, out)),
        Q5_0 => blocks.for_each(|b| q::q5_0(b, out)),
        Q5_1 => blocks.for_each(|b| q::q5_1(b, out)),
        Q8_0 => blocks.for_each(|b| q::q8_0(b, out)),
        Q2_K => blocks.for_each(|b| q::q2_k(b, out)),
        Q3_K => blocks.for_each(|b| q::q3_k(b, out)),
        Q4_K => blocks.for_each(|b| q::q4_k(b, out)),
        Q5_K => blocks.for_each(|b| q::q5_k(b, out)),
        Q6_K => blocks.for_each(|b| q::q6_k(b, out)),
        Q8_K => blocks.for_each(|b| q::q8_k(b, out)),
        IQ4_NL => blocks.for_each(|b| cb::iq4_nl(b, out)),
        IQ4_XS => blocks.for_each(|b| cb::iq4_xs(b, out)),
        MXFP4 => blocks.for_each(|b| cb::mxfp4(b, out)),
        NVFP4 => blocks.for_each(|b| cb::nvfp4(b, out)),
        TQ1_0 => blocks.for_each(|b| cb::tq1_0(b, out)),
        TQ2_0 => blocks.for_each(|b| cb::tq2_0(b, out)),
        IQ2_XXS => blocks.for_each(|b| iq::iq2_xxs(b, out)),
        IQ2_XS => blocks.for_each(|b| iq::iq2_xs(b, out)),
        IQ2_S => blocks.for_each(|b| iq::iq2_s(b, out)),
        IQ3_XXS => blocks.for_each(|b| iq::iq3_xxs(b, out)),
        IQ3_S => blocks.for_each(|b| iq::iq3_s(b, out)),
        IQ1_S => blocks.for_each(|b| iq::iq1_s(b, out)),
        IQ1_M => blocks.for_each(|b| iq::iq1_m(b, out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values checked by hand from the block layouts.
    #[test]
    fn q4_0_and_q8_0_by_hand() {
        // d = 0.5 (f16 0x3800); byte 0 = 0x9F: element 0 = 0xF-8 = 7, element 16 = 0x9-8 = 1.
        let mut b = vec![0x00, 0x38];
        b.extend([0x9F; 16]);
        let mut out = Vec::new();
        dequantize(GgmlType::Q4_0, &b, &mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(out[0], 3.5);
        assert_eq!(out[16], 0.5);
        let mut b = vec![0x00, 0x40]; // d = 2
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        out.clear();
        dequantize(GgmlType::Q8_0, &b, &mut out);
        assert_eq!(out[0], -32.0);
        assert_eq!(out[31], 30.0);
    }

    #[test]
    fn block_sizes_match_gguf_py() {
        // GGML_QUANT_SIZES in gguf-py's constants.py.
        let expect = [
            (GgmlType::Q4_0, 18),
            (GgmlType::Q4_1, 20),
            (GgmlType::Q5_0, 22),
            (GgmlType::Q5_1, 24),
            (GgmlType::Q8_0, 34),
            (GgmlType::Q2_K, 84),
            (GgmlType::Q3_K, 110),
            (GgmlType::Q4_K, 144),
            (GgmlType::Q5_K, 176),
            (GgmlType::Q6_K, 210),
            (GgmlType::Q8_K, 292),
        ];
        for (t, bytes) in expect {
            assert_eq!(t.block().1, bytes, "{}", t.name());
        }
    }
}
