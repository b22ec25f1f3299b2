//! Whitened (activation-aware) truncation: the best rank-r approximation of W in the
//! metric of the layer's outputs on calibration inputs, ‖(W − Ŵ)·X‖_F, instead of ‖W − Ŵ‖_F.
//!
//! With G = XᵀX the input second moment (docs/calibration.md), λ = δ·trace(G)/d and the
//! Cholesky factor G + λI = L·Lᵀ, ‖D·X‖² + λ‖D‖² = ‖D·L‖² for any D, so truncating
//! A = W·L plainly and mapping its right factor back (Vᵀ = V'ᵀ·L⁻¹) is optimal in the damped
//! output metric (the SVD-LLM construction). Weights stored `[in, out]` (y = x·W) whiten
//! from the left instead: A = Lᵀ·W, U = L⁻ᵀ·U'. Everything here runs in f64 with
//! sequential kernels, so the bits do not depend on the thread count.

use super::{fix_signs, Factorization};
use crate::calibration::{InputAxis, InputStats};
use crate::input::FloatData;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{
    cholesky_in_place, cholesky_in_place_scratch, LltRegularization,
};
use faer::linalg::matmul::triangular::{self as tri, BlockStructure};
use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// The whitening of one weight: L (lower triangular) and the damping λ it includes.
pub struct Whitener {
    l: Mat<f64>,
    lambda: f64,
    axis: InputAxis,
}

impl Whitener {
    /// Factors G + λI with λ = `damping`·trace(G)/d. The reason is an error message when
    /// the statistics cannot whiten (all zero, or not positive definite after damping).
    pub fn new(stats: &InputStats, damping: f64) -> Result<Self, String> {
        let d = stats.dim;
        let g = &stats.g;
        let trace: f64 = (0..d).map(|i| g[i * d + i]).sum();
        if trace <= 0.0 {
            return Err(
                "its calibration statistics are all zero (the layer saw no input); \
                        exclude it from the calibration file or from --include"
                    .into(),
            );
        }
        let lambda = damping * trace / d as f64;
        let mut l = Mat::<f64>::from_fn(d, d, |i, j| {
            if j > i {
                0.0
            } else if i == j {
                g[i * d + i] + lambda
            } else {
                g[i * d + j]
            }
        });
        let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(
            d,
            Par::Seq,
            Default::default(),
        ));
        cholesky_in_place(
            l.as_mut(),
            LltRegularization::default(),
            Par::Seq,
            MemStack::new(&mut mem),
            Default::default(),
        )
        .map_err(|e| {
            format!(
                "G + λI of its calibration statistics is not positive definite ({e:?}; \
                 damping δ = {damping}): raise --calibration-damping"
            )
        })?;
        // The factorization leaves the strict upper triangle as it was (zero here).
        Ok(Whitener {
            l,
            lambda,
            axis: stats.axis,
        })
    }

    /// The weight's axis that meets the input.
    pub fn axis(&self) -> InputAxis {
        self.axis
    }

    /// λ, the absolute damping added to G's diagonal.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The statistics' side an m×n weight needs on its input axis.
    pub fn dim_for(axis: InputAxis, m: usize, n: usize) -> usize {
        match axis {
            InputAxis::Columns => n,
            InputAxis::Rows => m,
        }
    }

    /// A = W·L (input axis 1) or Lᵀ·W (axis 0), row-major m×n.
    pub fn whiten(&self, w: &FloatData, m: usize, n: usize) -> Vec<f64> {
        let w = w.to_f64();
        let mut a = vec![0.0f64; m * n];
        // Row-major m×n buffers are column-major n×m: work on the transposes.
        let wt = MatRef::from_column_major_slice(&w, n, m);
        let at = MatMut::from_column_major_slice_mut(&mut a, n, m);
        match self.axis {
            // Aᵀ = Lᵀ·Wᵀ.
            InputAxis::Columns => tri::matmul(
                at,
                BlockStructure::Rectangular,
                Accum::Replace,
                self.l.transpose(),
                BlockStructure::TriangularUpper,
                wt,
                BlockStructure::Rectangular,
                1.0,
                Par::Seq,
            ),
            // Aᵀ = Wᵀ·L.
            InputAxis::Rows => tri::matmul(
                at,
                BlockStructure::Rectangular,
                Accum::Replace,
                wt,
                BlockStructure::Rectangular,
                self.l.as_ref(),
                BlockStructure::TriangularLower,
                1.0,
                Par::Seq,
            ),
        }
        a
    }

    /// Maps the factors of A back to factors of W (Vᵀ = V'ᵀ·L⁻¹, or U = L⁻ᵀ·U'), in f64,
    /// with the sign rule of formats/cersa-v1.md §4 rule 7 applied again.
    pub fn unwhiten(&self, f: Factorization, m: usize, n: usize) -> Factorization {
        let r = f.rank;
        let mut u = f.u.to_f64().into_owned();
        let mut vt = f.vt.to_f64().into_owned();
        match self.axis {
            // Lᵀ·V = V' with V = (Vᵀ)ᵀ, n×r.
            InputAxis::Columns => solve_upper_triangular_in_place(
                self.l.transpose(),
                MatMut::from_row_major_slice_mut(&mut vt, r, n).transpose_mut(),
                Par::Seq,
            ),
            // Lᵀ·U = U', m×r.
            InputAxis::Rows => solve_upper_triangular_in_place(
                self.l.transpose(),
                MatMut::from_row_major_slice_mut(&mut u, m, r),
                Par::Seq,
            ),
        }
        fix_signs(&mut u, &mut vt, m, r, n);
        Factorization {
            u: u.into(),
            vt: vt.into(),
            ..f
        }
    }

    /// ‖(W − Ŵ)·X‖_F / ‖W·X‖_F for the stored factors (`u` m×r, `s`, `vt` r×n, decoded
    /// to f64) with the undamped G: ‖D·L‖² − λ‖D‖² over ‖A‖² − λ‖W‖², where
    /// `weight_res2` = ‖W − Ŵ‖² and `weight_norm2` = ‖W‖² were measured by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn output_rel_error(
        &self,
        a: &[f64],
        m: usize,
        n: usize,
        u: &[f64],
        s: &[f64],
        vt: &[f64],
        weight_res2: f64,
        weight_norm2: f64,
    ) -> f64 {
        let r = s.len();
        // Whitened stored factors: Û·diag σ·(V̂ᵀ·L), or (Lᵀ·Û)·diag σ·V̂ᵀ.
        let (wu, wvt) = match self.axis {
            InputAxis::Columns => {
                let mut y = vec![0.0f64; r * n];
                // (V̂ᵀ·L)ᵀ = Lᵀ·V̂, n×r; its column-major storage is Y row-major.
                tri::matmul(
                    MatMut::from_column_major_slice_mut(&mut y, n, r),
                    BlockStructure::Rectangular,
                    Accum::Replace,
                    self.l.transpose(),
                    BlockStructure::TriangularUpper,
                    MatRef::from_row_major_slice(vt, r, n).transpose(),
                    BlockStructure::Rectangular,
                    1.0,
                    Par::Seq,
                );
                (std::borrow::Cow::Borrowed(u), std::borrow::Cow::Owned(y))
            }
            InputAxis::Rows => {
                let mut z = vec![0.0f64; m * r];
                tri::matmul(
                    MatMut::from_row_major_slice_mut(&mut z, m, r),
                    BlockStructure::Rectangular,
                    Accum::Replace,
                    self.l.transpose(),
                    BlockStructure::TriangularUpper,
                    MatRef::from_row_major_slice(u, m, r),
                    BlockStructure::Rectangular,
                    1.0,
                    Par::Seq,
                );
                (std::borrow::Cow::Owned(z), std::borrow::Cow::Borrowed(vt))
            }
        };
        // Residual by blocks of rows, in the transposed (column-major) views:
        // Rᵀ[:, blk] = Aᵀ[:, blk] − Ŷᵀ·(Û·diag σ)ᵀ[:, blk].
        let mut us: Vec<f64> = wu.to_vec();
        for row in us.chunks_exact_mut(r.max(1)) {
            row.iter_mut().zip(s).for_each(|(x, &sk)| *x *= sk);
        }
        let yt = MatRef::from_column_major_slice(&wvt, n, r);
        let (mut a_norm2, mut res2) = (0.0f64, 0.0f64);
        const BLOCK: usize = 256;
        let mut i0 = 0;
        while i0 < m {
            let b = BLOCK.min(m - i0);
            let block = &a[i0 * n..(i0 + b) * n];
            a_norm2 += block.iter().map(|x| x * x).sum::<f64>();
            let mut rt = block.to_vec();
            faer::linalg::matmul::matmul(
                MatMut::from_column_major_slice_mut(&mut rt, n, b),
                Accum::Add,
                yt,
                MatRef::from_column_major_slice(&us[i0 * r..(i0 + b) * r], r, b),
                -1.0,
                Par::Seq,
            );
            res2 += rt.iter().map(|x| x * x).sum::<f64>();
            i0 += b;
        }
        let out_res2 = (res2 - self.lambda * weight_res2).max(0.0);
        let out_norm2 = a_norm2 - self.lambda * weight_norm2;
        if out_norm2 > 0.0 {
            (out_res2 / out_norm2).sqrt()
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::rank::RankRule;
    use crate::decompose::Route;

    fn stats(axis: InputAxis, d: usize, t: usize) -> InputStats {
        // G = XᵀX of a deterministic t×d "activation" matrix.
        let x: Vec<f64> = (0..t * d)
            .map(|k| ((k * 7919 % 101) as f64 / 50.0 - 1.0) * (1.0 + (k % d) as f64))
            .collect();
        let mut g = vec![0.0; d * d];
        for row in x.chunks_exact(d) {
            for i in 0..d {
                for j in 0..d {
                    g[i * d + j] += row[i] * row[j];
                }
            }
        }
        InputStats { g, dim: d, axis }
    }

    #[test]
    fn full_rank_whitened_factors_recompose_w_on_both_axes() {
        let (m, n) = (7, 5);
        let w: Vec<f64> = (0..m * n).map(|k| ((k * 31 % 17) as f64) - 8.0).collect();
        for (axis, d) in [(InputAxis::Columns, n), (InputAxis::Rows, m)] {
            let wh = Whitener::new(&stats(axis, d, 40), 0.01).unwrap();
            let a = wh.whiten(&FloatData::F64(w.clone()), m, n);
            let rule = RankRule {
                energy: 1.0,
                ..RankRule::default()
            };
            let f = Route::Svd
                .decomposer()
                .unwrap()
                .factorize(&FloatData::F64(a.clone()), m, n, &rule)
                .unwrap();
            let r = f.rank;
            assert_eq!(r, n);
            let f = wh.unwhiten(f, m, n);
            let (u, vt) = (f.u.to_f64(), f.vt.to_f64());
            for i in 0..m {
                for j in 0..n {
                    let x: f64 = (0..r).map(|k| u[i * r + k] * f.s[k] * vt[k * n + j]).sum();
                    assert!((x - w[i * n + j]).abs() < 1e-9, "{axis:?} [{i}, {j}]");
                }
            }
            // Exact factors have no output error.
            let e = wh.output_rel_error(&a, m, n, &u, &f.s, &vt, 0.0, 1.0);
            assert!(e < 1e-7, "{axis:?}: {e}");
        }
    }

    #[test]
    fn unusable_statistics_are_refused_with_a_reason() {
        let zero = InputStats {
            g: vec![0.0; 9],
            dim: 3,
            axis: InputAxis::Columns,
        };
        assert!(Whitener::new(&zero, 0.01)
            .err()
            .unwrap()
            .contains("all zero"));
        // Rank-deficient G without damping is not positive definite.
        let mut s = stats(InputAxis::Columns, 4, 2);
        assert!(Whitener::new(&s, 0.0)
            .err()
            .unwrap()
            .contains("positive definite"));
        s.g[0] = -1.0;
        assert!(Whitener::new(&s, 0.0).is_err());
    }
}
