//! Small vector kernels with a fixed summation order (same bits whatever the thread count).

use super::Elem;

/// Dot product with eight partial sums in a fixed order (vectorizable, and the same bits on
/// every SIMD level).
#[inline(always)]
pub fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let (ac, ar) = a.split_at(n - n % 8);
    let (bc, br) = b.split_at(n - n % 8);
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// ys += Σ_c a[c]·x[c] over four columns, returning (a[c]·xs)_c, in explicit SIMD
/// vectors of `S` (y is loaded and stored once for the four; partial sums in a fixed order).
/// Explicit types because the plain-Rust loop was not vectorized once inlined into the
/// dispatched kernel (4.6 GFLOP/s, vs 12 for one column and 16–19 for four here, 2048²).
macro_rules! axpy4_dot4_impl {
    ($name:ident, $t:ty, $as_simd:ident, $as_mut_simd:ident, $splat:ident, $add:ident, $mul:ident, $reduce:ident) => {
        #[inline(always)]
        pub fn $name<S: pulp::Simd>(
            simd: S,
            a: [&[$t]; 4],
            x: [$t; 4],
            xs: &[$t],
            ys: &mut [$t],
        ) -> [$t; 4] {
            let n = a[0].len();
            let (a0, a0_t) = S::$as_simd(a[0]);
            let (a1, a1_t) = S::$as_simd(&a[1][..n]);
            let (a2, a2_t) = S::$as_simd(&a[2][..n]);
            let (a3, a3_t) = S::$as_simd(&a[3][..n]);
            let (x_h, x_t) = S::$as_simd(&xs[..n]);
            let (y_h, y_t) = S::$as_mut_simd(&mut ys[..n]);
            let v = [
                simd.$splat(x[0]),
                simd.$splat(x[1]),
                simd.$splat(x[2]),
                simd.$splat(x[3]),
            ];
            let mut s = [simd.$splat(0.0); 4];
            for i in 0..a0.len() {
                let (p0, p1, p2, p3, xv) = (a0[i], a1[i], a2[i], a3[i], x_h[i]);
                let u = simd.$add(
                    simd.$add(simd.$mul(p0, v[0]), simd.$mul(p1, v[1])),
                    simd.$add(simd.$mul(p2, v[2]), simd.$mul(p3, v[3])),
                );
                y_h[i] = simd.$add(y_h[i], u);
                s[0] = simd.$add(s[0], simd.$mul(p0, xv));
                s[1] = simd.$add(s[1], simd.$mul(p1, xv));
                s[2] = simd.$add(s[2], simd.$mul(p2, xv));
                s[3] = simd.$add(s[3], simd.$mul(p3, xv));
            }
            let mut t: [$t; 4] = [0.0; 4];
            for (i, yv) in y_t.iter_mut().enumerate() {
                let (p0, p1, p2, p3, xv) = (a0_t[i], a1_t[i], a2_t[i], a3_t[i], x_t[i]);
                *yv += (p0 * x[0] + p1 * x[1]) + (p2 * x[2] + p3 * x[3]);
                t[0] += p0 * xv;
                t[1] += p1 * xv;
                t[2] += p2 * xv;
                t[3] += p3 * xv;
            }
            [
                simd.$reduce(s[0]) + t[0],
                simd.$reduce(s[1]) + t[1],
                simd.$reduce(s[2]) + t[2],
                simd.$reduce(s[3]) + t[3],
            ]
        }
    };
}
axpy4_dot4_impl!(
    axpy4_dot4_f32,
    f32,
    as_simd_f32s,
    as_mut_simd_f32s,
    splat_f32s,
    add_f32s,
    mul_f32s,
    reduce_sum_f32s
);
axpy4_dot4_impl!(
    axpy4_dot4_f64,
    f64,
    as_simd_f64s,
    as_mut_simd_f64s,
    splat_f64s,
    add_f64s,
    mul_f64s,
    reduce_sum_f64s
);
