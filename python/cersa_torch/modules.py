"""``CersaLinear``: a linear layer held as its CERSA factors, in one of four training modes.

Mirrors the Rust ``cersa_loader::candle::CersaLinear``. With U_r [m, r], σ_r, V_rᵀ [r, n]:

- ``frozen``:  y = ((x·V_r) ⊙ σ)·U_rᵀ + b, nothing trainable;
- ``scale``:   σ trainable (spectrum tuning);
- ``core``:    ΔM = A·B trainable inside the subspace (A: r×k, B: k×r, B zero-initialized),
               y = x·V_r·(diag σ + A·B)·U_rᵀ + b;
- ``factors``: U_r·diag(√σ) and diag(√σ)·V_rᵀ trainable (PiSSA-like, no residual);
- ``cersa``:   the CERSA paper's mode: U_r, V_r frozen, an r×r core C initialized to
               diag(σ_r), y = x·V_r·Cᵀ·U_rᵀ + b (W = U_r·C·V_rᵀ). Only C's leading t×t block
               is trainable (t = r by default; fewer with a second threshold β < τ, see
               :func:`trainable_rank`); the rest of C stays diag(σ_{t+1..r}).

Memory held per layer (e = bytes per element): frozen r·(m+n+1)·e; scale the same, σ
trainable; core r·(m+n+1)·e + 2·r·k trainable; factors r·(m+n)·e, all trainable; cersa r·(m+n+1)·e + t² trainable. The dense
W (m·n·e) is never formed. Quantized factors can stay packed (U8 GGML rows, dequantized in
each forward): :class:`cersa_torch.packed.PackedCersaLinear`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import MODES


def _as_tensor(a, dtype, device):
    if not torch.is_tensor(a):
        import numpy as np

        a = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return a.detach().to(device=device, dtype=dtype)


class CersaLinear(nn.Module):
    """y = x·Wᵀ + b with W = U_r·diag(σ_r)·V_rᵀ held as its factors (see the module doc)."""

    def __init__(self, u, s, vt, bias=None, mode: str = "frozen", k: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 trainable: Optional[int] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        device = device if device is not None else (u.device if torch.is_tensor(u) else "cpu")
        u, s, vt = (_as_tensor(a, dtype, device) for a in (u, s, vt))
        r = s.shape[0]
        if u.ndim != 2 or vt.ndim != 2 or u.shape[1] != r or vt.shape[0] != r:
            raise ValueError(f"factor shapes {tuple(u.shape)}, {tuple(s.shape)}, "
                             f"{tuple(vt.shape)} do not agree on the rank")
        self.mode, self.rank = mode, r
        self.out_features, self.in_features = u.shape[0], vt.shape[1]
        if mode == "factors":
            root = s.sqrt()
            self.left = nn.Parameter(u * root)               # U_r·diag(√σ)   [m, r]
            self.right = nn.Parameter(root[:, None] * vt)    # diag(√σ)·V_rᵀ  [r, n]
        else:
            self.register_buffer("u", u)
            self.register_buffer("vt", vt)
        self._init_core(s, bias, mode, k, dtype, device, trainable)

    def _init_core(self, s, bias, mode, k, dtype, device, trainable):
        """σ (a parameter in ``scale`` mode), the mode's trainable core and the bias, after
        the factors are registered (shared with :class:`~cersa_torch.packed.PackedCersaLinear`)."""
        r = s.shape[0]
        if mode != "factors":
            if mode == "scale":
                self.s = nn.Parameter(s.clone())
            else:
                self.register_buffer("s", s)
        if mode == "cersa":
            t = r if trainable is None else trainable
            if not 1 <= t <= r:
                raise ValueError(f"cersa mode needs 1 <= trainable <= rank {r}, got {t}")
            self.c = nn.Parameter(torch.diag(s[:t].clone()))  # leading t×t block of C
        if mode == "core":
            if k is None or not 1 <= k <= r:
                raise ValueError(f"core mode needs 1 <= k <= rank {r}, got {k}")
            self.a = nn.Parameter(torch.randn(r, k, dtype=dtype, device=device) / r ** 0.5)
            self.b = nn.Parameter(torch.zeros(k, r, dtype=dtype, device=device))  # ΔM starts at 0
        if bias is not None:
            self.register_buffer("bias", _as_tensor(bias, dtype, device))
        else:
            self.bias = None

    def forward(self, x):
        if self.mode == "factors":
            y = (x @ self.right.T) @ self.left.T
        else:
            y = self._through_core(x @ self.vt.T) @ self.u.T   # x·V_r, the core, ·U_rᵀ
        return y if self.bias is None else y + self.bias

    def _through_core(self, t):
        """t = x·V_r [.., r] through the mode's core (the r×r middle of every mode but
        ``factors``): t ⊙ σ, + t·A·B (``core``), or t·Cᵀ in the leading block (``cersa``)."""
        z = t * self.s
        if self.mode == "core":
            z = z + (t @ self.a) @ self.b
        if self.mode == "cersa":
            tb = self.c.shape[0]
            z = torch.cat([t[..., :tb] @ self.c.T, z[..., tb:]], dim=-1)
        return z

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """The matrix the layer applies, W [out, in] with y = x·Wᵀ + b, in float64:
        U·(diag σ + A·B)ᵀ·Vᵀ in ``core`` mode (the layer computes x·V·(diag σ + A·B)·Uᵀ),
        U·C·Vᵀ in ``cersa`` mode, U·diag σ·Vᵀ in ``frozen``/``scale``, left·right in ``factors``."""
        if self.mode == "factors":
            return self.left.double() @ self.right.double()
        core = torch.diag(self.s.double())
        if self.mode == "core":
            core = (core + self.a.double() @ self.b.double()).T
        if self.mode == "cersa":
            tb = self.c.shape[0]
            core[:tb, :tb] = self.c.double()
        return self.u.double() @ core @ self.vt.double()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, mode={self.mode}")


def trainable_rank(s, energy: float, beta: float) -> int:
    """Side t of the trainable core block for a second threshold β: the smallest t whose
    cumulative energy Σ_{i≤t} σᵢ² / ‖W‖_F² reaches β, where ‖W‖_F² = Σ_{i≤r} σᵢ² / E(r) and
    E(r) = ``energy`` is the manifest's retained energy of the stored rank r."""
    s2 = torch.as_tensor(s, dtype=torch.float64) ** 2
    cum = torch.cumsum(s2, 0) / (s2.sum() / energy)
    reach = torch.nonzero(cum >= beta)
    return int(reach[0, 0]) + 1 if len(reach) else int(s2.shape[0])


def linear_from_checkpoint(ckpt, weight_name: str, bias_name=None, mode: str = "frozen",
                           k: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """A :class:`CersaLinear` for factored ``weight_name`` (and an optional dense bias) of a
    numpy (:func:`load_cersa`) or torch (:func:`open_checkpoint`) checkpoint."""
    u, s, vt = ckpt.factors(weight_name)
    bias = ckpt.dense(bias_name) if bias_name else None
    return CersaLinear(u, s, vt, bias, mode, k, dtype=dtype)


def patch_linears(model, ckpt, mode: str = "core", k: Optional[int] = 8,
                  dtype: torch.dtype = torch.float32):
    """Replaces every ``nn.Linear`` of ``model`` whose ``<path>.weight`` is factored in
    ``ckpt`` with a :class:`CersaLinear` (bias from the checkpoint when stored, else the
    module's own); returns the list of replaced paths. Load the checkpoint's dense tensors
    (norms, embeddings) into the model yourself, or use :func:`cersa_torch.load_hf`.
    """
    replaced = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not ckpt.manifest["tensors"].get(
                f"{path}.weight", {}).get("kind") == "factored":
            continue
        u, s, vt = ckpt.factors(f"{path}.weight")
        if (u.shape[0], vt.shape[1]) != (module.out_features, module.in_features):
            raise ValueError(f"{path}: checkpoint is {u.shape[0]}×{vt.shape[1]}, module is "
                             f"{module.out_features}×{module.in_features}")
        bias_key = f"{path}.bias"
        if bias_key in ckpt.manifest["tensors"]:
            bias = ckpt.dense(bias_key)
        elif module.bias is not None:
            bias = module.bias.detach()
        else:
            bias = None
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, CersaLinear(u, s, vt, bias, mode, k, dtype=dtype))
        replaced.append(path)
    return replaced
