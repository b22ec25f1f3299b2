//! Where a source tensor becomes a matrix: read as floats, refused when not finite, viewed
//! as m×n (first dimension × the rest), with its ‖W‖². `convert` and `inspect` both start
//! here, so a tensor is read, checked and measured the same way by both.

use crate::decompose::rank::frobenius2;
use crate::error::{ConvertError, Result};
use crate::input::{FloatData, Source};

/// A source tensor read for decomposition.
#[derive(Debug)]
pub struct Matrix {
    /// The values, row-major [m, n], in the tensor's decomposition precision.
    pub data: FloatData,
    /// Rows: the first dimension.
    pub m: usize,
    /// Columns: the product of the other dimensions (`[o, i, kh, kw]` → `i·kh·kw`).
    pub n: usize,
    /// ‖W‖_F² in f64.
    pub norm2: f64,
}

/// Reads tensor `i` of `src` (a selected float tensor with ≥ 1 dimension) as a matrix.
/// `Ok(None)` when it is empty or all zeros: it has no subspace and stays dense
/// ([`cersa_loader::DenseReason::Zero`]). NaN or ±Inf is an error naming the file, the
/// tensor, how many there are and the first one.
pub fn read_matrix(src: &dyn Source, i: usize) -> Result<Option<Matrix>> {
    let meta = &src.tensors()[i];
    let m = meta.shape[0];
    let n: usize = meta.shape[1..].iter().product();
    read_part(src, i, 0, 1, m, n)
}

/// Expert `e` of stacked experts tensor `i` (`[E, m, …]`) as its `[m, n]` matrix, read
/// without the other experts where the format allows. `Ok(None)` when it is all zeros; a
/// non-finite value is an error naming the tensor and its index in the whole tensor.
pub fn read_expert(
    src: &dyn Source,
    i: usize,
    e: usize,
    experts: usize,
    m: usize,
    n: usize,
) -> Result<Option<Matrix>> {
    read_part(src, i, e, experts, m, n)
}

fn read_part(
    src: &dyn Source,
    i: usize,
    part: usize,
    parts: usize,
    m: usize,
    n: usize,
) -> Result<Option<Matrix>> {
    let meta = &src.tensors()[i];
    let data = match parts {
        1 => src.read_float(i)?,
        _ => src.read_float_part(i, part, parts)?,
    };
    if let Some((count, first, index)) = data.non_finite() {
        return Err(ConvertError::NonFinite {
            path: src.file_path(meta.file).to_path_buf(),
            tensor: meta.name.clone(),
            count,
            first,
            index: part * m * n + index,
        });
    }
    let norm2 = match &data {
        FloatData::F32(v) => frobenius2(v),
        FloatData::F64(v) => frobenius2(v),
    };
    if m == 0 || n == 0 || norm2 == 0.0 {
        return Ok(None);
    }
    Ok(Some(Matrix { data, m, n, norm2 }))
}
