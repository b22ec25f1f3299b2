//! How the factors `cersa_u` and `cersa_vt` of a factored entry are stored: in a float
//! dtype as `[m, r]` and `[r, n]`, or block-quantized along the singular vectors as U8
//! rows `[r, row_bytes(m)]` and `[r, row_bytes(n)]` (spec §2). One rule for the writer,
//! the reader, the validator and the converter's byte accounting.

use crate::dtype::{decode_f32, encode_f32, encode_f64, Dtype};
use crate::manifest::TensorInfo;
use crate::quant::Quant;

/// The storage of one entry's `cersa_u` / `cersa_vt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FactorEncoding {
    /// Row-major `[m, r]` and `[r, n]` in a float dtype (F16, BF16, F32, F64).
    Float(Dtype),
    /// One quantized row per singular vector.
    Quant(Quant),
}

/// Factor values a writer holds (f32 or f64; quantization takes them rounded to f32).
pub trait FactorValue: Copy {
    /// The value rounded to f32.
    fn f32(self) -> f32;
    /// Encodes `values` in a float dtype; `None` for other dtypes.
    fn encode(dtype: Dtype, values: &[Self]) -> Option<Vec<u8>>;
}

impl FactorValue for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn encode(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
        encode_f32(dtype, values)
    }
}

impl FactorValue for f64 {
    fn f32(self) -> f32 {
        self as f32
    }
    fn encode(dtype: Dtype, values: &[f64]) -> Option<Vec<u8>> {
        encode_f64(dtype, values)
    }
}

impl FactorEncoding {
    /// The encoding a manifest entry declares.
    pub fn of(info: &TensorInfo) -> FactorEncoding {
        match info.quant {
            Some(q) => FactorEncoding::Quant(q),
            None => FactorEncoding::Float(info.stored_dtype),
        }
    }

    /// The manifest's `stored_dtype` (and the shard dtype of both factors).
    pub fn stored_dtype(self) -> Dtype {
        match self {
            FactorEncoding::Float(d) => d,
            FactorEncoding::Quant(_) => Dtype::U8,
        }
    }

    /// The manifest's `quant`.
    pub fn quant(self) -> Option<Quant> {
        match self {
            FactorEncoding::Float(_) => None,
            FactorEncoding::Quant(q) => Some(q),
        }
    }

    /// Shard shape of `cersa_u` for an m-row matrix at rank r; `None` on overflow.
    pub fn u_shape(self, m: usize, r: usize) -> Option<[usize; 2]> {
        match self {
            FactorEncoding::Float(_) => Some([m, r]),
            FactorEncoding::Quant(q) => Some([r, q.row_bytes(m)?]),
        }
    }

    /// Shard shape of `cersa_vt` for an n-column matrix at rank r; `None` on overflow.
    pub fn vt_shape(self, r: usize, n: usize) -> Option<[usize; 2]> {
        match self {
            FactorEncoding::Float(_) => Some([r, n]),
            FactorEncoding::Quant(q) => Some([r, q.row_bytes(n)?]),
        }
    }

    /// Bytes of `cersa_u` + `cersa_vt` (σ excluded); `None` on overflow.
    pub fn factor_bytes(self, m: usize, n: usize, r: usize) -> Option<u64> {
        let size = self.stored_dtype().size() as u64;
        let [a, b] = self.u_shape(m, r)?;
        let [c, d] = self.vt_shape(r, n)?;
        let elems = (a as u64)
            .checked_mul(b as u64)?
            .checked_add((c as u64).checked_mul(d as u64)?)?;
        elems.checked_mul(size)
    }

    /// Encodes U (row-major `[m, r]`); `None` when a float dtype is not a factor dtype.
    pub fn encode_u<T: FactorValue>(self, u: &[T], m: usize, r: usize) -> Option<Vec<u8>> {
        match self {
            FactorEncoding::Float(d) => T::encode(d, u),
            FactorEncoding::Quant(q) => {
                let mut out = Vec::with_capacity(r * q.row_bytes(m)?);
                let mut column = Vec::with_capacity(m);
                for k in 0..r {
                    column.clear();
                    column.extend((0..m).map(|i| u[i * r + k].f32()));
                    q.quantize_row(&column, &mut out);
                }
                Some(out)
            }
        }
    }

    /// Encodes Vᵀ (row-major `[r, n]`).
    pub fn encode_vt<T: FactorValue>(self, vt: &[T], r: usize, n: usize) -> Option<Vec<u8>> {
        match self {
            FactorEncoding::Float(d) => T::encode(d, vt),
            FactorEncoding::Quant(q) => {
                let mut out = Vec::with_capacity(r * q.row_bytes(n)?);
                let mut row = Vec::with_capacity(n);
                for k in 0..r {
                    row.clear();
                    row.extend(vt[k * n..(k + 1) * n].iter().map(|v| v.f32()));
                    q.quantize_row(&row, &mut out);
                }
                Some(out)
            }
        }
    }

    /// U as f32, row-major `[m, r]`, from the bytes of `cersa_u`; `None` when the bytes do
    /// not fit the shape or the dtype is not a float.
    pub fn decode_u(self, bytes: &[u8], m: usize, r: usize) -> Option<Vec<f32>> {
        match self {
            FactorEncoding::Float(d) => {
                decode_f32(d, bytes).filter(|v| Some(v.len()) == m.checked_mul(r))
            }
            FactorEncoding::Quant(q) => {
                let rows = q.dequantize_rows(bytes, r, m)?;
                let mut u = vec![0f32; rows.len()];
                for (k, column) in rows.chunks_exact(m.max(1)).enumerate() {
                    for (i, &v) in column.iter().enumerate() {
                        u[i * r + k] = v;
                    }
                }
                Some(u)
            }
        }
    }

    /// Vᵀ as f32, row-major `[r, n]`, from the bytes of `cersa_vt`.
    pub fn decode_vt(self, bytes: &[u8], r: usize, n: usize) -> Option<Vec<f32>> {
        match self {
            FactorEncoding::Float(d) => {
                decode_f32(d, bytes).filter(|v| Some(v.len()) == r.checked_mul(n))
            }
            FactorEncoding::Quant(q) => q.dequantize_rows(bytes, r, n),
        }
    }
}

impl std::fmt::Display for FactorEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FactorEncoding::Float(d) => d.fmt(f),
            FactorEncoding::Quant(q) => q.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_u_is_stored_by_columns() {
        // U [m=3, r=2]: column 0 = (1, 2, 3)/4, column 1 = (−1, 0, 1)/2.
        let u = [0.25f32, -0.5, 0.5, 0.0, 0.75, 0.5];
        let enc = FactorEncoding::Quant(Quant::Q8_0);
        let bytes = enc.encode_u(&u, 3, 2).unwrap();
        assert_eq!(enc.u_shape(3, 2), Some([2, 34]));
        assert_eq!(bytes.len(), 68);
        let back = enc.decode_u(&bytes, 3, 2).unwrap();
        for (a, b) in u.iter().zip(&back) {
            assert!((a - b).abs() < 0.004, "{u:?} vs {back:?}");
        }
        // Row 0 holds column 0: its largest value 0.75 is code 127.
        assert_eq!(bytes[2 + 2] as i8, 127);
    }

    /// fuzz/regressions/manifest/factor-bytes-overflow.json: a factored entry
    /// [2^32, 2^32 − 1] at rank 2^32 − 1 passes `factored_dims`; each factor's element
    /// count fits u64 but their sum did not (an add overflow, not the `None` documented).
    #[test]
    fn factor_bytes_overflow_is_none() {
        let text = include_bytes!("../../fuzz/regressions/manifest/factor-bytes-overflow.json");
        let m = crate::validate::parse_manifest(text).unwrap();
        let (name, info) = m.tensors.iter().next().unwrap();
        let (rows, cols, r) = crate::validate::factored_dims(name, info).unwrap();
        assert_eq!(FactorEncoding::of(info).factor_bytes(rows, cols, r), None);
        let f16 = FactorEncoding::Float(Dtype::F16);
        assert_eq!(
            f16.factor_bytes(1 << 32, (1 << 32) - 1, (1 << 32) - 1),
            None
        );
    }

    #[test]
    fn float_encoding_is_the_plain_layout() {
        let enc = FactorEncoding::Float(Dtype::F32);
        let vt = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bytes = enc.encode_vt(&vt, 2, 3).unwrap();
        assert_eq!(
            enc.decode_vt(&bytes, 2, 3).unwrap(),
            [1., 2., 3., 4., 5., 6.]
        );
        assert_eq!(enc.decode_vt(&bytes, 3, 3), None);
        assert_eq!(enc.factor_bytes(4, 3, 2), Some(4 * (8 + 6)));
        let q4 = FactorEncoding::Quant(Quant::Q4_0);
        assert_eq!(q4.factor_bytes(40, 70, 3), Some(3 * (2 * 18 + 3 * 18)));
        assert_eq!(q4.stored_dtype(), Dtype::U8);
    }
}
