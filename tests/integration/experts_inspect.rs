//! Stacked mixture-of-experts tensors in `inspect`, `plan` (+ `convert --plan`) and
//! `report`: each expert's `[m, n]` matrix is analysed, planned and shown on its own.
//!
//! The experts are built with known singular values: expert e is `s_i` at `(i, π(i))`, a
//! scaled partial permutation, whose singular values are exactly the `|s_i|`. So the ranks
//! and bytes the tests expect are computed here from the `s_i`, independently of cersa.

use crate::util::*;
use cersa::inspect::{CheckpointReport, SourceReport, TensorSpectrum};
use cersa::plan::Plan;
use cersa_loader::{DenseReason, TensorKind};

const E: usize = 4;
const M: usize = 24;
const N: usize = 32;
const EXPERTS: &str = "model.layers.0.mlp.experts.down_proj";

/// Singular values of expert `e`: steep, flat, zero, harmonic.
fn sigma(e: usize) -> Vec<f64> {
    (0..M)
        .map(|i| match e {
            0 => 0.6f64.powi(i as i32),
            1 => 1.0,
            2 => 0.0,
            _ => 1.0 / (i + 1) as f64,
        })
        .collect()
}

/// The `[E, M, N]` values: expert e has σ_i at row i, column (7·i + e) mod N.
fn stacked() -> Vec<f32> {
    let mut v = vec![0f32; E * M * N];
    for e in 0..E {
        for (i, s) in sigma(e).into_iter().enumerate() {
            v[e * M * N + i * N + (7 * i + e) % N] = s as f32;
        }
    }
    v
}

/// A small MoE layer as safetensors: fused experts (no `weight` suffix), an attention
/// matrix and a norm vector.
fn source(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("moe.safetensors");
    write_f32(
        &src,
        &[
            (EXPERTS, vec![E, M, N], stacked()),
            (
                "model.layers.0.self_attn.q_proj.weight",
                vec![M, N],
                noise(5, M * N),
            ),
            (
                "model.layers.0.input_layernorm.weight",
                vec![N],
                vec![1.0; N],
            ),
        ],
    );
    src
}

/// Smallest r with Σ_{i≤r} σᵢ² ≥ τ·Σ σᵢ² (σ non-increasing).
fn rank_at(s: &[f64], tau: f64) -> usize {
    let total: f64 = s.iter().map(|x| x * x).sum();
    let mut acc = 0.0;
    for (i, x) in s.iter().enumerate() {
        acc += x * x;
        if acc >= tau * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    s.len()
}

/// F32 bytes `convert --dtype source` stores for an M×N expert at rank r.
fn expert_bytes(r: usize) -> u64 {
    if r * (M + N + 1) < M * N {
        (r * (M + N) * 4 + 4 * r) as u64
    } else {
        (M * N * 4) as u64
    }
}

fn experts_of(r: &SourceReport) -> &TensorSpectrum {
    r.tensors.iter().find(|t| t.name == EXPERTS).unwrap()
}

#[test]
fn inspect_analyses_each_expert_and_convert_agrees() {
    let dir = tmp();
    let src = source(dir.path());
    let json = cersa_ok(&[
        "inspect",
        s(&src),
        "--json",
        "--singular-values",
        "--energy",
        "0.9,0.99",
        "-q",
    ]);
    let r: SourceReport = serde_json::from_str(&json).unwrap();
    assert_eq!(r.schema_version, cersa::inspect::SCHEMA_VERSION);
    let t = experts_of(&r);
    assert_eq!(t.matrix_shape, Some([M, N]), "one expert's matrix view");
    assert_eq!(t.experts.len(), E);
    for (e, x) in t.experts.iter().enumerate() {
        assert_eq!(x.name, format!("{EXPERTS}.cersa_expert.{e}"));
        assert_eq!(x.shape, vec![M, N]);
        assert_eq!(
            (x.params, x.source_bytes),
            ((M * N) as u64, (M * N * 4) as u64)
        );
        assert_eq!(x.module_kind, "mlp.experts.down_proj");
        if e == 2 {
            assert_eq!(x.reason, Some(DenseReason::Zero));
            assert!(x.ranks.is_empty());
            continue;
        }
        // Its own spectrum: min(M, N) values, equal to the constructed ones.
        let want = sigma(e);
        assert_eq!(x.singular_values.len(), M, "{}", x.name);
        for (got, want) in x.singular_values.iter().zip(&want) {
            assert!((got - want).abs() < 1e-6, "{}: {got} vs {want}", x.name);
        }
        for (k, tau) in [0.9, 0.99].into_iter().enumerate() {
            assert_eq!(x.ranks[k].rank, rank_at(&want, tau), "{} at {tau}", x.name);
        }
    }
    // The tensor's bytes at each τ are the experts' sum (dense where factoring saves
    // nothing, the zero expert dense), and so are the totals.
    for (k, tau) in [0.9, 0.99].into_iter().enumerate() {
        let want: u64 = (0..E)
            .map(|e| match e {
                2 => (M * N * 4) as u64,
                _ => expert_bytes(rank_at(&sigma(e), tau)),
            })
            .sum();
        assert_eq!(t.ranks[k].stored_bytes, want, "τ = {tau}");
        let others: u64 = r
            .tensors
            .iter()
            .filter(|x| x.name != EXPERTS)
            .map(|x| x.ranks.get(k).map_or(x.source_bytes, |a| a.stored_bytes))
            .sum();
        assert_eq!(r.totals.at_energy[k].stored_bytes, want + others);
        let kind = r
            .by_kind
            .iter()
            .find(|g| g.key == "mlp.experts.down_proj")
            .unwrap();
        assert_eq!(kind.matrices, 3, "the three nonzero experts");
        assert_eq!(kind.at_energy[k].stored_bytes, want);
    }
    // The terminal and CSV list every expert.
    let table = cersa_ok(&["inspect", s(&src), "--group", "none", "-q"]);
    let csv = cersa_ok(&["inspect", s(&src), "--csv", "-q"]);
    for e in 0..E {
        let name = format!("{EXPERTS}.cersa_expert.{e}");
        assert!(table.contains(&name) && csv.contains(&name), "{name}");
    }
    assert!(table.contains("4 matrices analysed"), "{table}");

    // convert at τ = 0.9 keeps exactly the ranks inspect predicted, per expert, and the
    // bytes inspect counted.
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--energy", "0.9", "-q"]);
    let man = cersa_loader::read_manifest(&out).unwrap();
    let info = &man.tensors[EXPERTS];
    assert_eq!(info.kind, TensorKind::Experts);
    for (e, x) in info.experts.as_ref().unwrap().iter().enumerate() {
        let predicted = t.experts[e].ranks.first();
        match x.kind {
            TensorKind::Factored => {
                let a = predicted.unwrap();
                assert!(a.saves);
                assert_eq!(x.rank, Some(a.rank), "expert {e}");
            }
            _ => assert!(predicted.is_none_or(|a| !a.saves), "expert {e}"),
        }
    }
    assert_eq!(man.totals.stored_bytes, r.totals.at_energy[0].stored_bytes);

    // inspect OUT lists the experts with their stored ranks; the report is not blank.
    let c: CheckpointReport =
        serde_json::from_str(&cersa_ok(&["inspect", s(&out), "--json"])).unwrap();
    let st = c.tensors.iter().find(|x| x.name == EXPERTS).unwrap();
    assert_eq!(st.kind, TensorKind::Experts);
    assert_eq!(st.experts.len(), E);
    for (x, rec) in st.experts.iter().zip(info.experts.as_ref().unwrap()) {
        assert_eq!((x.kind, x.rank), (rec.kind, rec.rank), "{}", x.name);
    }
    let stored: u64 = st.experts.iter().map(|x| x.stored_bytes).sum();
    assert_eq!(stored, st.stored_bytes);
    let all: u64 = c.tensors.iter().map(|x| x.stored_bytes).sum();
    assert_eq!(all, c.totals.stored_bytes);
    let factored = st
        .experts
        .iter()
        .filter(|x| x.kind == TensorKind::Factored)
        .count();
    let kind = c
        .by_kind
        .iter()
        .find(|g| g.key == "mlp.experts.down_proj")
        .unwrap();
    assert_eq!(kind.matrices, factored);
    let table = cersa_ok(&["inspect", s(&out), "--group", "none"]);
    assert!(
        table.contains(&format!("{EXPERTS}.cersa_expert.0")),
        "{table}"
    );
    assert!(table.contains("factored)"), "{table}");

    let html_path = dir.path().join("cersa.html");
    cersa_ok(&["report", s(&out), "-o", s(&html_path), "-q"]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    // Every factored matrix and every factored expert has a spectrum.
    let factored_matrices = c
        .tensors
        .iter()
        .filter(|x| x.kind == TensorKind::Factored)
        .count();
    let note = format!("· {} matrices ·", factored_matrices + factored);
    assert!(html.contains(&note), "{note}");
    assert!(html.contains(&format!("{EXPERTS}.cersa_expert.3")));
    let html_path = dir.path().join("src.html");
    cersa_ok(&["report", s(&src), "-o", s(&html_path), "-q"]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains("· 4 matrices ·"), "q_proj and three experts");
}

#[test]
fn plan_gives_each_expert_its_own_rank_and_convert_applies_it() {
    let dir = tmp();
    let src = source(dir.path());
    let plan_path = dir.path().join("plan.json");
    cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.4",
        "-o",
        s(&plan_path),
        "-q",
    ]);
    let text = std::fs::read_to_string(&plan_path).unwrap();
    let plan: Plan = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = plan.tensors.keys().map(String::as_str).collect();
    let expert = |e: usize| format!("{EXPERTS}.cersa_expert.{e}");
    // One entry per nonzero expert, none for the stacked tensor or the zero expert.
    assert_eq!(
        names,
        [
            expert(0).as_str(),
            &expert(1),
            &expert(3),
            "model.layers.0.self_attn.q_proj.weight"
        ]
    );
    for e in [0, 1, 3] {
        assert_eq!(plan.tensors[&expert(e)].matrix_shape, [M, N]);
    }
    let t = &plan.totals;
    assert!(t.stored_bytes <= t.budget_bytes);
    // The zero expert (dense) and the norm vector are the fixed bytes.
    assert_eq!(t.fixed_bytes, (M * N * 4 + N * 4) as u64);
    // Each expert is planned on its own spectrum: its energy is E(r) of its own σ.
    let mut ranks = Vec::new();
    for e in [0, 1, 3] {
        let p = &plan.tensors[&expert(e)];
        let s = sigma(e);
        let total: f64 = s.iter().map(|x| x * x).sum();
        let want = match p.rank {
            Some(r) => s[..r].iter().map(|x| x * x).sum::<f64>() / total,
            None => 1.0,
        };
        assert!(
            (p.energy - want).abs() < 1e-6,
            "expert {e}: {} vs {want}",
            p.energy
        );
        ranks.push(p.rank);
    }
    assert!(ranks.iter().any(|r| *r != ranks[0]), "{ranks:?}");

    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--plan", s(&plan_path), "-q"]);
    let man = cersa_loader::read_manifest(&out).unwrap();
    assert_eq!(man.totals.stored_bytes, t.stored_bytes);
    assert!(man.totals.stored_bytes <= t.budget_bytes);
    let records = man.tensors[EXPERTS].experts.clone().unwrap();
    for e in [0, 1, 3] {
        let want = plan.tensors[&expert(e)].rank;
        let rec = &records[e];
        assert_eq!(rec.rank, want, "expert {e}");
        if want.is_none() {
            assert_eq!(rec.reason, Some(DenseReason::Planned), "expert {e}");
        }
    }
    assert_eq!(records[2].reason, Some(DenseReason::Zero));
    assert!(cersa_loader::validate(&out).is_empty());

    // An edited plan must name experts that exist, one at a time.
    let edit = |from: &str, to: &str, needle: &str| {
        let p = dir.path().join("edited.json");
        std::fs::write(&p, text.replace(from, to)).unwrap();
        let err = cersa_fails(
            &[
                "convert",
                s(&src),
                s(&dir.path().join("x")),
                "--plan",
                s(&p),
            ],
            2,
        );
        assert!(err.contains(needle), "{err}");
        assert!(!dir.path().join("x").exists());
    };
    edit(
        &format!("\"{}\"", expert(3)),
        &format!("\"{}\"", expert(9)),
        "which has 4 experts",
    );
    edit(
        &format!("\"{}\"", expert(3)),
        &format!("\"{EXPERTS}\""),
        "one expert at a time",
    );
    edit(
        &format!("\"{}\"", expert(3)),
        &format!("\"{EXPERTS}.cersa_expert.03\""),
        "not an expert index",
    );
}

#[test]
fn gguf_stacked_experts_are_inspected_per_expert() {
    // A Mixtral-style GGUF layer: blk.0.ffn_up_exps.weight is [E, M, N].
    let dir = tmp();
    let src = dir.path().join("moe.gguf");
    let tensors = [
        (
            "blk.0.ffn_up_exps.weight",
            vec![E as u64, M as u64, N as u64],
            stacked(),
        ),
        (
            "blk.0.attn_q.weight",
            vec![M as u64, N as u64],
            noise(8, M * N),
        ),
    ];
    std::fs::write(&src, gguf_bytes(&[], &tensors)).unwrap();
    let r: SourceReport = serde_json::from_str(&cersa_ok(&[
        "inspect",
        s(&src),
        "--json",
        "--energy",
        "0.9",
        "-q",
    ]))
    .unwrap();
    let t = r
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_up_exps.weight")
        .unwrap();
    assert_eq!(t.experts.len(), E);
    assert_eq!(t.module_kind, "ffn_up_exps");
    let ranks: Vec<usize> = t
        .experts
        .iter()
        .filter_map(|x| x.ranks.first().map(|a| a.rank))
        .collect();
    let want: Vec<usize> = [0, 1, 3].iter().map(|&e| rank_at(&sigma(e), 0.9)).collect();
    assert_eq!(ranks, want);
    assert_eq!(t.ranks[0].rank, *want.iter().max().unwrap());
}
