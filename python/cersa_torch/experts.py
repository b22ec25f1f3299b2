"""Stacked mixture-of-experts tensors in :func:`cersa_torch.load_hf` (format revision 1.3).

transformers keeps the experts of some mixture-of-experts models fused in one parameter per
projection — gpt-oss's ``mlp.experts.gate_up_proj`` ``[E, hidden, 2·intermediate]`` and
``down_proj`` ``[E, intermediate, hidden]`` — and ``save_pretrained`` writes them so.
``cersa convert`` factors each expert of such a tensor on its own (an ``experts`` entry,
formats/cersa-v1.md §2 "Stacked experts"). The model indexes the experts of the fused
parameter inside its forward, so :func:`load_hf` fills the parameter with every expert
recomposed (``U·diag σ·Vᵀ``, or the dense expert), read one expert at a time from the
checkpoint, and freezes it: experts are not adapted (no ``CersaLinear`` for them, no adapter
entries, whatever ``mode`` and ``train_dense`` say).
"""
from __future__ import annotations

import torch


def stacked_experts(ckpt, key: str, model, name: str) -> torch.Tensor:
    """Experts entry ``key`` of ``ckpt`` (a :class:`~cersa_torch.TorchCheckpoint`)
    recomposed for the model parameter ``name``, whose shape it must have."""
    want = tuple(model.get_parameter(name).shape)
    shape = tuple(ckpt.info(key)["shape"])
    if shape != want:
        raise ValueError(f"{ckpt.dir}: {key} is a stacked experts tensor of shape "
                         f"{list(shape)}; the model's {name} is {list(want)}")
    return ckpt.experts(key)
