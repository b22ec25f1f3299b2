"""Per-expert (Mixtral-style) MoE checkpoints in :func:`cersa_torch.load_hf`.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and the other families that
transformers ≥ 5 maps to the ``mixtral`` or ``qwen2_moe`` conversion store one 2-D matrix per
expert and role (Mixtral ``block_sparse_moe.experts.N.w1|w3|w2.weight``, the others
``mlp.experts.N.gate_proj|up_proj|down_proj.weight``). ``from_pretrained`` merges them with
its ``WeightConverter`` s into the experts module's fused parameters ``gate_up_proj``
[E, 2I, H] (``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``: gate rows first, then
up) and ``down_proj`` [E, H, I]. ``cersa convert`` factors each per-expert matrix as an
ordinary entry, so :func:`load_hf` does not build the fused tensors: it replaces the experts
module with a :class:`CersaExperts` that holds, per expert, three linear layers built like
any other of ``load_hf`` (a :class:`~cersa_torch.modules.CersaLinear` in the load mode for a
factored matrix, a :class:`~cersa_torch.dense.DenseSubspaceLinear` or a frozen dense layer for
one kept dense), named by their checkpoint entries, so :func:`save_adapter` writes them and
``cersa merge`` folds them. The dense [E, 2I, H] tensor is never allocated.

The pairing of checkpoint names with experts and roles is transformers' own: the converter
that matched a name gives its role (the index of its source pattern: gate, up for
``gate_up_proj``), and the experts are taken in the natural order of their names, as
transformers stacks them. Only the standard experts module is replaced (concatenated
gate/up, not transposed, no biases, gated by the default ``act_fn(gate) * up``, no post-expert
norm); any other form is refused with a ``ValueError`` naming the module and what differs.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: The fused experts parameters load_hf builds from per-expert matrices, and the roles of
#: the converter's source patterns in their order.
ROLES = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


class DenseExpertLinear(nn.Module):
    """y = x·Wᵀ for one expert's matrix the checkpoint keeps dense (frozen unless
    ``trainable``)."""

    def __init__(self, weight: torch.Tensor, trainable: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def forward(self, x):
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dense"


class CersaExperts(nn.Module):
    """Drop-in for a transformers experts module (``MixtralExperts`` and its kin): the same
    ``forward(hidden_states, top_k_index, top_k_weights)``, computing for each expert e and
    token x routed to it ``down_e(act_fn(gate_e(x)) * up_e(x))`` times its routing weight,
    summed over the token's experts, with one layer per expert and role."""

    def __init__(self, gate_proj: List[nn.Module], up_proj: List[nn.Module],
                 down_proj: List[nn.Module], act_fn: nn.Module):
        super().__init__()
        if not len(gate_proj) == len(up_proj) == len(down_proj):
            raise ValueError("CersaExperts needs as many gate, up and down layers")
        self.num_experts = len(gate_proj)
        self.gate_proj = nn.ModuleList(gate_proj)
        self.up_proj = nn.ModuleList(up_proj)
        self.down_proj = nn.ModuleList(down_proj)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # The routing loop of transformers' eager MixtralExperts.forward.
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]
            current = self.act_fn(self.gate_proj[e](current_state)) * self.up_proj[e](
                current_state)
            current = self.down_proj[e](current)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def _unsupported(path: str, module: nn.Module) -> List[str]:
    """What keeps ``module`` (at ``path``) from being a standard experts module."""
    why = []
    n_exp = getattr(module, "num_experts", None)
    for attr in ("gate_up_proj", "down_proj"):
        p = getattr(module, attr, None)
        if not isinstance(p, torch.Tensor) or p.ndim != 3:
            why.append(f"no 3-D parameter {attr}")
        elif p.shape[0] != n_exp:
            why.append(f"{attr} of {p.shape[0]} experts, num_experts={n_exp!r}")
    for flag, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                       ("is_concatenated", True), ("has_post_expert_norm", False)):
        if getattr(module, flag, want) != want:
            why.append(f"{flag}={getattr(module, flag)!r} (supported: {want})")
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - older transformers: no custom gates either
        _default_apply_gate = None
    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if _default_apply_gate is not None and gate is not _default_apply_gate:
        why.append("a custom _apply_gate (supported: act_fn(gate) * up)")
    if not isinstance(getattr(module, "act_fn", None), nn.Module) and not callable(
            getattr(module, "act_fn", None)):
        why.append("no act_fn")
    return why


def _converters(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]


def _expert_role(converters, target: str, pattern: str):
    """The role (``gate``, ``up``, ``down``) of a checkpoint key that the converter source
    ``pattern`` merged into ``target``, or ``None`` when that merge is not the per-expert
    stacking of a standard experts parameter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    leaf = target.rpartition(".")[2]
    roles = ROLES.get(leaf)
    if roles is None:
        return None
    for conv in converters:
        if pattern not in conv.source_patterns:
            continue
        ops = [(type(op), getattr(op, "dim", None)) for op in conv.operations]
        want = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(roles) > 1 else [])
        if ops != want or len(conv.source_patterns) != len(roles) or "*" not in pattern:
            return None
        return roles[conv.source_patterns.index(pattern)]
    return None


def swap_experts(model, merged: Dict[str, Tuple[str, str]], source: str,
                 build: Callable[[str, Tuple[int, int]], nn.Module]) -> List[str]:
    """Replaces every experts module of ``model`` whose fused parameters transformers would
    merge from the per-expert checkpoint keys in ``merged`` (key → (model target name,
    converter source pattern), as :func:`cersa_torch.hf._model_names` reports them) with a
    :class:`CersaExperts`; ``build(key, (out, in))`` makes the layer of one checkpoint
    matrix. Returns the replaced modules' paths. Raises ``ValueError`` for a merge that is
    not per-expert stacking (naming the key, as before), for an experts module of another
    form, and for a missing or surplus expert."""
    if not merged:  # nothing merged (transformers < 5 merges nothing)
        return []
    from transformers.core_model_loading import dot_natural_key

    converters = _converters(model)
    groups: Dict[str, Dict[str, List[str]]] = {}
    for key, (target, pattern) in merged.items():
        role = _expert_role(converters, target, pattern)
        if role is None:
            raise ValueError(f"{source}: {key}: transformers merges it with other tensors on "
                             f"loading ({pattern}); load_hf cannot build that from a CERSA "
                             "checkpoint yet")
        groups.setdefault(target.rpartition(".")[0], {}).setdefault(role, []).append(key)
    done = []
    for path, by_role in sorted(groups.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{source}: the model has no experts module {path} for "
                             f"{sorted(by_role.values())[0][0]}") from None
        why = _unsupported(path, module)
        if why:
            raise ValueError(f"{source}: {path} ({type(module).__name__}): load_hf builds "
                             "per-expert checkpoints only into standard experts modules; this "
                             f"one has {'; '.join(why)}")
        n_exp = module.num_experts
        _, two_i, h = module.gate_up_proj.shape
        shapes = {"gate": (two_i // 2, h), "up": (two_i // 2, h),
                  "down": tuple(module.down_proj.shape[1:])}
        layers = {}
        for role in ("gate", "up", "down"):
            keys = sorted(by_role.get(role, []), key=dot_natural_key)
            if len(keys) != n_exp:
                raise ValueError(f"{source}: {path} has {n_exp} experts; the checkpoint has "
                                 f"{len(keys)} {role} matrices for it"
                                 + (f" ({keys[0]} …)" if keys else ""))
            layers[role] = [build(k, shapes[role]) for k in keys]
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, CersaExperts(layers["gate"], layers["up"], layers["down"],
                                            module.act_fn))
        done.append(path)
    return done


def layer_builder(ckpt, source: str, mode: str, k, beta, dtype, device, dense_subspace: bool,
                  train_dense: bool, packed: bool = False, bases=None
                  ) -> Callable[[str, Tuple[int, int]], nn.Module]:
    """``build`` for :func:`swap_experts`: one expert matrix as :func:`load_hf` makes any
    linear layer (:func:`cersa_torch.layers.build_layer`: a :class:`CersaLinear` in ``mode``,
    packed with ``packed``, when factored; a :class:`DenseSubspaceLinear` when kept dense
    under the ``dense_subspace`` rule), else a :class:`DenseExpertLinear` (trainable only
    with ``train_dense``)."""
    from .layers import build_layer

    def build(name: str, want: Tuple[int, int]) -> nn.Module:
        info = ckpt.info(name)
        factored = ckpt.is_factored(name)
        if not factored and info["kind"] != "dense":
            raise ValueError(f"{source}: {name}: an expert matrix of kind {info['kind']!r} "
                             "(load_hf takes factored or dense ones)")
        shape = tuple(info["matrix_shape"] if factored else info["shape"])
        if shape != tuple(want):
            raise ValueError(f"{source}: {name} has shape {list(shape)} (out×in), the model's "
                             f"expert layer is {want[0]}×{want[1]}")
        layer = build_layer(ckpt, name, mode, k, beta, dtype, device, dense_subspace, packed,
                            bases=bases)
        if layer is None:
            return DenseExpertLinear(ckpt.dense(name).to(device=device, dtype=dtype),
                                     train_dense)
        return layer

    return build
