"""A CERSA directory opened for PyTorch: tensors are read lazily, one at a time.

``safetensors.safe_open(framework="pt")`` memory-maps each shard, so a tensor costs memory
only when it is asked for, in its stored dtype (BF16 natively) or the ``dtype`` given, on
the ``device`` given. The manifest and every shard header are checked when the directory is
opened (see ``_manifest.index``); no tensor data is read then.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import torch

from ._manifest import (MANIFEST_FILE, SUFFIX_S, SUFFIX_U, SUFFIX_VT, ManifestEntries, index,
                        read_manifest)
from ._quant import dequantize_torch


class TorchCheckpoint(ManifestEntries):
    """A CERSA checkpoint whose tensors load on demand as ``torch.Tensor`` s."""

    def __init__(self, directory: str, device="cpu", dtype: Optional[torch.dtype] = None):
        from safetensors import safe_open

        self.dir = directory
        self.device = torch.device(device)
        self.dtype = dtype
        self.manifest = read_manifest(directory)
        with open(os.path.join(directory, MANIFEST_FILE), "rb") as f:
            # What adapter files record to name the checkpoint they were trained on.
            self.manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
        self._where, _ = index(directory, self.manifest)
        self._open = {p: safe_open(p, framework="pt", device="cpu")
                      for p in sorted(set(self._where.values()))}

    def _get(self, key: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        t = self._open[self._where[key]].get_tensor(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(self.device)

    def factors(self, name: str, dtype: Optional[torch.dtype] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_r [m, r], σ_r [r], V_rᵀ [r, n]) in ``dtype`` (default: the checkpoint's).

        Quantized factors (``quant`` in the entry) are dequantized to float32 on ``device``
        (U is the transpose of the stored rows u_i), then cast to ``dtype`` when given."""
        if not self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is stored dense")
        dtype = dtype or self.dtype
        info = self.info(name)
        quant = info.get("quant")
        if quant is None:
            return (self._get(name + SUFFIX_U, dtype), self._get(name + SUFFIX_S, dtype),
                    self._get(name + SUFFIX_VT, dtype))
        # Checked when the directory was opened: a known type, U8 rows of the right shape.
        m, n = info["matrix_shape"]
        u = dequantize_torch(self._get(name + SUFFIX_U, None), quant, m).t().contiguous()
        vt = dequantize_torch(self._get(name + SUFFIX_VT, None), quant, n)
        if dtype is not None:
            u, vt = u.to(dtype), vt.to(dtype)
        return u, self._get(name + SUFFIX_S, dtype), vt

    def dense(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A tensor stored dense, with its manifest shape (float ones in ``dtype``)."""
        if self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is factored; use factors()")
        return self._get(name, dtype or self.dtype)

    def dense_state(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Every dense tensor by name (norms, embeddings, biases, unfactored matrices)."""
        return {n: self.dense(n, dtype) for n in self.names() if not self.is_factored(n)}


def open_checkpoint(directory, device="cpu", dtype: Optional[torch.dtype] = None
                    ) -> TorchCheckpoint:
    """Opens a CERSA directory for PyTorch (lazy, memory-mapped; see :class:`TorchCheckpoint`)."""
    return TorchCheckpoint(str(directory), device=device, dtype=dtype)
