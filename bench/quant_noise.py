#!/usr/bin/env python3
"""The planner's quantization model: mean ‖x − Q(x)‖² of unit-norm Gaussian vectors under
gguf-py's Q8_0 / Q5_0 / Q4_0 (the constants of `quant_vector_sq_error` in src/plan/mod.rs).

    python3 bench/quant_noise.py

A rank-1 term σ·u·vᵀ with both vectors quantized loses ≈ σ²·(q_u + q_v), so the planner
counts a quantized rank-r factorization as keeping E(r)·(1 − 2q). Measured 2026-12-03 (the
value barely depends on the length): Q8_0 2.9e-5, Q5_0 1.83e-3, Q4_0 7.4e-3. On MiniLM's real
factors at τ = 0.9 the excess squared error per unit of kept energy was 6.5e-5 / 4.2e-3 /
1.7e-2 (bench/quant_factors.py), close to 2q.
"""
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

rng = np.random.default_rng(0)
print("| length | Q8_0 | Q5_0 | Q4_0 |")
print("|---|---|---|---|")
for length in (64, 384, 1536, 4096):
    x = rng.standard_normal((200, length)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    row = []
    for qt in (T.Q8_0, T.Q5_0, T.Q4_0):
        y = dequantize(quantize(x, qt), qt)
        row.append(np.mean(np.sum((x - y) ** 2, axis=1)))
    print(f"| {length} | " + " | ".join(f"{v:.3e}" for v in row) + " |")
