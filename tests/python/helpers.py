"""Helpers shared by the Python tests (plain functions; fixtures are in conftest.py)."""
import json
import os


def stored_tensors(cersa_dir):
    """(manifest, every stored tensor of the shards as `safetensors.numpy` reads them)."""
    from safetensors.numpy import load_file

    manifest = json.load(open(os.path.join(cersa_dir, "cersa.json")))
    stored = {}
    for shard in manifest["shards"]:
        stored.update(load_file(os.path.join(cersa_dir, shard["file"])))
    return manifest, stored


def perturb_trainable(model, generator):
    """A stand-in for training: moves every trainable tensor of `model` by 5 % of its mean
    magnitude (at least 5e-5) in a random direction drawn from `generator`."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                scale = 0.05 * p.abs().mean().clamp(min=1e-3)
                p.add_(scale * torch.randn(p.shape, generator=generator))


def smollm2():
    """Path of the SmolLM2-135M GGUF (`CERSA_SMOLLM2`, else bench/fetch_smollm2.py's cache;
    it may not exist: tests skip then)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from fetch_smollm2 import cached_path
    return os.environ.get("CERSA_SMOLLM2", cached_path())


def gguf_dequant_rows(raw, quant, length):
    """The reference for quantized factors: gguf-py's dequantization of the U8 rows `raw`
    (`quant` "Q8_0", "Q5_0" or "Q4_0"), the padding cut, as float64 [r, length]."""
    import gguf
    import numpy as np

    return gguf.quants.dequantize(np.asarray(raw, dtype=np.uint8),
                                  gguf.GGMLQuantizationType[quant])[:, :length].astype(
                                      np.float64)


def planted_torch(gen, rank, m, n):
    """An m×n float32 matrix of `rank` equal singular values (0.5) plus 1 % noise, drawn
    from the torch generator `gen`; rank 0 gives a flat spectrum (the converter keeps it
    dense)."""
    import torch

    k = min(m, n) if rank == 0 else rank
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    w = q1 @ q2.T
    if rank:
        w += 0.1 * (k / (m * n)) ** 0.5 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return (0.5 * w).float()
