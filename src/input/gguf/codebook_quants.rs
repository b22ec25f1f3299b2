//! Dequantization of the GGML types that decode through a small codebook or are ternary:
//! IQ4_NL and IQ4_XS (ggml's 16-entry non-linear 4-bit grid), MXFP4 (OCP microscaling
//! e2m1 values with an e8m0 block scale), NVFP4 (e2m1 with e4m3 scales per 16 values),
//! TQ1_0 and TQ2_0 (ternary −1/0/1, BitNet-style).
//!
//! As in `ggml`, every formula follows gguf-py's `gguf.quants.dequantize_blocks`
//! operation by operation in f32 (a product is one rounding; two products are two), so the
//! results are bit-equal to gguf-py; `tests/python/test_gguf_dequant.py` checks each type
//! on random blocks, edge blocks and, where gguf-py can quantize, real weights.

use super::block::f16_at;

/// ggml's non-linear 4-bit grid (`kvalues_iq4nl`), shared by IQ4_NL and IQ4_XS.
const IQ4_GRID: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// e2m1 (FP4) values, doubled so they are integers; the block scale is halved to match.
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// The 4-bit codes of `qs`: all low nibbles first, then all high nibbles.
fn codes(qs: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let lo = qs.iter().map(|&q| usize::from(q & 0x0F));
    let hi = qs.iter().map(|&q| usize::from(q >> 4));
    lo.chain(hi)
}

/// IQ4_NL, 32 elements in 18 bytes: f16 scale d, 16 bytes of grid indices.
pub(super) fn iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(codes(&b[2..18]).map(|c| d * f32::from(IQ4_GRID[c])));
}

/// IQ4_XS, 256 elements in 136 bytes: f16 d, 16 high scale bits (2 per sub-block), 4 bytes
/// of low scale nibbles, 128 bytes of grid indices; 8 sub-blocks of 32 with 6-bit scales.
pub(super) fn iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for j in 0..8 {
        let lo = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
        let hi = ((scales_h >> (2 * j)) & 0x03) as u8;
        let scale = (lo | (hi << 4)) as i8 - 32;
        let dl = d * f32::from(scale);
        out.extend(codes(&qs[16 * j..16 * (j + 1)]).map(|c| dl * f32::from(IQ4_GRID[c])));
    }
}

/// ggml's e8m0 → f32, halved (`ggml_e8m0_to_fp32_half`): 2^(e − 128), subnormal for e < 2.
fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// MXFP4, 32 elements in 17 bytes: e8m0 scale, 16 bytes of e2m1 codes.
pub(super) fn mxfp4(b: &[u8], out: &mut Vec<f32>) {
    let d = e8m0_half(b[0]);
    out.extend(codes(&b[1..17]).map(|c| d * f32::from(E2M1_DOUBLED[c])));
}

/// NVFP4's unsigned e4m3 sub-block scale (bias 7, top bit ignored; 0x00 and 0x7F read as
/// zero), halved like MXFP4's to match the doubled e2m1 values.
fn ue4m3_half(x: u8) -> f32 {
    let (exp, man) = (i32::from((x >> 3) & 0x0F), f32::from(x & 0x07));
    if x == 0 || x == 0x7F {
        return 0.0;
    }
    let raw = if exp == 0 {
        man * 2f32.powi(-9)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    raw * 0.5
}

/// NVFP4, 64 elements in 36 bytes: 4 e4m3 scales (one per 16 elements), then 4 × 8 bytes
/// of e2m1 codes (each 8 bytes: low nibbles, then high nibbles).
pub(super) fn nvfp4(b: &[u8], out: &mut Vec<f32>) {
    for (s, qs) in b[4..36].chunks_exact(8).enumerate() {
        let d = ue4m3_half(b[s]);
        out.extend(codes(qs).map(|c| d * f32::from(E2M1_DOUBLED[c])));
    }
}

/// A base-3 digit packed as gguf-py packs TQ1_0: the byte times 3^k (mod 256), scaled to a
/// trit by ·3 >> 8, minus 1.
fn trit(byte: u8, pow3: u8) -> f32 {
    let q = byte.wrapping_mul(pow3);
    f32::from(((u16::from(q) * 3) >> 8) as i8 - 1)
}

/// TQ1_0, 256 elements in 54 bytes: 48 bytes of 5 trits each (32 bytes, then 16), 4 bytes
/// of 4 trits each, f16 d.
pub(super) fn tq1_0(b: &[u8], out: &mut Vec<f32>) {
    let (qs0, qs1, qh) = (&b[0..32], &b[32..48], &b[48..52]);
    let d = f16_at(b, 52);
    for (bytes, digits) in [(qs0, 5), (qs1, 5), (qh, 4)] {
        for pow3 in [1u8, 3, 9, 27, 81].into_iter().take(digits) {
            out.extend(bytes.iter().map(|&q| d * trit(q, pow3)));
        }
    }
}

/// TQ2_0, 256 elements in 66 bytes: 64 bytes of 2-bit codes (code − 1 ∈ {−1, 0, 1, 2}),
/// f16 d; each 32-byte half holds 4 groups of 32 elements, by bit pair.
pub(super) fn tq2_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 64);
    for half in b[0..64].chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            out.extend(
                half.iter()
                    .map(|&q| d * f32::from(((q >> shift) & 0x03) as i8 - 1)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked out by hand from the block layouts.
    #[test]
    fn codebook_types_by_hand() {
        // IQ4_NL: d = 0.5; byte 0 = 0xF0: element 0 = grid[0] = −127, element 16 = grid[15].
        let mut b = vec![0x00, 0x38, 0xF0];
        b.extend([0u8; 15]);
        let mut out = Vec::new();
        iq4_nl(&b, &mut out);
        assert_eq!(
            (out.len(), out[0], out[16], out[1]),
            (32, -63.5, 56.5, -63.5)
        );

        // MXFP4: e = 127 → 2^0 halved = 0.5; code 7 → 12 · 0.5 = 6 (e2m1 6.0), code 9 → −0.5.
        let mut b = vec![127u8, 0x97];
        b.extend([0u8; 15]);
        let mut out = Vec::new();
        mxfp4(&b, &mut out);
        assert_eq!((out[0], out[16], out[1]), (6.0, -0.5, 0.0));
        assert_eq!(e8m0_half(0), f32::from_bits(0x0020_0000)); // 2^-128, subnormal
        assert_eq!(e8m0_half(255), 2f32.powi(127));
        // NVFP4's e4m3 scale: 0x38 = exponent 7, mantissa 0 → 1.0, halved; 0x01 → 2^-9 / 2.
        assert_eq!((ue4m3_half(0x38), ue4m3_half(0x01)), (0.5, 2f32.powi(-10)));
        assert_eq!((ue4m3_half(0x7F), ue4m3_half(0xFF)), (0.0, 240.0));

        // TQ2_0: d = 1; byte 0 = 0b11_10_01_00 → elements 0, 32, 64, 96 = −1, 0, 1, 2.
        let mut b = vec![0b1110_0100u8];
        b.extend([0x55u8; 63]);
        b.extend([0x00, 0x3C]);
        let mut out = Vec::new();
        tq2_0(&b, &mut out);
        assert_eq!(
            (out[0], out[32], out[64], out[96], out[1]),
            (-1.0, 0.0, 1.0, 2.0, 0.0)
        );

        // TQ1_0: the byte for trits (t0..t4) is ceil(Σ tᵢ·3^(4−i) · 256 / 243); trits 2,0,1,1,0
        // (values 1,−1,0,0,−1) → 2·81 + 0 + 9 + 3 = 174 → byte ceil(174·256/243) = 184.
        let mut b = vec![184u8];
        b.extend([0u8; 51]);
        b.extend([0x00, 0x3C]);
        let mut out = Vec::new();
        tq1_0(&b, &mut out);
        let firsts: Vec<f32> = (0..5).map(|k| out[32 * k]).collect();
        assert_eq!(firsts, [1.0, -1.0, 0.0, 0.0, -1.0]);
        assert_eq!(out.len(), 256);

        // IQ4_XS: d = 1, sub-block 1's scale = (lo 0x2 | hi 0b10 << 4) − 32 = 2; code 8 → 1.
        let mut b = vec![0x00, 0x3C, 0b0000_1000, 0x00, 0x20, 0, 0, 0];
        b.extend([0x88u8; 128]);
        let mut out = Vec::new();
        iq4_xs(&b, &mut out);
        assert_eq!((out.len(), out[0], out[32]), (256, -32.0, 2.0));
    }
}
