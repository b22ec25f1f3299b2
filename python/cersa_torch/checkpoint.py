"""A CERSA directory opened for PyTorch: tensors are read lazily, one at a time.

``safetensors.safe_open(framework="pt")`` memory-maps each shard, so a tensor costs memory
only when it is asked for, in its stored dtype (BF16 natively) or the ``dtype`` given, on
the ``device`` given. The manifest and every shard header are checked when the directory is
opened, as the Rust loader checks them (see ``_manifest.open_shards``). By default each shard
is also read once, in chunks, for its sha256 (and the factors' values are checked for NaN
and ±Inf on the way); with ``verify_checksums=False`` no tensor data is read when the
directory is opened, and each factor is checked for NaN/±Inf when it is first read.

Stacked experts (format revision 1.3) are read one expert at a time: an expert's stored name
``NAME.cersa_expert.e`` (:meth:`~TorchCheckpoint.expert_name`) goes to ``factors``, ``dense``
and ``info`` as a tensor of its own, :meth:`~TorchCheckpoint.reconstruct_expert` recomposes
it, and only that expert's tensors are read from the shard.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import torch

from ._manifest import (MANIFEST_FILE, SUFFIX_S, SUFFIX_U, SUFFIX_VT, CersaFormatError,
                        ManifestEntries, nonfinite_error, open_shards, read_manifest)
from ._quant import BLOCK_BYTES, BLOCK_VALUES, dequantize_torch

_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}


def _nonfinite(values: torch.Tensor) -> torch.Tensor:
    """Where ``values`` is NaN or ±Inf; ``None`` when nowhere (found by max and min, which
    propagate NaN and need no temporary: the common case costs one pass, no allocation)."""
    if values.numel() == 0 or (bool(torch.isfinite(torch.amax(values)))
                               and bool(torch.isfinite(torch.amin(values)))):
        return None
    return ~torch.isfinite(values)


def count_nonfinite(chunk, dtype: str, quant=None, length: int = 0) -> int:
    """NaN/±Inf values in ``chunk`` (a writable buffer of whole ``dtype`` elements; with
    ``quant``, of whole quantized rows of ``length`` values: a block with a non-finite scale
    makes its values non-finite, the row's padding not counted). Torch only, no numpy."""
    if quant is None:
        bad = _nonfinite(torch.frombuffer(chunk, dtype=_FLOAT[dtype]))
        return 0 if bad is None else int(bad.sum())
    return _count_quant_nonfinite(torch.frombuffer(chunk, dtype=torch.uint8), quant, length)


def _count_quant_nonfinite(raw: torch.Tensor, quant: str, length: int) -> int:
    """NaN/±Inf values of the U8 quantized rows ``raw`` (any shape holding whole rows of
    ``length`` values): a block's values are non-finite exactly when its scale is."""
    nb = -(-length // BLOCK_VALUES)
    blocks = raw.reshape(-1, nb, BLOCK_BYTES[quant])
    bad = _nonfinite(blocks[..., :2].contiguous().view(torch.float16).reshape(-1, nb))
    if bad is None:
        return 0
    values = torch.full((nb,), BLOCK_VALUES, dtype=torch.int64)
    values[-1] = length - BLOCK_VALUES * (nb - 1)
    return int((bad * values).sum())


try:  # numpy's bit test when numpy is there: single-threaded, a steady few GB/s per core
    from ._numpy import count_nonfinite as _count_nonfinite
except ImportError:  # pragma: no cover - numpy is optional for the torch reader
    _count_nonfinite = count_nonfinite


class TorchCheckpoint(ManifestEntries):
    """A CERSA checkpoint whose tensors load on demand as ``torch.Tensor`` s."""

    def __init__(self, directory: str, device="cpu", dtype: Optional[torch.dtype] = None,
                 verify_checksums: bool = True):
        from safetensors import safe_open

        self.dir = directory
        self.device = torch.device(device)
        self.dtype = dtype
        self.manifest = read_manifest(directory)
        with open(os.path.join(directory, MANIFEST_FILE), "rb") as f:
            # What adapter files record to name the checkpoint they were trained on.
            self.manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
        shards = open_shards(directory, self.manifest, verify_checksums, _count_nonfinite)
        self._where = shards.where
        # Factors whose values are known finite (all of them when the shards were read).
        self._finite = None if shards.values_checked else set()
        self._open = {}
        for p in sorted(set(self._where.values())):
            try:
                self._open[p] = safe_open(p, framework="pt", device="cpu")
            except Exception as e:  # checked above: a file changed since, or a safetensors quirk
                raise CersaFormatError(f"{p}: cannot read the shard: {e}", path=p) from None

    def _raw(self, key: str) -> torch.Tensor:
        return self._open[self._where[key]].get_tensor(key)

    def _cast(self, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(self.device)

    def _get(self, key: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        return self._cast(self._raw(key), dtype)

    def _check_finite(self, name: str, values) -> None:
        """Raises unless the factors ``values`` (U, σ, Vᵀ as read) of ``name`` are finite;
        once per tensor, when the directory was opened without reading the shards."""
        if self._finite is None or name in self._finite:
            return
        for suffix, t in zip((SUFFIX_U, SUFFIX_S, SUFFIX_VT), values):
            bad = _nonfinite(t)
            if bad is not None:
                raise nonfinite_error(self.dir, self.info(name)["shard"], name + suffix,
                                      int(bad.sum()), t.numel())
        self._finite.add(name)

    def factors(self, name: str, dtype: Optional[torch.dtype] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_r [m, r], σ_r [r], V_rᵀ [r, n]) in ``dtype`` (default: the checkpoint's).

        Quantized factors (``quant`` in the entry) are dequantized to float32 on ``device``
        (U is the transpose of the stored rows u_i), then cast to ``dtype`` when given."""
        if not self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is not factored (kind "
                             f"{self.info(name)['kind']})")
        dtype = dtype or self.dtype
        info = self.info(name)
        quant = info.get("quant")
        if quant is None:
            raw = [self._raw(name + suffix) for suffix in (SUFFIX_U, SUFFIX_S, SUFFIX_VT)]
            self._check_finite(name, raw)
            return tuple(self._cast(t, dtype) for t in raw)
        # Checked when the directory was opened: a known type, U8 rows of the right shape.
        m, n = info["matrix_shape"]
        u = dequantize_torch(self._get(name + SUFFIX_U, None), quant, m).t().contiguous()
        vt = dequantize_torch(self._get(name + SUFFIX_VT, None), quant, n)
        s = self._raw(name + SUFFIX_S)
        self._check_finite(name, (u, s, vt))
        if dtype is not None:
            u, vt = u.to(dtype), vt.to(dtype)
        return u, self._cast(s, dtype), vt

    def packed_factors(self, name: str, dtype: Optional[torch.dtype] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str,
                                  Tuple[int, int]]:
        """The quantized factors of ``name`` as stored, not dequantized: (rows_u [r,
        row_bytes(m)] U8 holding the vectors u_i as rows, σ_r [r] in ``dtype`` (default: the
        checkpoint's), rows_vt [r, row_bytes(n)] U8, quant, (m, n)), on ``device``.
        ``cersa_torch._quant.dequantize_torch(rows_u, quant, m)`` is U_rᵀ [r, m] in float32,
        the values :meth:`factors` hands out. Raises ``ValueError`` unless ``name`` is
        factored with quantized factors (``quant`` in its entry)."""
        if not self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is not factored (kind "
                             f"{self.info(name)['kind']})")
        info = self.info(name)
        quant = info.get("quant")
        if quant is None:
            raise ValueError(f"{self.dir}: {name}: factors are stored as "
                             f"{info.get('stored_dtype')}, not quantized (no packed rows)")
        m, n = info["matrix_shape"]
        rows_u, rows_vt = self._get(name + SUFFIX_U, None), self._get(name + SUFFIX_VT, None)
        s = self._raw(name + SUFFIX_S)
        if self._finite is not None and name not in self._finite:
            for suffix, t, length in ((SUFFIX_U, rows_u, m), (SUFFIX_S, s, 0),
                                      (SUFFIX_VT, rows_vt, n)):
                if length:
                    bad = _count_quant_nonfinite(t, quant, length)
                    total = t.shape[0] * length
                else:
                    found = _nonfinite(t)
                    bad, total = (0 if found is None else int(found.sum())), t.numel()
                if bad:
                    raise nonfinite_error(self.dir, info["shard"], name + suffix, bad, total)
            self._finite.add(name)
        return rows_u, self._cast(s, dtype or self.dtype), rows_vt, quant, (m, n)

    def dense(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A tensor stored dense (or a dense expert), with its manifest shape (float ones in
        ``dtype``)."""
        self._not_dense(name)
        return self._get(name, dtype or self.dtype)

    def dense_state(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Every dense tensor by name (norms, embeddings, biases, unfactored matrices)."""
        return {n: self.dense(n, dtype) for n in self.names() if self.info(n)["kind"] == "dense"}

    def reconstruct_expert(self, name: str, e: int, dtype: Optional[torch.dtype] = None
                           ) -> torch.Tensor:
        """Expert ``e`` of stacked experts tensor ``name`` as its [d1, d2·…] matrix, read
        from its own stored tensors only (the other experts' are not touched): U·diag σ·Vᵀ
        formed in float32 (float64 when that is asked for) when factored (quantized factors
        dequantized first), then cast to ``dtype`` (default: the checkpoint's, else float32)."""
        key = self.expert_name(name, e)
        m = self.info(name)["shape"][1]
        dtype = dtype or self.dtype or torch.float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if self.is_factored(key):
            u, s, vt = self.factors(key, work)
            w = (u * s) @ vt
        else:
            w = self.dense(key, work).reshape(m, -1)
        return w.to(dtype)

    def experts(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Stacked experts tensor ``name`` in its manifest shape [E, d1, d2, …], every expert
        recomposed (:meth:`reconstruct_expert`)."""
        shape = self.info(name)["shape"]
        return torch.stack([self.reconstruct_expert(name, e, dtype).reshape(shape[1:])
                            for e in range(self.expert_count(name))])


def open_checkpoint(directory, device="cpu", dtype: Optional[torch.dtype] = None,
                    verify_checksums: bool = True) -> TorchCheckpoint:
    """Opens a CERSA directory for PyTorch (memory-mapped; see :class:`TorchCheckpoint`).

    Raises :class:`CersaFormatError` with the first issue the Rust loader's
    ``Checkpoint::open`` (with sha256 verification) would report, naming the file and the
    tensor, or for a factor holding NaN/±Inf. ``verify_checksums=False`` skips reading the
    shards (no sha256; each factor is checked for NaN/±Inf when first read instead), so the
    directory opens without reading tensor data."""
    return TorchCheckpoint(str(directory), device=device, dtype=dtype,
                           verify_checksums=verify_checksums)
