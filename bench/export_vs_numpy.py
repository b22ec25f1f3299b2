#!/usr/bin/env python3
"""`cersa export --to safetensors` against the obvious Python route, in the same run.

    python3 bench/export_vs_numpy.py CERSA CERSA_DIR [THREADS]

The baseline reads the factors with `cersa_torch.load_cersa` (numpy; dense tensors with
`safetensors.torch`), forms U·diag(σ)·Vᵀ in
float64 (numpy's BLAS, all cores), casts it to the source dtype with torch (numpy has no
bfloat16) and writes `model.safetensors` with `safetensors.torch`. Prints wall time and peak
RSS of both, and checks that the two exports agree tensor by tensor within one rounding of
the output dtype (they differ only where the two f64 products round differently).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))


def baseline(cersa_dir, out):
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    import cersa_torch

    ckpt = cersa_torch.load_cersa(cersa_dir)
    manifest = json.load(open(os.path.join(cersa_dir, "cersa.json")))
    shards = {}  # dense tensors as torch reads them (numpy has no bfloat16)
    for shard in manifest["shards"]:
        shards.update(load_file(os.path.join(cersa_dir, shard["file"])))
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}
    tensors = {}
    for name, info in manifest["tensors"].items():
        if info["kind"] == "dense":
            tensors[name] = shards[name]
            continue
        u, s, vt = (a.astype(np.float64) for a in ckpt.factors(name))
        w = ((u * s) @ vt).reshape(info["shape"])
        tensors[name] = torch.from_numpy(w).to(dtypes.get(info["source_dtype"], torch.bfloat16))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def main():
    cersa, cersa_dir = sys.argv[1], sys.argv[2]
    threads = sys.argv[3] if len(sys.argv) > 3 else "2"
    with tempfile.TemporaryDirectory() as work:
        ours = os.path.join(work, "cersa")
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", cersa, "export", cersa_dir, ours,
                            "--threads", threads, "-q"], capture_output=True, text=True,
                           check=True)
        t_ours, rss_ours = time.perf_counter() - t, int(p.stderr.split()[-1]) / 1024
        ref = os.path.join(work, "numpy")
        os.mkdir(ref)
        t = time.perf_counter()
        baseline(cersa_dir, ref)
        t_ref = time.perf_counter() - t
        rss_ref = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        import torch
        from safetensors.torch import load_file

        a = load_file(os.path.join(ours, "model.safetensors"))
        b = load_file(os.path.join(ref, "model.safetensors"))
        assert set(a) == set(b)
        worst, differ = 0.0, 0
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            x, y = a[k].double(), b[k].double()
            if not torch.equal(x, y):
                differ += 1
                eps = torch.finfo(a[k].dtype).eps if a[k].is_floating_point() else 0
                scale = y.abs().clamp(min=torch.finfo(a[k].dtype).tiny)
                worst = max(worst, float(((x - y).abs() / scale).max()) / max(eps, 1e-300))
        print(f"| route | wall | peak RSS |\n|---|---|---|\n"
              f"| cersa export, --threads {threads} | {t_ours:.2f} s | {rss_ours:.0f} MiB |\n"
              f"| numpy f64 + torch cast + safetensors | {t_ref:.2f} s | {rss_ref:.0f} MiB |\n")
        print(f"cersa is {t_ref / t_ours:.2f}× faster; {len(a)} tensors, {differ} not bit-equal, "
              f"worst difference {worst:.2f} ulp of the output dtype")


if __name__ == "__main__":
    main()
