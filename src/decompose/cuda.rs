//! The `cuda` route (feature `cuda`): the f64 Gram route of `gram` on an NVIDIA GPU.
//!
//! Same algorithm as `gram`'s f64 pass, with the O(p·k²) steps on the device (cuBLAS and
//! cuSOLVER through cudarc): X, the long×short view of W, is uploaded in f64; G = XᵀX
//! (Dsyrk, lower triangle); G = V·Λ·Vᵀ (Dsyevd); σᵢ = √max(λᵢ, 0); the rank comes from the
//! same `RankRule` on the host; Y = X·V_r (Dgemm); Y = Q·R (Dgeqrf + Dorgqr), stored
//! σ = |R_ii|. Column order (non-increasing σ), signs of R and the long factor's layout are
//! applied on the device by copies and exact negations (cuBLAS Dcopy with a stride, Dscal by
//! −1), so U or Vᵀ comes back in its final row-major form; the short factor (k×r) and §4.7's
//! sign rule are done on the host. The result has the same bits as assembling on the host
//! (checked by whole-convert hashes on the H100). There is no f32 first pass: on this
//! hardware f64 is fast, so the precision rule's fallback is the only pass (f64 G, absolute
//! σ error ≈ 1e-8·σ₁). Entries are scaled by a power of two (exact) when the largest is
//! outside 2^±16, as in `gram`, so tiny or huge matrices neither under- nor overflow.
//!
//! **Data path.** W is converted to f64 chunk by chunk into a 16 MiB page-locked staging
//! buffer and uploaded from there, measuring ‖W‖_F² and max |w| in the same pass; no f64 copy
//! of W exists on the host. (On the H100 host, allocating and filling that copy, then laying
//! out U on the host, took 0.8 s of a 32000×2048 matrix's 1.2 s.) `CERSA_TRACE_CUDA=1`
//! prints each phase's time to stderr.
//!
//! **Sharing.** One CUDA context, stream, cuBLAS and cuSOLVER handle per process, created on
//! first use (`OnceLock`) and kept behind a `Mutex`. Converter workers read and decode their
//! input and finish (short factor, signs) in parallel; the GPU runs one matrix at a time on
//! one stream. For the sizes this route is for (k ≥ 1024) one matrix already fills the
//! device, and one stream keeps the work, and so the bits, independent of thread count.
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

use super::gram::{self, row_major, sigma_of};
use super::rank::RankRule;
use super::{fix_signs, footprint_of, DecomposeError, Decomposer, Factorization, Result, Route};
use crate::input::{FloatData, Precision};
use cudarc::cublas::{sys as blas, CudaBlas};
use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
};
use std::sync::{Arc, Mutex, OnceLock};

/// The cuBLAS/cuSOLVER Gram route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cuda;

/// Prefix of the message of every error raised when the GPU cannot be used at all
/// ([`DecomposeError::Unavailable`] for [`Route::Cuda`]).
pub const UNAVAILABLE: &str = "cuda route unavailable";

/// The process-wide device state.
struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    name: String,
    /// Page-locked staging buffer for uploads: W is converted to f64 into it chunk by chunk,
    /// so no f64 copy of W is ever allocated on the host (on the H100 host, allocating and
    /// filling that copy took 0.42 s of a 32000×2048 matrix's 1.2 s).
    staging: PinnedHostSlice<f64>,
}

/// f64 entries per staging chunk (16 MiB).
const STAGING: usize = 1 << 21;

/// The device state, or why there is none.
static GPU: OnceLock<Result<Mutex<Gpu>>> = OnceLock::new();

fn unavailable(why: &str) -> DecomposeError {
    DecomposeError::Unavailable {
        route: Route::Cuda,
        reason: why.to_string(),
    }
}

/// A failed device or library call (`detail` names the call and what it reported).
fn backend(detail: String) -> DecomposeError {
    DecomposeError::Backend {
        route: Route::Cuda,
        detail,
    }
}

/// The shared device state, opened on first use; the error says why there is none.
fn gpu() -> Result<&'static Mutex<Gpu>> {
    GPU.get_or_init(|| {
        std::panic::catch_unwind(open_gpu)
            .unwrap_or_else(|_| Err(unavailable("CUDA initialisation panicked")))
            .map(Mutex::new)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Name of the GPU the route runs on, or why it cannot run.
pub fn device_name() -> Result<String> {
    let g = gpu()?;
    let g = g.lock().map_err(|_| unavailable("GPU state poisoned"))?;
    Ok(g.name.clone())
}

#[allow(unsafe_code)]
fn open_gpu() -> Result<Gpu> {
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
    // SAFETY: the buffer is written before it is read (upload_scaled fills each chunk before
    // copying it). Write-combined memory suits it: the host only writes, the device reads.
    let staging = unsafe { ctx.alloc_pinned::<f64>(STAGING) }
        .map_err(|e| unavailable(&format!("page-locked staging buffer: {e:?}")))?;
    Ok(Gpu {
        stream,
        blas,
        solver,
        name,
        staging,
    })
}

/// How W was scaled for the device (σ × `unscale` undoes it), and ‖W‖_F² (f64, summed as
/// `rank::frobenius2` sums).
#[derive(Clone, Copy)]
struct Scale {
    unscale: f64,
    norm2: f64,
}

/// Converts W's row-major entries × `f` to f64 and uploads them through the page-locked
/// staging buffer, measuring ‖W‖_F² and max |w| on the way (one pass over W).
fn upload_scaled<T: Copy + Into<f64>>(
    g: &mut Gpu,
    w: &[T],
    f: f64,
) -> Result<(CudaSlice<f64>, f64, f64), String> {
    // frobenius2's order: sums of 4096-entry blocks, added in sequence (STAGING is a multiple
    // of 4096, so the blocks are the same).
    const BLOCK: usize = 4096;
    const _: () = assert!(STAGING.is_multiple_of(BLOCK));
    let st = g.stream.clone();
    let mut d_a = st
        .alloc_zeros::<f64>(w.len())
        .map_err(dev_err("uploading W"))?;
    let buf = g
        .staging
        .as_mut_slice()
        .map_err(dev_err("staging buffer"))?;
    let (mut norm2, mut amax) = (0f64, 0f64);
    for (i, chunk) in w.chunks(STAGING).enumerate() {
        let off = i * STAGING;
        let dst = &mut buf[..chunk.len()];
        for (d, b) in dst.chunks_mut(BLOCK).zip(chunk.chunks(BLOCK)) {
            let mut sum = 0f64;
            for (d, &x) in d.iter_mut().zip(b) {
                let v: f64 = x.into();
                sum += v * v;
                amax = amax.max(v.abs());
                *d = v * f;
            }
            norm2 += sum;
        }
        st.memcpy_htod(&*dst, &mut d_a.slice_mut(off..off + chunk.len()))
            .map_err(dev_err("uploading W"))?;
        // A copy from page-locked memory is asynchronous: wait before the buffer is refilled.
        st.synchronize().map_err(dev_err("uploading W"))?;
    }
    Ok((d_a, norm2, amax))
}

/// Uploads W as f64, scaled by a power of two (exact) when its largest entry is outside
/// 2^±16, as in `gram`, so that squaring neither under- nor overflows. The scaling needs
/// max |w|, known after the first pass: in that (rare) case W is uploaded a second time.
fn upload(g: &mut Gpu, w: &FloatData) -> Result<(CudaSlice<f64>, Scale), String> {
    let pass = |g: &mut Gpu, f| match w {
        FloatData::F32(v) => upload_scaled(g, v, f),
        FloatData::F64(v) => upload_scaled(g, v, f),
    };
    let (d_a, norm2, amax) = pass(g, 1.0)?;
    let e = if amax > 0.0 { amax.log2().round() } else { 0.0 };
    if e.abs() <= 16.0 {
        return Ok((
            d_a,
            Scale {
                unscale: 1.0,
                norm2,
            },
        ));
    }
    drop(d_a);
    let (f, unscale) = ((-e).exp2(), e.exp2());
    let (d_a, _, _) = pass(g, f)?;
    Ok((d_a, Scale { unscale, norm2 }))
}

/// What the device returns: eigenvalues of the scaled G (non-increasing) and, with vectors,
/// V_r (k×r column-major, non-increasing λ), R's diagonal, the column order (non-increasing
/// |R_ii|, stable) and the long-side factor in its final layout: Q's columns in that order,
/// negated where R_ii < 0, as row-major U (m ≥ n) or row-major Vᵀ (m < n).
struct GpuOut {
    scale: Scale,
    lambda: Vec<f64>,
    rank: usize,
    vr: Vec<f64>,
    r_diag: Vec<f64>,
    order: Vec<usize>,
    long: Vec<f64>,
}

fn dim(x: usize, what: &str) -> Result<i32, String> {
    i32::try_from(x).map_err(|_| format!("{what} = {x} exceeds the 32-bit API"))
}

fn dev_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            format!("out of GPU memory ({what})")
        } else {
            format!("{what}: {e:?}")
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
        i if i > 0 => Err(format!("{what} did not converge (info = {i})")),
        i => Err(format!("{what} rejected argument {} (info = {i})", -i)),
    }
}

/// With `CERSA_TRACE_CUDA` set, prints `cersa-cuda M×N PHASE: SECONDS` to stderr per phase
/// (synchronizing the stream at each mark, so the phases add up to the wall time); costs one
/// env lookup otherwise. For finding where a matrix's time goes (host or device).
struct Trace {
    on: bool,
    shape: String,
    t: std::time::Instant,
}

impl Trace {
    fn new(m: usize, n: usize) -> Self {
        Trace {
            on: crate::trace::cuda_phases(),
            shape: format!("{m}×{n}"),
            t: std::time::Instant::now(),
        }
    }

    fn mark(&mut self, st: Option<&CudaStream>, phase: &str) {
        if !self.on {
            return;
        }
        if let Some(st) = st {
            let _ = st.synchronize();
        }
        let now = std::time::Instant::now();
        eprintln!(
            "cersa-cuda {} {phase}: {:.4}",
            self.shape,
            (now - self.t).as_secs_f64()
        );
        self.t = now;
    }
}

/// Picks the rank from the eigenvalues of the (scaled) Gram matrix, non-increasing.
type RankPicker<'a> = dyn Fn(&[f64], &Scale) -> usize + 'a;

/// The Gram route on the device for the m×n matrix whose row-major f64 entries are `a`.
/// Without `pick_rank` only the eigenvalues are computed.
#[allow(unsafe_code)]
fn run_on_gpu(
    g: &mut Gpu,
    w: &FloatData,
    m: usize,
    n: usize,
    pick_rank: Option<&RankPicker>,
    trace: &mut Trace,
) -> Result<GpuOut, String> {
    let (p, k) = (m.max(n), m.min(n));
    let (ni, pi, ki) = (dim(n, "n")?, dim(p, "p")?, dim(k, "k")?);
    let st = &g.stream.clone();
    st.context()
        .bind_to_thread()
        .map_err(dev_err("binding the context"))?;
    let (d_a, scale) = upload(g, w)?;
    trace.mark(Some(st), "convert, measure and upload W");
    let hb = *g.blas.handle();
    let hs = g.solver.cu();
    let ok_b = |s: blas::cublasStatus_t, what: &str| {
        if s == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what} failed: {s:?}"))
        }
    };
    let ok_s = |s: sol::cusolverStatus_t, what: &str| {
        if s == sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what} failed: {s:?}"))
        }
    };

    // The buffer is column-major Wᵀ (n×m, leading dimension n). X = W = bufferᵀ when m ≥ n,
    // X = Wᵀ = buffer otherwise.
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
    trace.mark(Some(st), "syrk");

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
    trace.mark(Some(st), "syevd");
    let Some(pick_rank) = pick_rank else {
        return Ok(GpuOut {
            scale,
            lambda,
            rank: 0,
            vr: vec![],
            r_diag: vec![],
            order: vec![],
            long: vec![],
        });
    };
    let r = pick_rank(&lambda, &scale).clamp(1, k);
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
    trace.mark(Some(st), "rank, V_r down and up");
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
    trace.mark(Some(st), "gemm");

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
    trace.mark(Some(st), "geqrf + orgqr");
    drop(d_a);
    let r_diag = st.clone_dtoh(&d_diag).map_err(dev_err("diag(R)"))?;
    // Columns by non-increasing σ = |R_ii| (stable: ties keep basis order, deterministic).
    let mut order: Vec<usize> = (0..r).collect();
    order.sort_by(|&a, &b| r_diag[b].abs().total_cmp(&r_diag[a].abs()));
    // The long-side factor in its final layout, by copies and exact negations on the device:
    // column c is Q's column order[c], written with stride r (row-major p×r, U when m ≥ n)
    // or contiguously (column-major p×r = row-major Vᵀ when m < n).
    let mut d_l = st.alloc_zeros::<f64>(p * r).map_err(dev_err("U or Vᵀ"))?;
    let pl = ptr_mut(&mut d_l, st) as *mut f64;
    let (col_step, inc) = if x_is_buf_t { (1, ri) } else { (p, 1) };
    let minus_one = -1.0f64;
    for (c, &j) in order.iter().enumerate() {
        // SAFETY: column j of Q is p values at Y + j·p (j < r); the destination's p values
        // at L + c·col_step with stride inc stay inside L's p·r (c < r).
        let dst = unsafe { pl.add(c * col_step) };
        ok_b(
            unsafe { blas::cublasDcopy_v2(hb, pi, py.add(j * p), 1, dst, inc) },
            "cublasDcopy (order Q's columns)",
        )?;
        if r_diag[j] < 0.0 {
            // SAFETY: as for the copy above.
            ok_b(
                unsafe { blas::cublasDscal_v2(hb, pi, &minus_one, dst, inc) },
                "cublasDscal (signs of Q's columns)",
            )?;
        }
    }
    trace.mark(Some(st), "order and signs (device)");
    let long = st.clone_dtoh(&d_l).map_err(dev_err("U or Vᵀ"))?;
    st.synchronize().map_err(dev_err("synchronize"))?;
    st.context().check_err().map_err(dev_err("device"))?;
    trace.mark(Some(st), "download U or Vᵀ");
    Ok(GpuOut {
        scale,
        lambda,
        rank: r,
        vr,
        r_diag,
        order,
        long,
    })
}

/// Runs `f` on the shared device, turning a poisoned lock or a panic into an error.
fn with_gpu<R>(f: impl FnOnce(&mut Gpu) -> Result<R, String>) -> Result<R> {
    let g = gpu()?;
    let mut guard = g
        .lock()
        .map_err(|_| backend("GPU state poisoned by an earlier failure".into()))?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut guard)))
        .unwrap_or_else(|_| Err("the CUDA library call panicked".into()))
        .map_err(backend)
}

/// Eigenvalues of the scaled G → σ of W (non-increasing).
fn unscaled_sigma(lambda: &[f64], unscale: f64) -> Vec<f64> {
    let l: Vec<f64> = lambda.iter().map(|x| x * unscale * unscale).collect();
    sigma_of(&l)
}

impl Decomposer for Cuda {
    fn route(&self) -> Route {
        Route::Cuda
    }

    /// The host side holds what the `svd` estimate covers (W, the staging buffer, V_r and
    /// the factors); the device holds its own copies: 5·S + 3·k²·e.
    fn footprint(&self, m: usize, n: usize, precision: Precision) -> u64 {
        footprint_of(m, n, precision, 3)
    }

    fn factorize(
        &self,
        w: &FloatData,
        m: usize,
        n: usize,
        rule: &RankRule,
    ) -> Result<Factorization> {
        if m == 0 || n == 0 {
            // Nothing to offload; keep the CPU route's handling of empty matrices.
            return gram::Gram.factorize(w, m, n, rule);
        }
        let mut trace = Trace::new(m, n);
        let pick = |lambda: &[f64], sc: &Scale| {
            rule.rank(&unscaled_sigma(lambda, sc.unscale), sc.norm2, m, n)
        };
        let out = with_gpu(|g| run_on_gpu(g, w, m, n, Some(&pick), &mut trace))?;
        let Scale { unscale, norm2, .. } = out.scale;
        let (k, r) = (m.min(n), out.rank);
        let (order, vr) = (&out.order, &out.vr);
        // Short side: V_r's columns in the same order (host; k×r is the small factor).
        let short = |i: usize, c: usize| vr[order[c] * k + i];
        let (mut u, mut vt) = if m >= n {
            (out.long, row_major(r, n, |c, j| short(j, c)))
        } else {
            (row_major(m, r, short), out.long)
        };
        fix_signs(&mut u, &mut vt, m, r, n);
        let s: Vec<f64> = order
            .iter()
            .map(|&j| out.r_diag[j].abs() * unscale)
            .collect();
        trace.mark(None, "host: short side, signs");
        Ok(Factorization {
            rank: r,
            u: u.into(),
            s,
            vt: vt.into(),
            sigma: unscaled_sigma(&out.lambda, unscale),
            norm2,
        })
    }

    fn singular_values(&self, w: &FloatData, m: usize, n: usize) -> Result<Vec<f64>> {
        if m == 0 || n == 0 {
            return gram::Gram.singular_values(w, m, n);
        }
        let mut trace = Trace::new(m, n);
        let out = with_gpu(|g| run_on_gpu(g, w, m, n, None, &mut trace))?;
        Ok(unscaled_sigma(&out.lambda, out.scale.unscale))
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
