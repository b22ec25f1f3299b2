"""What a PiSSA user runs instead of `cersa --algorithm cuda`: torch.linalg.svd on the GPU.

For each 2-D tensor of each safetensors FILE: upload f32, torch.linalg.svd(full_matrices=False)
(PEFT's PiSSA init calls exactly this on `weight.float()`), synchronize; the same with U, S,
Vh copied back to the host; the same in f64;
and torch.linalg.svdvals in f32. Prints one TSV line per tensor and call: name, shape, call,
seconds (median of REPS after one warm-up, upload included), rank at TAU from the σ it returned.

  python3 bench/torch_gpu_svd.py FILE... [--reps 3] [--tau 0.9]
"""
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file


def rank_at(s, tau):
    e = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(e / e[-1], tau) + 1)


def timed(fn, reps):
    fn()  # warm-up (cuSOLVER workspace, kernels)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def main(argv):
    reps, tau, files = 3, 0.9, []
    i = 0
    while i < len(argv):
        if argv[i] == "--reps":
            reps, i = int(argv[i + 1]), i + 2
        elif argv[i] == "--tau":
            tau, i = float(argv[i + 1]), i + 2
        else:
            files.append(argv[i])
            i += 1
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    for f in files:
        for name, w in load_file(f).items():
            if w.ndim != 2:
                continue
            host = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            calls = {
                "svd_f32": lambda: torch.linalg.svd(host.cuda(), full_matrices=False),
                # The factors on the host, as a converter needs them (cersa's timings include this).
                "svd_f32_to_host": lambda: [x.cpu() for x in torch.linalg.svd(host.cuda(), full_matrices=False)],
                "svd_f64": lambda: torch.linalg.svd(host.cuda().double(), full_matrices=False),
                "svdvals_f32": lambda: torch.linalg.svdvals(host.cuda()),
            }
            for call, fn in calls.items():
                sec, out = timed(fn, reps)
                s = (out[1] if isinstance(out, (tuple, list)) else out).cpu().numpy()
                print(f"{name}\t{w.shape[0]}x{w.shape[1]}\t{call}\t{sec:.4f}\t{rank_at(s, tau)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
