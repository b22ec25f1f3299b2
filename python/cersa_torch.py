"""Load CERSA v1 checkpoints in Python and fine-tune inside their principal subspace.

CERSA shards are plain safetensors files, so this module needs only ``safetensors`` and
``numpy`` for reading (``load_cersa(dir)`` → :class:`CersaCheckpoint`, whose ``apply``
computes ``y = x · Wᵀ`` through the factors without forming ``W``). PyTorch is imported
only when you ask for it: :func:`CersaLinear` / :func:`patch_linears` build ``nn.Module`` s
mirroring the Rust ``cersa_loader::candle::CersaLinear`` modes:

- ``frozen``:  y = ((x·V_r) ⊙ σ)·U_rᵀ + b, nothing trainable;
- ``scale``:   σ trainable (spectrum tuning);
- ``core``:    ΔM = A·B trainable inside the subspace (A: r×k, B: k×r, B zero-initialized),
               y = x·V_r·(diag σ + A·B)·U_rᵀ + b;
- ``factors``: U_r·diag(√σ) and diag(√σ)·V_rᵀ trainable (PiSSA-like, no residual).

The format is specified in ``formats/cersa-v1.md``; every size read here is checked
against the manifest before use.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

MANIFEST_FILE = "cersa.json"
SUFFIX_U, SUFFIX_S, SUFFIX_VT = ".cersa_u", ".cersa_s", ".cersa_vt"
MAX_MANIFEST_SIZE = 256 << 20
MODES = ("frozen", "scale", "core", "factors")


class CersaFormatError(ValueError):
    """The directory is not a valid CERSA v1 checkpoint (message names file and tensor)."""


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    # numpy has no bfloat16: bf16 is the top half of an f32.
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def _read_shard(path: str) -> Dict[str, np.ndarray]:
    """All tensors of one shard as numpy arrays; BF16 decoded to f32 (numpy lacks bf16)."""
    from safetensors import safe_open

    out: Dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > 100_000_000:
            raise CersaFormatError(f"{path}: header length {header_len} exceeds 100000000")
        header = json.loads(f.read(header_len))
    bf16 = {k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"}
    with safe_open(path, framework="numpy") as st:
        for key in st.keys():
            if key not in bf16:
                out[key] = st.get_tensor(key)
    if bf16:
        data_start = 8 + header_len
        with open(path, "rb") as f:
            for key in bf16:
                begin, end = header[key]["data_offsets"]
                shape = header[key]["shape"]
                if end - begin != 2 * int(np.prod(shape, dtype=np.int64)):
                    raise CersaFormatError(f"{path}: {key}: byte range does not match shape")
                f.seek(data_start + begin)
                out[key] = _bf16_to_f32(f.read(end - begin), shape)
    return out


class CersaCheckpoint:
    """A CERSA directory read into memory: the manifest and every stored tensor."""

    def __init__(self, directory: str, manifest: dict, stored: Dict[str, np.ndarray]):
        self.dir = directory
        self.manifest = manifest
        self.stored = stored

    def names(self):
        """Source tensor names, sorted."""
        return sorted(self.manifest["tensors"])

    def info(self, name: str) -> dict:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise KeyError(f"{self.dir}: no tensor {name!r}") from None

    def is_factored(self, name: str) -> bool:
        return self.info(name)["kind"] == "factored"

    def factors(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U_r [m, r], σ_r [r], V_rᵀ [r, n]) as stored (BF16 decoded to f32)."""
        if not self.is_factored(name):
            raise ValueError(f"{self.dir}: {name} is stored dense")
        return (self.stored[name + SUFFIX_U], self.stored[name + SUFFIX_S],
                self.stored[name + SUFFIX_VT])

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


def _check_stored(path: str, stored: Dict[str, np.ndarray], key: str, shape) -> None:
    if key not in stored:
        raise CersaFormatError(f"{path}: {key} is listed in the manifest but missing")
    if list(stored[key].shape) != list(shape):
        raise CersaFormatError(
            f"{path}: {key} has shape {list(stored[key].shape)}, expected {list(shape)}")


def load_cersa(directory: str) -> CersaCheckpoint:
    """Reads ``cersa.json`` and its shards; checks format, sizes, names and shapes."""
    mpath = os.path.join(directory, MANIFEST_FILE)
    if os.path.getsize(mpath) > MAX_MANIFEST_SIZE:
        raise CersaFormatError(f"{mpath}: manifest exceeds {MAX_MANIFEST_SIZE} bytes")
    with open(mpath, "rb") as f:
        manifest = json.load(f)
    if manifest.get("format") != "cersa" or manifest.get("format_version") != 1:
        raise CersaFormatError(f"{mpath}: not a CERSA v1 manifest")
    stored: Dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        name = shard["file"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise CersaFormatError(f"{mpath}: shard name {name!r} is not a plain file name")
        path = os.path.join(directory, name)
        if os.path.getsize(path) != shard["bytes"]:
            raise CersaFormatError(f"{path}: size {os.path.getsize(path)} != {shard['bytes']}")
        for key, arr in _read_shard(path).items():
            if key in stored:
                raise CersaFormatError(f"{path}: {key} stored in more than one shard")
            stored[key] = arr
    claimed = set()
    for name, info in manifest["tensors"].items():
        if info["kind"] == "factored":
            m, n = info["matrix_shape"]
            r = info["rank"]
            if not 1 <= r <= min(m, n):
                raise CersaFormatError(f"{mpath}: {name}: rank {r} outside 1..=min({m}, {n})")
            for suffix, shape in ((SUFFIX_U, [m, r]), (SUFFIX_S, [r]), (SUFFIX_VT, [r, n])):
                _check_stored(mpath, stored, name + suffix, shape)
                claimed.add(name + suffix)
        else:
            _check_stored(mpath, stored, name, info["shape"])
            claimed.add(name)
    stray = sorted(set(stored) - claimed)
    if stray:
        raise CersaFormatError(f"{directory}: {stray[0]} is stored but not in the manifest")
    return CersaCheckpoint(directory, manifest, stored)


# --------------------------------------------------------------------------- PyTorch


def CersaLinear(u, s, vt, bias=None, mode: str = "frozen", k: Optional[int] = None):
    """An ``nn.Module`` computing y = ((x·V_r) ⊙ σ)·U_rᵀ + b in the given adaptation mode.

    ``u``, ``s``, ``vt``, ``bias``: numpy arrays or tensors (converted to float32).
    Defined as a factory so that importing this module does not need torch.
    """
    return _torch_classes()["CersaLinear"](u, s, vt, bias, mode, k)


def linear_from_checkpoint(ckpt: CersaCheckpoint, weight_name: str, bias_name=None,
                           mode: str = "frozen", k: Optional[int] = None):
    """A :func:`CersaLinear` for factored ``weight_name`` (and an optional dense bias)."""
    u, s, vt = ckpt.factors(weight_name)
    bias = ckpt.dense(bias_name) if bias_name else None
    return CersaLinear(u, s, vt, bias, mode, k)


def patch_linears(model, ckpt: CersaCheckpoint, mode: str = "core", k: Optional[int] = 8):
    """Replaces every ``nn.Linear`` of ``model`` whose ``<path>.weight`` is factored in
    ``ckpt`` with a :func:`CersaLinear` (bias from the checkpoint when stored, else the
    module's own); returns the list of replaced paths. Load the checkpoint's dense tensors
    (norms, embeddings) into the model yourself, e.g. ``model.load_state_dict(..., strict=False)``.
    """
    import torch.nn as nn

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
        setattr(parent, child, CersaLinear(u, s, vt, bias, mode, k))
        replaced.append(path)
    return replaced


_CLASSES: Dict[str, type] = {}


def _torch_classes():
    if _CLASSES:
        return _CLASSES
    import torch
    import torch.nn as nn

    def as_f32(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32)) if not torch.is_tensor(a) \
            else a.detach().to(torch.float32)

    class _CersaLinear(nn.Module):
        def __init__(self, u, s, vt, bias, mode, k):
            super().__init__()
            if mode not in MODES:
                raise ValueError(f"mode {mode!r}: expected one of {MODES}")
            u, s, vt = as_f32(u), as_f32(s), as_f32(vt)
            r = s.shape[0]
            if u.shape[1] != r or vt.shape[0] != r:
                raise ValueError(f"factor shapes {tuple(u.shape)}, {tuple(s.shape)}, "
                                 f"{tuple(vt.shape)} do not agree on the rank")
            self.mode, self.rank = mode, r
            if mode == "factors":
                root = s.sqrt()
                self.left = nn.Parameter(u * root)               # U_r·diag(√σ)   [m, r]
                self.right = nn.Parameter(root[:, None] * vt)    # diag(√σ)·V_rᵀ  [r, n]
            else:
                self.register_buffer("u", u)
                self.register_buffer("vt", vt)
                if mode == "scale":
                    self.s = nn.Parameter(s.clone())
                else:
                    self.register_buffer("s", s)
            if mode == "core":
                if k is None or not 1 <= k <= r:
                    raise ValueError(f"core mode needs 1 <= k <= rank {r}, got {k}")
                self.a = nn.Parameter(torch.randn(r, k) / r ** 0.5)
                self.b = nn.Parameter(torch.zeros(k, r))  # ΔM = A·B starts at 0
            if bias is not None:
                self.register_buffer("bias", as_f32(bias))
            else:
                self.bias = None

        def forward(self, x):
            if self.mode == "factors":
                y = (x @ self.right.T) @ self.left.T
            else:
                t = x @ self.vt.T                     # x·V_r        [.., r]
                z = t * self.s                        # ⊙ σ
                if self.mode == "core":
                    z = z + (t @ self.a) @ self.b     # + x·V_r·A·B
                y = z @ self.u.T                      # ·U_rᵀ        [.., m]
            return y if self.bias is None else y + self.bias

    _CLASSES["CersaLinear"] = _CersaLinear
    return _CLASSES
