"""``load_hf``: a Hugging Face transformers model built around a CERSA checkpoint.

The model is built with its parameters on the ``meta`` device (no memory), every linear
layer whose weight is factored in the checkpoint (``nn.Linear``, and GPT-2-style ``Conv1D``,
whose weight is stored transposed) becomes a :class:`CersaLinear` holding U_r, σ_r, V_rᵀ,
and only the checkpoint's dense tensors (embeddings, norms, biases, unfactored matrices)
are loaded. The dense W of a factored layer is never allocated. A layer kept dense for lack
of saving (``no-saving``, ``planned``) gets, in the trainable modes, a frozen W plus an
adapter in its own top-r subspace (:mod:`cersa_torch.dense`). With ``packed=True``,
quantized factors stay packed and are dequantized in each forward
(:mod:`cersa_torch.packed`).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import open_checkpoint
from .experts import stacked_experts
from .layers import Bases, adapts, build_layer
from .modules import CersaLinear
from .moe import layer_builder, swap_experts
from .packed import PACKED_MODES, PackedCersaLinear


@contextlib.contextmanager
def _parameters_on_meta():
    """Moves every parameter to the meta device as it is registered. Buffers stay real, so
    values computed at construction (rotary ``inv_freq``, ``position_ids``) are kept.
    ``torch.empty`` of a weight reserves address space but touches no page, and its
    initialization then runs on the meta tensor: nothing of the dense W is resident."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _config(cersa_dir: str, config):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if config is not None:
        return AutoConfig.from_pretrained(os.fspath(config))
    if os.path.isfile(os.path.join(cersa_dir, "config.json")):
        return AutoConfig.from_pretrained(cersa_dir)
    raise ValueError(f"{cersa_dir}: no config.json (cersa convert copies it when it is next to "
                     "the source); pass config= (the source model directory, or a transformers "
                     "PretrainedConfig)")


def _model_class(config, auto_class):
    import transformers

    if auto_class is not None:
        return auto_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _model_names(model, checkpoint_names: Iterable[str], source: str,
                 what: Optional[str] = "load_hf cannot build that from a CERSA checkpoint yet",
                 merged: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, str]:
    """Model state-dict name → checkpoint name, for the tensor names ``checkpoint_names`` as
    stored in the files of ``source`` (a CERSA manifest's tensors for :func:`load_hf`, a
    safetensors model's for :func:`cersa_torch.calibrate`), as ``from_pretrained`` would map them:
    transformers' own key renamings for the architecture (transformers ≥ 5 renames, e.g.,
    ViT's ``encoder.layer.N.attention.attention.query`` to ``layers.N.attention.q_proj``) and
    the base model's prefix added or removed. Tensors that transformers would merge with
    others on loading (fused or stacked weights) cannot be taken from factors (nor given one
    statistic): an error names them, ending with ``what``; with ``what=None`` they are left
    out of the mapping instead; with a dict ``merged`` they are recorded there (key →
    (target, converter source pattern)) for :func:`cersa_torch.moe.swap_experts`."""
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:  # transformers 4: no renamings; only the prefix.
        get_model_conversion_mapping = None
    if get_model_conversion_mapping is not None:
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def rename(key):
            return rename_source_key(key, renamings, converters, prefix, meta)
    else:
        def rename(key):
            if key not in meta and f"{prefix}.{key}" in meta:
                return f"{prefix}.{key}", None
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in meta:
                return key[len(prefix) + 1:], None
            return key, None
    names: Dict[str, str] = {}
    for key in checkpoint_names:
        target, pattern = rename(key)
        if pattern is not None:
            if merged is not None:
                merged[key] = (target, pattern)
                continue
            if what is None:
                continue
            raise ValueError(f"{source}: {key}: transformers merges it with other tensors "
                             f"on loading ({pattern}); {what}")
        names[target] = key
    return names


def _set_tensor(model, name: str, value: torch.Tensor, trainable: bool) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(value, requires_grad=trainable)
    else:
        parent._buffers[leaf] = value


def load_hf(cersa_dir, auto_class=None, mode: str = "frozen", k: Optional[int] = 8,
            device="cpu", dtype: torch.dtype = torch.float32, config=None,
            train_dense: bool = False, beta: Optional[float] = None,
            verify_checksums: bool = True, dense_subspace: bool = True,
            packed: bool = False, bases=None):
    """A transformers model whose factored linear layers are :class:`CersaLinear` s.

    ``auto_class``: e.g. ``transformers.AutoModelForCausalLM`` (default: the class named in
    the config's ``architectures``, else ``AutoModel``). ``config``: a directory or
    ``PretrainedConfig`` (default: ``config.json`` in ``cersa_dir``, which ``cersa convert``
    copies from the source directory with the tokenizer files; needed when the source had
    none, e.g. a lone GGUF file). ``mode``/``k``: the adaptation of every factored layer
    (``frozen``, ``scale``, ``core``, ``factors``, ``cersa``; in ``core`` mode a layer of rank
    r < k gets k = r; with ``cersa``, ``beta`` < τ trains only each core's leading
    components up to cumulative energy β). Dense parameters are frozen unless
    ``train_dense``. Raises ``ValueError`` naming every model parameter the checkpoint does
    not provide.
    ``verify_checksums``: see :func:`open_checkpoint` (default: every shard's sha256 is
    checked, one read of each shard).
    ``dense_subspace`` (default on; measured better, README "Training"): in the ``scale``,
    ``core`` and ``cersa`` modes, every linear layer the converter kept dense because its
    factors would not be smaller (reason ``no-saving``, or ``planned`` by a budget) becomes
    a :class:`~cersa_torch.dense.DenseSubspaceLinear`: its exact W frozen, plus the mode's
    adaptation in W's own top-r subspace, computed here (a float64 SVD per layer; r by the
    checkpoint's rank rule). ``False`` keeps those layers dense and frozen.
    Per-expert MoE checkpoints (Mixtral, Qwen-MoE, …: one matrix per expert that
    transformers fuses on loading) get a :class:`~cersa_torch.moe.CersaExperts` per experts
    module, its expert matrices built as above (:mod:`cersa_torch.moe`, docs/experts.md).
    ``bases``: a file written by :func:`cersa_torch.save_bases` (or an adapter file from
    :func:`cersa_torch.save_adapter`) for this checkpoint: the dense-subspace layers take
    their basis from it instead of computing an SVD (the SVDs dominate the load time of a
    large model; layers the file lacks are still computed).
    ``packed`` (default off): every factored layer whose factors are quantized (``--dtype
    q8_0|q5_0|q4_0``) keeps them as stored, U8 rows of GGML blocks, and dequantizes them in
    each forward (a :class:`~cersa_torch.packed.PackedCersaLinear`): 0.27× (Q8_0) / 0.14×
    (Q4_0) of the f32 factor bytes held, the same outputs and gradients as
    ``packed=False``, the factor path 1.2–1.4× slower at 256 tokens; in training no
    dequantized factor is kept for the backward pass (dequantized again there), so a
    step's peak keeps the saving too (bench/RESULTS.md). Layers whose factors are not
    quantized are unaffected. U and V stay frozen, so ``mode="factors"`` with ``packed``
    raises ``ValueError``.
    """
    import transformers

    if packed and mode not in PACKED_MODES:
        raise ValueError(f"packed=True keeps the quantized U and V frozen as stored; mode "
                         f"{mode!r} trains them. Use one of {PACKED_MODES}, or packed=False")
    cersa_dir = os.fspath(cersa_dir)
    cfg = _config(cersa_dir, config)
    cls = _model_class(cfg, auto_class)
    ckpt = open_checkpoint(cersa_dir, device=device, dtype=dtype,
                           verify_checksums=verify_checksums)
    with _parameters_on_meta():
        model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    merged: Dict[str, Tuple[str, str]] = {}
    names = _model_names(model, ckpt.manifest["tensors"], cersa_dir, merged=merged)
    # Per-expert (Mixtral-style) matrices: each experts module becomes a CersaExperts.
    if bases is not None:
        bases = Bases(bases, ckpt.manifest_sha256)
    swap_experts(model, merged, cersa_dir, layer_builder(ckpt, cersa_dir, mode, k, beta, dtype,
                                                         device, dense_subspace, train_dense,
                                                         packed, bases))
    conv1d = getattr(transformers.pytorch_utils, "Conv1D", ())
    for path, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, conv1d)):
            continue
        name = names.get(f"{path}.weight")
        if name is None:
            continue
        if not adapts(ckpt, name, mode, dense_subspace):
            continue
        transposed = not isinstance(module, nn.Linear)
        # Conv1D computes x·W with W [in, out]: its layer is built from the factors of Wᵀ.
        want = ((module.nf, module.weight.shape[0]) if transposed
                else (module.out_features, module.in_features))
        bias = None
        if getattr(module, "bias", None) is not None:
            bias_name = names.get(f"{path}.bias")
            if bias_name is None:
                raise ValueError(f"{cersa_dir}: {path}.bias is not in the checkpoint")
            bias = ckpt.dense(bias_name)
        layer = build_layer(ckpt, name, mode, k, beta, dtype, device, dense_subspace, packed,
                            transposed, bias, bases)
        got = (layer.out_features, layer.in_features)
        if got != want:
            raise ValueError(f"{cersa_dir}: {name} is {got[0]}×{got[1]} (out×in), "
                             f"the model's {path} is {want[0]}×{want[1]}")
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer)
    if packed and not any(isinstance(m, PackedCersaLinear) for m in model.modules()):
        warnings.warn(f"{cersa_dir}: packed=True, but no factored layer has quantized factors "
                      "(convert with --dtype q8_0, q5_0 or q4_0): nothing is packed",
                      stacklevel=2)
    # Everything else comes from the checkpoint's dense tensors.
    cersa_layers = {p for p, m in model.named_modules() if isinstance(m, CersaLinear)}
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rpartition(".")[0] in cersa_layers:
            continue
        key = names.get(name)
        if key is not None and ckpt.is_experts(key):  # fused MoE experts: recomposed, frozen
            _set_tensor(model, name, stacked_experts(ckpt, key, model, name), False)
        elif key is not None and not ckpt.is_factored(key):
            _set_tensor(model, name, ckpt.dense(key), train_dense)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise ValueError(f"{cersa_dir}: the checkpoint lacks {len(missing)} tensors the model "
                         f"needs: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    model.cersa_manifest_sha256 = ckpt.manifest_sha256
    return model.to(device).eval()
