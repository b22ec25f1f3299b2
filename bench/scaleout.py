#!/usr/bin/env python3
"""Scale-out benchmark (issue 18): partitioned conversion measured here, projected to big models.

    python3 bench/scaleout.py CERSA WORK [--parts 4] [--shapes 1024x1024,...] [--cores 16]

1. Measured: a Llama-shaped BF16 checkpoint (bench/tools.py gen_llama) converted in one run
   and as --parts parts run one after another, each with one thread (N nodes of one core);
   then `cersa assemble`. Prints each part's time, the balance (slowest part / mean), the
   speed-up if the parts ran side by side (one run / slowest part), assemble's time and
   throughput, and whether the result is byte-identical to the one run (sha256 of every file).
2. Measured: per matrix, one `cersa convert --threads 1 --force-factor` of a one-matrix file
   with a power-law spectrum (wall time and peak RSS of the child). Fitted:
   t = a·m·n·k + b·k³ (k = min(m, n)) and RSS = c + d·4mn + e·8k² (least squares).
3. Projected (not measured): Llama-2-7B, Llama-3-70B and Llama-3.1-405B shapes on 1, 8 and 64
   nodes of --cores cores (CPU: the fit above, one matrix per core) or of one GPU (the `cuda`
   route's per-matrix times measured on an H100 on 2026-11-27, bench/RESULTS.md, fitted the
   same way), plus reading the source at --read-gbs GB/s per node and assembling at the
   throughput measured in step 1. Memory per node: --cores × the RSS fit at the largest matrix.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tools  # noqa: E402

# The `cuda` route per matrix on one H100 (bench/RESULTS.md, 2026-11-27, "Per matrix"):
# (m, n, seconds), host f32 in to factors on the host.
H100_CUDA = [(2048, 2048, 0.141), (4096, 4096, 0.464), (4096, 11008, 0.641), (32000, 2048, 0.733)]

MODELS = {
    # name: (hidden, layers, ffn, vocab, kv_dim)
    "Llama-2-7B": (4096, 32, 11008, 32000, 4096),
    "Llama-3-70B": (8192, 80, 28672, 128256, 1024),
    "Llama-3.1-405B": (16384, 126, 53248, 128256, 1024),
}


def rss_of(cmd):
    """Wall seconds and peak RSS (MiB) of `cmd`, in a fresh Python so the max is its own."""
    probe = (
        "import resource,subprocess,sys,time;t=time.perf_counter();"
        "subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL);"
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    dt, mib = out.stdout.split()
    return float(dt), float(mib)


def best_of(n, cmd, fresh):
    """The fastest of `n` runs of `cmd` (this VM's timings drift 10–30 %), removing `fresh`
    before each."""
    best = None
    for _ in range(n):
        subprocess.run(["rm", "-rf", fresh], check=True)
        r = rss_of(cmd)
        best = r if best is None or r[0] < best[0] else best
    return best


def tree_digest(d):
    h = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            h[name] = hashlib.sha256(f.read()).hexdigest()
    return h


def measured_parts(cersa, work, parts, llama):
    hidden, layers, ffn, vocab = llama
    src = os.path.join(work, "llama")
    if not os.path.exists(os.path.join(src, "model.safetensors")):
        tools.gen_llama(src, hidden, layers, ffn, vocab)
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    one = os.path.join(work, "one")
    subprocess.run(["rm", "-rf", one, os.path.join(work, "parts"), os.path.join(work, "assembled")], check=True)
    common = ["-q", "--threads", "1", "--max-shard-size", "50MB"]
    t_one, _ = best_of(2, [cersa, "convert", src, one, *common], one)
    times = []
    dirs = []
    for i in range(parts):
        d = os.path.join(work, "parts", f"part-{i}")
        dirs.append(d)
        t, _ = best_of(2, [cersa, "convert", src, d, "--part", f"{i}/{parts}", *common], d)
        times.append(t)
    out = os.path.join(work, "assembled")
    t_asm, _ = best_of(2, [cersa, "assemble", out, "-q", *dirs], out)
    stored = json.load(open(os.path.join(out, "cersa.json")))["totals"]["stored_bytes"]
    identical = tree_digest(out) == tree_digest(one)
    print(f"## Partitioned conversion, measured here ({parts} parts, one thread each, run one after another)\n")
    print(f"Llama-shaped BF16 (hidden {hidden}, {layers} layers, ffn {ffn}, vocab {vocab}): {size / 1e6:.0f} MB\n")
    print("| run (best of 2) | seconds |")
    print("|---|---|")
    print(f"| one run, 1 thread | {t_one:.2f} |")
    for i, t in enumerate(times):
        print(f"| part {i}/{parts} | {t:.2f} |")
    print(f"| assemble | {t_asm:.2f} ({stored / 1e6 / t_asm:.0f} MB/s of output, shards sha256-verified first) |")
    mean = sum(times) / len(times)
    print()
    print(f"- sum of parts / one run: {sum(times) / t_one:.2f}× (work added by partitioning)")
    print(f"- balance, slowest part / mean: {max(times) / mean:.2f}")
    print(f"- speed-up with the parts side by side: {t_one / max(times):.2f}× on {parts} nodes "
          f"({t_one / (max(times) + t_asm):.2f}× with the assembly)")
    print(f"- assembled == one run, byte for byte (sha256 of every file): {identical}")
    print()
    if not identical:
        sys.exit("assembled output differs from the one run")
    return stored / t_asm


def fit(rows, cols):
    """Least squares with non-negative coefficients (a negative cost per flop or byte is
    unphysical): the best fit over the subsets of terms whose solution is non-negative."""
    import itertools
    a = np.array([[f(*r[:2]) for f in cols] for r in rows], dtype=np.float64)
    y = np.array([r[2] for r in rows], dtype=np.float64)
    best, best_res = np.zeros(len(cols)), np.inf
    for k in range(1, len(cols) + 1):
        for subset in itertools.combinations(range(len(cols)), k):
            coef, *_ = np.linalg.lstsq(a[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(len(cols))
            full[list(subset)] = coef
            res = float(np.sum((a @ full - y) ** 2))
            if res < best_res:
                best, best_res = full, res
    return best


def time_terms():
    return [lambda m, n: m * n * min(m, n), lambda m, n: float(min(m, n)) ** 3]


def measured_matrices(cersa, work, shapes):
    print("## Per matrix, measured here (`cersa convert --threads 1 --force-factor`, power-law spectrum, τ = 0.9)\n")
    print("| matrix | seconds | peak RSS MiB |")
    print("|---|---|---|")
    rows_t, rows_m = [], []
    for s in shapes.split(","):
        m, n = (int(x) for x in s.split("x"))
        path = os.path.join(work, f"w{m}x{n}.safetensors")
        if not os.path.exists(path):
            tools.gen_matrices(path, s)
        out = os.path.join(work, f"out{m}x{n}")
        subprocess.run(["rm", "-rf", out], check=True)
        dt, mib = rss_of([cersa, "convert", path, out, "-q", "--threads", "1", "--force-factor"])
        print(f"| {m}×{n} | {dt:.2f} | {mib:.0f} |")
        rows_t.append((m, n, dt))
        rows_m.append((m, n, mib * 2**20))
    print()
    tfit = fit(rows_t, time_terms())
    mfit = fit(rows_m, [lambda m, n: 1.0, lambda m, n: 4.0 * m * n, lambda m, n: 8.0 * min(m, n) ** 2])
    return tfit, mfit


def model_matrices(hidden, layers, ffn, vocab, kv):
    """The matrices cersa factors by default (embeddings and lm_head are kept dense)."""
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                 (ffn, hidden), (ffn, hidden), (hidden, ffn)]
    params = layers * sum(m * n for m, n in per_layer) + 2 * vocab * hidden
    return per_layer * layers, params


def project(tfit, mfit, asm_bps, cores, read_gbs):
    gfit = fit(H100_CUDA, time_terms())
    t_of = lambda c, m, n: max(0.0, c[0] * m * n * min(m, n) + c[1] * float(min(m, n)) ** 3)  # noqa: E731
    print("## Projected from the fits above (not measured)\n")
    print(f"CPU nodes: {cores} cores, one matrix per core (a node's time is its busiest core's, "
          f"so the largest matrix bounds it); GPU nodes: one H100 running the `cuda` route "
          f"(its per-matrix times, bench/RESULTS.md 2026-11-27); every node reads its share of the BF16 "
          f"source at {read_gbs} GB/s; assembly at the {asm_bps / 1e6:.0f} MB/s measured here, on one machine.\n")
    print("| model | BF16 size | largest matrix | nodes | CPU convert | GPU convert | read per node | assemble | memory per CPU node |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (h, layers, ffn, vocab, kv) in MODELS.items():
        mats, params = model_matrices(h, layers, ffn, vocab, kv)
        src_bytes = 2 * params
        cpu_times = [t_of(tfit, m, n) for m, n in mats]
        gpu_times = [t_of(gfit, m, n) for m, n in mats]
        big = max(mats, key=lambda x: x[0] * x[1])
        rss = mfit[0] + mfit[1] * 4 * big[0] * big[1] + mfit[2] * 8 * min(big) ** 2
        mem = cores * rss
        # Output ≈ 0.9× of the source (measured whole-checkpoint ratio at τ = 0.9).
        asm = 0.9 * src_bytes / asm_bps
        for nodes in (1, 8, 64):
            read = src_bytes / nodes / (read_gbs * 1e9)
            # As cersa deals them: heaviest first to the least-loaded node, then on a CPU
            # node to the least-loaded core; a GPU node runs its matrices one at a time.
            cpu = max(makespan(share, cores) for share in deal(cpu_times, nodes))
            gpu = max(sum(share) for share in deal(gpu_times, nodes))
            print(f"| {name} | {src_bytes / 1e9:.0f} GB | {big[0]}×{big[1]} | {nodes} | {hours(cpu)} | "
                  f"{hours(gpu)} | {hours(read)} | {hours(asm)} | {mem / 2**30:.0f} GiB |")
    print()
    print(f"Fits: CPU t = {tfit[0]:.3e}·mnk + {tfit[1]:.3e}·k³ s; GPU t = {gfit[0]:.3e}·mnk + {gfit[1]:.3e}·k³ s; "
          f"RSS = {mfit[0] / 2**20:.0f} MiB + {mfit[1]:.2f}·(4mn) + {mfit[2]:.2f}·(8k²) bytes.")


def deal(times, bins):
    """Longest-processing-time-first dealing (cersa's --part rule): the times of each bin."""
    load = [0.0] * bins
    shares = [[] for _ in range(bins)]
    for t in sorted(times, reverse=True):
        k = min(range(bins), key=lambda i: (load[i], i))
        load[k] += t
        shares[k].append(t)
    return shares


def makespan(times, workers):
    return max((sum(s) for s in deal(times, workers)), default=0.0)


def hours(s):
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa")
    ap.add_argument("work")
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--llama", default="1024,4,2816,8000", help="hidden,layers,ffn,vocab")
    ap.add_argument("--shapes", default="1024x1024,2048x2048,2048x5632,4096x4096")
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--read-gbs", type=float, default=1.0)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    asm_bps = measured_parts(a.cersa, a.work, a.parts, tuple(int(x) for x in a.llama.split(",")))
    tfit, mfit = measured_matrices(a.cersa, a.work, a.shapes)
    project(tfit, mfit, asm_bps, a.cores, a.read_gbs)


if __name__ == "__main__":
    main()
