//! Scheduling: worker threads claim tensors in source order and run [`process`] on them;
//! their results go to the writer through [`Results`].
//!
//! A worker may run at most `window` factored tensors ahead of the writer, which bounds
//! the reorder backlog, and starts a tensor only while the memory budget admits its
//! footprint estimate (`--max-memory`). Pass-through tensors (biases, norms: most tensors
//! of a transformer) do not count: with a window of tensor indices, a block of them
//! between two matrices left a worker idle (all-MiniLM-L6-v2 at 2 threads ran at ~1 core).

use super::process::{process, Outcome};
use super::{write, ConvertOptions, Progress};
use crate::budget::{default_budget, Admission};
use crate::decompose::Decomposer;
use crate::error::{ConvertError, Result};
use crate::input::{Precision, Source};
use crate::journal::{Journal, Recovered};
use crate::select::Selection;
use cersa_loader::Manifest;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// What a run works on, shared by the workers and the writer.
pub(super) struct Job<'a> {
    pub src: &'a dyn Source,
    /// The partial output directory.
    pub tmp: &'a Path,
    pub opts: &'a ConvertOptions,
    pub decomposer: &'a dyn Decomposer,
    pub selection: &'a Selection,
    pub cancel: &'a AtomicBool,
    /// The side files copied into `tmp`, for the manifest.
    pub side_files: &'a [cersa_loader::manifest::SideFile],
}

struct Shared {
    next_claim: usize,
    next_write: usize,
    /// Finished results with the bytes they hold in `admission`.
    results: HashMap<usize, (Result<Outcome>, u64)>,
    admission: Admission,
    stop: bool,
}

/// The writer's end of the workers' results: it takes them strictly in source order.
pub(super) struct Results<'a> {
    shared: &'a Mutex<Shared>,
    cv: &'a Condvar,
    cancel: &'a AtomicBool,
}

impl Results<'_> {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for tensor `i`'s result (the writer asks for 0, 1, 2, … in turn); returns it
    /// with the bytes it holds against the budget, to [`Results::release`] once written.
    pub(super) fn take(&self, i: usize) -> Result<(Outcome, u64)> {
        let mut g = self.lock();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ConvertError::Interrupted);
            }
            if let Some((r, held)) = g.results.remove(&i) {
                g.next_write = i + 1;
                self.cv.notify_all();
                return Ok((r?, held));
            }
            g = self
                .cv
                .wait_timeout(g, std::time::Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A written result's buffers are freed: its bytes no longer count against the budget.
    pub(super) fn release(&self, held: u64) {
        let mut g = self.lock();
        g.admission.release(held);
        self.cv.notify_all();
    }
}

/// Footprint estimate of each tensor: only tensors that are read and factored allocate;
/// pass-through ones stream (0).
fn estimates(job: &Job, plan: &[Result<(), cersa_loader::DenseReason>]) -> Vec<u64> {
    job.src
        .tensors()
        .iter()
        .zip(plan)
        .map(|(t, p)| match (p, t.float) {
            (Ok(()), Some(precision)) if !t.shape.is_empty() => {
                let view = job.selection.view(t);
                let (m, n) = (view.m, view.n);
                if let Some(count) = view.experts {
                    // One expert is read and factored at a time; the factors of every
                    // expert are held until the tensor is written (each smaller than its
                    // expert, or it stays dense).
                    let held = (count as u64)
                        .saturating_mul(m as u64)
                        .saturating_mul(n as u64)
                        .saturating_mul(precision.size() as u64);
                    return job
                        .decomposer
                        .footprint(m, n, precision)
                        .saturating_add(held);
                }
                match &job.opts.calibration {
                    // Whitened: A = W·L in f64 is factored, beside W, G and L (d×d each).
                    Some(cal) if cal.has(&t.name) => {
                        let d = m.max(n) as u64;
                        job.decomposer
                            .footprint(m, n, Precision::F64)
                            .saturating_add((m as u64).saturating_mul(n as u64).saturating_mul(8))
                            .saturating_add(d.saturating_mul(d).saturating_mul(16))
                    }
                    _ => job.decomposer.footprint(m, n, precision),
                }
            }
            _ => 0,
        })
        .collect()
}

/// Runs the workers and, on the calling thread, the ordered writer; returns the manifest.
pub(super) fn run(
    job: &Job,
    progress: &mut dyn FnMut(&Progress),
    journal: &mut Journal,
    recovered: &Recovered,
) -> Result<Manifest> {
    let metas = job.src.tensors();
    let total = metas.len();
    let start = recovered.next_tensor();
    let plan: Vec<_> = metas.iter().map(|t| job.selection.check(t)).collect();
    let threads = job.opts.threads.max(1);
    let window = 2 * threads;
    let estimates = estimates(job, &plan);
    // heavy_before[i]: factored (allocating) tensors before index i; the window counts them.
    let heavy_before: Vec<usize> = std::iter::once(0)
        .chain(estimates.iter().scan(0usize, |c, &e| {
            *c += usize::from(e > 0);
            Some(*c)
        }))
        .collect();
    let shared = Mutex::new(Shared {
        next_claim: start,
        next_write: start,
        results: HashMap::new(),
        admission: Admission::new(job.opts.max_memory.unwrap_or_else(default_budget)),
        stop: false,
    });
    let cv = Condvar::new();
    let results = Results {
        shared: &shared,
        cv: &cv,
        cancel: job.cancel,
    };

    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = {
                    let mut g = results.lock();
                    loop {
                        if g.stop || g.next_claim >= total || job.cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        if heavy_before[g.next_claim] < heavy_before[g.next_write] + window
                            && g.admission.admits(estimates[g.next_claim])
                        {
                            break;
                        }
                        g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    let estimate = estimates[g.next_claim];
                    g.admission.hold(estimate);
                    g.next_claim += 1;
                    g.next_claim - 1
                };
                let outcome = match plan[i] {
                    Err(reason) => Ok(Outcome::Dense(reason)),
                    Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let view = job.selection.view(&metas[i]);
                        process(job.src, i, view, job.opts, job.decomposer)
                    }))
                    .unwrap_or_else(|_| {
                        Err(ConvertError::Decompose {
                            tensor: metas[i].name.clone(),
                            source: crate::decompose::DecomposeError::Panic,
                        })
                    }),
                };
                let held = outcome.as_ref().map_or(0, Outcome::held_bytes);
                let mut g = results.lock();
                g.admission.replace(estimates[i], held);
                g.results.insert(i, (outcome, held));
                cv.notify_all();
            });
        }

        let result = write::write_all(job, &results, progress, journal, recovered);
        let mut g = results.lock();
        g.stop = true;
        cv.notify_all();
        drop(g);
        result
    })
}
