//! Human-readable tables for the terminal.

use crate::convert::ConvertReport;
use std::fmt::Write;

/// Counts with k/M/G suffixes.
pub(crate) fn human(n: u64) -> String {
    crate::report::si_text(n, "", "")
}

/// Renders rows with left-aligned first column and right-aligned others.
pub(crate) fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        for (k, (c, w)) in cells.iter().zip(&width).enumerate() {
            if k == 0 {
                let _ = write!(out, "{c:<w$}");
            } else {
                let _ = write!(out, "  {c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, header);
    for r in rows {
        line(&mut out, r);
    }
    out
}

/// How the ranks were chosen, in words.
fn rank_choice(c: &cersa_loader::manifest::ConvertConfig) -> String {
    match c.rules.as_slice() {
        [only] if only == crate::rank_rules::PLAN_RULE => "ranks: from the plan".into(),
        [] => format!("energy threshold τ = {}", c.energy),
        rules => format!(
            "energy threshold τ = {}; rules: {}",
            c.energy,
            rules.join(", ")
        ),
    }
}

/// `cersa convert` summary.
pub fn convert_summary(r: &ConvertReport) -> String {
    let t = &r.manifest.totals;
    let part = match r.part {
        Some(p) => format!(
            "part {} of {}: its share of the tensors; `cersa assemble` joins the parts\n",
            p.index, p.count
        ),
        None => String::new(),
    };
    part + &format!(
        "wrote {} ({} shard(s)) in {:.1}s\n\
         tensors: {} factored, {} dense\n\
         params:  {} → {} ({:.3}×)\n\
         bytes:   {} → {} ({:.3}×)\n\
         {}\n",
        r.out_dir.display(),
        r.manifest.shards.len(),
        r.seconds,
        t.factored_tensors,
        t.dense_tensors,
        human(t.source_params),
        human(t.stored_params),
        r.param_ratio,
        human(t.source_bytes),
        human(t.stored_bytes),
        r.byte_ratio,
        rank_choice(&r.manifest.config),
    ) + &whitening_summary(&r.manifest)
}

/// For a whitened conversion: how many tensors used the statistics, and their mean errors
/// in both metrics (the output one is what the rank rule kept).
fn whitening_summary(m: &cersa_loader::Manifest) -> String {
    let Some(cal) = &m.config.calibration else {
        return String::new();
    };
    let white: Vec<_> = m
        .tensors
        .values()
        .filter_map(|t| Some((t.whitening.as_ref()?, t.rel_error?)))
        .collect();
    if white.is_empty() {
        return format!(
            "calibration {}…: no factored tensor used it\n",
            &cal.sha256[..12]
        );
    }
    let k = white.len() as f64;
    let out = white.iter().map(|(w, _)| w.output_rel_error).sum::<f64>() / k;
    let weight = white.iter().map(|(_, e)| e).sum::<f64>() / k;
    format!(
        "whitened: {} tensors (calibration {}…, damping δ = {}); mean rel. error: outputs \
         {out:.4}, weights {weight:.4}\n",
        white.len(),
        &cal.sha256[..12],
        cal.damping
    )
}

/// `cersa verify` result: every failure, then a one-line verdict.
pub fn verify_summary(r: &crate::verify::VerifyReport) -> String {
    let mut out = String::new();
    for f in &r.failures {
        let check = serde_json::to_value(f.check)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = write!(out, "FAIL {check:<15}");
        if let Some(file) = &f.file {
            let _ = write!(out, " {file}");
        }
        if let Some(t) = &f.tensor {
            let _ = write!(out, " `{t}`");
        }
        let _ = write!(out, ": {}", f.detail);
        if let (Some(e), Some(x)) = (&f.expected, &f.found) {
            let _ = write!(out, " (expected {e}, found {x})");
        }
        out.push('\n');
    }
    for s in &r.skipped {
        let _ = writeln!(out, "skipped: {s}");
    }
    let c = &r.counts;
    let _ = writeln!(
        out,
        "{}: {} shard(s) hashed, {} tensor(s) checked{}",
        if r.ok {
            "OK".to_string()
        } else {
            format!("FAILED ({} check(s))", r.failures.len())
        },
        c.shards,
        c.tensors,
        if r.source.is_some() {
            format!(
                ", {} rel_error(s) recomputed, {} dense tensor(s) compared with the source{}",
                c.rel_errors_compared,
                c.dense_compared,
                if c.output_errors_compared > 0 {
                    format!(
                        ", {} output-space error(s) recomputed from the calibration",
                        c.output_errors_compared
                    )
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        }
    );
    out
}

/// `cersa merge` summary: one line per re-decomposed layer.
pub fn merge_summary(r: &crate::merge::MergeReport) -> String {
    let mut text = format!(
        "merged {} layer(s) into {} (route {})\n",
        r.layers.len(),
        r.out_dir.display(),
        r.algorithm
    );
    for l in &r.layers {
        let _ = writeln!(
            text,
            "  {}  rank {} -> {}  energy {:.4}  rel_error {:.3e}",
            l.name, l.old_rank, l.new_rank, l.energy, l.rel_error
        );
    }
    text
}

/// `cersa export` summary.
pub fn export_summary(r: &crate::export::ExportReport) -> String {
    let mut out = format!(
        "wrote {}: {} tensors ({} recomposed from factors{}), {} in {} file(s)\n",
        r.out_dir.display(),
        r.tensors,
        r.recomposed,
        match r.adapted {
            0 => String::new(),
            n => format!(", {n} with the adapter folded in"),
        },
        human(r.tensor_bytes),
        r.files.len(),
    );
    if !r.side_files.is_empty() {
        out += &format!("side files: {}\n", r.side_files.join(", "));
    }
    out
}

/// `cersa export --to gguf` without `--json`.
pub fn gguf_export_summary(r: &crate::export::gguf::GgufReport) -> String {
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    let mut out = format!(
        "wrote {}: {} tensors ({} recomposed from factors{}; {}), {} metadata keys, {}\n",
        r.file.display(),
        r.tensors,
        r.recomposed,
        match r.adapted {
            0 => String::new(),
            n => format!(", {n} with the adapter folded in"),
        },
        types.join(", "),
        r.metadata_keys,
        human(r.bytes),
    );
    if !r.fallbacks.is_empty() {
        out += &format!(
            "{} tensor(s) written as F16 (rows not whole 32-value blocks): {}\n",
            r.fallbacks.len(),
            r.fallbacks.join(", ")
        );
    }
    out
}
