//! The `gram` route: eigendecomposition of the Gram matrix on the short side.
//!
//! With X the long×short view of W (X = W when m ≥ n, X = Wᵀ otherwise), G = XᵀX is k×k,
//! k = min(m, n). Its eigenpairs (λᵢ, vᵢ) give σᵢ = √max(λᵢ, 0) and the short-side singular
//! vectors; the long-side ones come from Y = X·V_r, re-orthonormalized by a Householder QR
//! (Y = Q·R, the stored σᵢ are |R_ii|). The QR is needed because the columns of Y are only
//! orthogonal up to ε·σ₁²/(σᵢσⱼ), far above 1e-5 in f32 for a spread spectrum.
//!
//! **Precision rule** (formats/cersa-v1.md §9): f32 inputs first form and decompose G in
//! f32. Eigenvalues of G carry an absolute error of about ε₃₂·k·λ₁, and the energies E(r)
//! were measured to carry up to ~3·ε·√r, so the margin is the larger of
//! `GRAM_SAFETY·ε·k·λ₁/‖W‖²` and `GRAM_SAFETY_SQRT_R·ε·√r`. When the rank decision is
//! within that margin of τ
//! (τ − E(r−1) or E(r) − τ smaller than it), only the rank is in question: the eigenvalues
//! of G accumulated in f64 (no vectors) decide it, and the f32 eigenvectors are kept. When
//! only E(r) is near τ, a cheaper proof comes first: Ky Fan's trace bound from the f32 V_r,
//! in f64 ([`ritz_energy_lower_bound`]), shows E(r) ≥ τ when it reaches τ (on the
//! Llama-shaped benchmark it settled 5 of the 10 uncertain matrices; it cannot show
//! E(r−1) < τ, which needs the eigenvalues). When
//! λ at the cut (f32, or f64 after such a check) is below `CUT_FLOOR·ε·k·λ₁`, its vector is
//! noise and the matrix is redone with G accumulated and decomposed in f64, whose margin is
//! 2⁻²⁹ times smaller. Both constants were chosen from the tests in this module and
//! `decompose::tests` (f32 errors measured against f64 on synthetic spectra).
//!
//! Everything runs with `Par::Seq`, so bits do not depend on the thread count.

use super::rank::{energy_at, frobenius2, RankRule};
use super::{fix_signs, footprint_of, Decomposer, Elem, Factorization, Result, Route};
use crate::input::{FloatData, Precision};
use crate::linalg::{symmetric_eig, twostage, LinalgError};
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::householder;
use faer::linalg::matmul::triangular::{self as tri, BlockStructure};
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::solvers::Solve;
use faer::{Accum, Conj, Mat, MatRef, Par};

/// Multiplier on ε·k·λ₁/‖W‖² giving the energy uncertainty of a Gram pass.
pub const GRAM_SAFETY: f64 = 4.0;
/// Multiplier on ε·√r, the other term of that uncertainty. Measured f32-vs-f64 errors of
/// E(r) at the cut follow √r·ε more than k·λ₁: all-MiniLM-L6-v2 384² matrices 1.8–2.3e-6
/// (≈ 2.7·ε·√r, r ≈ 150), above their 4·ε·k·λ₁/‖W‖² of 1.9–3.4e-6 in places; 2048²
/// power-law matrices 1.4–1.6e-6 (≈ 1.1·ε·√r), far below their 2.7e-5.
pub const GRAM_SAFETY_SQRT_R: f64 = 8.0;
/// λ_r below `CUT_FLOOR·ε·k·λ₁` (the worst-case absolute error of an f32 eigenvalue of G)
/// cannot be told from rounding noise, nor can its eigenvector. 1 rather than a wider
/// margin: on 2048² and 5632×2048 power-law matrices (σ_r/σ₁ ≈ 0.08 at τ = 0.9,
/// λ_r ≈ 50·ε·k·λ₁) the f32 pass gives the f64 rank and a residual equal to the optimum to
/// 7 digits, while a floor of 64 sends them, and typical k = 4096 LLM weights, through a
/// needless f64 pass (2048²: 3.5 s instead of 1.0 s). `spec_noise_floor` pins the value.
pub const CUT_FLOOR: f64 = 1.0;

/// The Gram-eigendecomposition route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gram;

/// Long×short view of the row-major m×n matrix `w`.
pub(crate) fn long_view<T: Elem>(w: &[T], m: usize, n: usize) -> MatRef<'_, T> {
    // Row-major W is column-major Wᵀ (n×m).
    let wt = MatRef::from_column_major_slice(w, n, m);
    if m >= n {
        wt.transpose()
    } else {
        wt
    }
}

/// G = XᵀX (lower triangle only; the upper stays zero).
fn gram_matrix<T: Elem>(x: MatRef<'_, T>) -> Mat<T> {
    let k = x.ncols();
    let mut g = Mat::<T>::zeros(k, k);
    crate::trace::rss("gram: G allocated");
    // Symmetric rank-p update: only the lower triangle is formed (half the flops);
    // the EVD reads only the lower triangle.
    tri::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        T::of(1.0),
        Par::Seq,
    );
    crate::trace::rss("gram: G formed");
    g
}

/// σᵢ = √max(λᵢ, 0), non-increasing.
pub(crate) fn sigma_of(lambda: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = lambda.iter().map(|l| l.max(0.0).sqrt()).collect();
    // Rounding can break the order of the clamped tail by a hair; keep it non-increasing.
    for i in 1..s.len() {
        if s[i] > s[i - 1] {
            s[i] = s[i - 1];
        }
    }
    s
}

/// How far a rank decision taken from Gram eigenvalues computed with unit roundoff `eps`
/// can be trusted (see the module docs for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GramVerdict {
    /// Rank and vectors stand.
    Sound,
    /// E(r) or E(r−1) is within the eigenvalue error of τ: the rank needs f64 eigenvalues,
    /// the vectors at the cut are above the noise floor. `prev_clear`: E(r−1) is clearly
    /// below τ, so only whether E(r) reaches τ is in question (a lower bound can settle
    /// that: [`ritz_energy_lower_bound`]).
    RankUncertain { prev_clear: bool },
    /// λ_r is below the noise floor: its eigenvector cannot be told from rounding noise.
    CutNoisy,
}

/// The [`GramVerdict`] on rank `r` picked from `lambda` (non-increasing eigenvalues of G).
pub fn gram_verdict(
    lambda: &[f64],
    norm2: f64,
    rule: &RankRule,
    r: usize,
    eps: f64,
) -> GramVerdict {
    let k = lambda.len() as f64;
    let l1 = lambda.first().copied().unwrap_or(0.0).max(0.0);
    let noise = eps * k * l1;
    let margin = (GRAM_SAFETY * noise / norm2).max(GRAM_SAFETY_SQRT_R * eps * (r as f64).sqrt());
    let sigma = sigma_of(lambda);
    let e_r = energy_at(&sigma, norm2, r);
    let e_prev = energy_at(&sigma, norm2, r.saturating_sub(1));
    let tau = rule.energy;
    // Only the energy-picked part of the rank is in question; clamps are exact.
    let prev_near = (tau - e_prev).abs() < margin;
    let energy_near = (e_r - tau).abs() < margin || prev_near;
    if cut_is_noisy(lambda, r, noise) {
        GramVerdict::CutNoisy
    } else if energy_near {
        GramVerdict::RankUncertain {
            prev_clear: !prev_near,
        }
    } else {
        GramVerdict::Sound
    }
}

/// Whether λ_r (1-based; none for r = 0) is below `CUT_FLOOR·noise`.
fn cut_is_noisy(lambda: &[f64], r: usize, noise: f64) -> bool {
    let cut = lambda.get(r.saturating_sub(1)).copied().unwrap_or(0.0);
    r > 0 && cut < CUT_FLOOR * noise
}

/// Whether a rank decision taken from Gram eigenvalues computed with unit roundoff `eps`
/// is trustworthy as it stands.
pub fn gram_decision_is_sound(
    lambda: &[f64],
    norm2: f64,
    rule: &RankRule,
    r: usize,
    eps: f64,
) -> bool {
    gram_verdict(lambda, norm2, rule, r, eps) == GramVerdict::Sound
}

/// Orthonormalizes the p×r matrix `y` by a Householder QR: returns (Q p×r, |R_ii|, signs of
/// R_ii), so that y ≈ Q·diag(sign·|R_ii|) up to the dropped off-diagonal of R.
#[allow(clippy::type_complexity)]
pub(crate) fn thin_q<T: Elem>(y: Mat<T>) -> Result<(Mat<T>, Vec<f64>, Vec<bool>)> {
    let (p, r) = (y.nrows(), y.ncols());
    let mut a = y;
    if r == 0 {
        return Ok((Mat::zeros(p, 0), vec![], vec![]));
    }
    let bs = qr::recommended_block_size::<T>(p, r);
    let mut hh = Mat::<T>::zeros(bs, r.min(p));
    let req = StackReq::any_of(&[
        qr::qr_in_place_scratch::<T>(p, r, bs, Par::Seq, Default::default()),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(p, bs, r),
    ]);
    let mut mem = MemBuffer::try_new(req)
        .map_err(|_| LinalgError::alloc(format!("QR workspace ({p}×{r})")))?;
    qr::qr_in_place(
        a.as_mut(),
        hh.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    let diag: Vec<f64> = (0..r).map(|i| a[(i, i)].into()).collect();
    let mut q = Mat::<T>::from_fn(p, r, |i, j| if i == j { T::of(1.0) } else { T::of(0.0) });
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        a.as_ref(),
        hh.as_ref(),
        Conj::No,
        q.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
    );
    Ok((
        q,
        diag.iter().map(|d| d.abs()).collect(),
        diag.iter().map(|d| *d < 0.0).collect(),
    ))
}

/// Truncated factors from the short-side basis `vr` (k×r, orthonormal columns) of the
/// long×short view `x` of the row-major m×n matrix: Y = X·V_r = Q·R, X ≈ Q·diag(|R_ii|)·V_rᵀ
/// (signs folded into Q). Columns are reordered by non-increasing σ, signs fixed (§4.7).
/// Returns (U row-major m×r, σ, Vᵀ row-major r×n) in precision T. Memory: Y becomes the QR
/// storage, which is freed once Q is formed; Q is freed once the long-side factor is copied
/// out, so at most two p×r matrices are alive next to X.
#[allow(clippy::type_complexity)]
pub(crate) fn factors_from_basis<T: Elem>(
    x: MatRef<'_, T>,
    vr: MatRef<'_, T>,
    m: usize,
    n: usize,
) -> Result<(Vec<T>, Vec<f64>, Vec<T>)> {
    let (p, r) = (x.nrows(), vr.ncols());
    let mut y = Mat::<T>::zeros(p, r);
    faer::linalg::matmul::matmul(y.as_mut(), Accum::Replace, x, vr, T::of(1.0), Par::Seq);
    factors_from_y(y, vr, m, n)
}

/// [`factors_from_basis`] from Y = X·V_r already formed (consumed: it becomes the QR
/// storage).
#[allow(clippy::type_complexity)]
fn factors_from_y<T: Elem>(
    y: Mat<T>,
    vr: MatRef<'_, T>,
    m: usize,
    n: usize,
) -> Result<(Vec<T>, Vec<f64>, Vec<T>)> {
    crate::trace::rss("gram: Y = X·V_r");
    let (q, s, neg) = thin_q(y)?;
    crate::trace::rss("gram: Q");
    Ok(factors_from_qr(q.as_ref(), &s, &neg, vr, m, n))
}

/// Assembles U_r, σ_r, V_rᵀ of the row-major m×n matrix from the QR of Y = X·V_r: `q`
/// (p×r), |R_ii| `s`, signs `neg` of R_ii, and the short-side basis `vr` (k×r). Columns are
/// reordered by non-increasing σ and signs fixed (§4.7). (The `cuda` route does the same
/// ordering and negations on the device.)
fn factors_from_qr<T: Elem>(
    q: MatRef<'_, T>,
    s: &[f64],
    neg: &[bool],
    vr: MatRef<'_, T>,
    m: usize,
    n: usize,
) -> (Vec<T>, Vec<f64>, Vec<T>) {
    let r = vr.ncols();
    let mut order: Vec<usize> = (0..r).collect();
    // Stable sort: ties keep basis order, so the result is deterministic.
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    // Long side (p = rows of X) basis is Q·sign (negation is exact), short side is V_r.
    let long = |i: usize, c: usize| -> T {
        let j = order[c];
        if neg[j] {
            let v: f64 = q[(i, j)].into();
            T::of(-v)
        } else {
            q[(i, j)]
        }
    };
    let short = |i: usize, c: usize| -> T { vr[(i, order[c])] };
    crate::trace::rss("gram: before factors");
    let (mut u, mut vt) = if m >= n {
        (row_major(m, r, long), row_major(r, n, |c, j| short(j, c)))
    } else {
        (row_major(m, r, short), row_major(r, n, |c, j| long(j, c)))
    };
    crate::trace::rss("gram: factors");
    let s_sorted: Vec<f64> = order.iter().map(|&j| s[j]).collect();
    fix_signs(&mut u, &mut vt, m, r, n);
    (u, s_sorted, vt)
}

/// A row-major rows×cols matrix with entries `at(i, j)`, filled in 64×64 tiles: the sources
/// are column-major, and a row-by-row fill of a tall factor reads one cache line (and often
/// one page) per entry, seconds on a 32000×762 U.
pub(crate) fn row_major<T: Elem>(
    rows: usize,
    cols: usize,
    at: impl Fn(usize, usize) -> T,
) -> Vec<T> {
    const TILE: usize = 64;
    let mut out = vec![T::of(0.0); rows * cols];
    for i0 in (0..rows).step_by(TILE) {
        let i1 = (i0 + TILE).min(rows);
        for j0 in (0..cols).step_by(TILE) {
            for j in j0..(j0 + TILE).min(cols) {
                for i in i0..i1 {
                    out[i * cols + j] = at(i, j);
                }
            }
        }
    }
    out
}

/// One Gram pass in precision T. Returns `None` when the precision rule asks for f64.
fn factorize_pass<T: Elem>(
    w: &[T],
    m: usize,
    n: usize,
    rule: &RankRule,
    norm2: f64,
    eps: Option<f64>,
) -> Result<Option<Factorization>>
where
    FloatData: From<Vec<T>>,
{
    // Squaring entries under- or overflows f32 outside ~[1e-19, 1e19]: scale by a power of
    // two (exact) so the largest entry is near 1, and scale σ back.
    let amax = w.iter().fold(0f64, |a, &x| {
        let v: f64 = x.into();
        a.max(v.abs())
    });
    let e = if amax > 0.0 { amax.log2().round() } else { 0.0 };
    let scaled: Option<Vec<T>>;
    let (x, unscale) = if e.abs() > 16.0 {
        let f = (-e).exp2();
        scaled = Some(
            w.iter()
                .map(|&v| {
                    let v: f64 = v.into();
                    T::of(v * f)
                })
                .collect(),
        );
        (long_view(scaled.as_deref().unwrap_or(w), m, n), e.exp2())
    } else {
        (long_view(w, m, n), 1.0)
    };
    let eig = symmetric_eig(gram_matrix(x))?;
    let mut lambda = eig.lambda.clone();
    lambda.iter_mut().for_each(|l| *l *= unscale * unscale);
    let mut sigma = sigma_of(&lambda);
    let mut r = rule.rank(&sigma, norm2, m, n);
    let mut vr = None;
    if let Some(eps) = eps {
        match gram_verdict(&lambda, norm2, rule, r, eps) {
            GramVerdict::Sound => {}
            GramVerdict::CutNoisy => return Ok(None),
            GramVerdict::RankUncertain { prev_clear } => {
                if prev_clear {
                    vr = Some(eig.leading_vectors(r)?);
                }
                if ritz_proves_rank(x, vr.as_ref(), unscale, rule.energy * norm2) {
                    crate::trace::rss("gram: rank certified by the Ritz bound");
                } else {
                    // Only the rank is in question: f64 eigenvalues (no vectors, about a third
                    // of a full f64 pass) decide it, and the f32 eigenvectors (any r of them can
                    // still be formed) serve as long as the new cut is above the f32 noise floor.
                    crate::trace::rss("gram: f64 rank check");
                    let mut lambda64 = eigenvalues_f64(x)?;
                    lambda64.iter_mut().for_each(|l| *l *= unscale * unscale);
                    let sigma64 = sigma_of(&lambda64);
                    let r64 = rule.rank(&sigma64, norm2, m, n);
                    let noise = eps * lambda.len() as f64 * lambda[0].max(0.0);
                    if cut_is_noisy(&lambda64, r64, noise) {
                        return Ok(None);
                    }
                    if r64 != r {
                        vr = None;
                    }
                    (sigma, r) = (sigma64, r64);
                }
            }
        }
    }
    let vr = match vr {
        Some(v) => v,
        None => eig.leading_vectors(r)?,
    };
    drop(eig);
    crate::trace::rss("gram: eigenvectors");
    let (u, mut s, vt) = factors_from_basis(x, vr.as_ref(), m, n)?;
    s.iter_mut().for_each(|v| *v *= unscale);
    Ok(Some(Factorization {
        rank: r,
        u: u.into(),
        s,
        vt: vt.into(),
        sigma,
        norm2,
    }))
}

/// Whether the Ky Fan bound from the leading vectors `v` (of the X scaled by 1/`unscale`)
/// proves Σ_{i≤r} λᵢ ≥ `target`: only "does E(r) reach τ" was in question, and two f64
/// products of X with V_r replace an f64 G and its eigenvalues.
fn ritz_proves_rank<T: Elem>(
    x: MatRef<'_, T>,
    v: Option<&Mat<T>>,
    unscale: f64,
    target: f64,
) -> bool {
    v.and_then(|v| ritz_energy_lower_bound(x, v.as_ref()))
        .is_some_and(|b| b * unscale * unscale >= target)
}

/// A lower bound on Σ_{i≤r} λᵢ(XᵀX), r = `v.ncols()`, rigorous up to f64 rounding
/// (relative 1e-12 is taken off): by Ky Fan's principle, trace(P·XᵀX) ≤ Σ_{i≤r} λᵢ for the
/// orthogonal projector P onto span(V), and trace(P·XᵀX) = trace(C⁻¹·M) with C = VᵀV,
/// M = (XV)ᵀ(XV). All in f64 from the widened inputs, over [`WIDEN_BLOCK`] rows of X at a
/// time. With V the f32 eigenvectors, the bound falls short of the sum by second-order
/// terms of their errors, far below the f32 eigenvalue error. `None` when C is not
/// positive definite.
pub(crate) fn ritz_energy_lower_bound<T: Elem>(x: MatRef<'_, T>, v: MatRef<'_, T>) -> Option<f64> {
    let (p, r) = (x.nrows(), v.ncols());
    if r == 0 {
        return Some(0.0);
    }
    let v64 = Mat::<f64>::from_fn(v.nrows(), r, |i, j| v[(i, j)].into());
    let mut c = Mat::<f64>::zeros(r, r);
    faer::linalg::matmul::matmul(
        c.as_mut(),
        Accum::Replace,
        v64.transpose(),
        v64.as_ref(),
        1.0,
        Par::Seq,
    );
    let mut mm = Mat::<f64>::zeros(r, r);
    let mut y = Mat::<f64>::zeros(WIDEN_BLOCK.min(p), r);
    let mut i0 = 0;
    while i0 < p {
        let b = WIDEN_BLOCK.min(p - i0);
        let xb = widened_rows(x, i0, b, 1.0);
        let mut yb = y.as_mut().subrows_mut(0, b);
        faer::linalg::matmul::matmul(
            yb.as_mut(),
            Accum::Replace,
            xb.as_ref(),
            v64.as_ref(),
            1.0,
            Par::Seq,
        );
        faer::linalg::matmul::matmul(
            mm.as_mut(),
            if i0 == 0 { Accum::Replace } else { Accum::Add },
            yb.as_ref().transpose(),
            yb.as_ref(),
            1.0,
            Par::Seq,
        );
        i0 += b;
    }
    let llt = c.llt(faer::Side::Lower).ok()?;
    let q = llt.solve(&mm);
    let trace: f64 = (0..r).map(|i| q[(i, i)]).sum();
    trace.is_finite().then_some(trace * (1.0 - 1e-12))
}

/// Gram factorization of an f32 matrix with the f64 fallback; `force_f64` skips the f32 pass.
pub fn factorize_f32(
    w: &[f32],
    m: usize,
    n: usize,
    rule: &RankRule,
    force_f64: bool,
) -> Result<Factorization> {
    let norm2 = frobenius2(w);
    if !force_f64 {
        if let Some(f) = factorize_pass(w, m, n, rule, norm2, Some(f32::EPSILON as f64 / 2.0))? {
            return Ok(f);
        }
    }
    factorize_widened(w, m, n, rule, norm2)
}

/// Long-side rows of X widened to f64 at a time by [`factorize_widened`]. Fixed, so the
/// accumulation order (and the bits) never depends on the thread count.
pub const WIDEN_BLOCK: usize = 256;

/// The f64 Gram pass of an f32 matrix without an f64 copy of it: G = XᵀX is accumulated
/// and Y = X·V_r formed over blocks of [`WIDEN_BLOCK`] long-side rows widened to f64 (exact),
/// so the extra memory is O(block·k) instead of 2·m·n·4 bytes.
fn factorize_widened(
    w: &[f32],
    m: usize,
    n: usize,
    rule: &RankRule,
    norm2: f64,
) -> Result<Factorization> {
    // The same power-of-two scaling as `factorize_pass` (exact), σ scaled back.
    let e = super::svd::scale_exponent(w);
    let (f, unscale) = ((-e).exp2(), e.exp2());
    let x = long_view(w, m, n);
    let p = x.nrows();
    let g = gram_widened(x, f);
    crate::trace::rss("gram f64: G formed");
    let eig = symmetric_eig(g)?;
    let mut lambda = eig.lambda.clone();
    lambda.iter_mut().for_each(|l| *l *= unscale * unscale);
    let sigma = sigma_of(&lambda);
    let r = rule.rank(&sigma, norm2, m, n);
    let vr = eig.leading_vectors(r)?;
    let vr = vr.as_ref();
    let mut y = Mat::<f64>::zeros(p, r);
    let mut i0 = 0;
    while i0 < p {
        let b = WIDEN_BLOCK.min(p - i0);
        let xb = widened_rows(x, i0, b, f);
        faer::linalg::matmul::matmul(
            y.as_mut().subrows_mut(i0, b),
            Accum::Replace,
            xb.as_ref(),
            vr,
            1.0,
            Par::Seq,
        );
        i0 += b;
    }
    let (u, mut s, vt) = factors_from_y(y, vr, m, n)?;
    s.iter_mut().for_each(|v| *v *= unscale);
    Ok(Factorization {
        rank: r,
        u: u.into(),
        s,
        vt: vt.into(),
        sigma,
        norm2,
    })
}

/// σ of the row-major m×n matrix `w` from a Gram matrix accumulated in f64 (f64 absolute
/// accuracy ≈ √(ε₆₄)·σ₁ ≈ 1e-8·σ₁, finer than an f32 SVD's ε₃₂·σ₁).
pub fn singular_values_f64<T: Elem>(w: &[T], m: usize, n: usize) -> Result<Vec<f64>> {
    Ok(sigma_of(&eigenvalues_f64(long_view(w, m, n))?))
}

/// G = (f·X)ᵀ(f·X) accumulated in f64 (lower triangle) over blocks of [`WIDEN_BLOCK`]
/// long-side rows widened to f64, so the extra memory is O(block·k), not a copy of X. `f`
/// is a power of two (exact).
fn gram_widened<T: Elem>(x: MatRef<'_, T>, f: f64) -> Mat<f64> {
    let (p, k) = (x.nrows(), x.ncols());
    let mut g = Mat::<f64>::zeros(k, k);
    let mut i0 = 0;
    while i0 < p {
        let b = WIDEN_BLOCK.min(p - i0);
        let xb = widened_rows(x, i0, b, f);
        tri::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            if i0 == 0 { Accum::Replace } else { Accum::Add },
            xb.transpose(),
            BlockStructure::Rectangular,
            xb.as_ref(),
            BlockStructure::Rectangular,
            1.0,
            Par::Seq,
        );
        i0 += b;
    }
    g
}

/// Rows i0..i0+b of X widened to f64 and multiplied by `f` (a power of two: exact).
fn widened_rows<T: Elem>(x: MatRef<'_, T>, i0: usize, b: usize, f: f64) -> Mat<f64> {
    Mat::<f64>::from_fn(b, x.ncols(), |i, j| x[(i0 + i, j)].into() * f)
}

/// Eigenvalues (non-increasing) of XᵀX with G accumulated and decomposed in f64.
fn eigenvalues_f64<T: Elem>(x: MatRef<'_, T>) -> Result<Vec<f64>> {
    let g = gram_widened(x, 1.0);
    Ok(if g.nrows() >= twostage::MIN_ORDER {
        twostage::symmetric_eigenvalues(g)?
    } else {
        crate::linalg::symmetric_eigenvalues(g)?
    })
}

impl Decomposer for Gram {
    fn route(&self) -> Route {
        Route::Gram
    }

    /// 5·S + 12·k²·e. The f32 pass needs the input X, G, its eigenvectors and the
    /// eigensolver workspace (measured X + 5.3·k²·4 on 8192×2048). A spectrum whose rank
    /// decision is too close to τ for f32 reruns in f64 (common on power-law spectra): f64
    /// G, eigenvectors and workspace (measured 5.8·k²·8 = 11.6·k²·4), then f64 Y = X·V_r
    /// (becoming the QR storage) and Q, each p×r·8 ≤ 2·S for r ≤ k/2. Measured on an
    /// 8192×2048 f32 power-law matrix that took the rerun: peak 262 MB above the process
    /// baseline (S = 67 MB, k²·4 = 16.8 MB; estimate 537 MB, which also covers ranks up to k).
    fn footprint(&self, m: usize, n: usize, precision: Precision) -> u64 {
        footprint_of(m, n, precision, 12)
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization> {
        match w {
            FloatData::F32(v) => factorize_f32(v, m, n, rule, false),
            FloatData::F64(v) => {
                factorize_pass(v, m, n, rule, frobenius2(v), None).map(|f| f.expect("no check"))
            }
        }
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>> {
        match w {
            FloatData::F32(v) => singular_values_f64(v, m, n),
            FloatData::F64(v) => singular_values_f64(v, m, n),
        }
    }
}
