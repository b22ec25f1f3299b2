//! GGML's legacy block quantizations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): dequantization of one
//! block, and for the three types CERSA stores factors in ([`Quant`]: Q8_0, Q5_0, Q4_0) the
//! quantizer and the row layout of spec §2 "Quantized factors".
//!
//! One implementation for the whole project: the converter's GGUF reader dequantizes its
//! legacy blocks with these functions. Every formula follows gguf-py's
//! `gguf.quants.quantize_blocks` / `dequantize_blocks` operation by operation in f32 (a
//! product and a sum are two roundings; Rust never fuses them), so results are bit-equal
//! to gguf-py (`tests/python/test_quant.py`, `test_gguf_dequant.py`).

use half::f16;
use serde::{Deserialize, Serialize};

/// Values per block of every legacy type.
pub const BLOCK: usize = 32;

/// A block quantization CERSA stores factors in (manifest `quant`, GGML's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum Quant {
    /// 8-bit: f16 scale + 32 × i8 (34 bytes per 32 values).
    Q8_0,
    /// 5-bit: f16 scale + 32 high bits + 32 nibbles (22 bytes per 32 values).
    Q5_0,
    /// 4-bit: f16 scale + 32 nibbles (18 bytes per 32 values).
    Q4_0,
}

impl Quant {
    /// Every type, in the spec's order.
    pub const ALL: [Quant; 3] = [Quant::Q8_0, Quant::Q5_0, Quant::Q4_0];

    /// GGML's name (`"Q8_0"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Quant::Q8_0 => "Q8_0",
            Quant::Q5_0 => "Q5_0",
            Quant::Q4_0 => "Q4_0",
        }
    }

    /// Bytes of one block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Quant::Q8_0 => 34,
            Quant::Q5_0 => 22,
            Quant::Q4_0 => 18,
        }
    }

    /// Bytes of one stored row holding `len` values (zero-padded to whole blocks);
    /// `None` on overflow.
    pub fn row_bytes(self, len: usize) -> Option<usize> {
        len.div_ceil(BLOCK).checked_mul(self.block_bytes())
    }

    /// Quantizes one vector of `values` into whole blocks (zero padding), appended to `out`.
    pub fn quantize_row(self, values: &[f32], out: &mut Vec<u8>) {
        let mut block = [0f32; BLOCK];
        for chunk in values.chunks(BLOCK) {
            block[..chunk.len()].copy_from_slice(chunk);
            block[chunk.len()..].fill(0.0);
            match self {
                Quant::Q8_0 => quantize_q8_0(&block, out),
                Quant::Q5_0 => quantize_q5_0(&block, out),
                Quant::Q4_0 => quantize_q4_0(&block, out),
            }
        }
    }

    /// The first `len` values of one stored row, appended to `out` as f32; `None` when
    /// `row` is not exactly [`Quant::row_bytes`]`(len)` bytes.
    pub fn dequantize_row(self, row: &[u8], len: usize, out: &mut Vec<f32>) -> Option<()> {
        if self.row_bytes(len) != Some(row.len()) {
            return None;
        }
        let start = out.len();
        out.reserve(row.len() / self.block_bytes() * BLOCK);
        for b in row.chunks_exact(self.block_bytes()) {
            match self {
                Quant::Q8_0 => q8_0(b, out),
                Quant::Q5_0 => q5_0(b, out),
                Quant::Q4_0 => q4_0(b, out),
            }
        }
        out.truncate(start + len);
        Some(())
    }

    /// Dequantizes `rows` stored rows of `len` values each (a `[rows, row_bytes]` U8
    /// tensor), row-major `[rows, len]`; `None` when the byte count does not match.
    pub fn dequantize_rows(self, bytes: &[u8], rows: usize, len: usize) -> Option<Vec<f32>> {
        let rb = self.row_bytes(len)?;
        if rows.checked_mul(rb) != Some(bytes.len()) {
            return None;
        }
        let mut out = Vec::with_capacity(rows.checked_mul(len)?);
        if rb > 0 {
            for row in bytes.chunks_exact(rb) {
                self.dequantize_row(row, len, &mut out)?;
            }
        }
        Some(out)
    }
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The little-endian f16 at byte `at` of a block, as f32 (exact).
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn push_f16(d: f32, out: &mut Vec<u8>) {
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
}

/// 1/d, or 0 where d is 0 (gguf-py `np.where(d == 0, 0, 1 / d)`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The value of largest magnitude, the first one on ties (numpy `argmax` of `abs`).
fn signed_max(x: &[f32; BLOCK]) -> f32 {
    let mut best = x[0];
    for &v in &x[1..] {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

fn quantize_q8_0(x: &[f32; BLOCK], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    push_f16(d, out);
    // gguf-py's np_roundf rounds half away from zero, as f32::round does.
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0 and Q5_0 codes: `min(top, trunc(x·id + offset))` with d = x_max / −(offset − ½).
fn symmetric_codes(x: &[f32; BLOCK], half_range: f32, top: u8) -> (f32, [u8; BLOCK]) {
    let d = signed_max(x) / -half_range;
    let id = inverse(d);
    let offset = half_range + 0.5;
    let mut q = [0u8; BLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        // Non-negative by construction; `as u8` saturates like numpy's clip after astype.
        *q = ((v * id + offset).trunc() as u8).min(top);
    }
    (d, q)
}

fn quantize_q4_0(x: &[f32; BLOCK], out: &mut Vec<u8>) {
    let (d, q) = symmetric_codes(x, 8.0, 15);
    push_f16(d, out);
    out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
}

fn quantize_q5_0(x: &[f32; BLOCK], out: &mut Vec<u8>) {
    let (d, q) = symmetric_codes(x, 16.0, 31);
    push_f16(d, out);
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (u32::from(v >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0F) | (q[j + 16] << 4)));
}

/// Low nibbles of the 16 bytes give elements 0..16, high nibbles 16..32.
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }
}

/// Dequantizes one Q4_0 block (18 bytes), appending 32 values.
pub fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend((0..32).map(|j| d * (nibble(qs, j) as i8 - 8) as f32));
}

/// Dequantizes one Q4_1 block (20 bytes), appending 32 values.
pub fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    out.extend((0..32).map(|j| d * nibble(qs, j) as f32 + m));
}

/// Dequantizes one Q5_0 block (22 bytes), appending 32 values.
pub fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..32).map(|j| {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        d * (q as i8 - 16) as f32
    }));
}

/// Dequantizes one Q5_1 block (24 bytes), appending 32 values.
pub fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..32).map(|j| {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        d * q as f32 + m
    }));
}

/// Dequantizes one Q8_0 block (34 bytes), appending 32 values.
pub fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&x| x as i8 as f32 * d));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(q: Quant, x: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        q.quantize_row(x, &mut bytes);
        assert_eq!(bytes.len(), q.row_bytes(x.len()).unwrap());
        let mut out = Vec::new();
        q.dequantize_row(&bytes, x.len(), &mut out).unwrap();
        out
    }

    #[test]
    fn zeros_and_padding_dequantize_to_zero() {
        for q in Quant::ALL {
            assert_eq!(round_trip(q, &[0.0; 40]), vec![0.0; 40]);
            // A partial last block: the padding quantizes to 0 and is dropped.
            let mut bytes = Vec::new();
            q.quantize_row(&[0.5; 33], &mut bytes);
            let mut all = Vec::new();
            q.dequantize_row(&bytes, 64, &mut all).unwrap();
            assert!(all[33..].iter().all(|&v| v == 0.0), "{q}: {:?}", &all[33..]);
        }
    }

    #[test]
    fn hand_checked_blocks() {
        // Q8_0: amax 127 → d = 1 exactly, codes are the values.
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 4.0 - 1.0).collect();
        let mut b = Vec::new();
        Quant::Q8_0.quantize_row(&x, &mut b);
        assert_eq!(&b[..2], &f16::from_f32(123.0 / 127.0).to_le_bytes());
        // Q4_0: x_max = −8 → d = 1, id = 1, codes trunc(x + 8.5).
        let mut x = [0f32; 32];
        x[0] = -8.0;
        x[1] = 7.0;
        x[17] = -1.5; // trunc(7.0) = 7 → value −1
        let mut b = Vec::new();
        Quant::Q4_0.quantize_row(&x, &mut b);
        assert_eq!(&b[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(b[2], 0x80); // element 0 code 0, element 16 code 8 (zero)
        assert_eq!(b[3] & 0x0F, 15);
        assert_eq!(b[3] >> 4, 7);
        let back = round_trip(Quant::Q4_0, &x);
        assert_eq!((back[0], back[1], back[17]), (-8.0, 7.0, -1.0));
    }

    #[test]
    fn error_shrinks_with_bits() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 71.0)
            .collect();
        let err = |q| {
            let y = round_trip(q, &x);
            x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
        };
        let (e8, e5, e4) = (err(Quant::Q8_0), err(Quant::Q5_0), err(Quant::Q4_0));
        assert!(e8 < e5 && e5 < e4, "{e8} {e5} {e4}");
        assert!(e8 > 0.0);
    }

    #[test]
    fn wrong_row_sizes_are_refused() {
        assert!(Quant::Q8_0
            .dequantize_row(&[0; 33], 32, &mut Vec::new())
            .is_none());
        assert!(Quant::Q4_0.dequantize_rows(&[0; 36], 3, 32).is_none());
        assert_eq!(Quant::Q4_0.dequantize_rows(&[], 0, 32), Some(vec![]));
        assert_eq!(Quant::Q8_0.row_bytes(usize::MAX), None);
    }

    #[test]
    fn names_round_trip_through_serde() {
        for q in Quant::ALL {
            let json = serde_json::to_string(&q).unwrap();
            assert_eq!(json, format!("\"{}\"", q.as_str()));
            assert_eq!(serde_json::from_str::<Quant>(&json).unwrap(), q);
        }
    }
}
