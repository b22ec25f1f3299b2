//! Eigenvalues of a symmetric tridiagonal matrix by the root-free QL/QR iteration of Pal,
//! Walker and Kahan (the algorithm of LAPACK's `dsterf`).
//!
//! faer's tridiagonal QR builds a Givens rotation (with its square root and hypot) per
//! step; on all-MiniLM-L6-v2's k = 384 Gram matrices that was 27 % of `cersa inspect`'s
//! time (perf). The root-free variant works on the squared off-diagonals and needs one
//! square root per sweep, not per step. Accuracy is the same kind: absolute error of a few
//! ε·‖T‖ per eigenvalue (backward stable), which is what energies need; the tests compare
//! with faer's QR on random, graded, split, clustered and Wilkinson matrices.

use super::LinalgError;

/// Eigenvalues, non-increasing, of the symmetric tridiagonal matrix with diagonal `d` and
/// off-diagonal `e` (`e.len() + 1 == d.len()`, or both empty).
pub fn eigenvalues(d: &[f64], e: &[f64]) -> Result<Vec<f64>, LinalgError> {
    let n = d.len();
    let mut d = d.to_vec();
    if n <= 1 {
        return Ok(d);
    }
    debug_assert_eq!(e.len() + 1, n);
    if d.iter().chain(e).any(|x| !x.is_finite()) {
        return Err(LinalgError::NonFinite {
            what: "tridiagonal matrix".into(),
        });
    }
    let norm = d.iter().chain(e).fold(0f64, |a, &x| a.max(x.abs()));
    if norm == 0.0 {
        return Ok(d);
    }
    // Scale by a power of two (exact) so the entries are near 1: their squares, which the
    // iteration works with, can then neither overflow nor lose range.
    let scale = (-norm.log2().round()).exp2();
    d.iter_mut().for_each(|x| *x *= scale);
    let e: Vec<f64> = e.iter().map(|x| x * scale).collect();
    let eps = f64::EPSILON / 2.0;
    let mut e2 = vec![0f64; n - 1];
    let mut start = 0;
    while start < n {
        // The unreduced block start..=end ends at the first negligible off-diagonal.
        let mut end = start;
        while end + 1 < n {
            let t = e[end].abs();
            if t == 0.0 || t <= d[end].abs().sqrt() * d[end + 1].abs().sqrt() * eps {
                break;
            }
            end += 1;
        }
        if end > start {
            for i in start..end {
                e2[i] = e[i] * e[i];
            }
            let (db, eb) = (&mut d[start..=end], &mut e2[start..end]);
            // QL chases toward the top, so it takes the end with the larger diagonal last;
            // reversing the block (same eigenvalues) makes QL do LAPACK's QR case.
            if db[db.len() - 1].abs() < db[0].abs() {
                db.reverse();
                eb.reverse();
            }
            ql(db, eb, eps)?;
        }
        start = end + 1;
    }
    d.iter_mut().for_each(|x| *x /= scale);
    d.sort_by(|a, b| b.total_cmp(a));
    Ok(d)
}

/// Root-free implicit QL on an unreduced block: `d` its diagonal, `e2` its squared
/// off-diagonal. Leaves the eigenvalues in `d`.
fn ql(d: &mut [f64], e2: &mut [f64], eps: f64) -> Result<(), LinalgError> {
    let last = d.len() - 1;
    let eps2 = eps * eps;
    let max_sweeps = 30 * d.len();
    let mut sweeps = 0;
    let mut l = 0;
    while l <= last {
        // Find a negligible off-diagonal at or after l.
        let mut m = l;
        while m < last {
            if e2[m].abs() <= eps2 * (d[m] * d[m + 1]).abs() {
                break;
            }
            m += 1;
        }
        if m < last {
            e2[m] = 0.0;
        }
        if m == l {
            l += 1;
            continue;
        }
        if m == l + 1 {
            let (rt1, rt2) = eig2(d[l], e2[l].sqrt(), d[l + 1]);
            d[l] = rt1;
            d[l + 1] = rt2;
            e2[l] = 0.0;
            l += 2;
            continue;
        }
        if sweeps == max_sweeps {
            return Err(LinalgError::NotConverged {
                what: "tridiagonal eigenvalues".into(),
                detail: format!("{max_sweeps} sweeps"),
            });
        }
        sweeps += 1;
        // Wilkinson-type shift from the leading 2×2.
        let p0 = d[l];
        let rte = e2[l].sqrt();
        let mut sigma = (d[l + 1] - p0) / (2.0 * rte);
        let r = sigma.hypot(1.0);
        sigma = p0 - rte / (sigma + if sigma >= 0.0 { r } else { -r });
        let (mut c, mut s) = (1f64, 0f64);
        let mut gamma = d[m] - sigma;
        let mut p = gamma * gamma;
        for i in (l..m).rev() {
            let bb = e2[i];
            let r = p + bb;
            if i + 1 != m {
                e2[i + 1] = s * r;
            }
            let old_c = c;
            c = p / r;
            s = bb / r;
            let old_gamma = gamma;
            let alpha = d[i];
            gamma = c * (alpha - sigma) - s * old_gamma;
            d[i + 1] = old_gamma + (alpha - gamma);
            p = if c != 0.0 {
                gamma * gamma / c
            } else {
                old_c * bb
            };
        }
        e2[l] = s * p;
        d[l] = sigma + gamma;
    }
    Ok(())
}

/// Eigenvalues (larger first by magnitude of the sum's sign, as LAPACK's `dlae2`) of the
/// symmetric 2×2 matrix [[a, b], [b, c]].
fn eig2(a: f64, b: f64, c: f64) -> (f64, f64) {
    let sm = a + c;
    let adf = (a - c).abs();
    let ab = (b + b).abs();
    let (acmx, acmn) = if a.abs() > c.abs() { (a, c) } else { (c, a) };
    let rt = if adf > ab {
        adf * (1.0 + (ab / adf).powi(2)).sqrt()
    } else if adf < ab {
        ab * (1.0 + (adf / ab).powi(2)).sqrt()
    } else {
        ab * std::f64::consts::SQRT_2
    };
    if sm != 0.0 {
        let rt1 = 0.5 * (sm + if sm > 0.0 { rt } else { -rt });
        (rt1, (acmx / rt1) * acmn - (b / rt1) * b)
    } else {
        (0.5 * rt, -0.5 * rt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::rng::Rng;
    use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
    use faer::linalg::evd::tridiagonal_self_adjoint_evd;
    use faer::Par;

    /// faer's tridiagonal QR (non-increasing), the reference.
    fn reference(d: &[f64], e: &[f64]) -> Vec<f64> {
        let n = d.len();
        let dc = faer::Col::<f64>::from_fn(n, |i| d[i]);
        let ec = faer::Col::<f64>::from_fn(n, |i| e.get(i).copied().unwrap_or(0.0));
        let mut s = faer::diag::Diag::<f64>::zeros(n);
        let req = StackReq::all_of(&[faer::linalg::temp_mat_scratch::<f64>(n, 1); 4]);
        let mut mem = MemBuffer::new(req);
        tridiagonal_self_adjoint_evd(
            dc.as_diagonal(),
            ec.as_diagonal(),
            s.as_mut(),
            None,
            Par::Seq,
            MemStack::new(&mut mem),
            Default::default(),
        )
        .expect("faer");
        s.column_vector().iter().rev().copied().collect()
    }

    /// Eigenvalues (non-increasing) by bisection on Sturm counts: slow, but each is found
    /// to about ε·‖T‖ independently of the others.
    fn bisection(d: &[f64], e: &[f64]) -> Vec<f64> {
        let n = d.len();
        let norm = d.iter().chain(e).fold(0f64, |a, x| a.max(x.abs()));
        let bound = 3.0 * norm + f64::MIN_POSITIVE;
        // Number of eigenvalues below x.
        let count = |x: f64| {
            let mut c = 0;
            let mut q = 1.0f64;
            for i in 0..n {
                let off = if i > 0 { e[i - 1] * e[i - 1] / q } else { 0.0 };
                q = d[i] - x - off;
                if q == 0.0 {
                    q = -f64::EPSILON * bound;
                }
                if q < 0.0 {
                    c += 1;
                }
            }
            c
        };
        (0..n)
            .map(|j| {
                // The (n−1−j)-th smallest, i.e. the j-th largest.
                let k = n - 1 - j;
                let (mut lo, mut hi) = (-bound, bound);
                for _ in 0..200 {
                    let mid = 0.5 * (lo + hi);
                    if mid == lo || mid == hi {
                        break;
                    }
                    if count(mid) > k {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                0.5 * (lo + hi)
            })
            .collect()
    }

    fn check(label: &str, d: &[f64], e: &[f64]) {
        check_scaled(label, d, e, 1.0)
    }

    /// The eigenvalues of (d, e)·`scale` against bisection's and faer's of (d, e), times
    /// `scale` (at extreme scales squares of the entries leave f64's range, which this
    /// module's scaling handles and the references do not). Measured worst errors, in
    /// ε·‖T‖: against bisection ≤ 0.33·n (n = 3) down to 0.09·n (n = 513); faer's QR is
    /// itself up to 0.5·n from bisection.
    fn check_scaled(label: &str, d: &[f64], e: &[f64], scale: f64) {
        let n = d.len();
        let bis: Vec<f64> = bisection(d, e).iter().map(|x| x * scale).collect();
        let faer: Vec<f64> = reference(d, e).iter().map(|x| x * scale).collect();
        let d: Vec<f64> = d.iter().map(|x| x * scale).collect();
        let e: Vec<f64> = e.iter().map(|x| x * scale).collect();
        let got = eigenvalues(&d, &e).expect("converges");
        let norm = d.iter().chain(&e).fold(0f64, |a, x| a.max(x.abs()));
        let unit = f64::EPSILON * norm;
        assert_eq!(got.len(), n);
        for (i, ((a, b), f)) in got.iter().zip(&bis).zip(&faer).enumerate() {
            assert!(
                (a - b).abs() <= (n as f64 / 2.0).max(4.0) * unit,
                "{label}: λ{i} {a} vs bisection {b}"
            );
            assert!(
                (a - f).abs() <= 2.0 * n as f64 * unit,
                "{label}: λ{i} {a} vs faer {f}"
            );
        }
    }

    #[test]
    fn matches_faer_on_hard_matrices() {
        let mut rng = Rng::new(3);
        check("empty", &[], &[]);
        check("1×1", &[-2.5], &[]);
        check("2×2", &[1.0, 3.0], &[2.0]);
        check("2×2 equal", &[1.0, 1.0], &[1e-3]);
        check("zeros", &[0.0; 5], &[0.0; 4]);
        check("off-diagonal only", &[0.0; 6], &[1.0; 5]);
        for &n in &[3usize, 10, 64, 65, 200, 513] {
            let d: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let e: Vec<f64> = (0..n - 1).map(|_| rng.normal()).collect();
            check(&format!("random {n}"), &d, &e);
            // Graded both ways (QL vs the reversed, QR-like case).
            let g: Vec<f64> = (0..n)
                .map(|i| 10f64.powf(-(i as f64) * 12.0 / n as f64))
                .collect();
            let ge: Vec<f64> = (0..n - 1).map(|i| g[i + 1] * 0.5).collect();
            check(&format!("graded {n}"), &g, &ge);
            let rg: Vec<f64> = g.iter().rev().copied().collect();
            let rge: Vec<f64> = ge.iter().rev().copied().collect();
            check(&format!("graded reversed {n}"), &rg, &rge);
            // Splits: every fifth off-diagonal exactly zero, others tiny or huge.
            let se: Vec<f64> = (0..n - 1)
                .map(|i| match i % 5 {
                    0 => 0.0,
                    1 => 1e-300,
                    _ => e[i] * 1e3,
                })
                .collect();
            check(&format!("split {n}"), &d, &se);
            // Clustered: many equal diagonal entries, tiny couplings.
            let cd: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
            let ce: Vec<f64> = (0..n - 1).map(|_| 1e-9 * rng.normal()).collect();
            check(&format!("clustered {n}"), &cd, &ce);
            // Glued Wilkinson matrices W⁺ (close eigenvalue pairs).
            let w: Vec<f64> = (0..n).map(|i| ((i % 21) as f64 - 10.0).abs()).collect();
            let we: Vec<f64> = (0..n - 1)
                .map(|i| if i % 21 == 20 { 1e-10 } else { 1.0 })
                .collect();
            check(&format!("wilkinson {n}"), &w, &we);
            // Tiny and huge scales, where squares of the entries leave f64's range.
            check_scaled(&format!("tiny {n}"), &d, &e, 1e-200);
            check_scaled(&format!("huge {n}"), &d, &e, 1e200);
        }
        assert!(eigenvalues(&[1.0, f64::NAN], &[1.0]).is_err());
        assert!(eigenvalues(&[1.0, 2.0], &[f64::INFINITY]).is_err());
    }
}
