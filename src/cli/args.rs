//! Raw command-line flags (clap) and their validation into config structs, before any work.

use crate::calibration::Calibration;
use crate::convert::part::PartSpec;
use crate::convert::ConvertOptions;
use crate::decompose::{RankRule, Route};
use crate::inspect::InspectOptions;
use crate::plan::{Budget, PlanOptions};
use crate::rank_rules::ModuleRule;
use crate::storage::FactorDtype;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// cersa: convert model checkpoints into their energy-retaining SVD subspace (CERSA v1).
#[derive(Debug, Parser)]
#[command(name = "cersa", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `argv` like `Cli::try_parse_from`, also recording the command-line order of
    /// convert's `--energy` and `--rank` rules (first match wins, in that order).
    pub fn parse_args<I, T>(argv: I) -> std::result::Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(argv)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        if let (Command::Convert(a), Some(("convert", sub))) =
            (&mut cli.command, matches.subcommand())
        {
            let mut ordered: Vec<(usize, &'static str, String)> = Vec::new();
            for flag in ["energy", "rank"] {
                if let (Some(idx), Some(vals)) =
                    (sub.indices_of(flag), sub.get_many::<String>(flag))
                {
                    ordered.extend(idx.zip(vals).map(|(i, v)| (i, flag, v.clone())));
                }
            }
            ordered.sort_by_key(|(i, _, _)| *i);
            a.rules_in_order = ordered.into_iter().map(|(_, f, v)| (f, v)).collect();
        }
        Ok(cli)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert a checkpoint (safetensors file, index, directory, GGUF file or split GGUF part, or PyTorch .pt/.pth/.bin or its .bin.index.json) into a CERSA directory.
    Convert(Box<ConvertArgs>),
    /// Show ranks and energies of a source checkpoint or of a CERSA directory.
    Inspect(InspectArgs),
    /// Check a CERSA directory: shard sha256, tensors vs manifest, finite factors, and
    /// (with --source) rel_error and dense bytes against the source. Exit 1 on a failed check.
    Verify(VerifyArgs),
    /// Write a self-contained HTML report (energy curves, rank heatmap, memory bars,
    /// spectra, per-tensor table) of a source checkpoint or a CERSA directory.
    Report(ReportArgs),
    /// Merge a trained adapter into its CERSA checkpoint, writing a new CERSA directory.
    Merge(MergeArgs),
    /// Choose every matrix's rank (or dense) so the output fits a byte budget with the most
    /// retained energy, from the singular values; writes a plan for `convert --plan`.
    Plan(PlanArgs),
    /// Export a CERSA directory (and optionally a trained adapter) to a plain Hugging Face
    /// safetensors model directory: factored tensors recomposed as U·diag(σ)·Vᵀ.
    Export(ExportArgs),
    /// Join the part directories of `convert --part I/N` into one CERSA directory,
    /// byte-identical to a one-machine convert with the same options (bytes are copied,
    /// nothing is recomputed).
    Assemble(AssembleArgs),
}

/// `cersa assemble`.
#[derive(Debug, Args)]
pub struct AssembleArgs {
    /// Output directory (must not exist, or be empty; see --overwrite).
    pub out_dir: PathBuf,
    /// Every part directory of the conversion, in any order.
    #[arg(required = true, num_args = 1..)]
    pub parts: Vec<PathBuf>,
    /// Replace OUT_DIR if it is a CERSA directory, once the new one is complete.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the result as JSON on stdout (the `convert --json` report).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Target format of `cersa export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportTarget {
    /// A Hugging Face model directory (`model.safetensors` or shards with
    /// `model.safetensors.index.json`, plus the side files).
    Safetensors,
    /// A PEFT LoRA adapter directory of `--adapter` (ΔW exactly as lora_B·lora_A) for the
    /// `--to safetensors` export of the same checkpoint without the adapter.
    Peft,
    /// One GGUF file for llama.cpp, `OUT_DIR/model.gguf`, with every metadata key of the
    /// GGUF source the checkpoint was converted from.
    Gguf,
}

/// Output dtype of `cersa export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    /// Each tensor's source float dtype (BF16 for quantized sources; dense tensors as stored).
    Source,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// GGML Q8_0 blocks (`--to gguf` only).
    #[value(name = "q8_0")]
    Q8_0,
    /// GGML Q5_0 blocks (`--to gguf` only).
    #[value(name = "q5_0")]
    Q5_0,
    /// GGML Q4_0 blocks (`--to gguf` only).
    #[value(name = "q4_0")]
    Q4_0,
}

/// `cersa export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The CERSA directory.
    pub cersa_dir: PathBuf,
    /// Output directory (must not exist, or be empty).
    pub out_dir: PathBuf,
    /// Target format.
    #[arg(long = "to", value_enum, default_value_t = ExportTarget::Safetensors)]
    pub target: ExportTarget,
    /// The trained adapter (format `cersa-adapter`): folded into the weights with
    /// `--to safetensors`, exported on its own with `--to peft` (required there).
    #[arg(long, required_if_eq("target", "peft"))]
    pub adapter: Option<PathBuf>,
    /// Dtype of the float tensors written. With `--to gguf`, an explicit type applies to
    /// tensors of two or more dimensions (one-dimensional ones stay F32, rows that are not
    /// whole 32-value blocks fall back to F16, as llama.cpp's converter does).
    #[arg(long, alias = "type", value_enum, default_value_t = ExportDtype::Source)]
    pub dtype: ExportDtype,
    /// Largest shard (e.g. 5GB, 500MiB, bytes); more shards get an index file.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Tensors recomposed at once (default: all cores). The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as JSON on stdout (`report_version` 1).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl ExportArgs {
    /// The library options.
    pub fn to_options(&self) -> Result<crate::export::ExportOptions> {
        let dtype = match self.dtype {
            ExportDtype::Source => None,
            ExportDtype::F32 => Some(cersa_loader::Dtype::F32),
            ExportDtype::F16 => Some(cersa_loader::Dtype::F16),
            ExportDtype::Bf16 => Some(cersa_loader::Dtype::BF16),
            ExportDtype::Q8_0 | ExportDtype::Q5_0 | ExportDtype::Q4_0 => {
                bail!(
                    "--dtype {:?} (a GGML block type) needs --to gguf",
                    self.dtype
                )
            }
        };
        Ok(crate::export::ExportOptions {
            dtype,
            max_shard_size: parse_size(&self.max_shard_size).context("--max-shard-size")?,
            threads: threads(self.threads)?,
            adapter: self.adapter.clone(),
        })
    }
}

impl ExportArgs {
    /// The library options of `--to gguf`.
    pub fn to_gguf_options(&self) -> Result<crate::export::gguf::GgufOptions> {
        use crate::export::gguf::GgufTarget;
        use cersa_loader::quant::Quant;
        use cersa_loader::Dtype;
        let target = match self.dtype {
            ExportDtype::Source => GgufTarget::Source,
            ExportDtype::F32 => GgufTarget::Float(Dtype::F32),
            ExportDtype::F16 => GgufTarget::Float(Dtype::F16),
            ExportDtype::Bf16 => GgufTarget::Float(Dtype::BF16),
            ExportDtype::Q8_0 => GgufTarget::Quant(Quant::Q8_0),
            ExportDtype::Q5_0 => GgufTarget::Quant(Quant::Q5_0),
            ExportDtype::Q4_0 => GgufTarget::Quant(Quant::Q4_0),
        };
        Ok(crate::export::gguf::GgufOptions {
            target,
            threads: threads(self.threads)?,
            adapter: self.adapter.clone(),
        })
    }
}

/// `cersa merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base CERSA directory the adapter was trained on.
    pub cersa_dir: PathBuf,
    /// The adapter file (safetensors, format `cersa-adapter`).
    pub adapter: PathBuf,
    /// Output directory (must not exist, or be empty; see --overwrite).
    pub out_dir: PathBuf,
    /// Decomposition route for the re-decomposed layers (default: the route recorded in
    /// the base checkpoint's manifest, `config.algorithm`; lapack and cuda need builds
    /// with those cargo features).
    #[arg(long, value_enum)]
    pub algorithm: Option<Route>,
    /// Replace OUT_DIR if it is a CERSA directory, once the new one is complete.
    #[arg(long)]
    pub overwrite: bool,
    /// The calibration statistics the base was converted with (needed when an adapted
    /// layer is whitened: it is re-truncated in the same output metric).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Print the result as JSON on stdout (`report_version` 1).
    #[arg(long)]
    pub json: bool,
}

/// Flags shared by the selection of tensors.
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Factor only tensors matching this glob (repeatable; replaces the default name rule).
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// Never factor tensors matching this glob (repeatable; wins over --include).
    #[arg(long = "exclude", value_name = "GLOB")]
    pub exclude: Vec<String>,
}

/// `cersa plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Source checkpoint.
    pub src: PathBuf,
    /// Budget for the whole output's tensor bytes: a size (300MB, 2GiB, bytes) or a ratio
    /// of the source's tensor bytes (0.5 or 0.5x).
    #[arg(long, value_name = "SIZE|RATIO")]
    pub budget: String,
    /// Dtype the factors will be stored in (the plan records it for convert).
    #[arg(long, value_enum, default_value = "source")]
    pub dtype: FactorDtype,
    /// Keep every matrix at retained energy ≥ TAU when the budget allows (says so if not).
    #[arg(long, value_name = "TAU")]
    pub energy_floor: Option<f64>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Write the plan here (default: print it as JSON on stdout).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Route of the singular values.
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub algorithm: Route,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses `--budget`: a ratio (`0.5`, `0.5x`) or a size (`300MB`).
pub fn parse_budget(text: &str) -> Result<Budget> {
    let t = text.trim();
    let ratio = t.strip_suffix('x').or_else(|| t.strip_suffix('X'));
    let as_ratio = match ratio {
        Some(r) => Some(
            r.trim()
                .parse::<f64>()
                .with_context(|| format!("--budget {text:?}: {r:?} is not a number"))?,
        ),
        None => t.parse::<f64>().ok().filter(|v| *v <= 1.0),
    };
    match as_ratio {
        Some(r) if r > 0.0 && r.is_finite() => Ok(Budget::Ratio(r)),
        Some(_) => bail!("--budget {text:?}: a ratio must be positive"),
        None => Ok(Budget::Bytes(parse_size(t).context("--budget")?)),
    }
}

impl PlanArgs {
    /// Validated options.
    pub fn to_options(&self) -> Result<PlanOptions> {
        Ok(PlanOptions {
            budget: parse_budget(&self.budget)?,
            dtype: self.dtype,
            energy_floor: self.energy_floor.map(check_energy).transpose()?,
            include: self.select.include.clone(),
            exclude: self.select.exclude.clone(),
            calibration: self.calibration.open()?,
        })
    }
}

/// `cersa convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source checkpoint.
    pub src: PathBuf,
    /// Output directory (must not exist, or be empty; see --overwrite).
    pub out_dir: PathBuf,
    /// Energy threshold τ in (0, 1] (default 0.90), or a per-module rule GLOB=TAU
    /// (repeatable; the first --energy/--rank rule whose glob matches a tensor's name, in
    /// command-line order, chooses its rank; e.g. --energy '*attn*=0.95').
    #[arg(long, value_name = "TAU|GLOB=TAU")]
    pub energy: Vec<String>,
    /// A fixed rank for the tensors matching GLOB (repeatable; capped at min(m, n); the
    /// rank clamps do not apply to it).
    #[arg(long, value_name = "GLOB=N")]
    pub rank: Vec<String>,
    /// The --energy and --rank values in command-line order (filled by
    /// [`Cli::parse_args`]; empty: --energy rules first, then --rank).
    #[arg(skip)]
    pub rules_in_order: Vec<(&'static str, String)>,
    /// Apply a plan of `cersa plan` exactly: its ranks, dense choices, dtype and selection
    /// (it must have been made for this source).
    #[arg(long, value_name = "PLAN_JSON", conflicts_with = "budget")]
    pub plan: Option<PathBuf>,
    /// Plan under this budget (as `cersa plan --budget`) and convert in one go.
    #[arg(long, value_name = "SIZE|RATIO")]
    pub budget: Option<String>,
    /// With --budget: keep every matrix at retained energy ≥ TAU when the budget allows.
    #[arg(long, value_name = "TAU", requires = "budget")]
    pub energy_floor: Option<f64>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Dtype of the stored factors (and of quantized GGUF tensors kept dense).
    #[arg(long, value_enum, default_value = "source")]
    pub dtype: FactorDtype,
    /// Lower clamp of the rank.
    #[arg(long, default_value_t = 1)]
    pub min_rank: usize,
    /// Upper clamp of the rank.
    #[arg(long)]
    pub max_rank: Option<usize>,
    /// Round ranks up to a multiple of N.
    #[arg(long, default_value_t = 1)]
    pub rank_multiple: usize,
    /// Factor matrices even when the factors are not smaller.
    #[arg(long)]
    pub force_factor: bool,
    /// Maximum shard size (e.g. 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Memory budget for tensors in flight (e.g. 512M, 4G, 2GiB, or bytes; default: half of
    /// MemAvailable). A worker starts a tensor only while the estimated footprints of the
    /// tensors being factored or waiting to be written fit; a tensor larger than the budget
    /// runs alone. The output does not depend on it.
    #[arg(long, value_name = "BYTES")]
    pub max_memory: Option<String>,
    /// Decomposition route (lapack and cuda need builds with those cargo features).
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub algorithm: Route,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Continue an interrupted conversion (Ctrl-C, crash, full disk) with the same source
    /// and options, keeping its re-verified finished shards. Without it, a stale partial
    /// output directory is removed.
    #[arg(long)]
    pub resume: bool,
    /// Replace OUT_DIR if it is a CERSA directory (holds a cersa.json of format cersa),
    /// once the new output is complete; anything else at OUT_DIR is refused and left alone.
    #[arg(long)]
    pub overwrite: bool,
    /// Convert only part I of N (0-based, e.g. 2/8) of the tensors, balanced by estimated
    /// work and the same on every node, into OUT_DIR as a part directory for `cersa
    /// assemble`; `auto` takes I and N from a Slurm array (SLURM_ARRAY_TASK_ID/_MIN/_COUNT)
    /// or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with --parts N).
    #[arg(long, value_name = "I/N|auto")]
    pub part: Option<String>,
    /// With --part auto: the number of parts. Kubernetes: the Job's completions (needed).
    /// Slurm: optional; with it the array task id is the part index, so some parts can be
    /// rerun alone (`sbatch --array=2`); without it the whole array is the conversion.
    #[arg(long, value_name = "N", requires = "part")]
    pub parts: Option<usize>,
}

/// What `inspect` and `report` both read: the source, the thresholds, the selection and the
/// worker count.
#[derive(Debug, Args)]
pub struct SpectraArgs {
    /// Source checkpoint or CERSA directory.
    pub path: PathBuf,
    /// Comma-separated thresholds (source only).
    #[arg(long, default_value = "0.9,0.95,0.99")]
    pub energy: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Route computing the singular values (source only; default auto: f64 Gram
    /// eigenvalues, the cheapest exact route).
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub algorithm: Route,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// Calibration statistics for the output metric.
#[derive(Debug, Args)]
pub struct CalibrationArgs {
    /// Input statistics from `cersa_torch.calibrate` (docs/calibration.md): matrices with
    /// statistics are truncated (convert, plan) or analysed (inspect, report) in their
    /// layers' output metric, so τ is a share of each layer's output energy on the
    /// calibration text.
    #[arg(long, value_name = "CALIB_SAFETENSORS")]
    pub calibration: Option<PathBuf>,
    /// With --calibration: relative damping δ (λ = δ·trace(G)/d is added to G's diagonal).
    #[arg(long, value_name = "DELTA", requires = "calibration", default_value_t = crate::calibration::DEFAULT_DAMPING)]
    pub calibration_damping: f64,
}

impl CalibrationArgs {
    /// The opened, checked statistics file, if any.
    pub fn open(&self) -> Result<Option<std::sync::Arc<Calibration>>> {
        if !(self.calibration_damping.is_finite() && self.calibration_damping >= 0.0) {
            bail!(
                "--calibration-damping {} must be a finite number ≥ 0",
                self.calibration_damping
            );
        }
        Ok(self
            .calibration
            .as_deref()
            .map(|p| Calibration::open(p, self.calibration_damping))
            .transpose()
            .context("--calibration")?
            .map(std::sync::Arc::new))
    }
}

impl SpectraArgs {
    /// Validated inspect options.
    pub fn to_options(&self, keep_singular_values: bool) -> Result<InspectOptions> {
        Ok(InspectOptions {
            energies: parse_energies(&self.energy)?,
            include: self.select.include.clone(),
            exclude: self.select.exclude.clone(),
            keep_singular_values,
            calibration: self.calibration.open()?,
        })
    }
}

/// `cersa inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub spectra: SpectraArgs,
    /// Print JSON on stdout (schema in docs/inspect-json.md).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print one CSV row per tensor on stdout.
    #[arg(long)]
    pub csv: bool,
    /// Terminal table rows: one per module kind, per layer, or per tensor.
    #[arg(long, value_enum, default_value = "kind")]
    pub group: super::inspect_view::GroupBy,
    /// Include every singular value in --json (source only).
    #[arg(long)]
    pub singular_values: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `cersa report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub spectra: SpectraArgs,
    /// Output HTML file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `cersa verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// CERSA directory.
    pub out_dir: PathBuf,
    /// The source checkpoint it was converted from (enables rel_error and dense-byte checks).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// The calibration statistics a whitened checkpoint was converted with (with --source:
    /// recomputes each whitened tensor's output-space error ‖(W−Ŵ)·X‖/‖W·X‖ from them).
    #[arg(long, requires = "source")]
    pub calibration: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses sizes like `5GB`, `500MB`, `2GiB`, `1.5G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => bail!("size {s:?}: unknown unit {other:?}"),
    };
    let bytes = value * mult;
    if !(1.0..1.8e19).contains(&bytes) {
        bail!("size {s:?} out of range");
    }
    Ok(bytes as u64)
}

/// Validates a threshold τ.
pub fn check_energy(e: f64) -> Result<f64> {
    if !(e > 0.0 && e <= 1.0) {
        bail!("energy threshold {e} must be in (0, 1]");
    }
    Ok(e)
}

/// Thread count: the flag, or every core.
pub fn threads(flag: Option<usize>) -> Result<usize> {
    match flag {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
    }
}

impl ConvertArgs {
    /// Validated options.
    pub fn to_options(&self) -> Result<ConvertOptions> {
        let given: Vec<(&'static str, String)> = if self.rules_in_order.is_empty() {
            let energies = self.energy.iter().map(|v| ("energy", v.clone()));
            energies
                .chain(self.rank.iter().map(|v| ("rank", v.clone())))
                .collect()
        } else {
            self.rules_in_order.clone()
        };
        let mut energy = None;
        let mut rules = Vec::new();
        for (flag, value) in &given {
            if *flag == "energy" && !value.contains('=') {
                let e: f64 = value
                    .trim()
                    .parse()
                    .with_context(|| format!("--energy: {value:?} is not a number"))?;
                if energy.replace(check_energy(e)?).is_some() {
                    bail!("--energy TAU is given twice (per-module rules are GLOB=TAU)");
                }
            } else {
                rules.push(ModuleRule::parse(flag, value)?);
            }
        }
        let energy = energy.unwrap_or(RankRule::default().energy);
        if self.rank_multiple == 0 {
            bail!("--rank-multiple must be at least 1");
        }
        if let Some(max) = self.max_rank {
            if max == 0 {
                bail!("--max-rank must be at least 1");
            }
            if max < self.min_rank {
                bail!("--max-rank {max} is below --min-rank {}", self.min_rank);
            }
        }
        let calibration = self.calibration.open()?;
        if self.part.is_some() && self.budget.is_some() {
            // Every part would compute every matrix's spectrum to plan: the whole work.
            bail!(
                "--budget plans from the spectra of the whole source, so every part would \
                 repeat that work: plan once with `cersa plan SRC --budget … -o plan.json` \
                 and give every part --plan plan.json"
            );
        }
        let part = match self.part.as_deref() {
            None => None,
            Some("auto") => Some(
                PartSpec::from_env(&|k| std::env::var(k).ok(), self.parts)
                    .map_err(anyhow::Error::msg)
                    .context("--part auto")?,
            ),
            Some(text) => {
                if self.parts.is_some() {
                    bail!("--parts goes with --part auto (--part I/N names the count)");
                }
                Some(
                    PartSpec::parse(text)
                        .map_err(anyhow::Error::msg)
                        .context("--part")?,
                )
            }
        };
        Ok(ConvertOptions {
            rule: RankRule {
                energy,
                min_rank: self.min_rank,
                max_rank: self.max_rank,
                rank_multiple: self.rank_multiple,
            },
            rules,
            plan: None,
            calibration,
            dtype: self.dtype,
            include: self.select.include.clone(),
            exclude: self.select.exclude.clone(),
            force_factor: self.force_factor,
            max_shard_size: parse_size(&self.max_shard_size).context("--max-shard-size")?,
            threads: threads(self.threads)?,
            algorithm: self.algorithm,
            resume: self.resume,
            overwrite: self.overwrite,
            max_memory: self
                .max_memory
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("--max-memory")?,
            part,
        })
    }
}

/// Parses a comma-separated list of thresholds.
pub fn parse_energies(text: &str) -> Result<Vec<f64>> {
    let energies = text
        .split(',')
        .map(|s| {
            let e: f64 = s
                .trim()
                .parse()
                .with_context(|| format!("--energy: {s:?} is not a number"))?;
            check_energy(e)
        })
        .collect::<Result<Vec<_>>>()?;
    if energies.is_empty() {
        bail!("--energy needs at least one threshold");
    }
    Ok(energies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn max_memory_flag() {
        let opts = |extra: &[&str]| {
            let mut argv = vec!["cersa", "convert", "in.safetensors", "out"];
            argv.extend_from_slice(extra);
            match Cli::parse_args(argv).expect("parses").command {
                Command::Convert(a) => a.to_options(),
                _ => unreachable!("convert"),
            }
        };
        assert_eq!(opts(&[]).unwrap().max_memory, None);
        let got = |v: &str| opts(&["--max-memory", v]).unwrap().max_memory;
        assert_eq!(got("512M"), Some(512_000_000));
        assert_eq!(got("4G"), Some(4_000_000_000));
        assert_eq!(got("2GiB"), Some(2 << 30));
        assert_eq!(got("1048576"), Some(1 << 20));
        for bad in ["0", "lots", "0.1", "4X"] {
            let e = opts(&["--max-memory", bad]).unwrap_err();
            assert!(format!("{e:#}").contains("--max-memory"), "{bad}: {e:#}");
        }
    }
}
