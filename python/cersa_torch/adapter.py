"""Adapter files (the trained part of a CERSA fine-tune) for models from :func:`load_hf`.

The format is the Rust crate's (``cersa_loader::adapter``): one safetensors file of F32
tensors per adapted layer ``NAME`` (``NAME.adapter_s`` for ``scale``; ``NAME.adapter_a``
[r, k] and ``NAME.adapter_b`` [k, r] for ``core``; ``NAME.adapter_left`` [m, r] and
``NAME.adapter_right`` [r, n] for ``factors``; ``NAME.adapter_c`` [t, t], the trained
leading block of the core C, for ``cersa``) with ``__metadata__`` ``format:
cersa-adapter``, ``adapter_version: 1``, the base manifest's sha256 and the layers' modes.
Names and orientation are the checkpoint's, so ``cersa merge`` folds a file written here.

A layer the checkpoint keeps dense (:class:`~cersa_torch.dense.DenseSubspaceLinear`) is
listed with ``"base": "dense"`` and also stores the basis it was trained in, computed at
load: ``NAME.adapter_u`` [m, r], ``NAME.adapter_sigma`` [r] (the σ_r the core starts from)
and ``NAME.adapter_vt`` [r, n]; its adapted matrix is W + U·(M − diag σ)·Vᵀ, M the mode's
core. A file with such a layer is ``adapter_version: 2`` (older readers refuse it rather
than drop the layer); a file without is still written as version 1, byte for byte as
before.

A GPT-2-style ``Conv1D`` layer holds its factors transposed (its checkpoint matrix is
W [in, out]); its adapter tensors are transposed back: core's (A, B) is written as
(Bᵀ, Aᵀ), since U·(diag σ + A·B)·Vᵀ = U·(diag σ + Bᵀ·Aᵀ)ᵀ·Vᵀ; factors' (left, right) as
(rightᵀ, leftᵀ).
"""
from __future__ import annotations

import json
from typing import Dict

import torch

from .dense import DenseSubspaceLinear
from .modules import CersaLinear

ADAPTER_FORMAT, ADAPTER_VERSION = "cersa-adapter", "1"
#: The version of files holding a dense-base layer; readers take both.
ADAPTER_VERSION_DENSE = "2"


def _layers(model) -> Dict[str, CersaLinear]:
    layers = {}
    for m in model.modules():
        if isinstance(m, CersaLinear) and getattr(m, "cersa_name", None):
            layers[m.cersa_name] = m
    if not layers:
        raise ValueError("the model has no CersaLinear layers from a CERSA checkpoint "
                         "(build it with cersa_torch.load_hf)")
    return layers


def _basis(layer: DenseSubspaceLinear, name: str) -> Dict[str, torch.Tensor]:
    """The basis of a dense-base layer in the checkpoint's orientation (U [m, r], σ, Vᵀ)."""
    f32 = lambda x: x.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
    u, vt = ((layer.vt.T, layer.u.T) if layer.cersa_transposed else (layer.u, layer.vt))
    return {f"{name}.adapter_u": f32(u), f"{name}.adapter_sigma": f32(layer.s0),
            f"{name}.adapter_vt": f32(vt)}


def _tensors(layer: CersaLinear, name: str) -> Dict[str, torch.Tensor]:
    t = getattr(layer, "cersa_transposed", False)
    f32 = lambda x: x.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
    if layer.mode == "scale":
        return {f"{name}.adapter_s": f32(layer.s)}
    if layer.mode == "core":
        a, b = (layer.b.T, layer.a.T) if t else (layer.a, layer.b)
        return {f"{name}.adapter_a": f32(a), f"{name}.adapter_b": f32(b)}
    if layer.mode == "cersa":
        # W = U·C·Vᵀ; a transposed layer holds Wᵀ = V·C·Uᵀ, so its C is the checkpoint's Cᵀ.
        return {f"{name}.adapter_c": f32(layer.c.T if t else layer.c)}
    if layer.mode == "factors":
        left, right = (layer.right.T, layer.left.T) if t else (layer.left, layer.right)
        return {f"{name}.adapter_left": f32(left), f"{name}.adapter_right": f32(right)}
    return {}


def save_adapter(model, path) -> Dict[str, dict]:
    """Writes the trainable state of every adapted :class:`CersaLinear` of ``model`` (from
    :func:`load_hf`) to ``path``; returns the layers' metadata."""
    from safetensors.torch import save_file

    sha = getattr(model, "cersa_manifest_sha256", None)
    if sha is None:
        raise ValueError("the model does not record its CERSA checkpoint (use load_hf)")
    tensors, meta = {}, {}
    for name, layer in sorted(_layers(model).items()):
        if layer.mode == "frozen":
            continue
        tensors.update(_tensors(layer, name))
        m, n = ((layer.in_features, layer.out_features) if layer.cersa_transposed
                else (layer.out_features, layer.in_features))
        meta[name] = {"mode": layer.mode, "rank": layer.rank, "matrix_shape": [m, n]}
        if isinstance(layer, DenseSubspaceLinear):
            tensors.update(_basis(layer, name))
            meta[name]["base"] = "dense"
        if layer.mode == "core":
            meta[name]["k"] = layer.a.shape[1]
        if layer.mode == "cersa":
            meta[name]["trainable"] = layer.c.shape[0]
    if not meta:
        raise ValueError("no layer is trainable (mode frozen): nothing to save")
    dense = any(v.get("base") == "dense" for v in meta.values())
    save_file(tensors, str(path), metadata={
        "format": ADAPTER_FORMAT,
        "adapter_version": ADAPTER_VERSION_DENSE if dense else ADAPTER_VERSION,
        "manifest_sha256": sha, "layers": json.dumps(meta, sort_keys=True)})
    return meta


def save_bases(model, path) -> int:
    """Writes the basis of every dense-subspace layer of ``model`` (from :func:`load_hf`) to
    ``path`` (safetensors, ``format: cersa-bases``, the base manifest's sha256; tensors as in
    an adapter file), so that ``load_hf(…, bases=path)`` skips their SVDs. Returns the number
    of layers written."""
    from safetensors.torch import save_file

    sha = getattr(model, "cersa_manifest_sha256", None)
    if sha is None:
        raise ValueError("the model does not record its CERSA checkpoint (use load_hf)")
    tensors = {}
    for m in model.modules():
        if isinstance(m, DenseSubspaceLinear) and getattr(m, "cersa_name", None):
            tensors.update(_basis(m, m.cersa_name))
    if not tensors:
        raise ValueError("the model has no dense-subspace layer: no basis to save")
    save_file(tensors, str(path), metadata={"format": "cersa-bases", "manifest_sha256": sha})
    return len(tensors) // 3


def load_adapter(model, path) -> None:
    """Loads an adapter file into the matching :class:`CersaLinear` layers of ``model``
    (built by :func:`load_hf` on the same checkpoint, in the same modes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        version = md.get("adapter_version")
        if md.get("format") != ADAPTER_FORMAT or version not in (ADAPTER_VERSION,
                                                                 ADAPTER_VERSION_DENSE):
            raise ValueError(f"{path}: not a cersa-adapter v{ADAPTER_VERSION} or "
                             f"v{ADAPTER_VERSION_DENSE} file")
        if md.get("manifest_sha256") != getattr(model, "cersa_manifest_sha256", None):
            raise ValueError(f"{path}: trained on another CERSA checkpoint (manifest sha256 "
                             "differs)")
        meta = json.loads(md.get("layers", "{}"))
        layers = _layers(model)
        for name, info in meta.items():
            layer = layers.get(name)
            if layer is None or layer.mode != info.get("mode"):
                raise ValueError(f"{path}: {name}: adapter mode {info.get('mode')!r}, model "
                                 f"layer {'missing' if layer is None else layer.mode!r}")
            base = info.get("base", "factored")
            dense = isinstance(layer, DenseSubspaceLinear)
            if base != ("dense" if dense else "factored") or (dense and version == "1"):
                raise ValueError(f"{path}: {name}: adapter base {base!r} (version {version}), "
                                 f"the model layer's is {'dense' if dense else 'factored'}")
            want = _tensors(layer, name)
            if dense:
                want.update(_basis(layer, name))
            missing = [k for k in want if k not in f.keys()]
            if missing:
                raise ValueError(f"{path}: {name}: the adapter lacks {', '.join(missing)}")
            got = {k: f.get_tensor(k) for k in want}
            for k, v in want.items():
                if tuple(got[k].shape) != tuple(v.shape):
                    raise ValueError(f"{path}: {k} has shape {tuple(got[k].shape)}, the model "
                                     f"expects {tuple(v.shape)}")
            t = layer.cersa_transposed
            with torch.no_grad():
                if dense:
                    # The basis the adapter was trained in replaces the one computed at load.
                    u, vt = got[f"{name}.adapter_u"], got[f"{name}.adapter_vt"]
                    layer.u.copy_(vt.T if t else u)
                    layer.vt.copy_(u.T if t else vt)
                    layer.s0.copy_(got[f"{name}.adapter_sigma"])
                    if layer.mode != "scale":
                        layer.s.copy_(got[f"{name}.adapter_sigma"])
                if layer.mode == "scale":
                    layer.s.copy_(got[f"{name}.adapter_s"])
                elif layer.mode == "cersa":
                    c = got[f"{name}.adapter_c"]
                    layer.c.copy_(c.T if t else c)
                elif layer.mode == "core":
                    a, b = got[f"{name}.adapter_a"], got[f"{name}.adapter_b"]
                    layer.a.copy_(b.T if t else a)
                    layer.b.copy_(a.T if t else b)
                else:
                    left, right = got[f"{name}.adapter_left"], got[f"{name}.adapter_right"]
                    layer.left.copy_(right.T if t else left)
                    layer.right.copy_(left.T if t else right)
