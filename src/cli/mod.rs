//! The command-line front end: parses flags, runs the library, prints results.

pub mod args;
pub mod inspect_view;
pub mod output;
pub mod plan_view;

use crate::convert::{convert, ConvertReport};
use crate::inspect::{inspect_checkpoint, inspect_source};
use anyhow::{Context, Result};
use args::{
    AssembleArgs, Cli, Command, ConvertArgs, ExportArgs, InspectArgs, MergeArgs, PlanArgs,
    ReportArgs, VerifyArgs,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Exit status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything held.
    Ok,
    /// A check failed (`verify`).
    CheckFailed,
}

fn progress_bar(quiet: bool, len: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static template is valid"),
    );
    bar
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// Writes `report` to stdout as pretty JSON (the versioned wire formats of `--json`).
fn emit_json(report: &impl serde::Serialize) -> Result<()> {
    emit(&(serde_json::to_string_pretty(report)? + "\n"))
}

/// Runs the parsed command line.
pub fn run(cli: Cli, cancel: Arc<AtomicBool>) -> Result<Status> {
    match cli.command {
        Command::Convert(a) => run_convert(*a, &cancel),
        Command::Inspect(a) => run_inspect(a, &cancel),
        Command::Verify(a) => run_verify(a, &cancel),
        Command::Report(a) => run_report(a, &cancel),
        Command::Merge(a) => run_merge(a, &cancel),
        Command::Plan(a) => run_plan(a, &cancel),
        Command::Export(a) => run_export(a, &cancel),
        Command::Assemble(a) => run_assemble(a, &cancel),
    }
}

/// Plans `src` with a progress bar on `threads` workers.
fn plan_source(
    src: &dyn crate::input::Source,
    opts: &crate::plan::PlanOptions,
    route: crate::decompose::Route,
    threads: usize,
    quiet: bool,
    cancel: &AtomicBool,
) -> Result<crate::plan::Plan> {
    let decomposer = route.decomposer()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting worker threads")?;
    let bar = progress_bar(quiet, src.tensors().len() as u64);
    let plan = pool.install(|| {
        crate::plan::make_plan(
            src,
            opts,
            decomposer.as_ref(),
            &|done, _| bar.set_position(done as u64),
            cancel,
        )
    })?;
    bar.finish_and_clear();
    Ok(plan)
}

fn run_plan(a: PlanArgs, cancel: &AtomicBool) -> Result<Status> {
    let opts = a.to_options()?;
    let threads = args::threads(a.threads)?;
    let src = crate::input::open(&a.src).with_context(|| format!("opening {}", a.src.display()))?;
    let plan = plan_source(src.as_ref(), &opts, a.algorithm, threads, a.quiet, cancel)
        .with_context(|| format!("planning {}", a.src.display()))?;
    let json = serde_json::to_string_pretty(&plan)? + "\n";
    match &a.output {
        Some(path) => {
            std::fs::write(path, json)
                .with_context(|| format!("writing the plan to {}", path.display()))?;
            emit(&plan_view::plan_view(&plan))?;
        }
        None => emit(&json)?,
    }
    Ok(Status::Ok)
}

/// The plan `convert` applies (`--plan FILE` or `--budget`), checked against `src`; it sets
/// the options' ranks, dtype and selection.
fn convert_plan(
    a: &ConvertArgs,
    opts: &mut crate::convert::ConvertOptions,
    src: &dyn crate::input::Source,
    cancel: &AtomicBool,
) -> Result<()> {
    let plan = match (&a.plan, &a.budget) {
        (Some(path), _) => {
            let text = cersa_loader::regular::read_regular(path)
                .with_context(|| format!("reading the plan {}", path.display()))?;
            let plan: crate::plan::Plan = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a cersa plan", path.display()))?;
            plan.check_source(src)
                .and_then(|()| plan.check_calibration(opts.calibration.as_deref()))
                .with_context(|| format!("applying the plan {}", path.display()))?;
            plan
        }
        (None, Some(budget)) => {
            let popts = crate::plan::PlanOptions {
                budget: args::parse_budget(budget)?,
                dtype: opts.dtype,
                energy_floor: a.energy_floor.map(args::check_energy).transpose()?,
                include: opts.include.clone(),
                exclude: opts.exclude.clone(),
                calibration: opts.calibration.clone(),
            };
            plan_source(src, &popts, opts.algorithm, opts.threads, a.quiet, cancel)
                .context("planning under --budget")?
        }
        (None, None) => return Ok(()),
    };
    if !a.rank.is_empty() || a.energy.iter().any(|e| e.contains('=')) {
        anyhow::bail!(
            "a plan chooses every rank: it cannot be combined with --energy GLOB=TAU or --rank"
        );
    }
    opts.dtype = plan.dtype;
    opts.include = plan.include.clone();
    opts.exclude = plan.exclude.clone();
    opts.plan = Some(
        plan.tensors
            .iter()
            .map(|(k, e)| (k.clone(), e.rank))
            .collect(),
    );
    Ok(())
}

fn run_convert(a: ConvertArgs, cancel: &AtomicBool) -> Result<Status> {
    let mut opts = a.to_options()?;
    let start = std::time::Instant::now();
    let mut src =
        crate::input::open(&a.src).with_context(|| format!("opening {}", a.src.display()))?;
    convert_plan(&a, &mut opts, src.as_ref(), cancel)?;
    if let Some(dtype) = opts.dtype.explicit() {
        // `--dtype` also sets the dtype quantized tensors are dequantized into when dense.
        src.set_requantized_dtype(dtype);
    }
    let bytes: u64 = src.tensors().iter().map(|t| t.source_bytes).sum();
    let bar = progress_bar(a.quiet, bytes);
    let manifest = convert(
        src.as_ref(),
        &a.out_dir,
        &opts,
        &mut |p| {
            bar.set_position(p.bytes_done);
            bar.set_message(p.name.to_string());
        },
        cancel,
    )
    .with_context(|| {
        format!(
            "converting {} into {}",
            a.src.display(),
            a.out_dir.display()
        )
    })?;
    bar.finish_and_clear();
    let mut report = ConvertReport::new(a.out_dir.clone(), start.elapsed().as_secs_f64(), manifest);
    report.part = opts.part;
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::convert_summary(&report))?;
    }
    Ok(Status::Ok)
}

/// Singular values of every selected matrix of the source `a.path` by the route
/// `a.algorithm`, with a progress bar unless `quiet` (shared by `inspect` and `report`).
fn spectra_of_source(
    a: &args::SpectraArgs,
    opts: &crate::inspect::InspectOptions,
    quiet: bool,
    cancel: &AtomicBool,
) -> Result<crate::inspect::SourceReport> {
    let path = &a.path;
    let threads = args::threads(a.threads)?;
    let decomposer = a.algorithm.decomposer()?;
    let src = crate::input::open(path).with_context(|| format!("opening {}", path.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting worker threads")?;
    let bar = progress_bar(quiet, src.tensors().len() as u64);
    let report = pool
        .install(|| {
            inspect_source(
                src.as_ref(),
                opts,
                decomposer.as_ref(),
                &|done, _| bar.set_position(done as u64),
                cancel,
            )
        })
        .with_context(|| format!("inspecting {}", path.display()))?;
    bar.finish_and_clear();
    Ok(report)
}

fn run_inspect(a: InspectArgs, cancel: &AtomicBool) -> Result<Status> {
    let opts = a.spectra.to_options(a.singular_values)?;
    let path = &a.spectra.path;
    let text = if path.join(cersa_loader::MANIFEST_FILE).is_file() {
        let ckpt = cersa_loader::Checkpoint::open(path)
            .with_context(|| format!("opening CERSA directory {}", path.display()))?;
        let report = inspect_checkpoint(&ckpt);
        match (a.json, a.csv) {
            (true, _) => return emit_json(&report).map(|()| Status::Ok),
            (_, true) => inspect_view::checkpoint_csv(&report),
            _ => inspect_view::checkpoint_view(&report, a.group),
        }
    } else {
        let report = spectra_of_source(&a.spectra, &opts, a.quiet, cancel)?;
        match (a.json, a.csv) {
            (true, _) => return emit_json(&report).map(|()| Status::Ok),
            (_, true) => inspect_view::source_csv(&report),
            _ => inspect_view::source_view(&report, a.group),
        }
    };
    emit(&text)?;
    Ok(Status::Ok)
}

fn run_verify(a: VerifyArgs, cancel: &AtomicBool) -> Result<Status> {
    let threads = args::threads(a.threads)?;
    let src = match &a.source {
        Some(p) => Some(crate::input::open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting worker threads")?;
    let calibration = match &a.calibration {
        Some(p) => Some(
            crate::calibration::Calibration::open(p, crate::calibration::DEFAULT_DAMPING)
                .with_context(|| format!("opening calibration statistics {}", p.display()))?,
        ),
        None => None,
    };
    let bar = progress_bar(a.quiet, 0);
    let source = a.source.as_deref().zip(src.as_deref());
    let report = pool
        .install(|| {
            crate::verify::verify(
                &a.out_dir,
                source,
                calibration.as_ref(),
                &|done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64)
                },
                cancel,
            )
        })
        .with_context(|| format!("verifying {}", a.out_dir.display()))?;
    bar.finish_and_clear();
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::verify_summary(&report))?;
    }
    Ok(if report.ok {
        Status::Ok
    } else {
        Status::CheckFailed
    })
}

fn run_report(a: ReportArgs, cancel: &AtomicBool) -> Result<Status> {
    let path = &a.spectra.path;
    let title = path.display().to_string();
    let model = if path.join(cersa_loader::MANIFEST_FILE).is_file() {
        let ckpt = cersa_loader::Checkpoint::open(path)
            .with_context(|| format!("opening CERSA directory {}", path.display()))?;
        let report = inspect_checkpoint(&ckpt);
        crate::report::model_from_checkpoint(&title, &ckpt, &report, cancel)
            .with_context(|| format!("reading the spectra of {}", path.display()))?
    } else {
        // Every singular value: the report plots the spectra.
        let opts = a.spectra.to_options(true)?;
        let report = spectra_of_source(&a.spectra, &opts, a.quiet, cancel)?;
        crate::report::model_from_source(&title, &report)
    };
    let html = crate::report::render_html(&model);
    crate::report::write_report(&a.output, &html)
        .with_context(|| format!("writing {}", a.output.display()))?;
    if !a.quiet {
        eprintln!("wrote {} ({} bytes)", a.output.display(), html.len());
    }
    Ok(Status::Ok)
}

fn run_assemble(a: AssembleArgs, cancel: &AtomicBool) -> Result<Status> {
    let start = std::time::Instant::now();
    let opts = crate::assemble::AssembleOptions {
        overwrite: a.overwrite,
    };
    let bar = progress_bar(a.quiet, a.parts.len() as u64);
    bar.set_message("checking the parts");
    let manifest = crate::assemble::assemble(
        &a.out_dir,
        &a.parts,
        &opts,
        &mut |p| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(p.name.to_string());
        },
        cancel,
    )
    .with_context(|| format!("assembling {}", a.out_dir.display()))?;
    bar.finish_and_clear();
    let report = ConvertReport::new(a.out_dir.clone(), start.elapsed().as_secs_f64(), manifest);
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::convert_summary(&report))?;
    }
    Ok(Status::Ok)
}

fn run_merge(a: MergeArgs, cancel: &AtomicBool) -> Result<Status> {
    let opts = crate::merge::MergeOptions {
        algorithm: a.algorithm,
        overwrite: a.overwrite,
        calibration: a.calibration.clone(),
    };
    let report = crate::merge::merge(&a.cersa_dir, &a.adapter, &a.out_dir, &opts, cancel)
        .with_context(|| {
            format!(
                "merging {} into {}",
                a.adapter.display(),
                a.cersa_dir.display()
            )
        })?;
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::merge_summary(&report))?;
    }
    Ok(Status::Ok)
}

fn run_export(a: ExportArgs, cancel: &AtomicBool) -> Result<Status> {
    if a.target == args::ExportTarget::Gguf {
        return run_export_gguf(a, cancel);
    }
    let opts = a.to_options()?;
    if a.target == args::ExportTarget::Peft {
        let adapter = a.adapter.as_deref().context("--to peft needs --adapter")?;
        let report = crate::export::peft::export_peft(&a.cersa_dir, adapter, &a.out_dir)
            .with_context(|| {
                format!(
                    "exporting {} (trained on {}) to PEFT {}",
                    adapter.display(),
                    a.cersa_dir.display(),
                    a.out_dir.display()
                )
            })?;
        if a.json {
            emit_json(&report)?;
        } else {
            let ranks = report.modules.iter().map(|m| m.rank);
            let (lo, hi) = (ranks.clone().min(), ranks.max());
            emit(&format!(
                "wrote {}: PEFT LoRA adapter of {} module(s), LoRA ranks {}–{}\n",
                report.out_dir.display(),
                report.modules.len(),
                lo.unwrap_or(0),
                hi.unwrap_or(0),
            ))?;
        }
        return Ok(Status::Ok);
    }
    let report = with_counting_bar(a.quiet, |progress| {
        crate::export::export_safetensors(&a.cersa_dir, &a.out_dir, &opts, progress, cancel)
    })
    .with_context(|| {
        format!(
            "exporting {} to {}",
            a.cersa_dir.display(),
            a.out_dir.display()
        )
    })?;
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::export_summary(&report))?;
    }
    Ok(Status::Ok)
}

/// Runs `work` with a bar that counts `(done, total)` progress calls, cleared at the end.
fn with_counting_bar<R>(quiet: bool, work: impl FnOnce(&(dyn Fn(usize, usize) + Sync)) -> R) -> R {
    let bar = progress_bar(quiet, 0);
    let out = work(&|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    out
}

fn run_export_gguf(a: ExportArgs, cancel: &AtomicBool) -> Result<Status> {
    let opts = a.to_gguf_options()?;
    let report = with_counting_bar(a.quiet, |progress| {
        crate::export::gguf::export_gguf(&a.cersa_dir, &a.out_dir, &opts, progress, cancel)
    })
    .with_context(|| {
        format!(
            "exporting {} to GGUF {}",
            a.cersa_dir.display(),
            a.out_dir.display()
        )
    })?;
    if a.json {
        emit_json(&report)?;
    } else {
        emit(&output::gguf_export_summary(&report))?;
    }
    Ok(Status::Ok)
}

/// The whole chain of `e`, joined by ": ", leaving out a cause whose text the message before
/// it already ends with (library errors show their OS error in their own message too).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod chain_tests {
    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::other("disk on fire");
        let e = crate::error::ConvertError::io(std::path::Path::new("/x"), "read", io);
        let e = anyhow::Error::from(e).context("opening /x");
        assert_eq!(super::error_chain(&e), "opening /x: /x: read: disk on fire");
    }
}
