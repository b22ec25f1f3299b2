//! Dequantization of GGML's grid ("i-quant") types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
//! IQ3_XXS and IQ3_S: each group of 4 or 8 values is a row of a fixed codebook
//! (`grids`), times a sub-block scale, with per-value signs or a ±1/8 shift.
//!
//! As in `ggml`, every formula follows gguf-py's `gguf.quants.dequantize_blocks`
//! operation by operation in f32 (each product and sum one rounding, sign flips exact), so
//! the results are bit-equal to gguf-py; `tests/python/test_gguf_dequant.py` checks each
//! type on random and edge blocks (gguf-py cannot quantize these types).

use super::block::f16_at;
use super::grids;
use half::f16;
use std::sync::OnceLock;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A codebook decoded from gguf-py's hex form: a byte holds 4 two-bit codes (maps of up to
/// 4 values) or 2 codes in 4-bit slots (8 values), low bits first; codes index `map`.
fn decode(hex: &str, map: &[i8]) -> Vec<f32> {
    let (step, mask) = if map.len() <= 4 { (2, 0x03) } else { (4, 0x07) };
    let nibble = |c: u8| (if c > 0x40 { c + 9 } else { c }) & 0x0F;
    let mut out = Vec::with_capacity(hex.len() / 2 * (8 / step));
    for pair in hex.as_bytes().chunks_exact(2) {
        let byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
        for shift in (0..8).step_by(step) {
            out.push(f32::from(map[usize::from((byte >> shift) & mask)]));
        }
    }
    out
}

/// The codebooks, decoded once per process: (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S).
struct Grids {
    iq2_xxs: Vec<f32>,
    iq2_xs: Vec<f32>,
    iq2_s: Vec<f32>,
    iq3_xxs: Vec<f32>,
    iq3_s: Vec<f32>,
    iq1_s: Vec<f32>,
}

fn grids() -> &'static Grids {
    static GRIDS: OnceLock<Grids> = OnceLock::new();
    GRIDS.get_or_init(|| Grids {
        iq2_xxs: decode(grids::IQ2_XXS_HEX, &grids::IQ2_XXS_MAP),
        iq2_xs: decode(grids::IQ2_XS_HEX, &grids::IQ2_XS_MAP),
        iq2_s: decode(grids::IQ2_S_HEX, &grids::IQ2_S_MAP),
        iq3_xxs: decode(grids::IQ3_XXS_HEX, &grids::IQ3_XXS_MAP),
        iq3_s: decode(grids::IQ3_S_HEX, &grids::IQ3_S_MAP),
        iq1_s: decode(grids::IQ1_S_HEX, &grids::IQ1_S_MAP),
    })
}

/// ggml's `ksigns_iq2xs`: 7 stored sign bits plus an eighth that makes the parity even.
fn ksigns(i: u32) -> u8 {
    let i = (i & 0x7F) as u8;
    i | (((i.count_ones() & 1) as u8) << 7)
}

/// `scale · g`, negated where bit j of `signs` is set (exact), for the 8 values `g`.
fn signed(out: &mut Vec<f32>, scale: f32, g: &[f32], signs: u8) {
    out.extend(g.iter().enumerate().map(|(j, &x)| {
        let v = scale * x;
        if (signs >> j) & 1 == 1 {
            -v
        } else {
            v
        }
    }));
}

/// `d · (0.5 + s) · c` (gguf-py's scale for the IQ2 and IQ3_XXS types).
fn half_step_scale(d: f32, s: u32, c: f32) -> f32 {
    d * (0.5 + s as f32) * c
}

/// IQ2_XXS, 256 values in 66 bytes: f16 d, then 8 × (4 grid rows as bytes of a u32, and a
/// u32 with four 7-bit sign indices and a 4-bit scale).
pub(super) fn iq2_xxs(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq2_xxs, f16_at(b, 0));
    for ib in 0..8 {
        let (aux0, aux1) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
        let db = half_step_scale(d, aux1 >> 28, 0.25);
        for l in 0..4 {
            let row = ((aux0 >> (8 * l)) & 0xFF) as usize;
            signed(
                out,
                db,
                &grid[8 * row..8 * row + 8],
                ksigns(aux1 >> (7 * l)),
            );
        }
    }
}

/// Sixteen 4-bit scales from 8 bytes, low nibble first, as `d · (0.5 + s) · 0.25`.
fn nibble_scales(d: f32, bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .iter()
        .flat_map(move |&x| [x & 0x0F, x >> 4].map(|s| half_step_scale(d, u32::from(s), 0.25)))
}

/// IQ2_XS, 256 values in 74 bytes: f16 d, 32 u16 (9-bit grid row, 7-bit sign index), 8
/// bytes of 4-bit scales (one per 16 values).
pub(super) fn iq2_xs(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq2_xs, f16_at(b, 0));
    let db: Vec<f32> = nibble_scales(d, &b[66..74]).collect();
    for t in 0..32 {
        let q = u16_at(b, 2 + 2 * t);
        let row = usize::from(q & 511);
        signed(
            out,
            db[t / 2],
            &grid[8 * row..8 * row + 8],
            ksigns(u32::from(q >> 9)),
        );
    }
}

/// IQ2_S, 256 values in 82 bytes: f16 d, 32 grid-row low bytes, 32 sign bytes, 8 bytes of
/// 2-bit row high parts, 8 bytes of 4-bit scales.
pub(super) fn iq2_s(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq2_s, f16_at(b, 0));
    let (qs, signs, qh) = (&b[2..34], &b[34..66], &b[66..74]);
    let db: Vec<f32> = nibble_scales(d, &b[74..82]).collect();
    for t in 0..32 {
        let high = (qh[t / 4] >> (2 * (t % 4))) & 0x03;
        let row = usize::from(qs[t]) | (usize::from(high) << 8);
        signed(out, db[t / 2], &grid[8 * row..8 * row + 8], signs[t]);
    }
}

/// Rows `r0` and `r1` of a 4-wide codebook, side by side (the IQ3 types' groups of 8).
fn two_rows(grid: &[f32], r0: usize, r1: usize) -> [f32; 8] {
    let mut g = [0f32; 8];
    g[..4].copy_from_slice(&grid[4 * r0..4 * r0 + 4]);
    g[4..].copy_from_slice(&grid[4 * r1..4 * r1 + 4]);
    g
}

/// IQ3_XXS, 256 values in 98 bytes: f16 d, 64 grid rows (4 values each) as bytes, 8 u32
/// with four 7-bit sign indices and a 4-bit scale.
pub(super) fn iq3_xxs(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq3_xxs, f16_at(b, 0));
    let qs = &b[2..66];
    for ib in 0..8 {
        let aux = u32_at(b, 66 + 4 * ib);
        let db = half_step_scale(d, aux >> 28, 0.5);
        for l in 0..4 {
            let (r0, r1) = (
                usize::from(qs[8 * ib + 2 * l]),
                usize::from(qs[8 * ib + 2 * l + 1]),
            );
            signed(out, db, &two_rows(grid, r0, r1), ksigns(aux >> (7 * l)));
        }
    }
}

/// IQ3_S, 256 values in 110 bytes: f16 d, 64 grid-row low bytes, 8 bytes of row high bits,
/// 32 sign bytes, 4 bytes of 4-bit scales (`d · (1 + 2s)`, one per 32 values).
pub(super) fn iq3_s(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq3_s, f16_at(b, 0));
    let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
    let row = |t: usize| usize::from(qs[t]) | (usize::from((qh[t / 8] >> (t % 8)) & 1) << 8);
    for k in 0..8 {
        let s = (scales[k / 2] >> (4 * (k % 2))) & 0x0F;
        let db = d * f32::from(1 + 2 * s);
        for l in 0..4 {
            let (r0, r1) = (row(8 * k + 2 * l), row(8 * k + 2 * l + 1));
            signed(out, db, &two_rows(grid, r0, r1), signs[4 * k + l]);
        }
    }
}

/// IQ1's shift of the ±1/0 codebook values: +1/8, or −1/8 when the flag is set.
fn delta(negative: bool) -> f32 {
    if negative {
        -0.125
    } else {
        0.125
    }
}

/// `dl · (g + delta)` for the 8 values of grid row `row`.
fn shifted(out: &mut Vec<f32>, grid: &[f32], row: usize, dl: f32, delta: f32) {
    out.extend(grid[8 * row..8 * row + 8].iter().map(|&g| dl * (g + delta)));
}

/// IQ1_S, 256 values in 50 bytes: f16 d, 32 grid-row low bytes, 8 u16 (four 3-bit row high
/// parts, a 3-bit scale, the delta's sign).
pub(super) fn iq1_s(b: &[u8], out: &mut Vec<f32>) {
    let (grid, d) = (&grids().iq1_s, f16_at(b, 0));
    for ib in 0..8 {
        let h = u16_at(b, 34 + 2 * ib);
        let dl = d * f32::from(2 * ((h >> 12) & 7) + 1);
        let dt = delta(h & 0x8000 != 0);
        for l in 0..4 {
            let row = usize::from(b[2 + 4 * ib + l]) | (usize::from((h >> (3 * l)) & 7) << 8);
            shifted(out, grid, row, dl, dt);
        }
    }
}

/// IQ1_M, 256 values in 56 bytes: 32 grid-row low bytes, 16 bytes of two (3-bit row high
/// part, delta sign) nibbles, 4 u16 of four 3-bit scales each whose top nibbles form the f16 d.
pub(super) fn iq1_m(b: &[u8], out: &mut Vec<f32>) {
    let grid = &grids().iq1_s;
    let (qs, qh) = (&b[0..32], &b[32..48]);
    let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
    let d_bits =
        (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000);
    let d = f16::from_bits(d_bits).to_f32();
    for t in 0..32 {
        let k = t / 2; // scale index: 16 scales of 16 values
        let s = (sc[k / 4] >> (3 * (k % 4))) & 7;
        let dl = d * f32::from(2 * s + 1);
        let nib = qh[t / 2] >> (4 * (t % 2));
        let row = usize::from(qs[t]) | (usize::from(nib & 7) << 8);
        shifted(out, grid, row, dl, delta(nib & 8 != 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebooks_have_their_shapes_and_values() {
        let g = grids();
        let shapes = [
            (&g.iq2_xxs, 256 * 8, &[8.0, 25.0, 43.0][..]),
            (&g.iq2_xs, 512 * 8, &[8.0, 25.0, 43.0]),
            (&g.iq2_s, 1024 * 8, &[8.0, 25.0, 43.0]),
            (
                &g.iq3_xxs,
                256 * 4,
                &[4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0],
            ),
            (
                &g.iq3_s,
                512 * 4,
                &[1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0],
            ),
            (&g.iq1_s, 2048 * 8, &[-1.0, 0.0, 1.0]),
        ];
        for (grid, len, values) in shapes {
            assert_eq!(grid.len(), len);
            assert!(grid.iter().all(|v| values.contains(v)));
        }
        // ggml's iq2xxs_grid[0] is 0x0808080808080808 (all 8s); iq1s_grid[0] is all −1.
        assert_eq!(&g.iq2_xxs[..8], &[8.0; 8]);
        assert_eq!(&g.iq1_s[..8], &[-1.0; 8]);
        // Eight sign bits with even parity.
        assert_eq!(
            (ksigns(0), ksigns(1), ksigns(3), ksigns(127)),
            (0, 129, 3, 255)
        );
    }
}
