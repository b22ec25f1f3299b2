//! `cersa plan`: each selected matrix's rank (or dense) under a global byte budget, from
//! the singular values alone, written as an editable `plan.json` that `convert --plan`
//! applies exactly (docs/plan-json.md).

pub mod solve;

use crate::decompose::Decomposer;
use crate::error::{ConvertError, Result};
use crate::input::Source;
use crate::inspect::{inspect_source, InspectOptions};
use crate::select::Selection;
use crate::storage::{FactorDtype, Stored};
use cersa_loader::manifest::INFIX_EXPERT;
use cersa_loader::{FactorEncoding, Quant};
use serde::{Deserialize, Serialize};
use solve::{Candidate, Choice};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

/// Version of the plan file.
pub const PLAN_VERSION: u32 = 1;

/// Mean ‖x − Q(x)‖² of a unit-norm vector under each quantization (gguf-py on Gaussian
/// vectors, `bench/quant_noise.py`; nearly independent of the length). Float factors: 0.
fn quant_vector_sq_error(enc: FactorEncoding) -> f64 {
    match enc {
        FactorEncoding::Float(_) => 0.0,
        FactorEncoding::Quant(Quant::Q8_0) => 2.9e-5,
        FactorEncoding::Quant(Quant::Q5_0) => 1.83e-3,
        FactorEncoding::Quant(Quant::Q4_0) => 7.4e-3,
    }
}

/// The budget: bytes, or a ratio of the source's tensor bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Total stored bytes.
    Bytes(u64),
    /// Fraction of the source's tensor bytes.
    Ratio(f64),
}

/// Options of [`make_plan`].
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The budget for the whole output's tensor bytes.
    pub budget: Budget,
    /// Factor dtype the bytes are counted in.
    pub dtype: FactorDtype,
    /// Keep every matrix at E ≥ this when the budget allows.
    pub energy_floor: Option<f64>,
    /// `--include` globs.
    pub include: Vec<String>,
    /// `--exclude` globs.
    pub exclude: Vec<String>,
    /// Calibration statistics (`--calibration`): matrices with statistics are planned in
    /// their output metric, as `convert --calibration` truncates them.
    pub calibration: Option<std::sync::Arc<crate::calibration::Calibration>>,
}

/// One selected matrix of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// Matrix view [m, n].
    pub matrix_shape: [usize; 2],
    /// Kept rank, or `null` for dense.
    pub rank: Option<usize>,
    /// Retained energy E of the truncation (1 when dense).
    pub energy: f64,
    /// Estimated squared relative error as stored: 1 − E·(1 − 2q), q the quantization's
    /// mean squared error of a unit vector (0 for float factors and dense).
    pub est_sq_rel_error: f64,
    /// Bytes stored.
    pub bytes: u64,
}

/// Which source a plan was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSource {
    /// Source format.
    pub format: String,
    /// Source files and sizes.
    pub files: Vec<cersa_loader::manifest::SourceFile>,
    /// sha256 of every tensor's `name\tshape\tdtype` line, in source order.
    pub tensors_sha256: String,
}

/// Sums of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTotals {
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// Bytes the output stores (every tensor).
    pub stored_bytes: u64,
    /// Bytes of the source's tensors.
    pub source_bytes: u64,
    /// Bytes of the tensors the plan does not choose for (not selected: dense).
    pub fixed_bytes: u64,
    /// Selected matrices.
    pub matrices: usize,
    /// Σ E over the matrices.
    pub sum_energy: f64,
    /// Σ `est_sq_rel_error`: the estimated sum of squared relative errors as stored (what
    /// the plan minimizes).
    pub sum_sq_rel_error: f64,
    /// Whether every matrix reached the energy floor (`null`: no floor).
    pub floor_met: Option<bool>,
}

/// `plan.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`PLAN_VERSION`].
    pub plan_version: u32,
    /// The source it is for.
    pub source: PlanSource,
    /// Factor dtype (`--dtype` of convert).
    pub dtype: FactorDtype,
    /// The energy floor asked for.
    pub energy_floor: Option<f64>,
    /// `--include` globs the selection used.
    pub include: Vec<String>,
    /// `--exclude` globs the selection used.
    pub exclude: Vec<String>,
    /// The calibration statistics the plan was made with (`--calibration`): its energies
    /// are then output energies of the matrices with statistics, and `convert --plan` must
    /// be given the same file and damping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<cersa_loader::manifest::CalibrationConfig>,
    /// Per selected matrix.
    pub tensors: BTreeMap<String, PlanEntry>,
    /// Sums.
    pub totals: PlanTotals,
}

/// The identity of `src` a plan records.
pub fn source_identity(src: &dyn Source) -> PlanSource {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in src.tensors() {
        h.update(format!("{}\t{:?}\t{}\n", t.name, t.shape, t.source_dtype).as_bytes());
    }
    PlanSource {
        format: src.format().into(),
        files: src.files().to_vec(),
        tensors_sha256: cersa_loader::writer::hex(&h.finalize()),
    }
}

/// Plans `src` under `opts.budget` from the singular values of its selected matrices.
pub fn make_plan(
    src: &dyn Source,
    opts: &PlanOptions,
    decomposer: &dyn Decomposer,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<Plan> {
    let inspect = InspectOptions {
        energies: vec![0.9],
        include: opts.include.clone(),
        exclude: opts.exclude.clone(),
        keep_singular_values: true,
        calibration: opts.calibration.clone(),
    };
    let report = inspect_source(src, &inspect, decomposer, progress, cancel)?;
    let metas = src.tensors();
    let mut fixed = 0u64;
    let mut names = Vec::new();
    let mut cands = Vec::new();
    let mut keeps = Vec::new();
    for (t, meta) in report.tensors.iter().zip(metas) {
        // A stacked experts tensor is one matrix per expert (named NAME.cersa_expert.e).
        let experts = match t.experts.is_empty() {
            true => std::slice::from_ref(t),
            false => &t.experts[..],
        };
        for x in experts {
            let dense = Stored::dense(x.params, meta.dense_dtype).bytes;
            let (Some([m, n]), Some(metrics)) = (x.matrix_shape, &x.metrics) else {
                fixed += dense;
                continue;
            };
            let norm2 = metrics.frobenius_norm * metrics.frobenius_norm;
            let mut cum = 0.0;
            let energy: Vec<f64> = x
                .singular_values
                .iter()
                .map(|s| {
                    cum += s * s;
                    (cum / norm2).min(1.0)
                })
                .collect();
            let enc = opts.dtype.resolve(meta.dense_dtype);
            // Quantized factors keep ≈ E(r)·(1 − 2q): each rank-1 term loses σ²(q_u + q_v).
            let keep = 1.0 - 2.0 * quant_vector_sq_error(enc);
            cands.push(Candidate {
                per_rank: Stored::factored(m, n, 1, enc).bytes,
                dense_bytes: dense,
                energy: energy.into_iter().map(|e: f64| e * keep).collect(),
            });
            keeps.push(keep);
            names.push((x.name.clone(), [m, n]));
        }
    }
    let source_bytes = report.totals.source_bytes;
    let budget = match opts.budget {
        Budget::Bytes(b) => b,
        Budget::Ratio(r) => (r * source_bytes as f64).floor() as u64,
    };
    let starts_of =
        |floor: Option<f64>| -> Vec<Choice> { cands.iter().map(|c| c.start(floor)).collect() };
    let min_bytes = |starts: &[Choice]| -> u64 {
        fixed
            + cands
                .iter()
                .zip(starts)
                .map(|(c, &s)| c.bytes(s))
                .sum::<u64>()
    };
    let avail = budget.saturating_sub(fixed);
    let (choices, floor_met) = match opts.energy_floor {
        Some(f) => match solve::solve(&cands, &starts_of(Some(f)), avail) {
            Some(c) if budget >= fixed => (Some(c), Some(true)),
            _ => (solve::solve(&cands, &starts_of(None), avail), Some(false)),
        },
        None => (solve::solve(&cands, &starts_of(None), avail), None),
    };
    let choices = match choices {
        Some(c) if budget >= fixed => c,
        _ => {
            return Err(ConvertError::Options(format!(
                "a budget of {budget} bytes is below the smallest feasible one, {} bytes \
                 (every selected matrix at rank 1 or dense if smaller, every other tensor dense)",
                min_bytes(&starts_of(None))
            )))
        }
    };
    let mut tensors = BTreeMap::new();
    let (mut stored, mut sum_e) = (fixed, 0.0);
    let mut sum_sq = 0.0;
    for ((((name, shape), c), ch), keep) in names.into_iter().zip(&cands).zip(&choices).zip(&keeps)
    {
        let (bytes, kept) = (c.bytes(*ch), c.energy_of(*ch));
        stored += bytes;
        sum_sq += (1.0 - kept).max(0.0);
        let (rank, energy) = match ch {
            Choice::Rank(r) => (Some(*r), kept / keep),
            Choice::Dense => (None, 1.0),
        };
        sum_e += energy;
        tensors.insert(
            name,
            PlanEntry {
                matrix_shape: shape,
                rank,
                energy,
                est_sq_rel_error: (1.0 - kept).max(0.0),
                bytes,
            },
        );
    }
    let matrices = tensors.len();
    Ok(Plan {
        plan_version: PLAN_VERSION,
        source: source_identity(src),
        dtype: opts.dtype,
        energy_floor: opts.energy_floor,
        include: opts.include.clone(),
        exclude: opts.exclude.clone(),
        calibration: report.calibration.clone(),
        totals: PlanTotals {
            budget_bytes: budget,
            stored_bytes: stored,
            source_bytes,
            fixed_bytes: fixed,
            matrices,
            sum_energy: sum_e,
            sum_sq_rel_error: sum_sq,
            floor_met,
        },
        tensors,
    })
}

impl Plan {
    /// Checks that the plan is applied with the calibration statistics it was made with
    /// (the same file, by sha256, and damping), or with none when it was made with none.
    pub fn check_calibration(&self, given: Option<&crate::calibration::Calibration>) -> Result<()> {
        let given = given.map(|c| &c.config);
        let same = match (&self.calibration, given) {
            (None, None) => true,
            (Some(a), Some(b)) => a.sha256 == b.sha256 && a.damping == b.damping,
            _ => false,
        };
        if same {
            return Ok(());
        }
        let describe = |c: Option<&cersa_loader::manifest::CalibrationConfig>| match c {
            Some(c) => format!(
                "statistics with sha256 {} at damping {}",
                c.sha256, c.damping
            ),
            None => "no calibration statistics".to_string(),
        };
        Err(ConvertError::Options(format!(
            "the plan was made with {}, but convert was given {}: its ranks are of another \
             metric (pass the plan's --calibration and --calibration-damping, or re-plan)",
            describe(self.calibration.as_ref()),
            describe(given)
        )))
    }

    /// Checks that the plan was made for `src` with this selection.
    pub fn check_source(&self, src: &dyn Source) -> Result<()> {
        if self.plan_version != PLAN_VERSION {
            return Err(ConvertError::Options(format!(
                "plan_version {} is not supported (this cersa writes {PLAN_VERSION})",
                self.plan_version
            )));
        }
        let here = source_identity(src);
        if here != self.source {
            return Err(ConvertError::Options(
                "the plan was made for another source (its files, sizes or tensor list \
                 differ): run `cersa plan` on this one"
                    .into(),
            ));
        }
        // The plan is a file the user may edit: every entry must name a matrix of this
        // source with its matrix view, and a rank in 1..=min(m, n).
        let selection = Selection::new(&self.include, &self.exclude, src.default_excludes())?;
        for (name, e) in &self.tensors {
            let [m, n] = planned_view(src, &selection, name)?;
            if e.matrix_shape != [m, n] {
                return Err(ConvertError::Options(format!(
                    "plan entry {name:?}: matrix_shape {:?}, but the source's matrix is \
                     [{m}, {n}]",
                    e.matrix_shape
                )));
            }
            if let Some(r) = e.rank {
                if r == 0 || r > m.min(n) {
                    return Err(ConvertError::Options(format!(
                        "plan entry {name:?}: rank {r} is outside 1..={} for a {m}×{n} matrix \
                         (use null to keep it dense)",
                        m.min(n)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The `[m, n]` matrix a plan entry `name` stands for: a source tensor (not a stacked
/// experts one), or expert `e` of stacked experts tensor `NAME`, named `NAME.cersa_expert.e`.
fn planned_view(src: &dyn Source, selection: &Selection, name: &str) -> Result<[usize; 2]> {
    let find = |n: &str| src.tensors().iter().find(|t| t.name == n);
    let fail = |why: String| Err(ConvertError::Options(format!("plan entry {name:?}: {why}")));
    if let Some(meta) = find(name) {
        let view = selection.view(meta);
        if meta.shape.len() < 2 {
            return fail(format!(
                "the source tensor has shape {:?}, not a matrix",
                meta.shape
            ));
        }
        if let Some(count) = view.experts {
            return fail(format!(
                "a stacked experts tensor {:?} is planned one expert at a time, as \
                 {name}{INFIX_EXPERT}0 … {name}{INFIX_EXPERT}{} (re-plan with this cersa)",
                meta.shape,
                count.saturating_sub(1)
            ));
        }
        return Ok([view.m, view.n]);
    }
    let Some((base, e)) = name.rsplit_once(INFIX_EXPERT) else {
        return fail("the source has no such tensor".into());
    };
    let Some(meta) = find(base) else {
        return fail(format!("the source has no tensor {base:?}"));
    };
    let view = selection.view(meta);
    let Some(count) = view.experts else {
        return fail(format!(
            "{base:?} (shape {:?}) is not a stacked experts tensor",
            meta.shape
        ));
    };
    // Decimal, no padding: exactly as cersa_loader::expert_name writes it.
    match e.parse::<usize>() {
        Ok(i) if i < count && i.to_string() == e => Ok([view.m, view.n]),
        _ => fail(format!(
            "{e:?} is not an expert index of {base:?}, which has {count} experts (0..{count})"
        )),
    }
}
