#!/usr/bin/env python3
"""Quantized factors in a PyTorch forward: dequantized once at load vs kept packed and
dequantized in every forward (issue 16, "packed vs dequantized"): memory held and time.

    python3 bench/packed_forward.py CERSA_DIR [--tokens 256] [--repeats 5] [--threads 1]

CERSA_DIR is a checkpoint converted with a quantized `--dtype` (q8_0, q5_0 or q4_0). For
every factored layer, three ways to compute y = ((x·V)·diag σ)·Uᵀ for x [tokens, n] (f32):

- `f32 at load`: U, Vᵀ dequantized to float32 once (what `cersa_torch` does today);
- `bf16 at load`: the same, stored as bfloat16 (cast to f32 for the matmul);
- `packed`: the U8 block rows kept as stored, dequantized by `cersa_torch._quant` in each
  forward (nothing but the packed bytes held between forwards);
- `PackedCersaLinear`: the module `cersa_torch.load_hf(..., packed=True)` builds (the same
  rows; its `forward`, `frozen` mode), to time the real layer rather than the bare formula.

Prints the bytes each holds for all layers and the time of one forward through all layers
(best of `repeats`), with ratios against `f32 at load` measured in the same process. This is
a per-layer measurement of the factor path only (no attention, no activations' memory).
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from cersa_torch._quant import dequantize_torch  # noqa: E402
from cersa_torch.checkpoint import open_checkpoint  # noqa: E402
from cersa_torch.packed import PackedCersaLinear  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa_dir")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = open_checkpoint(args.cersa_dir)
    man = ckpt.manifest
    layers = []
    for name, info in sorted(man["tensors"].items()):
        if info["kind"] != "factored" or "quant" not in info:
            continue
        raw_u, s, raw_vt, q, (m, n) = ckpt.packed_factors(name, torch.float32)
        # Copies: held in memory, not read from the memory-mapped shard.
        layers.append((name, q, m, n, raw_u.clone(), s.clone(), raw_vt.clone()))
    if not layers:
        sys.exit(f"{args.cersa_dir}: no quantized factored layer (convert with --dtype q8_0)")
    torch.manual_seed(0)
    xs = {n: torch.randn(args.tokens, n) for n in {ly[3] for ly in layers}}

    f32 = [(dequantize_torch(u, q, m).t().contiguous(), s, dequantize_torch(vt, q, n))
           for _, q, m, n, u, s, vt in layers]
    bf16 = [(u.to(torch.bfloat16), s, vt.to(torch.bfloat16)) for u, s, vt in f32]

    def run_dense(held):
        for (u, s, vt), (_, _, _, n, *_rest) in zip(held, layers):
            x = xs[n]
            ((x @ vt.to(torch.float32).t()) * s) @ u.to(torch.float32).t()

    def run_packed():
        for _, q, m, n, u, s, vt in layers:
            x = xs[n]
            vt_f = dequantize_torch(vt, q, n)
            u_f = dequantize_torch(u, q, m)  # [r, m]: U as rows
            ((x @ vt_f.t()) * s) @ u_f

    modules = [PackedCersaLinear(u, s, vt, q, (m, n)) for _, q, m, n, u, s, vt in layers]

    def run_module():
        with torch.no_grad():
            for layer, (_, _, _, n, *_rest) in zip(modules, layers):
                layer(xs[n])

    def best(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def held_bytes(held):
        return sum(u.numel() * u.element_size() + vt.numel() * vt.element_size()
                   for u, _, vt in held)

    packed_bytes = sum(u.numel() + vt.numel() for _, _, _, _, u, _, vt in layers)
    rows = [
        ("f32 at load", held_bytes(f32), best(lambda: run_dense(f32))),
        ("bf16 at load", held_bytes(bf16), best(lambda: run_dense(bf16))),
        ("packed", packed_bytes, best(run_packed)),
        ("PackedCersaLinear", sum(ly.packed_bytes() for ly in modules), best(run_module)),
    ]
    quants = sorted({ly[1] for ly in layers})
    print(f"{args.cersa_dir}: {len(layers)} factored layers ({', '.join(quants)}), "
          f"x [{args.tokens}, n] f32, {args.threads} thread(s), best of {args.repeats}")
    base_b, base_t = rows[0][1], rows[0][2]
    print(f"{'factors held as':<17} {'MiB held':>9} {'× f32':>6} {'ms/forward':>11} {'× f32':>6}")
    for label, b, t in rows:
        print(f"{label:<17} {b / 2**20:>9.1f} {b / base_b:>6.2f} {t * 1e3:>11.1f} "
              f"{t / base_t:>6.2f}")


if __name__ == "__main__":
    main()
