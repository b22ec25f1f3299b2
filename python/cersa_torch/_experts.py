"""Stacked mixture-of-experts entries (formats/cersa-v1.md §2 "Stacked experts", format
revision 1.3), checked without numpy or torch.

An entry of kind ``experts`` holds a tensor ``[E, d1, d2, …]`` whose expert ``e`` is stored
on its own, as the factored or dense entry ``NAME.cersa_expert.e`` of shape ``[d1, d2, …]``
would be. The rules are the Rust validator's (``loader/src/validate.rs``:
``expected_stored``, ``experts_dims``), in its order, with its issue kinds: a rule of the
entry breaks as ``experts-invalid``; an expert's own rules and stored tensors are reported
under the expert's name.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

INFIX_EXPERT = ".cersa_expert."
_U64 = 1 << 64


def expert_name(name: str, e: int) -> str:
    """Stored name of expert ``e`` of experts entry ``name`` (its dense tensor, or the
    prefix of its factors' names)."""
    return f"{name}{INFIX_EXPERT}{e}"


def split_expert_name(key: str) -> Optional[Tuple[str, int]]:
    """(entry name, e) of an expert's stored name ``NAME.cersa_expert.e`` (e in decimal,
    no padding), else None."""
    name, sep, e = key.rpartition(INFIX_EXPERT)
    if not sep or not e.isdigit() or not e.isascii() or (e != "0" and e.startswith("0")):
        return None
    return name, int(e)


def expert_info(info: dict, e: int) -> Optional[dict]:
    """Expert ``e`` of experts entry ``info`` as an entry of its own (Rust's
    ``TensorInfo::expert``): its record, with the shape without the first dimension and the
    entry's source dtype and shard (and, when factored, its matrix shape and rule). None when
    ``info`` lists no expert ``e``."""
    records = info.get("experts")
    if not isinstance(records, list) or not 0 <= e < len(records) or len(info["shape"]) < 1:
        return None
    x = records[e]
    out = {k: v for k, v in x.items() if v is not None and k in (
        "kind", "stored_dtype", "quant", "rank", "energy", "rel_error", "reason")}
    out.update(shape=list(info["shape"][1:]), source_dtype=info["source_dtype"],
               shard=info["shard"])
    if x["kind"] == "factored":
        for k in ("matrix_shape", "rule"):
            if info.get(k) is not None:
                out[k] = info[k]
    return out


def check_experts_list(issue, name: str, info: dict) -> None:
    """Raises ``experts-invalid`` unless the entry has an ``experts`` list exactly when it
    is of kind ``experts`` (``issue(kind, detail)`` makes the error)."""
    if (info.get("experts") is not None) != (info["kind"] == "experts"):
        kind = info["kind"]
        raise issue("experts-invalid", f"an entry of kind {kind} with an experts list"
                    if kind != "experts" else "kind experts without an experts list")


def experts_dims(issue, name: str, info: dict) -> Tuple[int, int, int]:
    """(E, m, n) of experts entry ``name``, or the first rule of §2 it breaks, raised as
    ``experts-invalid``: at least 3 dimensions, one record per index of the first,
    ``matrix_shape`` ``[d1, d2·…]``, no record of kind ``experts``."""
    shape = list(info["shape"])
    if len(shape) < 3:
        raise issue("experts-invalid", f"shape {shape} has fewer than 3 dimensions")
    e, m, rest = shape[0], shape[1], shape[2:]
    n = math.prod(rest)
    if n >= _U64 or m * n >= _U64:
        raise issue("experts-invalid", f"shape {shape} overflows")
    records = info["experts"]
    if len(records) != e:
        raise issue("experts-invalid", f"{len(records)} experts listed for a first dimension "
                    f"of {e}")
    if info.get("matrix_shape") != [m, n]:
        raise issue("experts-invalid", f"matrix_shape {info.get('matrix_shape')} is not "
                    f"[{m}, {n}], the view of one expert of shape {shape}")
    for i, x in enumerate(records):
        if x["kind"] == "experts":
            raise issue("experts-invalid", f"expert {i} is of kind experts")
    return e, m, n


def factored_units(tensors: dict) -> Iterator[Tuple[str, int, str, dict]]:
    """(entry name, expert index or -1, stored name, entry) of every factored matrix, in the
    order Rust's validator scans factors: entries by name, experts in order."""
    for name in sorted(tensors):
        info = tensors[name]
        if info["kind"] == "factored":
            yield name, -1, name, info
        elif info["kind"] == "experts" and isinstance(info.get("experts"), list):
            for e, x in enumerate(info["experts"]):
                if x["kind"] == "factored":
                    yield name, e, expert_name(name, e), expert_info(info, e)


class ExpertEntries:
    """Expert lookups of :class:`cersa_torch._manifest.ManifestEntries` (``self.manifest``,
    ``self.dir``): experts are named by their entry and index, or by their stored name."""

    dir: str
    manifest: dict

    def _expert_entry(self, key: str) -> Optional[dict]:
        """The entry of expert ``NAME.cersa_expert.e`` (None when ``key`` names none)."""
        parts = split_expert_name(key)
        if parts is None:
            return None
        parent = self.manifest["tensors"].get(parts[0])
        if parent is None or parent["kind"] != "experts":
            return None
        return expert_info(parent, parts[1])

    def is_experts(self, name: str) -> bool:
        """Whether ``name`` is a stacked experts tensor (format revision 1.3)."""
        return self.info(name)["kind"] == "experts"

    def expert_count(self, name: str) -> int:
        """E, the number of experts of stacked experts tensor ``name``."""
        if not self.is_experts(name):
            raise ValueError(f"{self.dir}: {name} is not a stacked experts tensor "
                             f"(kind {self.info(name)['kind']})")
        return len(self.info(name)["experts"])

    def expert_name(self, name: str, e: int) -> str:
        """The stored name of expert ``e`` of ``name`` (``NAME.cersa_expert.e``), which
        ``info``, ``is_factored``, ``factors`` and ``dense`` take; ValueError when out of
        range."""
        count = self.expert_count(name)
        if not (isinstance(e, int) and 0 <= e < count):
            raise ValueError(f"{self.dir}: {name}: expert {e} out of range (it has {count})")
        return expert_name(name, e)

    def _not_dense(self, name: str) -> None:
        """Raises when ``name`` is not stored dense (the readers' ``dense`` refuses it)."""
        kind = self.info(name)["kind"]
        if kind == "factored":
            raise ValueError(f"{self.dir}: {name} is factored; use factors() or reconstruct()")
        if kind == "experts":
            raise ValueError(f"{self.dir}: {name} is a stacked experts tensor; read its experts "
                             f"one at a time (reconstruct_expert, expert_name) or all at once "
                             f"(experts)")
