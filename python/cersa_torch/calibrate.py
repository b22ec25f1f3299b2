"""``calibrate``: each linear layer's input second moment G = Σ_t x_t x_tᵀ, collected by running
the dense model over calibration text, written as the file ``cersa convert --calibration``
reads (docs/calibration.md is the contract).

Why: plain truncation keeps ``‖W‖_F`` energy, but what a model needs kept is ``‖W X‖_F`` on
real inputs; whitened truncation needs G for every factored weight.

    python -m cersa_torch.calibrate MODEL_DIR --text FILE [--text FILE ...] -o calib.safetensors

Layers that read one input tensor (q/k/v, gate/up) share one statistic: a first forward
finds them. When all statistics (n²·8 bytes each, f64) would exceed ``max_stat_bytes``, they
are collected in several passes over the text, each holding a subset.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .hf import _model_class, _model_names

FORMAT = "cersa-calibration"
VERSION = 1


def checkpoint_tensor_names(model_dir: str) -> List[str]:
    """The tensor names stored in ``model_dir``'s safetensors files: those of the index
    (``model.safetensors.index.json``) when there is one, else ``model.safetensors``, else
    every ``*.safetensors`` file there."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(os.path.basename(f)
                       for f in glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors files (calibrate reads the tensor names "
                         "that cersa convert will read)")
    names: List[str] = []
    for f in files:
        with safe_open(os.path.join(model_dir, f), framework="numpy") as st:
            names.extend(st.keys())
    return names


def token_chunks(tokenizer, texts: Union[str, Sequence[str]], max_length: int,
                 max_sequences: int) -> List[List[int]]:
    """The documents tokenized (no special tokens), concatenated with EOS between them when
    the tokenizer has one, cut into up to ``max_sequences`` sequences of ``max_length``
    tokens. No padding, so every token is a real one; a last partial chunk is dropped unless
    it is the only one."""
    if isinstance(texts, str):
        texts = [texts]
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("calibrate: the calibration texts give no tokens")
    full = len(ids) // max_length
    if full == 0:
        return [ids]
    return [ids[i * max_length:(i + 1) * max_length] for i in range(min(full, max_sequences))]


def _file_sha256(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _layers(model, model_dir: str):
    """(module path, checkpoint weight name, module, input_axis, n_in) of every nn.Linear and
    Conv1D whose weight is stored in ``model_dir``'s safetensors files."""
    import transformers

    conv1d = getattr(transformers.pytorch_utils, "Conv1D", ())
    names = _model_names(model, checkpoint_tensor_names(model_dir), model_dir, what=None)
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            axis, n_in = 1, module.in_features
        elif conv1d and isinstance(module, conv1d):
            axis, n_in = 0, module.weight.shape[0]  # Conv1D stores W [in, out]: y = x W
        else:
            continue
        name = names.get(f"{path}.weight")
        if name is not None:
            layers.append((path, name, module, axis, n_in))
    if not layers:
        raise ValueError(f"{model_dir}: no linear layer of the model has its weight in the "
                         "checkpoint files")
    return layers


def _input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _groups(model, layers, first: torch.Tensor) -> List[List[int]]:
    """Layers grouped by the input tensors they read in one forward of ``first``: two layers
    share a statistic when every call of one reads the very tensor the other's call reads
    (same storage, shape and stride, all kept alive for the forward so nothing is reused)."""
    seen: Dict[int, list] = {i: [] for i in range(len(layers))}
    alive = []

    def probe(i):
        def hook(module, args, kwargs):
            x = _input(args, kwargs)
            alive.append(x)
            seen[i].append((x.data_ptr(), tuple(x.shape), x.stride(), x.dtype))
        return hook

    handles = [m.register_forward_pre_hook(probe(i), with_kwargs=True)
               for i, (_, _, m, _, _) in enumerate(layers)]
    try:
        model(input_ids=first)
    finally:
        for h in handles:
            h.remove()
    by_key: Dict[tuple, List[int]] = {}
    for i in range(len(layers)):
        if not seen[i]:
            continue  # not run by this model's forward (e.g. a head the class does not use)
        by_key.setdefault(tuple(seen[i]), []).append(i)
    return sorted(by_key.values())


def _passes(sizes: List[int], max_bytes: int) -> List[List[int]]:
    """Indices of ``sizes`` split, in order, into runs whose sum stays within ``max_bytes``
    (a run holds at least one)."""
    passes: List[List[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if passes[-1] and used + n > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += n
    return passes


def calibrate(model_dir, texts: Union[str, Sequence[str]], out, *, auto_class=None,
              max_length: int = 512, max_sequences: int = 128, device="cpu",
              stat_dtype: torch.dtype = torch.float32, max_stat_bytes: int = 2 << 30,
              progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Runs the dense model in ``model_dir`` (loaded with ``from_pretrained`` in float32, its
    tokenizer from the same directory) over ``texts`` and writes each layer input's
    G = Σ_t x_t x_tᵀ (accumulated in float64 on ``device``, stored as ``stat_dtype``) to
    ``out`` atomically. ``progress(done, total)`` is called after each forward. Returns the
    metadata document (docs/calibration.md)."""
    import transformers
    from safetensors.torch import save_file

    model_dir, out = os.fspath(model_dir), os.fspath(out)
    if stat_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"calibrate: stat_dtype must be float32 or float64, not {stat_dtype}")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = _model_class(config, auto_class)
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                        None)
    if limit is not None and max_length > limit:
        max_length = limit  # positions past the model's table would fail or mean nothing
    chunks = token_chunks(tokenizer, texts, max_length, max_sequences)
    layers = _layers(model, model_dir)
    seqs = [torch.tensor([c], dtype=torch.long, device=device) for c in chunks]
    with torch.no_grad():
        groups = _groups(model, layers, seqs[0])
        sizes = [layers[g[0]][4] ** 2 * 8 for g in groups]
        passes = _passes(sizes, max_stat_bytes)
        stats: Dict[int, torch.Tensor] = {}
        done, total = 0, len(passes) * len(seqs)
        for members in passes:
            acc = {gi: torch.zeros(layers[groups[gi][0]][4], layers[groups[gi][0]][4],
                                   dtype=torch.float64, device=device) for gi in members}

            def add(gi):
                g, n = acc[gi], layers[groups[gi][0]][4]

                def hook(module, args, kwargs):
                    x = _input(args, kwargs).detach().reshape(-1, n).to(device, torch.float64)
                    g.addmm_(x.T, x)
                return hook

            handles = [layers[groups[gi][0]][2].register_forward_pre_hook(add(gi),
                                                                         with_kwargs=True)
                       for gi in members]
            try:
                for s in seqs:
                    model(input_ids=s)
                    done += 1
                    if progress is not None:
                        progress(done, total)
            finally:
                for h in handles:
                    h.remove()
            for gi, g in acc.items():
                stats[gi] = ((g + g.T) / 2).to("cpu", stat_dtype).contiguous()
            del acc
    token_bytes = np.asarray([t for c in chunks for t in c], dtype="<i8").tobytes()
    tensors, weights = {}, {}
    for gi, group in enumerate(groups):
        stat = layers[group[0]][1]
        tensors[stat] = stats[gi]
        for i in group:
            weights[layers[i][1]] = {"stat": stat, "input_axis": layers[i][3]}
    weights = {layers[i][1]: weights[layers[i][1]] for i in range(len(layers))
               if layers[i][1] in weights}
    doc = {
        "version": VERSION,
        "model": {"config_sha256": _file_sha256(os.path.join(model_dir, "config.json")),
                  "architectures": list(getattr(config, "architectures", None) or [])},
        "text": {"sequences": len(chunks), "tokens": sum(len(c) for c in chunks),
                 "max_length": max_length, "sha256": hashlib.sha256(token_bytes).hexdigest()},
        "weights": weights,
    }
    metadata = {"format": FORMAT, "version": str(VERSION), "cersa_calibration": json.dumps(doc)}
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)),
                       f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return doc


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cersa_torch.calibrate",
                                description="Collect the input statistics G = Σ x xᵀ of every "
                                "linear layer for `cersa convert --calibration`.")
    p.add_argument("model_dir", help="dense Hugging Face model directory (safetensors, "
                   "config.json, tokenizer)")
    p.add_argument("--text", action="append", required=True, metavar="FILE",
                   help="a UTF-8 text file, one document (repeatable)")
    p.add_argument("-o", "--out", required=True, help="the calibration file to write")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-sequences", type=int, default=128)
    p.add_argument("--max-stat-bytes", type=int, default=2 << 30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--f64", action="store_true", help="store G as F64 (default F32)")
    a = p.parse_args(argv)
    texts = [open(f, encoding="utf-8").read() for f in a.text]

    def progress(done, total):
        print(f"\rforward {done}/{total}", end="", file=sys.stderr, flush=True)

    doc = calibrate(a.model_dir, texts, a.out, max_length=a.max_length,
                    max_sequences=a.max_sequences, device=a.device,
                    stat_dtype=torch.float64 if a.f64 else torch.float32,
                    max_stat_bytes=a.max_stat_bytes, progress=progress)
    print(file=sys.stderr)
    stats = len({w["stat"] for w in doc["weights"].values()})
    print(f"{a.out}: {len(doc['weights'])} weights, {stats} statistics, "
          f"{doc['text']['tokens']} tokens in {doc['text']['sequences']} sequences")
    return 0



class _CallableModule(type(sys)):
    """``import cersa_torch.calibrate`` makes the package attribute ``calibrate`` this module
    rather than the function of that name: calling the module calls the function."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
