//! `cersa plan` and `convert --plan/--budget`: the plan fits its budget, convert applies it
//! exactly, refuses a plan of another source, and names the smallest feasible budget.

use crate::util::*;
use cersa::plan::Plan;

#[test]
fn plan_fits_its_budget_and_convert_applies_it_exactly() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let plan_path = dir.path().join("plan.json");
    let summary = cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.3",
        "--dtype",
        "q8_0",
        "-o",
        s(&plan_path),
        "-q",
    ]);
    assert!(summary.contains("attention.self.query"), "{summary}");
    let plan: Plan = serde_json::from_slice(&std::fs::read(&plan_path).unwrap()).unwrap();
    let t = &plan.totals;
    assert_eq!(t.matrices, 6);
    assert!(t.stored_bytes <= t.budget_bytes);
    assert_eq!(t.budget_bytes, (0.3 * t.source_bytes as f64).floor() as u64);
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--plan", s(&plan_path), "-q"]);
    let man = cersa_loader::read_manifest(&out).unwrap();
    assert_eq!(
        man.totals.stored_bytes, t.stored_bytes,
        "the plan's bytes are the output's"
    );
    assert_eq!(man.config.dtype, "q8_0");
    for (name, e) in &plan.tensors {
        let info = &man.tensors[name];
        assert_eq!(info.rank, e.rank, "{name}");
        match e.rank {
            Some(_) => assert_eq!(info.rule.as_deref(), Some("plan")),
            None => assert_eq!(info.reason, Some(cersa_loader::DenseReason::Planned)),
        }
        // The plan's E is the energy the conversion retains (values-only f64 spectrum vs the
        // route's f32 one: within ~1e-5).
        if let Some(energy) = info.energy {
            assert!(
                (energy - e.energy).abs() < 1e-5,
                "{name}: {energy} vs {}",
                e.energy
            );
        }
    }
    assert!(cersa_loader::validate(&out).is_empty());
    // --budget plans and converts in one go: the same bytes.
    let once = dir.path().join("once");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&once),
        "--budget",
        "0.3",
        "--dtype",
        "q8_0",
        "-q",
    ]);
    for file in ["cersa.json", "cersa-00001-of-00001.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(once.join(file)).unwrap(),
            "{file}"
        );
    }
    // A plan made for another source is refused.
    let other = dir.path().join("other.safetensors");
    write_f32(&other, &[("a.weight", vec![40, 30], noise(3, 1200))]);
    let err = cersa_fails(
        &[
            "convert",
            s(&other),
            s(&dir.path().join("x")),
            "--plan",
            s(&plan_path),
        ],
        2,
    );
    assert!(err.contains("another source"), "{err}");
}

#[test]
fn infeasible_budgets_name_the_smallest_feasible_one() {
    let src = fixture("minilm-excerpt/model.safetensors");
    let err = cersa_fails(&["plan", s(&src), "--budget", "1kB", "-q"], 2);
    assert!(err.contains("smallest feasible"), "{err}");
    // A floor the budget cannot afford is dropped, and the summary says so.
    let dir = tmp();
    let p = dir.path().join("p.json");
    let text = cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.1",
        "--energy-floor",
        "0.99",
        "-o",
        s(&p),
        "-q",
    ]);
    assert!(text.contains("warning"), "{text}");
    let plan: Plan = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(plan.totals.floor_met, Some(false));
    // An affordable floor holds for every matrix.
    let text = cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.6",
        "--energy-floor",
        "0.8",
        "-o",
        s(&p),
        "-q",
    ]);
    assert!(!text.contains("warning"), "{text}");
    let plan: Plan = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(plan.totals.floor_met, Some(true));
    assert!(plan.tensors.values().all(|e| e.energy >= 0.8));
}

#[test]
fn an_edited_plan_is_applied_and_a_broken_one_refused() {
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let p = dir.path().join("p.json");
    cersa_ok(&["plan", s(&src), "--budget", "0.4", "-o", s(&p), "-q"]);
    let plan: Plan = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let mut names = plan.tensors.keys().cloned();
    let (a, b) = (names.next().unwrap(), names.next().unwrap());
    let edit = |f: &dyn Fn(&mut Plan)| {
        let mut e = plan.clone();
        f(&mut e);
        std::fs::write(&p, serde_json::to_vec_pretty(&e).unwrap()).unwrap();
    };
    // A hand edit is applied as written: a rank of 7 and a dense choice.
    edit(&|e| {
        e.tensors.get_mut(&a).unwrap().rank = Some(7);
        e.tensors.get_mut(&b).unwrap().rank = None;
    });
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--plan", s(&p), "-q"]);
    let man = cersa_loader::read_manifest(&out).unwrap();
    assert_eq!(man.tensors[&a].rank, Some(7));
    assert_eq!(
        man.tensors[&b].reason,
        Some(cersa_loader::DenseReason::Planned)
    );
    assert_eq!(man.config.rules, vec!["plan".to_string()]);
    assert!(cersa_loader::validate(&out).is_empty());
    // Ranks outside 1..=min(m, n), a wrong shape or an unknown name are refused by name.
    let [m, n] = plan.tensors[&a].matrix_shape;
    type Edit<'a> = &'a dyn Fn(&mut Plan);
    let cases: [(Edit, &str); 4] = [
        (&|e| e.tensors.get_mut(&a).unwrap().rank = Some(0), "rank 0"),
        (
            &|e| e.tensors.get_mut(&a).unwrap().rank = Some(m.min(n) + 1),
            "outside",
        ),
        (
            &|e| e.tensors.get_mut(&a).unwrap().matrix_shape = [n + 1, m],
            "matrix_shape",
        ),
        (
            &|e| {
                let x = e.tensors[&a].clone();
                e.tensors.insert("no.such.weight".into(), x);
            },
            "no such tensor",
        ),
    ];
    for (i, (f, want)) in cases.into_iter().enumerate() {
        edit(f);
        let x = dir.path().join(format!("x{i}"));
        let err = cersa_fails(&["convert", s(&src), s(&x), "--plan", s(&p)], 2);
        assert!(err.contains(want), "{want}: {err}");
        assert!(!x.exists(), "no output for a refused plan");
    }
}

#[test]
fn committed_plan_vector_applies_and_regenerates_its_ranks() {
    let vector = fixture("minilm-excerpt/plan-q8_0-budget-0.3.json");
    let committed: Plan = serde_json::from_slice(&std::fs::read(&vector).unwrap()).unwrap();
    assert_eq!(committed.plan_version, cersa::plan::PLAN_VERSION);
    let dir = tmp();
    let src = fixture("minilm-excerpt/model.safetensors");
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "--plan", s(&vector), "-q"]);
    let man = cersa_loader::read_manifest(&out).unwrap();
    assert_eq!(man.totals.stored_bytes, committed.totals.stored_bytes);
    for (name, e) in &committed.tensors {
        assert_eq!(man.tensors[name].rank, e.rank, "{name}");
    }
    // Today's planner makes the same choices from the same source and options.
    let fresh = dir.path().join("fresh.json");
    cersa_ok(&[
        "plan",
        s(&src),
        "--budget",
        "0.3",
        "--dtype",
        "q8_0",
        "-o",
        s(&fresh),
        "-q",
    ]);
    let fresh: Plan = serde_json::from_slice(&std::fs::read(&fresh).unwrap()).unwrap();
    assert_eq!(fresh.source, committed.source);
    let ranks = |p: &Plan| -> Vec<_> { p.tensors.values().map(|e| e.rank).collect() };
    assert_eq!(ranks(&fresh), ranks(&committed));
}
