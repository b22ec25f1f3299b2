"""``PackedCersaLinear``: a :class:`~cersa_torch.modules.CersaLinear` whose quantized factors
stay packed (issue 16, "packed vs dequantized").

A checkpoint converted with ``--dtype q8_0|q5_0|q4_0`` stores each factor as U8 rows of GGML
blocks (formats/cersa-v1.md §2): ``NAME.cersa_u`` [r, row_bytes(m)] holds the vectors u_i
as rows, ``NAME.cersa_vt`` [r, row_bytes(n)] the v_i. :meth:`TorchCheckpoint.factors`
dequantizes them to float at load; this module keeps the stored rows as the U8 buffers
``u_rows`` and ``vt_rows`` and dequantizes them (:func:`cersa_torch._quant.dequantize_torch`,
pure torch, any device) each time ``u`` or ``vt`` is read, in the dtype of σ (the layer's
compute dtype, which follows ``.to(dtype)``). ``adapted_weight`` and the adapter files
therefore work unchanged, and ``forward`` (below) computes :class:`CersaLinear`'s math, on
exactly the values the dequantize-at-load path holds. Between forwards a layer holds the packed bytes only: Q8_0 34 bytes per 32 values,
Q5_0 22, Q4_0 18, i.e. 0.27×, 0.17×, 0.14× of the f32 factors (plus the row padding to a
multiple of 32).

U and V are frozen as stored, so the modes are ``frozen``, ``scale``, ``core`` and
``cersa``; ``factors`` mode (which trains U·√σ and √σ·Vᵀ as float parameters) is refused.
In training, ``forward`` multiplies by the factors through two autograd functions
(:class:`_RowsT` for x·V_r, :class:`_Rows` for z·U_rᵀ) that save only the packed rows
(already held by the layer) and dequantize again in the backward pass; the mode's middle
(σ, core A·B, cersa C) is ordinary autograd, and the gradients are those of the
dequantize-at-load layer. No dequantized factor is kept from the forward to the backward
pass, so the saving holds at the peak of a training step too: on SmolLM2-135M Q8_0 (74
factored layers, ``core`` k = 8, 256 tokens, f32) a step keeps 14.9 MiB for the backward
pass instead of 77.9 MiB when autograd saved the dequantized U and Vᵀ, and the layers' part
of the step's peak (held + step) is 32–34 MiB against 93–96 MiB before and 77–79 MiB with
f32 factors at load; the whole model's step peak above what it holds falls by 62 MiB
(bench/RESULTS.md, session 15, ``bench/packed_train_peak.py``). The price: each factor
whose input needs a gradient is dequantized a second time in the backward pass (a step
took 1.1–1.6× the time of the packed layer as it was at 256 tokens, 1.8× at 16, on a
shared VM).

A GPT-2 ``Conv1D`` layer (W stored [in, out]) is built with the two row sets swapped, as
:func:`cersa_torch.load_hf` swaps U and Vᵀ: ``u_rows`` are then the stored ``cersa_vt``
rows (length ``out_features``) and ``vt_rows`` the stored ``cersa_u`` rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import MODES
from ._quant import BLOCK_BYTES, dequantize_torch, row_bytes
from .modules import CersaLinear, _as_tensor

#: The modes a packed layer supports (U and V frozen).
PACKED_MODES = tuple(m for m in MODES if m != "factors")


def _dequant(rows, quant, length, dtype):
    """R = the stored rows dequantized, [r, length] in ``dtype`` (what ``u``/``vt`` read)."""
    return dequantize_torch(rows, quant, length).to(dtype)


class _RowsT(torch.autograd.Function):
    """x·Rᵀ for R = the dequantized rows [r, length] (x [.., length] → [.., r]); the V_r
    product, R = V_rᵀ. Saves only the U8 rows, not R nor x (R is frozen, so x is not needed
    for any gradient): the backward pass dequantizes R again, grad_x = grad·R."""

    @staticmethod
    def forward(ctx, x, rows, quant, length, dtype):
        ctx.quant, ctx.length = quant, length
        ctx.save_for_backward(rows)
        return x @ _dequant(rows, quant, length, dtype).t()

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        gx = (_Rows.apply(grad, rows, ctx.quant, ctx.length, grad.dtype)
              if ctx.needs_input_grad[0] else None)
        return gx, None, None, None, None


class _Rows(torch.autograd.Function):
    """z·R for R = the dequantized rows [r, length] (z [.., r] → [.., length]); the U_r
    product, R = U_rᵀ. Saves only the U8 rows: grad_z = grad·Rᵀ, R dequantized again.
    Each is the other's backward, so double backward works too. The backward pass
    dequantizes in the gradient's dtype (the forward's ``dtype`` unless autocast ran the
    forward product in a lower precision, as autograd's own matmul backward would)."""

    @staticmethod
    def forward(ctx, z, rows, quant, length, dtype):
        ctx.quant, ctx.length = quant, length
        ctx.save_for_backward(rows)
        return z @ _dequant(rows, quant, length, dtype)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        gz = (_RowsT.apply(grad, rows, ctx.quant, ctx.length, grad.dtype)
              if ctx.needs_input_grad[0] else None)
        return gz, None, None, None, None


class PackedCersaLinear(CersaLinear):
    """y = x·Wᵀ + b with W = U_r·diag(σ_r)·V_rᵀ, U_r and V_r kept as quantized U8 rows and
    dequantized on each read of ``u``/``vt`` (see the module doc).

    ``u_rows``: U8 [r, row_bytes(out)] whose row i dequantizes to column i of U_r (length
    ``out_features``); ``vt_rows``: U8 [r, row_bytes(in)] whose row i is row i of V_rᵀ
    (length ``in_features``); ``quant``: ``Q8_0``, ``Q5_0`` or ``Q4_0``; ``shape``:
    (out_features, in_features). The other arguments are :class:`CersaLinear`'s."""

    def __init__(self, u_rows, s, vt_rows, quant: str, shape: Tuple[int, int], bias=None,
                 mode: str = "frozen", k: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 trainable: Optional[int] = None):
        # CersaLinear.__init__ would register float U and Vᵀ: only its shared tail is run.
        nn.Module.__init__(self)
        if mode not in PACKED_MODES:
            raise ValueError(f"mode {mode!r}: packed quantized factors are frozen, so the mode "
                             f"is one of {PACKED_MODES} ('factors' trains U and V: load "
                             "with packed=False)")
        if quant not in BLOCK_BYTES:
            raise ValueError(f"unknown quantization {quant!r}; known: {sorted(BLOCK_BYTES)}")
        device = device if device is not None else u_rows.device
        out_f, in_f = shape
        s = _as_tensor(s, dtype, device)
        r = s.shape[0]
        for what, rows, length in (("u_rows", u_rows, out_f), ("vt_rows", vt_rows, in_f)):
            if (rows.dtype != torch.uint8 or rows.ndim != 2
                    or tuple(rows.shape) != (r, row_bytes(quant, length))):
                raise ValueError(f"{what}: {quant} rows of {length} values at rank {r} are "
                                 f"uint8 [{r}, {row_bytes(quant, length)}], found "
                                 f"{rows.dtype} {list(rows.shape)}")
        self.mode, self.rank, self.quant = mode, r, quant
        self.out_features, self.in_features = out_f, in_f
        self.register_buffer("u_rows", u_rows.detach().to(device))
        self.register_buffer("vt_rows", vt_rows.detach().to(device))
        self._init_core(s, bias, mode, k, dtype, device, trainable)

    @property
    def u(self) -> torch.Tensor:
        """U_r [out, r], dequantized now in σ's dtype (a transposed view of [r, out])."""
        return dequantize_torch(self.u_rows, self.quant, self.out_features).to(
            self.s.dtype).t()

    @property
    def vt(self) -> torch.Tensor:
        """V_rᵀ [r, in], dequantized now in σ's dtype."""
        return dequantize_torch(self.vt_rows, self.quant, self.in_features).to(self.s.dtype)

    def forward(self, x):
        """:meth:`CersaLinear.forward`'s math, the factor products through :class:`_RowsT`
        and :class:`_Rows` so that autograd keeps no dequantized factor (module doc)."""
        dt = self.s.dtype  # the factors are dequantized in σ's dtype, as ``u``/``vt`` read
        t = _RowsT.apply(x, self.vt_rows, self.quant, self.in_features, dt)  # x·V_r  [.., r]
        z = self._through_core(t)
        y = _Rows.apply(z, self.u_rows, self.quant, self.out_features, dt)    # ·U_rᵀ [.., m]
        return y if self.bias is None else y + self.bias

    def packed_bytes(self) -> int:
        """Bytes of the packed factors held (``u_rows`` and ``vt_rows``)."""
        return self.u_rows.numel() + self.vt_rows.numel()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed={self.quant}"
