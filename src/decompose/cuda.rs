//! The `cuda` route (feature `cuda`): the f64 Gram route of `gram` on an NVIDIA GPU.
//!
//! Same algorithm as `gram`'s f64 pass, with the O(p·k²) steps on the device (cuBLAS and
//! cuSOLVER through cudarc): X, the long×short view of W, is uploaded in f64; G = XᵀX
//! (Dsyrk, lower triangle); G = V·Λ·Vᵀ (Dsyevd); σᵢ = √max(λᵢ, 0); the rank comes from the
//! same `RankRule` on the host; Y = X·V_r (Dgemm); Y = Q·R (Dgeqrf + Dorgqr), stored
//! σ = |R_ii|. Column order, signs (§4.7) and layout are done on the host by `gram`'s shared
//! code, so the output follows `gram`'s conventions. There is no f32 first pass: on this
//! hardware f64 is fast, so the precision rule's fallback is the only pass (f64 G, absolute
//! σ error ≈ 1e-8·σ₁). Entries are scaled by a power of two (exact) when the largest is
//! outside 2^±16, as in `gram`, so tiny or huge matrices neither under- nor overflow.
//!
//! **Sharing.** One CUDA context, stream, cuBLAS and cuSOLVER handle per process, created on
//! first use (`OnceLock`) and kept behind a `Mutex`. Converter workers prepare their input
//! (f64 copy, norm) and finish (order, signs, layout) in parallel; the GPU runs one matrix at
//! a time on one stream. For the sizes this route is for (k ≥ 1024) one matrix already fills
//! the device, and one stream keeps the work, and so the bits, independent of thread count.
//!
//! **Determinism.** cuSOLVER runs with `CUSOLVER_DETERMINISTIC_RESULTS`, cuBLAS with its
//! default (atomics not allowed): the same input gives the same bits on the same GPU model and
//! library versions. Bits may differ from `gram` (another BLAS) and across GPUs/libraries.
//!
//! **Libraries** are opened at run time (cudarc `dynamic-loading`, CUDA 13.0 API): the
//! driver's `libcuda.so.1`, and `libcublas.so.13` / `libcusolver.so.12` from a CUDA 13
//! toolkit or the `nvidia-cublas` / `nvidia-cusolver` wheels, found through
//! `LD_LIBRARY_PATH`. A missing library, no device, out-of-memory or a solver failure is an
//! `Err` naming the cause, never a panic (library look-ups are checked before any call, and
//! the GPU section runs under `catch_unwind` in case cudarc panics on a missing symbol).
//!
//! `unsafe` is allowed in the functions that call cuBLAS/cuSOLVER: those are raw FFI calls on
//! device buffers whose sizes are allocated right before from the same dimensions.

use super::gram::{self, factors_from_qr, sigma_of};
use super::rank::{frobenius2, RankRule};
use super::{Decomposer, Factorization};
use crate::input::FloatData;
use cudarc::cublas::{sys as blas, CudaBlas};
use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use faer::MatRef;
use std::sync::{Arc, Mutex, OnceLock};

/// The cuBLAS/cuSOLVER Gram route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cuda;

/// Prefix of every error raised when the GPU cannot be used at all (tests match on it).
pub const UNAVAILABLE: &str = "cuda route unavailable";

/// The process-wide device state.
struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    name: String,
}

static GPU: OnceLock<Result<Mutex<Gpu>, String>> = OnceLock::new();

fn unavailable(why: &str) -> String {
    format!("{UNAVAILABLE}: {why}")
}

/// The shared device state, opened on first use; the error says why there is none.
fn gpu() -> Result<&'static Mutex<Gpu>, String> {
    GPU.get_or_init(|| {
        std::panic::catch_unwind(open_gpu)
            .unwrap_or_else(|_| Err(unavailable("CUDA initialisation panicked")))
            .map(Mutex::new)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Name of the GPU the route runs on, or why it cannot run.
pub fn device_name() -> Result<String, String> {
    let g = gpu()?;
    let g = g.lock().map_err(|_| unavailable("GPU state poisoned"))?;
    Ok(g.name.clone())
}

#[allow(unsafe_code)]
fn open_gpu() -> Result<Gpu, String> {
    // SAFETY (three look-ups): each only tries dlopen on the candidate file names; no symbol
    // is called, so a missing library is reported instead of panicking later.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "the NVIDIA driver library libcuda.so.1 was not found (no NVIDIA driver or GPU here)",
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| unavailable(&format!("no usable CUDA device (driver says {e:?})")))?;
    if count < 1 {
        return Err(unavailable("no CUDA device"));
    }
    let libs = [
        ("cuBLAS (libcublas.so.13)", unsafe {
            cudarc::cublas::sys::is_culib_present()
        }),
        (
            "cuSOLVER (libcusolver.so.12, which needs cuBLASLt and cuSPARSE)",
            unsafe { cudarc::cusolver::sys::is_culib_present() },
        ),
    ];
    for (lib, present) in libs {
        if !present {
            return Err(unavailable(&format!(
                "{lib} was not found; add the CUDA 13 library folder to LD_LIBRARY_PATH"
            )));
        }
    }
    let ctx = CudaContext::new(0).map_err(|e| unavailable(&format!("CUDA context: {e:?}")))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let stream = ctx
        .new_stream()
        .map_err(|e| unavailable(&format!("CUDA stream: {e:?}")))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable(&format!("cuBLAS: {e:?}")))?;
    let solver =
        DnHandle::new(stream.clone()).map_err(|e| unavailable(&format!("cuSOLVER: {e:?}")))?;
    solver
        .set_deterministic_mode(sol::cusolverDeterministicMode_t::CUSOLVER_DETERMINISTIC_RESULTS)
        .map_err(|e| unavailable(&format!("cuSOLVER deterministic mode: {e:?}")))?;
    Ok(Gpu {
        stream,
        blas,
        solver,
        name,
    })
}

/// Host-side input: X's buffer in f64 (row-major W = column-major Wᵀ), scaled by 1/`unscale`.
struct Prepared {
    a: Vec<f64>,
    unscale: f64,
    norm2: f64,
}

fn prepare<T: Copy + Into<f64>>(w: &[T]) -> Prepared {
    let norm2 = frobenius2(w);
    let amax = w.iter().fold(0f64, |a, &x| a.max(x.into().abs()));
    // Same scaling rule as `gram`: a power of two, so it is exact.
    let e = if amax > 0.0 { amax.log2().round() } else { 0.0 };
    let (f, unscale) = if e.abs() > 16.0 {
        ((-e).exp2(), e.exp2())
    } else {
        (1.0, 1.0)
    };
    let a = w.iter().map(|&x| x.into() * f).collect();
    Prepared { a, unscale, norm2 }
}

fn prepare_data(w: &FloatData) -> Prepared {
    match w {
        FloatData::F32(v) => prepare(v),
        FloatData::F64(v) => prepare(v),
    }
}

/// What the device returns: eigenvalues of the scaled G (non-increasing) and, with vectors,
/// V_r (k×r column-major, non-increasing λ), Q (p×r column-major) and R's diagonal.
struct GpuOut {
    lambda: Vec<f64>,
    rank: usize,
    vr: Vec<f64>,
    q: Vec<f64>,
    r_diag: Vec<f64>,
}

fn dim(x: usize, what: &str) -> Result<i32, String> {
    i32::try_from(x).map_err(|_| format!("cuda route: {what} = {x} exceeds the 32-bit API"))
}

fn dev_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            format!("cuda route: out of GPU memory ({what})")
        } else {
            format!("cuda route: {what}: {e:?}")
        }
    }
}

fn ptr<T>(s: &CudaSlice<T>, st: &CudaStream) -> u64 {
    s.device_ptr(st).0
}

fn ptr_mut<T>(s: &mut CudaSlice<T>, st: &CudaStream) -> u64 {
    s.device_ptr_mut(st).0
}

/// Reads cuSOLVER's `info` and turns a non-zero value into an error.
fn check_info(st: &Arc<CudaStream>, info: &CudaSlice<i32>, what: &str) -> Result<(), String> {
    let v = st.clone_dtoh(info).map_err(dev_err(what))?;
    match v.first().copied().unwrap_or(0) {
        0 => Ok(()),
        i if i > 0 => Err(format!("cuda route: {what} did not converge (info = {i})")),
        i => Err(format!(
            "cuda route: {what} rejected argument {} (info = {i})",
            -i
        )),
    }
}

/// Picks the rank from the eigenvalues of the (scaled) Gram matrix, non-increasing.
type RankPicker<'a> = dyn Fn(&[f64]) -> usize + 'a;

/// The Gram route on the device for the m×n matrix whose row-major f64 entries are `a`.
/// Without `pick_rank` only the eigenvalues are computed.
#[allow(unsafe_code)]
fn run_on_gpu(
    g: &Gpu,
    a: &[f64],
    m: usize,
    n: usize,
    pick_rank: Option<&RankPicker>,
) -> Result<GpuOut, String> {
    let (p, k) = (m.max(n), m.min(n));
    let (ni, pi, ki) = (dim(n, "n")?, dim(p, "p")?, dim(k, "k")?);
    let st = &g.stream;
    st.context()
        .bind_to_thread()
        .map_err(dev_err("binding the context"))?;
    let hb = *g.blas.handle();
    let hs = g.solver.cu();
    let ok_b = |s: blas::cublasStatus_t, what: &str| {
        if s == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(format!("cuda route: {what} failed: {s:?}"))
        }
    };
    let ok_s = |s: sol::cusolverStatus_t, what: &str| {
        if s == sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(format!("cuda route: {what} failed: {s:?}"))
        }
    };

    // The buffer is column-major Wᵀ (n×m, leading dimension n). X = W = bufferᵀ when m ≥ n,
    // X = Wᵀ = buffer otherwise.
    let d_a = st.clone_htod(a).map_err(dev_err("uploading W"))?;
    let mut d_g = st
        .alloc_zeros::<f64>(k * k)
        .map_err(dev_err("Gram matrix"))?;
    let x_is_buf_t = m >= n;
    let (trans, inner) = if x_is_buf_t {
        (blas::cublasOperation_t::CUBLAS_OP_N, dim(m, "m")?) // G = A·Aᵀ
    } else {
        (blas::cublasOperation_t::CUBLAS_OP_T, ni) // G = Aᵀ·A
    };
    let (one, zero) = (1.0f64, 0.0f64);
    let pa = ptr(&d_a, st) as *const f64;
    let pg = ptr_mut(&mut d_g, st) as *mut f64;
    // SAFETY: A holds n·m f64 (lda = n), G holds k·k (ldc = k); both live until after the
    // stream is synchronized below (they are dropped at the end of this function).
    ok_b(
        unsafe {
            blas::cublasDsyrk_v2(
                hb,
                blas::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                trans,
                ki,
                inner,
                &one,
                pa,
                ni,
                &zero,
                pg,
                ki,
            )
        },
        "cublasDsyrk (G = XᵀX)",
    )?;

    let jobz = if pick_rank.is_some() {
        sol::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR
    } else {
        sol::cusolverEigMode_t::CUSOLVER_EIG_MODE_NOVECTOR
    };
    let lower = sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let mut d_w = st.alloc_zeros::<f64>(k).map_err(dev_err("eigenvalues"))?;
    let mut d_info = st.alloc_zeros::<i32>(1).map_err(dev_err("info"))?;
    let pw = ptr_mut(&mut d_w, st) as *mut f64;
    let pinfo = ptr_mut(&mut d_info, st) as *mut i32;
    let mut lwork: i32 = 0;
    // SAFETY: G is k×k (lda = k), W holds k values; the call only writes `lwork`.
    ok_s(
        unsafe { sol::cusolverDnDsyevd_bufferSize(hs, jobz, lower, ki, pg, ki, pw, &mut lwork) },
        "cusolverDnDsyevd_bufferSize",
    )?;
    let mut d_work = st
        .alloc_zeros::<f64>(usize::try_from(lwork).unwrap_or(0).max(1))
        .map_err(dev_err("eigensolver workspace"))?;
    let pwork = ptr_mut(&mut d_work, st) as *mut f64;
    // SAFETY: buffers as above, workspace of `lwork` f64 as cuSOLVER asked.
    ok_s(
        unsafe { sol::cusolverDnDsyevd(hs, jobz, lower, ki, pg, ki, pw, pwork, lwork, pinfo) },
        "cusolverDnDsyevd",
    )?;
    check_info(st, &d_info, "cusolverDnDsyevd")?;
    // cuSOLVER returns non-decreasing eigenvalues; reverse to non-increasing.
    let mut lambda = st.clone_dtoh(&d_w).map_err(dev_err("eigenvalues"))?;
    lambda.reverse();
    let Some(pick_rank) = pick_rank else {
        return Ok(GpuOut {
            lambda,
            rank: 0,
            vr: vec![],
            q: vec![],
            r_diag: vec![],
        });
    };
    let r = pick_rank(&lambda).clamp(1, k);
    let ri = dim(r, "rank")?;

    // V_r (non-increasing λ) = the last r eigenvector columns, in reverse order. The
    // reversal is done on the host, where V_r is needed anyway, so the QR sees Y's columns in
    // the same order as `gram`'s.
    let tail = st
        .clone_dtoh(&d_g.slice((k - r) * k..))
        .map_err(dev_err("eigenvectors"))?;
    let mut vr = vec![0f64; k * r];
    for c in 0..r {
        let src = (r - 1 - c) * k;
        vr[c * k..(c + 1) * k].copy_from_slice(&tail[src..src + k]);
    }
    let d_v = st.clone_htod(&vr).map_err(dev_err("uploading V_r"))?;
    let mut d_y = st.alloc_zeros::<f64>(p * r).map_err(dev_err("Y = X·V_r"))?;
    let pv = ptr(&d_v, st) as *const f64;
    let py = ptr_mut(&mut d_y, st) as *mut f64;
    let ta = if x_is_buf_t {
        blas::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N
    };
    // SAFETY: Y (p×r, ldc = p) = op(A) (p×k, lda = n) · V_r (k×r, ldb = k); sizes as allocated.
    ok_b(
        unsafe {
            blas::cublasDgemm_v2(
                hb,
                ta,
                blas::cublasOperation_t::CUBLAS_OP_N,
                pi,
                ri,
                ki,
                &one,
                pa,
                ni,
                pv,
                ki,
                &zero,
                py,
                pi,
            )
        },
        "cublasDgemm (Y = X·V_r)",
    )?;

    let mut d_tau = st.alloc_zeros::<f64>(r).map_err(dev_err("QR τ"))?;
    let ptau = ptr_mut(&mut d_tau, st) as *mut f64;
    let (mut lw_qr, mut lw_q) = (0i32, 0i32);
    // SAFETY: Y is p×r (lda = p), τ holds r values; these calls only write the sizes.
    ok_s(
        unsafe { sol::cusolverDnDgeqrf_bufferSize(hs, pi, ri, py, pi, &mut lw_qr) },
        "cusolverDnDgeqrf_bufferSize",
    )?;
    ok_s(
        unsafe { sol::cusolverDnDorgqr_bufferSize(hs, pi, ri, ri, py, pi, ptau, &mut lw_q) },
        "cusolverDnDorgqr_bufferSize",
    )?;
    let lw = lw_qr.max(lw_q).max(1);
    let mut d_qwork = st
        .alloc_zeros::<f64>(usize::try_from(lw).unwrap_or(1))
        .map_err(dev_err("QR workspace"))?;
    let pqw = ptr_mut(&mut d_qwork, st) as *mut f64;
    // SAFETY: as above, with a workspace of `lw` ≥ both requested sizes.
    ok_s(
        unsafe { sol::cusolverDnDgeqrf(hs, pi, ri, py, pi, ptau, pqw, lw, pinfo) },
        "cusolverDnDgeqrf",
    )?;
    check_info(st, &d_info, "cusolverDnDgeqrf")?;
    let mut d_diag = st.alloc_zeros::<f64>(r).map_err(dev_err("diag(R)"))?;
    let pdiag = ptr_mut(&mut d_diag, st) as *mut f64;
    // SAFETY: R_ii sits at Y[i·(p+1)], i < r ≤ p; the copy writes r values to d_diag.
    ok_b(
        unsafe { blas::cublasDcopy_v2(hb, ri, py, pi + 1, pdiag, 1) },
        "cublasDcopy (diag R)",
    )?;
    // SAFETY: as for geqrf; overwrites Y with Q's first r columns.
    ok_s(
        unsafe { sol::cusolverDnDorgqr(hs, pi, ri, ri, py, pi, ptau, pqw, lw, pinfo) },
        "cusolverDnDorgqr",
    )?;
    check_info(st, &d_info, "cusolverDnDorgqr")?;
    let r_diag = st.clone_dtoh(&d_diag).map_err(dev_err("diag(R)"))?;
    let q = st.clone_dtoh(&d_y).map_err(dev_err("Q"))?;
    st.synchronize().map_err(dev_err("synchronize"))?;
    st.context().check_err().map_err(dev_err("device"))?;
    Ok(GpuOut {
        lambda,
        rank: r,
        vr,
        q,
        r_diag,
    })
}

/// Runs `f` on the shared device, turning a poisoned lock or a panic into an error.
fn with_gpu<R>(f: impl FnOnce(&Gpu) -> Result<R, String>) -> Result<R, String> {
    let g = gpu()?;
    let guard = g
        .lock()
        .map_err(|_| "cuda route: GPU state poisoned by an earlier failure".to_string())?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&guard)))
        .unwrap_or_else(|_| Err("cuda route: the CUDA library call panicked".into()))
}

/// Eigenvalues of the scaled G → σ of W (non-increasing).
fn unscaled_sigma(lambda: &[f64], unscale: f64) -> Vec<f64> {
    let l: Vec<f64> = lambda.iter().map(|x| x * unscale * unscale).collect();
    sigma_of(&l)
}

impl Decomposer for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization, String> {
        if m == 0 || n == 0 {
            // Nothing to offload; keep the CPU route's handling of empty matrices.
            return gram::Gram.factorize(w, m, n, rule);
        }
        let prep = prepare_data(w);
        let (norm2, unscale) = (prep.norm2, prep.unscale);
        let pick = |lambda: &[f64]| rule.rank(&unscaled_sigma(lambda, unscale), norm2, m, n);
        let out = with_gpu(|g| run_on_gpu(g, &prep.a, m, n, Some(&pick)))?;
        drop(prep);
        let (p, k, r) = (m.max(n), m.min(n), out.rank);
        let q = MatRef::from_column_major_slice(&out.q, p, r);
        let vr = MatRef::from_column_major_slice(&out.vr, k, r);
        let s_abs: Vec<f64> = out.r_diag.iter().map(|d| d.abs()).collect();
        let neg: Vec<bool> = out.r_diag.iter().map(|d| *d < 0.0).collect();
        let (u, mut s, vt) = factors_from_qr(q, &s_abs, &neg, vr, m, n);
        s.iter_mut().for_each(|v| *v *= unscale);
        Ok(Factorization {
            rank: r,
            u: u.into(),
            s,
            vt: vt.into(),
            sigma: unscaled_sigma(&out.lambda, unscale),
            norm2,
        })
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>, String> {
        if m == 0 || n == 0 {
            return gram::Gram.singular_values(w, m, n);
        }
        let prep = prepare_data(w);
        let out = with_gpu(|g| run_on_gpu(g, &prep.a, m, n, None))?;
        Ok(unscaled_sigma(&out.lambda, prep.unscale))
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
