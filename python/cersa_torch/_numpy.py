"""The numpy reader: a CERSA directory read into memory as numpy arrays.

Needs only ``numpy`` and ``safetensors``. :meth:`CersaCheckpoint.apply` computes
``y = x · Wᵀ`` through the factors without forming ``W``; it is the reference the torch
modules and the Rust loader are compared with in the tests.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ._manifest import SUFFIX_S, SUFFIX_U, SUFFIX_VT, ManifestEntries, index, read_manifest
from ._quant import dequantize_numpy


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    # numpy has no bfloat16: bf16 is the top half of an f32.
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def _read_shard(path: str, header: dict, data_start: int) -> Dict[str, np.ndarray]:
    """All tensors of one shard, checked by ``index`` (its ``header``); BF16 decoded to f32."""
    from safetensors import safe_open

    bf16 = {k for k, v in header.items() if v["dtype"] == "BF16"}
    out: Dict[str, np.ndarray] = {}
    with safe_open(path, framework="numpy") as st:
        for key in st.keys():
            if key not in bf16:
                out[key] = st.get_tensor(key)
    with open(path, "rb") as f:
        for key in sorted(bf16):
            begin, end = header[key]["data_offsets"]
            f.seek(data_start + begin)
            out[key] = _bf16_to_f32(f.read(end - begin), header[key]["shape"])
    return out


class CersaCheckpoint(ManifestEntries):
    """A CERSA directory read into memory: the manifest and every stored tensor."""

    def __init__(self, directory: str, manifest: dict, stored: Dict[str, np.ndarray]):
        self.dir = directory
        self.manifest = manifest
        self.stored = stored

    def factors(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U_r [m, r], σ_r [r], V_rᵀ [r, n]) as stored (BF16 decoded to f32; quantized
        factors dequantized to f32, U the transpose of the stored rows u_i)."""
        if not self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is stored dense")
        u, s, vt = (self.stored[name + SUFFIX_U], self.stored[name + SUFFIX_S],
                    self.stored[name + SUFFIX_VT])
        info = self.info(name)
        quant = info.get("quant")
        if quant is not None:  # checked by index(): a known type, U8 rows of the right shape
            m, n = info["matrix_shape"]
            u = np.ascontiguousarray(dequantize_numpy(u, quant, m).T)
            vt = dequantize_numpy(vt, quant, n)
        return u, s, vt

    def dense(self, name: str) -> np.ndarray:
        """A dense tensor with its manifest shape."""
        if self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is factored; use factors() or reconstruct()")
        return self.stored[name]

    def reconstruct(self, name: str) -> np.ndarray:
        """W as float32 [m, n] (dense tensors viewed as [shape[0], rest])."""
        if self.is_factored(name):
            u, s, vt = (a.astype(np.float64) for a in self.factors(name))
            return ((u * s) @ vt).astype(np.float32)
        w = self.dense(name)
        if w.ndim < 2:
            raise ValueError(f"{self.dir}: {name} has shape {list(w.shape)}, not a matrix")
        return w.astype(np.float32).reshape(w.shape[0], -1)

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        """y = x · Wᵀ for x [rows, n], through ((x·V)·diag σ)·Uᵀ (never forms W). f32 out."""
        x = np.asarray(x, dtype=np.float64)
        if self.is_factored(name):
            u, s, vt = (a.astype(np.float64) for a in self.factors(name))
            if x.ndim != 2 or x.shape[1] != vt.shape[1]:
                raise ValueError(f"{name}: x has shape {x.shape}, expected [rows, {vt.shape[1]}]")
            return (((x @ vt.T) * s) @ u.T).astype(np.float32)
        w = self.reconstruct(name).astype(np.float64)
        if x.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"{name}: x has shape {x.shape}, expected [rows, {w.shape[1]}]")
        return (x @ w.T).astype(np.float32)


def load_cersa(directory: str) -> CersaCheckpoint:
    """Reads ``cersa.json`` and its shards; checks format, sizes, names, dtypes and shapes."""
    manifest = read_manifest(directory)
    _, headers = index(directory, manifest)
    stored: Dict[str, np.ndarray] = {}
    for path, (header, data_start) in sorted(headers.items()):
        stored.update(_read_shard(path, header, data_start))
    return CersaCheckpoint(directory, manifest, stored)
