//! Element types of safetensors tensors and conversions to floating point.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A safetensors element type (the `dtype` string of a header entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(missing_docs, non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Every dtype this crate knows, in the order of the safetensors spec.
    pub const ALL: [Dtype; 15] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E5M2 | Dtype::F8_E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The name used in safetensors headers (`"F32"`, `"BF16"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this crate does not know.
    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// True for the float types a CERSA factor may be stored in (F16, BF16, F32, F64).
    pub fn is_factor_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes little-endian float bytes of `dtype` into `f32` values.
///
/// Returns `None` when `dtype` is not one of F8_E4M3, F8_E5M2, F16, BF16, F32, F64 or when the byte
/// length is not a multiple of the element size. F64 values are rounded to f32.
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() % dtype.size() != 0 {
        return None;
    }
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
            .collect(),
        Dtype::F8_E4M3 => bytes.iter().map(|&b| f8_e4m3_to_f32(b)).collect(),
        Dtype::F8_E5M2 => bytes.iter().map(|&b| f8_e5m2_to_f32(b)).collect(),
        _ => return None,
    };
    Some(out)
}

/// OCP FP8 E4M3 as safetensors/PyTorch store it (`float8_e4m3fn`): bias 7, no
/// infinities, `S.1111.111` is NaN. Every value is exact in f32.
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0F);
    let man = f32::from(b & 0x07);
    if exp == 0x0F && b & 0x07 == 0x07 {
        return sign * f32::NAN;
    }
    let v = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * v
}

/// OCP FP8 E5M2 (`float8_e5m2`): the upper byte of an IEEE f16, infinities and NaN
/// included.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    half::f16::from_bits(u16::from(b) << 8).to_f32()
}

/// Decodes little-endian float bytes of `dtype` into `f64` values (exact for every
/// float dtype). Same `None` rules as [`decode_f32`].
pub fn decode_f64(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    if dtype == Dtype::F64 {
        if bytes.len() % 8 != 0 {
            return None;
        }
        return Some(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
        );
    }
    decode_f32(dtype, bytes).map(|v| v.into_iter().map(f64::from).collect())
}

/// Encodes `values` as little-endian bytes of a float `dtype`, rounding to nearest even.
///
/// Returns `None` for non-float dtypes.
pub fn encode_f64(dtype: Dtype, values: &[f64]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F64 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend((*v as f32).to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend(half::f16::from_f64(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f64(*v).to_le_bytes())),
        _ => return None,
    }
    Some(out)
}

/// Encodes f32 `values` as little-endian bytes of a float `dtype` (round to nearest even).
///
/// Returns `None` for non-float dtypes.
pub fn encode_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F64 => values
            .iter()
            .for_each(|v| out.extend(f64::from(*v).to_le_bytes())),
        Dtype::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::parse(d.as_str()), Some(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()));
        }
        assert_eq!(Dtype::parse("F4"), None);
    }

    #[test]
    fn f8_known_values() {
        // OCP 8-bit floating point spec, tables of E4M3 and E5M2 encodings.
        let e4 = |b| f8_e4m3_to_f32(b);
        assert_eq!(e4(0x38), 1.0);
        assert_eq!(e4(0x7E), 448.0); // max normal
        assert_eq!(e4(0x08), 2f32.powi(-6)); // min normal
        assert_eq!(e4(0x01), 2f32.powi(-9)); // min subnormal
        assert_eq!(e4(0xC4), -3.0);
        assert!(e4(0x7F).is_nan() && e4(0xFF).is_nan());
        assert_eq!(e4(0x80).to_bits(), (-0.0f32).to_bits());
        let e5 = |b| f8_e5m2_to_f32(b);
        assert_eq!(e5(0x3C), 1.0);
        assert_eq!(e5(0x7B), 57344.0); // max normal
        assert_eq!(e5(0x01), 2f32.powi(-16)); // min subnormal
        assert_eq!(e5(0x7C), f32::INFINITY);
        assert!(e5(0x7D).is_nan());
        assert_eq!(
            decode_f32(Dtype::F8_E4M3, &[0x38, 0xC4]),
            Some(vec![1.0, -3.0])
        );
    }

    #[test]
    fn encode_decode_known_values() {
        let v = [1.0f32, -2.5, 0.1];
        let bf = encode_f32(Dtype::BF16, &v).unwrap();
        // bf16(0.1) = 0x3DCD (round to nearest even of 0x3DCCCCCD)
        assert_eq!(&bf[4..6], &[0xCD, 0x3D]);
        let back = decode_f32(Dtype::BF16, &bf).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        let f16 = encode_f32(Dtype::F16, &v).unwrap();
        assert_eq!(&f16[0..2], &[0x00, 0x3C]);
        assert_eq!(decode_f32(Dtype::F32, &[0, 0]), None);
        assert_eq!(decode_f32(Dtype::I32, &[0, 0, 0, 0]), None);
    }
}
