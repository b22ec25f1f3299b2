//! The float types the kernels run in.

/// Float types the kernels and routes run in (f32, f64).
pub trait Elem: faer::traits::RealField + Copy + Into<f64> + Send + Sync + 'static {
    /// Rounds an f64 to this type.
    fn of(x: f64) -> Self;
    /// ys += Σ a[c]·x[c] over four columns and returns (a[c]·xs)_c, in `S`'s SIMD vectors.
    fn axpy4_dot4<S: pulp::Simd>(
        simd: S,
        a: [&[Self]; 4],
        x: [Self; 4],
        xs: &[Self],
        ys: &mut [Self],
    ) -> [Self; 4];
}
impl Elem for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn axpy4_dot4<S: pulp::Simd>(
        simd: S,
        a: [&[f32]; 4],
        x: [f32; 4],
        xs: &[f32],
        ys: &mut [f32],
    ) -> [f32; 4] {
        super::kernels::axpy4_dot4_f32(simd, a, x, xs, ys)
    }
}
impl Elem for f64 {
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn axpy4_dot4<S: pulp::Simd>(
        simd: S,
        a: [&[f64]; 4],
        x: [f64; 4],
        xs: &[f64],
        ys: &mut [f64],
    ) -> [f64; 4] {
        super::kernels::axpy4_dot4_f64(simd, a, x, xs, ys)
    }
}
