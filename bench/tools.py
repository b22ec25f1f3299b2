#!/usr/bin/env python3
"""Helpers for bench/run.sh: test-matrix and checkpoint generators, numpy/scipy timings,
a wall-time + peak-RSS wrapper, and the rank comparison.

  tools.py gen-matrices OUT.safetensors SIZES      e.g. 384x384,1536x384,2048x2048
  tools.py gen-llama OUT_DIR [--hidden 2048 --layers 4 --ffn 5632 --vocab 32000 --repeat N]
  tools.py largest-decomposed CERSA_OUT/cersa.json  bytes of the largest decomposed tensor in f32
  tools.py numpy-times FILE [--cap SECONDS]        numpy svd + scipy gesdd per tensor
  tools.py measure -- CMD...                       prints 'wall_s peak_rss_mib' of CMD
  tools.py compare-ranks CERSA_OUT/cersa.json REF_OUT/ranks.json
  tools.py cli-times CERSA FILE WORK ROUTES CAP    per-matrix `cersa convert` wall times
  tools.py matrix-table TSV...                     markdown table of the per-matrix timings
"""
import json
import resource
import subprocess
import sys
import time

import numpy as np


def power_law(m, n, rng, alpha=0.4, dtype=np.float32):
    """m×n matrix with σᵢ ≈ i^-alpha: Gaussian factors are near-orthogonal in high
    dimension, so G1·diag(σ)·G2ᵀ/√(m n) has an approximately power-law spectrum (like
    trained projection weights), at the cost of two GEMMs instead of two QRs."""
    k = min(m, n)
    sigma = (np.arange(1, k + 1, dtype=np.float64) ** -alpha).astype(np.float32)
    g1 = rng.standard_normal((m, k), dtype=np.float32) / np.sqrt(m)
    g2 = rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(n)
    w = (g1 * sigma) @ g2.T
    noise = rng.standard_normal((m, n), dtype=np.float32) * (1e-3 / np.sqrt(n))
    return (w + noise).astype(dtype)


def gen_matrices(out, sizes):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for s in sizes.split(","):
        m, n = (int(x) for x in s.split("x"))
        tensors[f"w{m}x{n}.weight"] = power_law(m, n, rng)
    save_file(tensors, out)


def gen_llama(out_dir, hidden, layers, ffn, vocab, repeat=1):
    """A Llama-shaped BF16 checkpoint (model.safetensors) with power-law spectra. With
    repeat N every tensor appears N times (copies 2..N named `rep{c}.NAME`, same values), for
    checking that memory does not grow with the model size."""
    import os

    import torch  # noqa: F401  (only for bf16 storage)
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    t = {}

    def bf16(a):
        return torch.from_numpy(a).to(torch.bfloat16)

    t["model.embed_tokens.weight"] = bf16(rng.standard_normal((vocab, hidden), dtype=np.float32) * 0.02)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            t[p + f"self_attn.{name}.weight"] = bf16(power_law(hidden, hidden, rng))
        t[p + "mlp.gate_proj.weight"] = bf16(power_law(ffn, hidden, rng))
        t[p + "mlp.up_proj.weight"] = bf16(power_law(ffn, hidden, rng))
        t[p + "mlp.down_proj.weight"] = bf16(power_law(hidden, ffn, rng))
        t[p + "input_layernorm.weight"] = bf16(np.ones(hidden, dtype=np.float32))
        t[p + "post_attention_layernorm.weight"] = bf16(np.ones(hidden, dtype=np.float32))
    t["model.norm.weight"] = bf16(np.ones(hidden, dtype=np.float32))
    for c in range(1, repeat):
        # Copies, not views: safetensors refuses tensors that share memory.
        t.update({f"rep{c}.{k}": v.clone() for k, v in list(t.items()) if not k.startswith("rep")})
    os.makedirs(out_dir, exist_ok=True)
    save_file(t, os.path.join(out_dir, "model.safetensors"))


def numpy_times(path, cap):
    import scipy.linalg
    from safetensors.numpy import load_file

    over_cap = set()
    # Smallest first: a library that exceeded the cap is skipped for the larger matrices.
    for name, w in sorted(load_file(path).items(), key=lambda kv: kv[1].size):
        if w.ndim != 2:
            continue
        w = w.astype(np.float32)
        m, n = w.shape
        for label, fn in [
            ("numpy", lambda a: np.linalg.svd(a, full_matrices=False)),
            ("scipy-gesdd", lambda a: scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesdd")),
        ]:
            if label in over_cap:
                continue
            t0 = time.perf_counter()
            fn(w)
            dt = time.perf_counter() - t0
            print(f"{name}\t{m}\t{n}\t{label}\t-\t{dt:.4f}\t-", flush=True)
            if dt > cap:
                over_cap.add(label)


def cli_times(cersa, path, work, routes, cap):
    """Per-matrix wall time of `cersa convert --include NAME --threads 1` for each route
    (includes reading, the stored-factor residual and writing: an upper bound on the
    decomposition time; for kernel-only timings use examples/bench_decompose.rs)."""
    import os
    import shutil

    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        names = [(k, f.get_slice(k).get_shape()) for k in f.keys()]
    for name, (m, n) in names:
        for route in routes.split(","):
            out = os.path.join(work, f"cli-{route}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([cersa, "convert", path, out, "--include", name, "--algorithm", route,
                            "--threads", "1", "--quiet"], check=True, stdout=subprocess.DEVNULL)
            dt = time.perf_counter() - t0
            rank = json.load(open(os.path.join(out, "cersa.json")))["tensors"][name].get("rank", "dense")
            print(f"{name}\t{m}\t{n}\t{route}\t{rank}\t{dt:.4f}\t-", flush=True)
            if dt > cap:
                return


def largest_decomposed(manifest):
    """Bytes in f32 of the largest tensor that was decomposed (factored, or found not to
    save), from a CERSA manifest."""
    best = 0
    for info in json.load(open(manifest))["tensors"].values():
        if info["kind"] == "factored" or info.get("reason") == "no-saving":
            numel = 1
            for d in info["shape"]:
                numel *= d
            best = max(best, 4 * numel)
    print(best)


def measure(cmd):
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"{wall:.2f} {peak_kib / 1024:.0f}")
    sys.exit(rc)


def compare_ranks(manifest, ref):
    got = {k: v.get("rank") for k, v in json.load(open(manifest))["tensors"].items() if v["kind"] == "factored"}
    want = json.load(open(ref))
    want = {k: v for k, v in want.items() if v is not None}
    same = sum(1 for k in want if got.get(k) == want[k])
    diff = [(k, got.get(k), want[k]) for k in want if got.get(k) != want[k]]
    extra = [k for k in got if k not in want]
    print(f"{same}/{len(want)} identical" + (f"; differ: {diff[:5]}" if diff else "") + (f"; only cersa: {extra[:5]}" if extra else ""))


def matrix_table(*files):
    """Per-matrix table from the tab-separated timings of bench_decompose and numpy-times.

    Given several runs' files, each (matrix, route) keeps its fastest run: the same rule for
    cersa and numpy/scipy, against run-to-run noise of a shared machine."""
    rows = {}
    for path in files:
        for line in open(path):
            name, m, n, route, rank, secs, gflops = line.rstrip("\n").split("\t")
            shape = rows.setdefault((int(m), int(n)), {})
            if route not in shape or float(secs) < shape[route][1]:
                shape[route] = (rank, float(secs), gflops)
    cols = ["svd", "gram", "randomized", "numpy", "scipy-gesdd", "gemm"]
    if any("lapack" in r for r in rows.values()):
        cols.insert(3, "lapack")  # cersa built with --features lapack
    print("| matrix | " + " | ".join(f"{c} s" for c in cols) + " | numpy/gram | gesdd/gram | gram GFLOP/s (nominal) | GEMM GFLOP/s 1 thread | gram % of GEMM | GEMM GFLOP/s all cores | ranks svd/gram/rand |")
    print("|" + "---|" * (len(cols) + 8))
    for (m, n), r in sorted(rows.items(), key=lambda x: x[0][0] * x[0][1]):
        t = lambda c: f"{r[c][1]:.3f}" if c in r else "skip"
        ratio = lambda c: f"{r[c][1] / r['gram'][1]:.1f}×" if c in r and "gram" in r else "-"
        g = r.get("gram", (None, None, "-"))[2]
        gemm = r.get("gemm", (None, None, "-"))[2]
        pct = f"{100 * float(g) / float(gemm):.0f}%" if g != "-" and gemm != "-" else "-"
        gemm_all = r.get("gemm-all-cores", (None, None, "-"))[2]
        ranks = "/".join(r[c][0] if c in r else "-" for c in ["svd", "gram", "randomized"])
        print(f"| {m}×{n} | " + " | ".join(t(c) for c in cols) + f" | {ratio('numpy')} | {ratio('scipy-gesdd')} | {g} | {gemm} | {pct} | {gemm_all} | {ranks} |")


def main():
    cmd = sys.argv[1]
    a = sys.argv[2:]
    if cmd == "gen-matrices":
        gen_matrices(a[0], a[1])
    elif cmd == "gen-llama":
        opts = {"--hidden": 2048, "--layers": 4, "--ffn": 5632, "--vocab": 32000, "--repeat": 1}
        for i in range(1, len(a), 2):
            opts[a[i]] = int(a[i + 1])
        gen_llama(a[0], opts["--hidden"], opts["--layers"], opts["--ffn"], opts["--vocab"], opts["--repeat"])
    elif cmd == "largest-decomposed":
        largest_decomposed(a[0])
    elif cmd == "numpy-times":
        cap = float(a[a.index("--cap") + 1]) if "--cap" in a else 120.0
        numpy_times(a[0], cap)
    elif cmd == "measure":
        measure(a[a.index("--") + 1 :])
    elif cmd == "cli-times":
        cli_times(a[0], a[1], a[2], a[3], float(a[4]))
    elif cmd == "matrix-table":
        matrix_table(*a)
    elif cmd == "compare-ranks":
        compare_ranks(a[0], a[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
