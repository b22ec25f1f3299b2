"""A trainable path for the matrices a CERSA checkpoint keeps dense (issue 16).

``cersa convert`` stores a selected matrix dense when its factors would not be smaller
(manifest reason ``no-saving``, r·(m+n+1) ≥ m·n) or when a byte budget chose so
(``planned``). Such a layer keeps its exact W, frozen, and gets the same adaptation as a
factored layer in its own top-r subspace, computed when the model is loaded:

    y = x·Wᵀ + x·V_r·ΔMᵀ·U_rᵀ + b,     ΔM = M − diag σ_r  (zero at the start),

where U_r, σ_r, V_r are W's leading singular triplets (torch float64 SVD, then the
converter's sign rule, spec §4 rule 7), r is chosen by the checkpoint's own rank rule
(spec §4 rule 5: the per-module rule that matches the name, else ``config.energy`` with
the clamps), and M is the trained core of the mode, as for a factored layer: diag(s')
(``scale``), diag σ + A·B (``core``, A r×k, B k×r zero-initialized), or C with its trained
leading t×t block (``cersa``, C initialized to diag σ). ΔM is exactly zero at the start, so
the model starts as the dense model bit for bit. ``factors`` mode has no such form (its
trained factors replace W's, which would need W − U·diag σ·Vᵀ as a residual): there, as in
``frozen``, these layers stay plain frozen dense layers.

Entries with reason ``planned`` are included: a plan keeps a matrix dense because its
factors were not worth their bytes, the same situation as ``no-saving``; a plan records no
rank for them, so r comes from ``config.energy`` and the clamps (the default the plan
replaced). Entries that are ``zero``, ``excluded`` or not matrices get nothing. In a
whitened checkpoint (``convert --calibration``) the subspace is still the plain SVD of W at
the recorded τ: the calibration statistics are not at hand when loading, and τ then meant
output energy, so r comes out higher than the whitened rule would give.

The SVD is computed on the CPU in float64 (``torch.linalg.svd``), then cast to the model's
dtype; its last bits may depend on the LAPACK build and thread count, which is why the
adapter file carries the basis.

The basis is written into the adapter file (``NAME.adapter_u``, ``adapter_sigma``,
``adapter_vt``, layer ``"base": "dense"``), so ``load_adapter`` and ``cersa merge`` use the
very basis the adapter was trained in, whatever SVD another library or thread count gives.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .modules import CersaLinear

#: Manifest reasons of the dense entries that get a subspace adapter.
DENSE_REASONS = ("no-saving", "planned")
#: Modes in which they do (see the module doc).
DENSE_MODES = ("scale", "core", "cersa")


def _parse_rule(text: str):
    """(glob, "energy" | "rank", value) of a ``config.rules`` entry; ``None`` for ``plan``."""
    if text == "plan":
        return None
    flag, _, rest = text.partition(" ")
    glob, eq, value = rest.rpartition("=")
    if flag not in ("--energy", "--rank") or not eq or not glob:
        raise ValueError(f"manifest rule {text!r} is not '--energy|--rank GLOB=VALUE'")
    return glob, flag[2:], float(value) if flag == "--energy" else int(value)


def subspace_rank(config: dict, name: str, sigma: torch.Tensor, norm2: float,
                  shape) -> int:
    """Rank r of the dense matrix ``name`` [m, n] with singular values ``sigma`` (descending)
    and squared Frobenius norm ``norm2`` (from its entries), by the checkpoint's rule: the
    first ``config.rules`` glob that matches (``--rank`` fixes r, ``--energy`` replaces τ),
    else ``config.energy``; then ``min_rank``, ``max_rank``, ``rank_multiple``, capped at
    min(m, n) — spec §4 rule 5."""
    m, n = shape
    full = min(m, n)
    tau = float(config["energy"])
    for text in config.get("rules") or []:
        rule = _parse_rule(text)
        if rule is None or not fnmatch.fnmatchcase(name, rule[0]):
            continue
        if rule[1] == "rank":
            return max(1, min(rule[2], full))
        tau = rule[2]
        break
    cum = torch.cumsum(sigma.double() ** 2, 0) / norm2
    reach = torch.nonzero(cum >= tau)
    r = int(reach[0, 0]) + 1 if len(reach) else full
    r = max(r, int(config.get("min_rank") or 1))
    if config.get("max_rank") is not None:
        r = min(r, int(config["max_rank"]))
    mult = int(config.get("rank_multiple") or 1)
    r = math.ceil(r / mult) * mult
    return max(1, min(r, full))


@torch.no_grad()
def top_subspace(w: torch.Tensor, config: dict, name: str):
    """(U_r [m, r], σ_r [r], V_rᵀ [r, n], E(r)) of ``w`` (checkpoint orientation) in
    float64, with r from :func:`subspace_rank`, E(r) its retained energy, and the sign rule
    of spec §4 rule 7 (the largest-magnitude entry of each uᵢ, first on ties, made
    positive)."""
    w64 = w.detach().to("cpu", torch.float64)
    u, s, vt = torch.linalg.svd(w64, full_matrices=False)
    norm2 = float((w64 * w64).sum())
    r = subspace_rank(config, name, s, norm2, tuple(w64.shape))
    u, s, vt = u[:, :r], s[:r], vt[:r]
    energy = float((s * s).sum()) / norm2
    # argmax returns the first index of the maximum: the tie rule of §4 rule 7.
    pick = u.abs().argmax(dim=0)
    sign = torch.where(u[pick, torch.arange(r)] < 0, -1.0, 1.0).to(torch.float64)
    return u * sign, s, vt * sign[:, None], energy


class DenseSubspaceLinear(CersaLinear):
    """y = x·Wᵀ + x·V_r·ΔMᵀ·U_rᵀ + b: a frozen exact dense W plus a trainable core in W's
    own top-r subspace (see the module doc). The trainable parameters are those of
    :class:`CersaLinear` in the same mode (``s``; ``a``, ``b``; ``c``); ``s0`` holds the σ_r
    they start from, ``weight`` the dense W [out, in]. In ``core`` mode a ``k`` above r is
    lowered to r: r is computed at load and may be tiny (r = 1 for a one-row matrix such as
    Qwen2-MoE's ``shared_expert_gate``), where a factored layer's r is the checkpoint's."""

    def __init__(self, weight, u, s, vt, bias=None, mode: str = "core",
                 k: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None,
                 trainable: Optional[int] = None):
        if mode not in DENSE_MODES:
            raise ValueError(f"mode {mode!r}: a dense layer's subspace adapter is one of "
                             f"{DENSE_MODES}")
        if mode == "core" and k is not None:
            k = min(k, len(s))
        super().__init__(u, s, vt, bias, mode, k, dtype=dtype, device=device,
                         trainable=trainable)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"dense weight {tuple(weight.shape)} does not match the basis "
                             f"{self.out_features}×{self.in_features}")
        self.register_buffer("weight", weight.detach().to(device=self.u.device, dtype=dtype))
        self.register_buffer("s0", self.s.detach().clone())

    def delta_core(self) -> torch.Tensor:
        """ΔM as the layer applies it (y gains x·V_r·ΔMᵀ·U_rᵀ): r×r, in the layer's dtype."""
        r = self.rank
        if self.mode == "scale":
            return torch.diag(self.s - self.s0)
        if self.mode == "core":
            return (self.a @ self.b).T
        tb = self.c.shape[0]
        d = torch.zeros(r, r, dtype=self.c.dtype, device=self.c.device)
        d[:tb, :tb] = self.c - torch.diag(self.s0[:tb])
        return d

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        t = x @ self.vt.T                                   # x·V_r          [.., r]
        if self.mode == "scale":
            z = t * (self.s - self.s0)
        elif self.mode == "core":
            z = (t @ self.a) @ self.b
        else:                                               # cersa: the block only
            tb = self.c.shape[0]
            z = t[..., :tb] @ (self.c - torch.diag(self.s0[:tb])).T
            return y + z @ self.u[:, :tb].T
        return y + z @ self.u.T

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """W + U_r·ΔM·V_rᵀ [out, in] in float64, the matrix the layer applies."""
        return (self.weight.double()
                + self.u.double() @ self.delta_core().double() @ self.vt.double())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", base=dense"
