"""The numpy reader: a CERSA directory read into memory as numpy arrays.

Needs only ``numpy`` and ``safetensors``. :func:`load_cersa` checks the directory as the Rust
loader does (``_manifest``) and verifies every shard's sha256 on the way (one read in
chunks, which also checks the factors for NaN/±Inf). :meth:`CersaCheckpoint.apply` computes
``y = x · Wᵀ`` through the factors without forming ``W``; it is the reference the torch
modules and the Rust loader are compared with in the tests. Stacked experts (format revision
1.3) are read per expert (:meth:`CersaCheckpoint.reconstruct_expert`, or ``factors`` and
``dense`` of the expert's stored name ``NAME.cersa_expert.e``); this reader holds every
tensor in memory — the torch reader (``open_checkpoint``) reads one expert's tensors only.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ._manifest import (SUFFIX_S, SUFFIX_U, SUFFIX_VT, CersaFormatError, ManifestEntries,
                        nonfinite_error, open_shards, read_manifest)
from ._experts import factored_units
from ._quant import BLOCK_BYTES, BLOCK_VALUES, dequantize_numpy

# Exponent bits of each factor dtype: all set means NaN or ±Inf.
_EXPONENT = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}


def count_nonfinite(chunk, dtype: str, quant=None, length: int = 0) -> int:
    """NaN/±Inf values in ``chunk`` (bytes of whole ``dtype`` elements; with ``quant``,
    whole quantized rows of ``length`` values: a block with a non-finite scale makes its
    values non-finite, the row's padding not counted)."""
    if quant is None:
        kind, mask = _EXPONENT[dtype]
        bits = np.frombuffer(chunk, dtype=kind)
        return int(np.count_nonzero((bits & mask) == mask))
    nb = -(-length // BLOCK_VALUES)
    blocks = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, nb, BLOCK_BYTES[quant])
    d = blocks[..., 0].astype(np.uint16) | (blocks[..., 1].astype(np.uint16) << 8)
    values = np.full(nb, BLOCK_VALUES, dtype=np.int64)
    values[-1] = length - BLOCK_VALUES * (nb - 1)
    return int((((d & 0x7C00) == 0x7C00) * values).sum())


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    # numpy has no bfloat16: bf16 is the top half of an f32.
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def _read_shard(path: str, header: dict, data_start: int) -> Dict[str, np.ndarray]:
    """All tensors of one shard, checked by ``open_shards`` (its ``header``); BF16 decoded to f32."""
    from safetensors import safe_open

    bf16 = {k for k, v in header.items() if v["dtype"] == "BF16"}
    out: Dict[str, np.ndarray] = {}
    try:
        with safe_open(path, framework="numpy") as st:
            for key in st.keys():
                if key not in bf16:
                    out[key] = st.get_tensor(key)
        with open(path, "rb") as f:
            for key in sorted(bf16):
                begin, end = header[key]["data_offsets"]
                f.seek(data_start + begin)
                out[key] = _bf16_to_f32(f.read(end - begin), header[key]["shape"])
    except Exception as e:  # checked by open_shards(); a file changed since, or a safetensors quirk
        raise CersaFormatError(f"{path}: cannot read the shard: {e}", path=path) from None
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
            raise ValueError(f"{self.dir}: {name} is not factored (kind "
                             f"{self.info(name)['kind']})")
        u, s, vt = (self.stored[name + SUFFIX_U], self.stored[name + SUFFIX_S],
                    self.stored[name + SUFFIX_VT])
        info = self.info(name)
        quant = info.get("quant")
        if quant is not None:  # checked by open_shards(): U8 rows of the right shape
            m, n = info["matrix_shape"]
            u = np.ascontiguousarray(dequantize_numpy(u, quant, m).T)
            vt = dequantize_numpy(vt, quant, n)
        return u, s, vt

    def dense(self, name: str) -> np.ndarray:
        """A dense tensor (or dense expert) with its manifest shape."""
        self._not_dense(name)
        return self.stored[name]

    def reconstruct_expert(self, name: str, e: int) -> np.ndarray:
        """Expert ``e`` of stacked experts tensor ``name`` as its float32 [d1, d2·…] matrix
        (Rust's ``reconstruct_expert``)."""
        return self.reconstruct(self.expert_name(name, e))

    def experts(self, name: str) -> np.ndarray:
        """Stacked experts tensor ``name`` as float32 in its manifest shape [E, d1, d2, …]."""
        shape = self.info(name)["shape"]
        return np.stack([self.reconstruct_expert(name, e).reshape(shape[1:])
                         for e in range(self.expert_count(name))]).reshape(shape)

    def reconstruct(self, name: str) -> np.ndarray:
        """W as float32 [m, n] (dense tensors viewed as [shape[0], rest]; stacked experts as
        [E, d1·d2·…], every expert's matrix in turn, as Rust's ``reconstruct``)."""
        if self.info(name)["kind"] == "experts":
            return self.experts(name).reshape(self.expert_count(name), -1)
        if self.is_factored(name):
            u, s, vt = (a.astype(np.float64) for a in self.factors(name))
            return ((u * s) @ vt).astype(np.float32)
        w = self.dense(name)
        if w.ndim < 2:
            raise ValueError(f"{self.dir}: {name} has shape {list(w.shape)}, not a matrix")
        return w.astype(np.float32).reshape(w.shape[0], -1)

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        """y = x · Wᵀ for x [rows, n], through ((x·V)·diag σ)·Uᵀ (never forms W). f32 out.
        Expert e of a stacked experts tensor: ``apply(ckpt.expert_name(name, e), x)``."""
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


def load_cersa(directory: str, verify_checksums: bool = True) -> CersaCheckpoint:
    """Reads ``cersa.json`` and its shards into memory.

    Checks what the Rust loader's ``Checkpoint::open`` checks, in its order (manifest, each
    shard's name, size, sha256 and safetensors layout, every entry against its shard, stray
    tensors), and that no factor holds NaN or ±Inf; raises :class:`CersaFormatError` with the
    first issue, naming the file and the tensor. ``verify_checksums=False`` skips the sha256
    of the shards (the factors are still checked once loaded)."""
    directory = str(directory)
    manifest = read_manifest(directory)
    shards = open_shards(directory, manifest, verify_checksums, count_nonfinite)
    stored: Dict[str, np.ndarray] = {}
    for path, (header, data_start) in sorted(shards.headers.items()):
        stored.update(_read_shard(path, header, data_start))
    ckpt = CersaCheckpoint(directory, manifest, stored)
    if not shards.values_checked:  # the values are in memory: check them there
        with np.errstate(invalid="ignore", over="ignore"):
            _check_finite(ckpt)
    return ckpt


def _check_finite(ckpt: CersaCheckpoint) -> None:
    """Raises for the first factor (entries by name, experts in order; U, σ, Vᵀ) holding
    NaN or ±Inf."""
    for _, _, name, info in factored_units(ckpt.manifest["tensors"]):
        for suffix, values in zip((SUFFIX_U, SUFFIX_S, SUFFIX_VT), ckpt.factors(name)):
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                raise nonfinite_error(ckpt.dir, info["shard"], name + suffix, bad, values.size)
