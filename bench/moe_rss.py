#!/usr/bin/env python3
"""Peak memory of `cersa convert` on one stacked mixture-of-experts tensor as the number of
experts grows (issue 15 part 4): experts are decoded one at a time, so the peak should grow
only by the factors held until the tensor is written, not by the tensor's f32 copy.

    python3 bench/moe_rss.py CERSA WORK [--experts 8,32] [--m 512] [--n 1024] [--rank 64]

Writes WORK/stack{E}.safetensors: one F32 tensor `model.layers.0.mlp.experts.down_proj`
[E, m, n], each expert rank-`rank` plus 10 % noise (seeded), converts it at τ = 0.9 with one
thread and prints per E: source MiB, the f32 copy of the whole tensor a whole-tensor decode
would hold, the factors stored, and peak RSS (VmHWM via CERSA_PRINT_PEAK_RSS=1).
"""
import argparse
import json
import os
import re
import subprocess

import numpy as np
from safetensors.numpy import save_file

NAME = "model.layers.0.mlp.experts.down_proj"


def source(path, experts, m, n, rank):
    if os.path.exists(path):
        return
    rng = np.random.default_rng(1)
    x = np.empty((experts, m, n), np.float32)
    for e in range(experts):
        a = rng.standard_normal((m, rank), dtype=np.float32)
        b = rng.standard_normal((rank, n), dtype=np.float32)
        x[e] = a @ b + 0.1 * np.sqrt(rank) * rng.standard_normal((m, n), dtype=np.float32)
    save_file({NAME: x}, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa")
    ap.add_argument("work")
    ap.add_argument("--experts", default="8,32")
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    mib = 1 << 20
    print(f"{'E':>4} {'source MiB':>11} {'f32 whole MiB':>14} {'factors MiB':>12} "
          f"{'peak RSS MiB':>13} {'ranks':>12}")
    for e in map(int, args.experts.split(",")):
        src = os.path.join(args.work, f"stack{e}.safetensors")
        out = os.path.join(args.work, f"out{e}")
        source(src, e, args.m, args.n, args.rank)
        env = dict(os.environ, CERSA_PRINT_PEAK_RSS="1")
        p = subprocess.run([args.cersa, "convert", src, out, "--overwrite", "-q",
                            "--threads", "1", "--energy", "0.9"],
                           capture_output=True, text=True, env=env, check=True)
        peak = re.search(r"cersa-peak-rss:\s*([0-9]+)\s*kB", p.stderr)
        man = json.load(open(os.path.join(out, "cersa.json")))
        info = man["tensors"][NAME]
        ranks = [x.get("rank") for x in info["experts"]]
        whole = e * args.m * args.n * 4
        print(f"{e:>4} {os.path.getsize(src) / mib:>11.1f} {whole / mib:>14.1f} "
              f"{man['totals']['stored_bytes'] / mib:>12.1f} "
              f"{int(peak.group(1)) / 1024 if peak else float('nan'):>13.1f} "
              f"{min(ranks)}–{max(ranks):>4}")


if __name__ == "__main__":
    main()
