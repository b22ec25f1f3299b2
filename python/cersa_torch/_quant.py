"""Dequantizers for quantized factors (formats/cersa-v1.md §2, format revision 1.1).

A quantized factor is U8 ``[r, ceil(L/32) * B]``: row i is one singular vector of length L,
zero-padded to a multiple of 32 and stored as GGML blocks of 32 values (Q8_0: 34 bytes,
Q5_0: 22, Q4_0: 18). Each block starts with its scale ``d`` (IEEE half, little-endian);
a value is ``f32(d) * f32(q)``, one f32 multiply, so the results are bit-equal to
``gguf.quants.dequantize``. Every function here works on all rows and blocks at once (no
Python loop over blocks) and returns ``[r, L]`` float32 with the padding discarded.

The numpy functions need numpy; the torch ones need only torch (numpy is not imported).
"""
from __future__ import annotations

BLOCK_VALUES = 32
BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18}


def row_bytes(quant: str, length: int) -> int:
    """Bytes of one stored row holding a vector of ``length`` values."""
    return -(-length // BLOCK_VALUES) * BLOCK_BYTES[quant]


def _check(quant: str, shape, length: int):
    if quant not in BLOCK_BYTES:
        raise ValueError(f"unknown quantization {quant!r}; known: {sorted(BLOCK_BYTES)}")
    if len(shape) != 2 or shape[1] != row_bytes(quant, length):
        raise ValueError(f"{quant} rows of {length} values need shape [r, "
                         f"{row_bytes(quant, length)}], found {list(shape)}")


# ---------------------------------------------------------------- numpy
def dequantize_numpy(raw, quant: str, length: int):
    """U8 ``[r, nblocks*B]`` → float32 ``[r, length]`` (numpy)."""
    import numpy as np

    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    _check(quant, raw.shape, length)
    r, nb = raw.shape[0], -(-length // BLOCK_VALUES)
    blocks = raw.reshape(r, nb, BLOCK_BYTES[quant])
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # [r, nb, 1]
    if quant == "Q8_0":
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
    else:
        qs = blocks[..., -16:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # [r, nb, 32]
        if quant == "Q4_0":
            q = (nib - 8).astype(np.float32)
        else:  # Q5_0: bit j of the little-endian u32 qh is bit j%8 of byte j//8
            qh = blocks[..., 2:6]
            hi = (qh[..., :, None] >> np.arange(8, dtype=np.uint8)) & 1  # [r, nb, 4, 8]
            hi = hi.reshape(r, nb, BLOCK_VALUES).astype(np.int16)
            q = ((nib | (hi << 4)) - 16).astype(np.float32)
    return (d * q).reshape(r, nb * BLOCK_VALUES)[:, :length]


# ---------------------------------------------------------------- torch
def dequantize_torch(raw, quant: str, length: int):
    """U8 ``[r, nblocks*B]`` tensor → float32 ``[r, length]`` tensor on the same device."""
    import torch

    if raw.dtype != torch.uint8:
        raise ValueError(f"{quant} rows must be uint8, found {raw.dtype}")
    _check(quant, tuple(raw.shape), length)
    r, nb = raw.shape[0], -(-length // BLOCK_VALUES)
    blocks = raw.contiguous().reshape(r, nb, BLOCK_BYTES[quant])
    d = blocks[..., :2].contiguous().view(torch.float16).to(torch.float32)  # [r, nb, 1]
    if quant == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32)
    else:
        qs = blocks[..., -16:].to(torch.int16)
        nib = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [r, nb, 32]
        if quant == "Q4_0":
            q = (nib - 8).to(torch.float32)
        else:
            qh = blocks[..., 2:6].to(torch.int16)
            shifts = torch.arange(8, dtype=torch.int16, device=raw.device)
            hi = ((qh.unsqueeze(-1) >> shifts) & 1).reshape(r, nb, BLOCK_VALUES)
            q = ((nib | (hi << 4)) - 16).to(torch.float32)
    return (d * q).reshape(r, nb * BLOCK_VALUES)[:, :length]
