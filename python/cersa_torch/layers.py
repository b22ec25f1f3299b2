"""What :func:`cersa_torch.load_hf` makes of one checkpoint matrix, for plain linear layers
and for the experts of :mod:`cersa_torch.moe` alike.

- a factored matrix: a :class:`~cersa_torch.modules.CersaLinear` in the load mode, or with
  ``packed`` and quantized factors a :class:`~cersa_torch.packed.PackedCersaLinear`;
- a matrix kept dense for lack of saving (reasons ``no-saving``, ``planned``), in the
  modes of ``DENSE_MODES`` with ``dense_subspace``: a
  :class:`~cersa_torch.dense.DenseSubspaceLinear` (the basis computed here);
- anything else: nothing (``None``): it stays a dense tensor of the model.

A layer built here carries ``cersa_name`` (the checkpoint entry) and ``cersa_transposed``
(whether it holds the checkpoint's W transposed, GPT-2's ``Conv1D``) for adapter files.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dense import DENSE_MODES, DENSE_REASONS, DenseSubspaceLinear, top_subspace
from .modules import CersaLinear, trainable_rank
from .packed import PackedCersaLinear


def adapts(ckpt, name: str, mode: str, dense_subspace: bool) -> bool:
    """Whether :func:`build_layer` makes a layer of ``name`` (else it stays dense)."""
    if ckpt.is_factored(name):
        return True
    return (dense_subspace and mode in DENSE_MODES
            and ckpt.info(name).get("reason") in DENSE_REASONS)


def build_layer(ckpt, name: str, mode: str, k: Optional[int], beta: Optional[float],
                dtype: torch.dtype, device, dense_subspace: bool, packed: bool,
                transposed: bool = False, bias=None, bases=None):
    """The layer of checkpoint matrix ``name`` (see the module doc), or ``None`` when it
    stays dense. ``transposed``: the module computes x·W with W [in, out] as stored (GPT-2
    ``Conv1D``), so the layer is built from the factors of Wᵀ: (V, σ, U) in
    :class:`CersaLinear`'s orientation. ``beta``: in ``cersa`` mode, each core trains only
    its leading components up to cumulative energy β. ``k``: in ``core`` mode, the core rank,
    lowered to the layer's rank r where r < k. ``bases``: a :class:`Bases` whose basis of a
    dense matrix is taken instead of computing its SVD."""
    if not adapts(ckpt, name, mode, dense_subspace):
        return None
    info = ckpt.info(name)
    factored = ckpt.is_factored(name)
    quant = info.get("quant") if packed and factored else None
    weight = None
    if quant is not None:
        # The stored rows: rows_u holds the u_i (length m), rows_vt the v_i (length n).
        rows_u, s, rows_vt, _, (m, n) = ckpt.packed_factors(name)
        if transposed:
            rows_u, rows_vt, m, n = rows_vt, rows_u, n, m
        energy = info["energy"]
    elif factored:
        u, s, vt = ckpt.factors(name)
        energy = info["energy"]
    else:
        # Checkpoint orientation [m, n], as stored; the basis from its exact values.
        # Read once, in float64 (exact for every stored float dtype): the SVD's input, and W
        # itself, which DenseSubspaceLinear casts to the layer's dtype (the same rounding as
        # reading it in that dtype).
        weight = ckpt.dense(name, torch.float64)
        stored = bases.get(name, tuple(weight.shape)) if bases is not None else None
        if stored is None:
            u, s, vt, energy = top_subspace(weight, ckpt.manifest["config"], name)
        else:
            u, s, vt = stored
            energy = float((s.double() ** 2).sum()) / float((weight * weight).sum())
    if quant is None and transposed:
        u, vt = vt.T, u.T
        weight = None if weight is None else weight.T
    t = trainable_rank(s, energy, beta) if mode == "cersa" and beta is not None else None
    if mode == "core" and k is not None:
        # k is the model's cap: a layer of rank r < k (a budget plan gives some rank 1) gets
        # a full r×r core instead of failing the whole load.
        k = min(k, s.shape[0])
    if quant is not None:
        layer = PackedCersaLinear(rows_u, s, rows_vt, quant, (m, n), bias, mode, k,
                                  dtype=dtype, device=device, trainable=t)
    elif factored:
        layer = CersaLinear(u, s, vt, bias, mode, k, dtype=dtype, device=device, trainable=t)
    else:
        layer = DenseSubspaceLinear(weight, u, s, vt, bias, mode, k, dtype=dtype,
                                    device=device, trainable=t)
    layer.cersa_name, layer.cersa_transposed = name, transposed
    return layer


class Bases:
    """The bases of dense-subspace layers from a file :func:`cersa_torch.save_bases` or
    :func:`cersa_torch.save_adapter` wrote (``NAME.adapter_u`` [m, r], ``adapter_sigma``
    [r], ``adapter_vt`` [r, n]), for the checkpoint whose manifest sha256 it records."""

    FORMATS = ("cersa-bases", "cersa-adapter")

    def __init__(self, path, manifest_sha256: str):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, framework="pt")
        md = self._file.metadata() or {}
        if md.get("format") not in self.FORMATS:
            raise ValueError(f"{self.path}: not a cersa-bases or cersa-adapter file "
                             f"(format {md.get('format')!r})")
        if md.get("manifest_sha256") != manifest_sha256:
            raise ValueError(f"{self.path}: made for another CERSA checkpoint (manifest sha256 "
                             "differs)")
        self._keys = set(self._file.keys())

    def get(self, name: str, shape):
        """(U, σ, Vᵀ) of ``name`` [m, n] = ``shape`` in float64, or ``None`` if the file has
        none; a basis of the wrong shape is an error naming the file and tensor."""
        keys = [f"{name}.adapter_{x}" for x in ("u", "sigma", "vt")]
        if not all(k in self._keys for k in keys):
            return None
        u, s, vt = (self._file.get_tensor(k).to(torch.float64) for k in keys)
        m, n = shape
        r = s.shape[0] if s.ndim == 1 else -1
        if s.ndim != 1 or tuple(u.shape) != (m, r) or tuple(vt.shape) != (r, n) or not (
                1 <= r <= min(m, n)):
            raise ValueError(f"{self.path}: {name}: basis shapes {tuple(u.shape)}, "
                             f"{tuple(s.shape)}, {tuple(vt.shape)} do not fit the matrix "
                             f"[{m}, {n}]")
        for key, t in zip(keys, (u, s, vt)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{self.path}: {key}: {int((~torch.isfinite(t)).sum())} of "
                                 f"{t.numel()} values are NaN or ±Inf")
        return u, s, vt
