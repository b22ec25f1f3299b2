"""Memory of fine-tuning a CERSA checkpoint in PyTorch, per mode, known before loading it.

``python -m cersa_torch.memory CERSA_DIR [--k 8] [--dtype float32|bfloat16|float16]
[--packed]``
prints, for every mode of :func:`cersa_torch.load_hf`, the bytes of frozen weights, of
trainable parameters and of AdamW's state, next to the dense model with LoRA of rank k.
Every tensor is held in the compute dtype (e bytes per element; quantized factors are
dequantized to it at load, or with ``--packed`` held as their U8 rows, r·(row_bytes(m) +
row_bytes(n)) bytes in place of r·(m+n)·e). For a factored layer [m, n] of rank r:

===========  ===========================  ======================
mode         frozen                       trainable
===========  ===========================  ======================
``frozen``   r·(m+n+1)·e                  0
``scale``    r·(m+n)·e                    r·e (σ)
``core``     r·(m+n+1)·e                  2·r·k·e (A, B; k ≤ r)
``factors``  0                            r·(m+n)·e
``cersa``    r·(m+n+1)·e                  t²·e (C's leading block)
===========  ===========================  ======================

t = r, or the rank whose cumulative energy reaches β when ``beta`` is given (that needs σ,
read from the checkpoint). AdamW holds the gradient and two moments per trainable element:
3× the trainable bytes. Every dense tensor (embeddings, norms, biases, matrices kept dense)
is frozen, numel·e (trainable with ``train_dense``). The baseline is the dense model (every
matrix m·n·e) with LoRA of rank k, k·(m+n)·e trainable, on every matrix the converter
selected (factored or kept dense).

A matrix kept dense for lack of saving (``no-saving``, ``planned``) gets, in the ``scale``,
``core`` and ``cersa`` modes with ``dense_subspace`` (:mod:`cersa_torch.dense`), a basis
computed at load whose rank r' is not known before its SVD; r' > m·n/(m+n+1) (else the
converter would have factored it) and r' ≤ min(m, n). Those layers are reported apart, with
the bytes of that bound. :func:`measure` counts what a loaded model really holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

import torch

from . import MODES
from ._manifest import read_manifest
from ._quant import row_bytes

#: AdamW's gradient, first and second moments, per trainable element.
ADAMW_STATE = 3


@dataclasses.dataclass
class MemoryUse:
    """Bytes held while training: frozen weights, trainable parameters, optimizer state."""

    frozen: int = 0
    trainable: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.optimizer

    def add(self, frozen: int = 0, trainable: int = 0) -> None:
        self.frozen += frozen
        self.trainable += trainable
        self.optimizer += ADAMW_STATE * trainable


@dataclasses.dataclass
class Estimate:
    """:func:`estimate`'s answer, in bytes."""

    mode: str
    cersa: MemoryUse
    lora: MemoryUse
    #: Layers kept dense that get a subspace adapter at load (their W is in ``cersa.frozen``).
    dense_base_layers: int = 0
    #: Upper bound of their bases' bytes, r' = min(m, n) (not in ``cersa``).
    dense_base_bound: int = 0


def layer_memory(m: int, n: int, r: int, mode: str, k: int = 8, t: Optional[int] = None,
                 elem_bytes: int = 4, packed: Optional[str] = None) -> MemoryUse:
    """Bytes of one factored layer [m, n] of rank r trained in ``mode`` (the module table).
    ``packed``: the factors' quantization (``Q8_0``, …) when they are held packed
    (``load_hf(packed=True)``): U and Vᵀ then cost r·(row_bytes(m) + row_bytes(n)) bytes."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    use = MemoryUse()
    uv = (r * (row_bytes(packed, m) + row_bytes(packed, n)) if packed
          else r * (m + n) * elem_bytes)
    sigma = r * elem_bytes
    if mode == "frozen":
        use.add(frozen=uv + sigma)
    elif mode == "scale":
        use.add(frozen=uv, trainable=sigma)
    elif mode == "core":
        use.add(frozen=uv + sigma, trainable=2 * r * min(k, r) * elem_bytes)
    elif mode == "factors":
        if packed:
            raise ValueError("factors mode trains U and V: they cannot stay packed")
        use.add(trainable=uv)
    else:
        t = r if t is None else min(t, r)
        use.add(frozen=uv + sigma, trainable=t * t * elem_bytes)
    return use


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate(cersa_dir, mode: str, k: int = 8, dtype: torch.dtype = torch.float32,
             beta: Optional[float] = None, train_dense: bool = False,
             dense_subspace: bool = True, packed: bool = False) -> Estimate:
    """What :func:`cersa_torch.load_hf` (same arguments) will hold for ``cersa_dir``, from its
    manifest alone (σ is read too when ``beta`` is given). Stacked experts count as frozen
    dense tensors, as ``load_hf`` fills them. With ``packed``, quantized factors count their
    stored U8 rows."""
    from .dense import DENSE_MODES, DENSE_REASONS
    from .modules import trainable_rank

    cersa_dir = os.fspath(cersa_dir)
    manifest = read_manifest(cersa_dir)
    e = torch.empty((), dtype=dtype).element_size()
    ckpt = None
    if beta is not None and mode == "cersa":
        from .checkpoint import open_checkpoint

        ckpt = open_checkpoint(cersa_dir, verify_checksums=False)
    out = Estimate(mode, MemoryUse(), MemoryUse())
    for name, info in sorted(manifest["tensors"].items()):
        matrix = info.get("matrix_shape")
        if matrix is None and len(info["shape"]) >= 2:  # a dense entry: [d0, d1·…]
            matrix = [info["shape"][0], _numel(info["shape"][1:])]
        if info["kind"] == "factored":
            (m, n), r = matrix, info["rank"]
            t = None
            if ckpt is not None:
                t = trainable_rank(ckpt.factors(name, torch.float64)[1], info["energy"], beta)
            use = layer_memory(m, n, r, mode, k, t, e, info.get("quant") if packed else None)
            out.cersa.add(use.frozen, use.trainable)
            out.lora.add(frozen=m * n * e, trainable=k * (m + n) * e)
            continue
        numel = _numel(info["shape"])
        if info["kind"] == "experts":
            out.cersa.add(frozen=numel * e)
        elif train_dense:
            out.cersa.add(trainable=numel * e)
        else:
            out.cersa.add(frozen=numel * e)
        if info.get("reason") in DENSE_REASONS:
            m, n = matrix
            out.lora.add(frozen=m * n * e, trainable=k * (m + n) * e)
            if dense_subspace and mode in DENSE_MODES:
                out.dense_base_layers += 1
                out.dense_base_bound += layer_memory(m, n, min(m, n), mode, k, None, e).total
        elif info["kind"] == "experts":
            out.lora.add(frozen=numel * e)
        else:
            out.lora.add(frozen=numel * e)
    return out


def measure(model) -> MemoryUse:
    """Bytes a loaded model holds: parameters with a gradient are trainable (AdamW state
    counted as :data:`ADAMW_STATE` × their bytes), the others and every persistent buffer
    frozen (non-persistent buffers, computed at construction like rotary tables, are not
    weights and are left out). Shared tensors are counted once."""
    use, seen = MemoryUse(), set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            if p.requires_grad:
                use.add(trainable=nbytes)
            else:
                use.add(frozen=nbytes)
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module._buffers.items():
            if b is not None and name not in skip and id(b) not in seen:
                seen.add(id(b))
                use.add(frozen=b.numel() * b.element_size())
    return use


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cersa_torch.memory",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("cersa_dir")
    ap.add_argument("--k", type=int, default=8, help="core rank k, and LoRA's rank (default 8)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--packed", action="store_true",
                    help="quantized factors held packed (load_hf(packed=True); no factors mode)")
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    modes = [m for m in MODES if not (args.packed and m == "factors")]
    rows = [estimate(args.cersa_dir, mode, args.k, dtype, packed=args.packed) for mode in modes]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return 0
    print(f"{args.cersa_dir}: {args.dtype}, AdamW, k = {args.k} (MiB)")
    print(f"{'':<22} {'frozen':>10} {'trainable':>10} {'optimizer':>10} {'total':>10} "
          f"{'+ bases ≤':>10}")
    label = {"cersa": "cersa (paper core)"}
    for label, use, bound in [(label.get(r.mode, f"cersa {r.mode}"), r.cersa,
                               r.dense_base_bound)
                              for r in rows] + [(f"dense + LoRA r={args.k}", rows[0].lora, 0)]:
        print(f"{label:<22} {_mib(use.frozen):>10} {_mib(use.trainable):>10} "
              f"{_mib(use.optimizer):>10} {_mib(use.total):>10} "
              f"{_mib(bound) if bound else '':>10}")
    layers = max(r.dense_base_layers for r in rows)
    if layers:
        print(f"+ bases: {layers} matrices kept dense get a subspace adapter at load "
              "(dense_subspace), whose rank is known only after its SVD: at most this much "
              "more; load_hf(dense_subspace=False) leaves them frozen instead.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
