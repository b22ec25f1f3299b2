//! Dequantization of GGML's K-quants (Q2_K … Q8_K), one function per type over one block;
//! the legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are `cersa_loader::quant`'s, the
//! same functions that read quantized CERSA factors.
//!
//! As in `ggml`, every formula follows gguf-py's `gguf.quants.dequantize_blocks` operation
//! by operation in f32 (a product and a sum are two roundings; Rust never fuses them), so
//! the results are bit-equal to gguf-py; Q8_K, which gguf-py lacks, follows ggml's
//! `dequantize_row_q8_K`. `tests/python/test_gguf_dequant.py` checks each type.

use super::block::{f16_at, QK_K};

pub(super) use cersa_loader::quant::{q4_0, q4_1, q5_0, q5_1, q8_0};

/// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
/// Element e: half h = e/128, shift s = (e%128)/32, lane l = e%32, 2 bits of qs[32h+l].
pub(super) fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    out.extend((0..QK_K).map(|e| {
        let sub = e / 16;
        let dl = d * (scales[sub] & 0x0F) as f32;
        let ml = dmin * (scales[sub] >> 4) as f32;
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let q = (qs[32 * h + l] >> (2 * s)) & 3;
        dl * q as f32 - ml
    }));
}

/// Q3_K: hmask[32], qs[64], scales[12] (16 six-bit scales), d.
pub(super) fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = f16_at(b, 108);
    let scale = |i: usize| {
        let low = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        ((low | (high << 4)) as i8 - 32) as f32
    };
    out.extend((0..QK_K).map(|e| {
        let dl = d * scale(e / 16);
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i8;
        // The high bit subtracts 4 when it is clear.
        let hbit = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        let q = low - ((hbit << 2) as i8);
        dl * q as f32
    }));
}

/// Scale and min (6 bits each) of sub-block `j` of a Q4_K/Q5_K block's 12 scale bytes.
fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3F, s[4 + j] & 0x3F)
    } else {
        (
            (s[4 + j] & 0x0F) | ((s[j - 4] >> 2) & 0x30),
            (s[4 + j] >> 4) | ((s[j] >> 2) & 0x30),
        )
    }
}

/// Q4_K: d, dmin, scales[12], qs[128]; 8 sub-blocks of 32, sub-block j = 2c+k uses the
/// k-th nibble of qs[32c..32c+32].
pub(super) fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let sc = &b[4..16];
    let qs = &b[16..144];
    for j in 0..8 {
        let (s, m) = scale_min_k4(sc, j);
        let (dl, ml) = (d * s as f32, dmin * m as f32);
        let (c, k) = (j / 2, j % 2);
        out.extend((0..32).map(|l| {
            let q = (qs[32 * c + l] >> (4 * k)) & 0x0F;
            dl * q as f32 - ml
        }));
    }
}

/// Q5_K: Q4_K plus qh[32], whose bit j is the fifth bit of sub-block j.
pub(super) fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let sc = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (s, m) = scale_min_k4(sc, j);
        let (dl, ml) = (d * s as f32, dmin * m as f32);
        let (c, k) = (j / 2, j % 2);
        out.extend((0..32).map(|l| {
            let q = ((qs[32 * c + l] >> (4 * k)) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            dl * q as f32 - ml
        }));
    }
}

/// Q6_K: ql[128], qh[64], scales[16] (i8), d; 16 sub-blocks of 16.
pub(super) fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    out.extend((0..QK_K).map(|e| {
        let dl = d * scales[e / 16] as i8 as f32;
        let (h, r) = (e / 128, e % 128);
        let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        dl * q as f32
    }));
}

/// Q8_K: d (f32), qs[256] (i8), bsums[16] (i16, unused when dequantizing).
pub(super) fn q8_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    out.extend(b[4..4 + QK_K].iter().map(|&x| d * x as i8 as f32));
}
