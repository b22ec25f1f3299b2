//! `verify --calibration`: the output-space error of whitened factors, recomputed from the
//! calibration statistics directly, ‖(W − Ŵ)·X‖_F² = tr(D·G·Dᵀ) with D = W − Ŵ and the
//! undamped G = XᵀX. The converter measures the same number another way (through the
//! Cholesky factor of the damped G, minus the damping's share), so agreement checks both.

use crate::calibration::{InputAxis, InputStats};
use crate::input::FloatData;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// Rows of W handled at once: bounds the working memory to a few blocks of n values.
const BLOCK_ROWS: usize = 128;

/// ‖(W − Ŵ)·X‖_F / ‖W·X‖_F in f64 for W (row-major m×n) and Ŵ = U·diag(s)·Vᵀ (`u` m×r,
/// `vt` r×n), with `stats` the second moment of the inputs on the axis it names. `None`
/// when the shapes disagree; 0 when ‖W·X‖ is 0.
pub fn output_relative_error(
    w: &FloatData,
    m: usize,
    n: usize,
    u: &[f64],
    s: &[f64],
    vt: &[f64],
    stats: &InputStats,
) -> Option<f64> {
    let r = s.len();
    if w.len() != m.checked_mul(n)? || u.len() != m.checked_mul(r)? || vt.len() != r * n {
        return None;
    }
    match stats.axis {
        // y = W·x: tr(D·G·Dᵀ) with G n×n.
        InputAxis::Columns if stats.dim == n => Some(row_metric(
            |i, row| copy_row(w, n, i, row),
            m,
            n,
            u,
            s,
            vt,
            &stats.g,
        )),
        // y = x·W (W stored [in, out]): tr(Dᵀ·G·D) = the same sum over Dᵀ (n×m), whose
        // factors are V (n×r) and Uᵀ (r×m).
        InputAxis::Rows if stats.dim == m => {
            let v: Vec<f64> = (0..n)
                .flat_map(|j| (0..r).map(move |k| (j, k)))
                .map(|(j, k)| vt[k * n + j])
                .collect();
            let ut: Vec<f64> = (0..r)
                .flat_map(|k| (0..m).map(move |i| (k, i)))
                .map(|(k, i)| u[i * r + k])
                .collect();
            Some(row_metric(
                |j, row| {
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = value(w, i * n + j);
                    }
                },
                n,
                m,
                &v,
                s,
                &ut,
                &stats.g,
            ))
        }
        _ => None,
    }
}

fn value(w: &FloatData, k: usize) -> f64 {
    match w {
        FloatData::F32(v) => v[k].into(),
        FloatData::F64(v) => v[k],
    }
}

fn copy_row(w: &FloatData, n: usize, i: usize, row: &mut [f64]) {
    match w {
        FloatData::F32(v) => row
            .iter_mut()
            .zip(&v[i * n..(i + 1) * n])
            .for_each(|(o, &x)| *o = x.into()),
        FloatData::F64(v) => row.copy_from_slice(&v[i * n..(i + 1) * n]),
    }
}

/// √(tr(D·G·Dᵀ) / tr(W·G·Wᵀ)) for a p×q matrix W given row by row (`row(i, out)`),
/// D = W − U·diag(s)·Vᵀ and G q×q, by blocks of rows.
fn row_metric(
    row: impl Fn(usize, &mut [f64]),
    p: usize,
    q: usize,
    u: &[f64],
    s: &[f64],
    vt: &[f64],
    g: &[f64],
) -> f64 {
    let r = s.len();
    let g = MatRef::from_row_major_slice(g, q, q);
    let vt = MatRef::from_row_major_slice(vt, r, q);
    let (mut res2, mut norm2) = (0.0f64, 0.0f64);
    let mut i0 = 0;
    while i0 < p {
        let b = BLOCK_ROWS.min(p - i0);
        let mut wb = vec![0.0f64; b * q];
        for (k, chunk) in wb.chunks_exact_mut(q).enumerate() {
            row(i0 + k, chunk);
        }
        let us: Vec<f64> = u[i0 * r..(i0 + b) * r]
            .chunks_exact(r.max(1))
            .flat_map(|ur| ur.iter().zip(s).map(|(x, &sk)| x * sk))
            .collect();
        // D = W − (U·diag s)·Vᵀ for this block.
        let mut d = wb.clone();
        if r > 0 {
            matmul(
                MatMut::from_row_major_slice_mut(&mut d, b, q),
                Accum::Add,
                MatRef::from_row_major_slice(&us, b, r),
                vt,
                -1.0,
                Par::Seq,
            );
        }
        norm2 += quadratic_sum(&wb, b, q, g);
        res2 += quadratic_sum(&d, b, q, g);
        i0 += b;
    }
    if norm2 <= 0.0 {
        return 0.0;
    }
    (res2.max(0.0) / norm2).sqrt()
}

/// Σᵢ xᵢ·G·xᵢᵀ over the rows of X (b×q).
fn quadratic_sum(x: &[f64], b: usize, q: usize, g: MatRef<'_, f64>) -> f64 {
    let mut xg = vec![0.0f64; b * q];
    matmul(
        MatMut::from_row_major_slice_mut(&mut xg, b, q),
        Accum::Replace,
        MatRef::from_row_major_slice(x, b, q),
        g,
        1.0,
        Par::Seq,
    );
    x.iter().zip(&xg).map(|(a, c)| a * c).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ‖(W − Ŵ)X‖/‖WX‖ from explicit inputs X, the definition itself.
    fn by_definition(w: &[f64], what: &[f64], x: &[f64], m: usize, n: usize, t: usize) -> f64 {
        let (mut res, mut norm) = (0.0, 0.0);
        for i in 0..m {
            for c in 0..t {
                let (mut y, mut yh) = (0.0, 0.0);
                for j in 0..n {
                    y += w[i * n + j] * x[c * n + j];
                    yh += what[i * n + j] * x[c * n + j];
                }
                res += (y - yh) * (y - yh);
                norm += y * y;
            }
        }
        (res / norm).sqrt()
    }

    #[test]
    fn equals_the_definition_on_both_axes() {
        let (m, n, r, t) = (7usize, 5usize, 2usize, 11usize);
        let f = |k: usize| (k as f64 * 0.7).sin() + 0.3 * (k as f64 * 1.9).cos();
        let w: Vec<f64> = (0..m * n).map(f).collect();
        let u: Vec<f64> = (0..m * r).map(|k| f(k + 100)).collect();
        let s = vec![1.5, 0.4];
        let vt: Vec<f64> = (0..r * n).map(|k| f(k + 200)).collect();
        let mut what = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                what[i * n + j] = (0..r).map(|k| u[i * r + k] * s[k] * vt[k * n + j]).sum();
            }
        }
        // Inputs of width n (columns axis) and of width m (rows axis, W stored [in, out]).
        let xn: Vec<f64> = (0..t * n).map(|k| f(k + 300)).collect();
        let gram = |x: &[f64], d: usize| -> Vec<f64> {
            let mut g = vec![0.0; d * d];
            for c in 0..t {
                for a in 0..d {
                    for b in 0..d {
                        g[a * d + b] += x[c * d + a] * x[c * d + b];
                    }
                }
            }
            g
        };
        let stats = InputStats {
            g: gram(&xn, n),
            dim: n,
            axis: InputAxis::Columns,
        };
        let got = output_relative_error(&FloatData::F64(w.clone()), m, n, &u, &s, &vt, &stats);
        let want = by_definition(&w, &what, &xn, m, n, t);
        assert!((got.unwrap() - want).abs() < 1e-12, "{got:?} vs {want}");

        // Rows axis: y = x·W, i.e. Wᵀ·x; the definition on the transposes.
        let xm: Vec<f64> = (0..t * m).map(|k| f(k + 400)).collect();
        let tr = |a: &[f64]| -> Vec<f64> {
            (0..n)
                .flat_map(|j| (0..m).map(move |i| (i, j)))
                .map(|(i, j)| a[i * n + j])
                .collect()
        };
        let stats = InputStats {
            g: gram(&xm, m),
            dim: m,
            axis: InputAxis::Rows,
        };
        let got = output_relative_error(&FloatData::F64(w.clone()), m, n, &u, &s, &vt, &stats);
        let want = by_definition(&tr(&w), &tr(&what), &xm, n, m, t);
        assert!((got.unwrap() - want).abs() < 1e-12, "{got:?} vs {want}");

        // A statistic of the wrong size is no answer, not a panic.
        let stats = InputStats {
            g: vec![1.0; 9],
            dim: 3,
            axis: InputAxis::Columns,
        };
        assert_eq!(
            output_relative_error(&FloatData::F64(w), m, n, &u, &s, &vt, &stats),
            None
        );
    }
}
