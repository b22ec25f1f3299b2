"""The CERSA v1 manifest and shard headers, checked without numpy or torch.

Every size read from a file is treated as hostile: header lengths are capped, byte ranges
must match dtype × shape, lie inside the file and cover its data section exactly, and every
stored tensor must be the one the manifest implies (formats/cersa-v1.md). The checks are the
Rust loader's (``loader/src/validate.rs``, ``loader/src/safetensors.rs``), run in its order,
so a broken directory is refused with the first issue ``cersa_loader::Checkpoint::open``
(with sha256 verification) reports: :class:`CersaFormatError` carries its ``kind`` (the
serialized ``IssueKind`` name), the file's ``path`` and the ``tensor``, and its message
names the file and the tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from typing import Callable, Dict, List, Optional, Tuple

from ._experts import (ExpertEntries, check_experts_list, expert_info, expert_name,
                       experts_dims, factored_units)

MANIFEST_FILE = "cersa.json"
SUFFIX_U, SUFFIX_S, SUFFIX_VT = ".cersa_u", ".cersa_s", ".cersa_vt"
# Caps on what is read before it is checked (as the Rust loader's).
MAX_MANIFEST_SIZE = 256 << 20
MAX_HEADER_SIZE = 100_000_000
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
              "U32": 4, "U64": 8}
FACTOR_DTYPES = ("F64", "F32", "F16", "BF16")
# The highest format revision (`format_minor`) this reader knows: 1 adds quantized factors,
# 2 whitened factors (one side not orthonormal; read and recomposed exactly as before), 3
# stacked mixture-of-experts tensors stored one expert at a time (``_experts``).
FORMAT_MINOR = 3
# Bytes read (and hashed) at a time when shards are verified.
HASH_CHUNK = 8 << 20
_U64 = 1 << 64

# The likely cause of each kind of issue (as the Rust loader's messages give it).
_HINTS = {
    "manifest-unreadable": "is this a CERSA directory?",
    "wrong-format": "is this a CERSA directory?",
    "manifest-not-json": "was it truncated or edited by hand?",
    "manifest-invalid": "was it edited by hand or written by another program?",
    "unsupported-version": "was it written by a newer cersa? upgrade cersa_torch",
    "shard-missing": "was the directory copied incompletely?",
    "shard-size": "was the file modified or truncated?",
    "sha256": "was the file modified or truncated?",
    **{k: "was the manifest edited by hand?" for k in (
        "factored-without-matrix-shape", "factored-without-rank", "matrix-shape-mismatch",
        "rank-out-of-range", "factor-dtype-not-float", "quant-stored-dtype",
        "whitening-invalid", "experts-invalid", "shard-not-listed", "claimed-twice")},
    **{k: "do the manifest and the shards come from the same conversion?" for k in (
        "tensor-missing", "wrong-shard", "stored-in-two-shards", "dtype-mismatch",
        "shape-mismatch", "stray-tensor")},
    "non-finite-factor": "was the shard damaged after conversion? convert again",
}


class CersaFormatError(ValueError):
    """The directory is not a valid CERSA v1 checkpoint (message names file and tensor).

    ``kind``: the rule broken, spelled as the Rust loader's ``IssueKind`` (``shape-mismatch``,
    ``sha256``, …; None when not known); ``path``: the file concerned (the manifest or a
    shard, joined to the directory); ``tensor``: the manifest or stored tensor name, or None.
    """

    def __init__(self, message: str, kind: Optional[str] = None, path: Optional[str] = None,
                 tensor: Optional[str] = None):
        super().__init__(message)
        self.kind, self.path, self.tensor = kind, path, tensor


def issue(directory: str, kind: str, file: str, detail: str, tensor: Optional[str] = None,
          expected=None, found=None, prefix: bool = True) -> CersaFormatError:
    """The error of one broken rule, worded as the Rust loader's ``Issue::located``:
    ``DIR/FILE: tensor `T`: detail (expected E, found F) — hint`` (without the tensor
    prefix when ``detail`` names it already: ``prefix=False``)."""
    path = os.path.join(directory, file)
    msg = f"{path}: "
    if tensor is not None and prefix:
        msg += f"tensor `{tensor}`: "
    msg += detail
    if expected is not None or found is not None:
        msg += f" (expected {expected}, found {found})"
    if kind in _HINTS:
        msg += f" — {_HINTS[kind]}"
    return CersaFormatError(msg, kind=kind, path=path, tensor=tensor)


# ---------------------------------------------------------------- JSON as serde_json reads it
class _NotJson(ValueError):
    pass


def _constant(name):  # NaN, Infinity: not JSON (Python's json accepts them)
    raise _NotJson(f"{name} is not a JSON value")


def _float(text):
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"number out of range: {text}")
    return value


def _loads(data: bytes, dups: Dict[int, list]):
    """``data`` parsed as serde_json does (strict UTF-8; no NaN, Infinity or out-of-range
    numbers); objects with a repeated key are recorded in ``dups`` (id → their pairs)."""
    text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError

    def hook(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            dups[id(obj)] = pairs
        return obj

    try:
        return json.loads(text, object_pairs_hook=hook, parse_constant=_constant,
                          parse_float=_float)
    except RecursionError:
        raise _NotJson("recursion limit exceeded") from None


def _first_dup(pairs) -> str:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return "?"


# ---------------------------------------------------------------- the manifest's shape (serde)
def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class _Bad(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}" if where else what)


def _int(bits):
    def check(v, where, dups):
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << bits)):
            raise _Bad(where, f"expected an integer in 0..2^{bits}, found {_short(v)}")
    return check


def _f64(v, where, dups):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
        raise _Bad(where, f"expected a number, found {_short(v)}")


def _str(v, where, dups):
    if not isinstance(v, str):
        raise _Bad(where, f"expected a string, found {_short(v)}")


def _bool(v, where, dups):
    if not isinstance(v, bool):
        raise _Bad(where, f"expected a boolean, found {_short(v)}")


def _any(v, where, dups):
    pass


def _enum(values, note=""):
    def check(v, where, dups):
        if not (isinstance(v, str) and v in values):
            raise _Bad(where, f"expected one of {sorted(values)}, found {_short(v)}{note}")
    return check


def _list(item, length=None):
    def check(v, where, dups):
        if not isinstance(v, list):
            raise _Bad(where, f"expected a list, found {_short(v)}")
        if length is not None and len(v) != length:
            raise _Bad(where, f"expected {length} values, found {len(v)}")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]", dups)
    return check


def _map(item):
    def check(v, where, dups):
        if not isinstance(v, dict):
            raise _Bad(where, f"expected an object, found {_short(v)}")
        for k, x in v.items():
            item(x, f"{where}[{k!r}]", dups)
    return check


REQ, OPT, DEF = "required", "optional", "default"  # OPT: null = absent; DEF: not null


def _struct(fields):
    def check(v, where, dups):
        if not isinstance(v, dict):
            raise _Bad(where, f"expected an object, found {_short(v)}")
        pairs = dups.get(id(v))
        if pairs is not None:
            key = next((k for k in fields if sum(1 for p, _ in pairs if p == k) > 1), None)
            if key is not None:
                raise _Bad(where, f"duplicate field {key!r}")
        for key, value in v.items():  # document order, as serde reads it
            if key in fields:
                presence, item = fields[key]
                if not (presence == OPT and value is None):
                    item(value, f"{where}.{key}" if where else key, dups)
        for key, (presence, _) in fields.items():
            if presence == REQ and key not in v:
                raise _Bad(where, f"missing field {key!r}")
    return check


_U = _int(64)
_QUANTS = ("Q8_0", "Q5_0", "Q4_0")
_KINDS = ("factored", "dense", "experts")
_REASONS = ("excluded", "not-a-matrix", "non-float", "no-saving", "zero", "planned")
_TENSOR = _struct({
    "kind": (REQ, _enum(_KINDS)),
    "shape": (REQ, _list(_U)),
    "source_dtype": (REQ, _str),
    "stored_dtype": (REQ, _enum(tuple(DTYPE_SIZE))),
    "quant": (OPT, _enum(_QUANTS, " (a newer cersa_torch may know it)")),
    "shard": (REQ, _str),
    "matrix_shape": (OPT, _list(_U, 2)),
    "rank": (OPT, _U),
    "energy": (OPT, _f64),
    "rel_error": (OPT, _f64),
    "reason": (OPT, _enum(_REASONS)),
    "rule": (OPT, _str),
    "whitening": (OPT, _struct({"input_axis": (REQ, _int(8)),
                                "output_rel_error": (REQ, _f64)})),
    "experts": (OPT, _list(_struct({  # `cersa_loader::ExpertInfo` (revision 1.3)
        "kind": (REQ, _enum(_KINDS)),
        "stored_dtype": (REQ, _enum(tuple(DTYPE_SIZE))),
        "quant": (OPT, _enum(_QUANTS, " (a newer cersa_torch may know it)")),
        "rank": (OPT, _U), "energy": (OPT, _f64), "rel_error": (OPT, _f64),
        "reason": (OPT, _enum(_REASONS))}))),
})
_FILE = _struct({"file": (REQ, _str), "bytes": (REQ, _U), "sha256": (REQ, _str)})
# `cersa_loader::Manifest` (loader/src/manifest.rs): what serde requires of a manifest.
_MANIFEST = _struct({
    "format": (REQ, _str),
    "format_version": (REQ, _int(32)),
    "format_minor": (DEF, _int(32)),
    "producer": (REQ, _struct({"name": (REQ, _str), "version": (REQ, _str)})),
    "config": (REQ, _struct({
        "energy": (REQ, _f64), "min_rank": (REQ, _U), "max_rank": (OPT, _U),
        "rank_multiple": (REQ, _U), "dtype": (REQ, _str), "algorithm": (REQ, _str),
        "force_factor": (REQ, _bool), "include": (REQ, _list(_str)),
        "exclude": (REQ, _list(_str)), "max_shard_size": (REQ, _U),
        "rules": (DEF, _list(_str)),
        "calibration": (OPT, _struct({
            "sha256": (REQ, _str), "damping": (REQ, _f64), "weights": (REQ, _U),
            "model": (DEF, _any), "text": (DEF, _any)})),
    })),
    "source": (REQ, _struct({
        "format": (REQ, _str),
        "files": (REQ, _list(_struct({"file": (REQ, _str), "bytes": (REQ, _U)}))),
        "details": (DEF, _map(_any)),
    })),
    "shards": (REQ, _list(_FILE)),
    "side_files": (DEF, _list(_FILE)),
    "tensors": (REQ, _map(_TENSOR)),
    "totals": (REQ, _struct({k: (REQ, _U) for k in (
        "source_params", "source_bytes", "stored_params", "stored_bytes",
        "factored_tensors", "dense_tensors")})),
})


def _regular_size(path: str) -> int:
    """Size of ``path`` (symlinks followed); OSError unless it is a regular file (a FIFO
    would block a read forever)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OSError(f"{what} where a regular file is expected")
    return st.st_size


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def read_manifest(directory: str) -> dict:
    """``cersa.json`` of ``directory``: readable, at most 256 MiB, JSON, of the manifest's
    shape (every field the Rust loader requires, with its type), ``format``,
    ``format_version`` and ``format_minor`` — in that order, as the Rust loader checks."""
    directory = os.fspath(directory)
    mpath = os.path.join(directory, MANIFEST_FILE)

    def bad(kind, detail, **kw):
        return issue(directory, kind, MANIFEST_FILE, detail, **kw)

    try:
        size = _regular_size(mpath)
    except OSError as e:
        raise bad("manifest-unreadable", f"cannot read the manifest ({_why(e)}) — is "
                  f"{directory} a CERSA directory?") from None
    if size > MAX_MANIFEST_SIZE:
        raise bad("manifest-too-large", "invalid CERSA manifest: larger than the cap",
                  expected=f"≤ {MAX_MANIFEST_SIZE} bytes", found=f"{size} bytes")
    try:
        with open(mpath, "rb") as f:
            data = f.read(size + 1)  # not more: read(n) allocates n bytes first
    except OSError as e:
        raise bad("manifest-unreadable", f"cannot read the manifest ({_why(e)})") from None
    if len(data) > MAX_MANIFEST_SIZE:  # grown since
        raise bad("manifest-too-large", "invalid CERSA manifest: larger than the cap",
                  expected=f"≤ {MAX_MANIFEST_SIZE} bytes", found=f"{len(data)}+ bytes")
    dups: Dict[int, list] = {}
    try:
        manifest = _loads(data, dups)
    except ValueError as e:
        raise bad("manifest-not-json", f"invalid CERSA manifest: not JSON: {e}") from None
    try:
        _MANIFEST(manifest, "", dups)
    except _Bad as e:
        raise bad("manifest-invalid", f"invalid CERSA manifest: {e}") from None
    if manifest["format"] != "cersa":
        raise bad("wrong-format", f"format is {manifest['format']!r}, expected 'cersa': not a "
                  f"CERSA v1 manifest", expected="cersa", found=manifest["format"])
    if manifest["format_version"] != 1:
        raise bad("unsupported-version", f"format_version {manifest['format_version']} is not "
                  f"supported (this reader knows 1)", expected=1,
                  found=manifest["format_version"])
    minor = manifest.get("format_minor", 0)
    if minor > FORMAT_MINOR:
        raise bad("unsupported-version", f"format_minor {minor}: this checkpoint needs a newer "
                  f"cersa_torch (this one reads format revisions up to 1.{FORMAT_MINOR})",
                  expected=f"format_minor ≤ {FORMAT_MINOR}", found=minor)
    return manifest


def row_bytes(quant: str, length: int) -> int:
    """Bytes of one stored row of ``length`` quantized values (GGML blocks of 32)."""
    from ._quant import row_bytes as rb

    return rb(quant, length)


def factored_dims(directory: str, name: str, info: dict):
    """(m, n, r) of factored entry ``name``, or the first rule of a factored entry it breaks
    (raised; ``validate::factored_dims`` order: matrix_shape, rank present, matrix_shape
    the matrix view of shape, 1 ≤ r ≤ min(m, n), the factor dtype, the whitening)."""
    def rule(kind, detail, **kw):
        return issue(directory, kind, MANIFEST_FILE, detail, tensor=name, **kw)

    ms, r = info.get("matrix_shape"), info.get("rank")
    if ms is None:
        raise rule("factored-without-matrix-shape", "factored without matrix_shape")
    if r is None:
        raise rule("factored-without-rank", "factored without rank")
    m, n = ms
    shape = info["shape"]
    numel = math.prod(shape)
    numel = numel if numel < _U64 else None
    mn = m * n if m * n < _U64 else None
    if len(shape) < 2 or numel != mn or shape[0] != m:
        raise rule("matrix-shape-mismatch", f"matrix_shape [{m}, {n}] does not fit shape "
                   f"{list(shape)}")
    if r == 0 or r > min(m, n):
        raise rule("rank-out-of-range", f"rank {r} outside 1..=min({m}, {n})",
                   expected=f"1..={min(m, n)}", found=r)
    quant, dtype = info.get("quant"), info["stored_dtype"]
    if quant is not None:
        if dtype != "U8":
            raise rule("quant-stored-dtype", f"factors quantized as {quant} must be stored as "
                       f"U8 rows: stored_dtype expected U8, found {dtype}")
        if row_bytes(quant, max(m, n)) >= _U64:
            raise rule("quant-stored-dtype", f"{quant} rows of {max(m, n)} values overflow")
    elif dtype not in FACTOR_DTYPES:
        raise rule("factor-dtype-not-float", f"factor dtype {dtype} is not a float type",
                   expected="F16, BF16, F32 or F64", found=dtype)
    w = info.get("whitening")
    if w is not None:
        axis, err = w["input_axis"], w["output_rel_error"]
        if axis > 1 or not (math.isfinite(err) and err >= 0):
            raise rule("whitening-invalid", f"whitening: input_axis {axis} must be 0 or 1 and "
                       f"output_rel_error {err} finite and ≥ 0")
    return m, n, r


def quant_of(mpath: str, name: str, info: dict):
    """The ``quant`` of a factored entry (None when its factors are floats); checked with
    the manifest by :func:`read_manifest` and :func:`open_shards`."""
    return info.get("quant")


def expected_stored(directory: str, name: str, info: dict) -> List[Tuple[str, str, list]]:
    """The stored tensors (name, dtype, shape) entry ``name`` implies (spec §2; an experts
    entry: those of each expert in turn, as the entry ``NAME.cersa_expert.e``)."""
    def rule(kind, detail):
        return issue(directory, kind, MANIFEST_FILE, detail, tensor=name)

    check_experts_list(rule, name, info)
    if info["kind"] == "experts":
        count = experts_dims(rule, name, info)[0]
        return [t for e in range(count)
                for t in expected_stored(directory, expert_name(name, e), expert_info(info, e))]
    if info["kind"] == "dense":
        return [(name, info["stored_dtype"], list(info["shape"]))]
    m, n, r = factored_dims(directory, name, info)
    quant, dtype = info.get("quant"), info["stored_dtype"]
    if quant is None:
        u_shape, vt_shape = [m, r], [r, n]
    else:  # rows are singular vectors in GGML blocks (§2 "Quantized factors")
        u_shape, vt_shape = [r, row_bytes(quant, m)], [r, row_bytes(quant, n)]
    return [(name + SUFFIX_U, dtype, u_shape), (name + SUFFIX_S, "F32", [r]),
            (name + SUFFIX_VT, dtype, vt_shape)]


# ---------------------------------------------------------------- shard headers (safetensors)
def _layout(directory: str, file: str, detail: str, kind: str, tensor=None):
    return issue(directory, kind, file, f"invalid safetensors file: {detail}", tensor=tensor,
                 prefix=False)


def _u64(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


def _raw_entries(obj, dups) -> List[Tuple[str, dict]]:
    """The (name, entry) pairs of a parsed header in file order (``__metadata__`` left
    out), or the reason it is not a header (a string)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object of tensor entries, found {type(obj).__name__}"
    out = []
    for key, value in dups.get(id(obj), obj.items()):
        if key == "__metadata__":
            if not (isinstance(value, dict) and all(isinstance(x, str)
                                                    for x in value.values())):
                return "__metadata__: expected a map of strings"
            continue
        if not isinstance(value, dict):
            return f"tensor `{key}`: expected an entry object"
        pairs = dups.get(id(value))
        if pairs is not None:
            for field in ("dtype", "shape", "data_offsets"):
                if sum(1 for p, _ in pairs if p == field) > 1:
                    return f"tensor `{key}`: duplicate field `{field}`"
        for field in ("dtype", "shape", "data_offsets"):
            if field not in value:
                return f"tensor `{key}`: missing field `{field}`"
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        if not isinstance(dtype, str):
            return f"tensor `{key}`: dtype: expected a string"
        if not (isinstance(shape, list) and all(_u64(d) for d in shape)):
            return f"tensor `{key}`: shape: expected a list of u64"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_u64, offsets))):
            return f"tensor `{key}`: data_offsets: expected two u64"
        out.append((key, value))
    return out


def read_header(path: str, directory: Optional[str] = None, file: Optional[str] = None,
                f=None) -> Tuple[Dict[str, dict], int]:
    """The safetensors header of ``path`` — tensor name → ``{"dtype", "shape",
    "data_offsets"}`` in the order of the data (without ``__metadata__``) — and where the
    data starts, checked as ``cersa_loader::safetensors::parse`` does, in its order: the
    length (≥ 8 bytes, ≤ 100 000 000, inside the file), UTF-8 JSON of entries, names once,
    each entry's dtype, shape (no u64 overflow) and offsets (inside the data section,
    spanning numel × dtype size), then tensors contiguous from 0 without overlap and
    covering the data section. Reads only the header."""
    if directory is None:
        directory, file = os.path.split(path)
    if f is None:
        with open(path, "rb") as f:
            return read_header(path, directory, file, f)
    size = os.fstat(f.fileno()).st_size

    def bad(kind, detail, tensor=None):
        return _layout(directory, file, detail, kind, tensor)

    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise bad("shard-too-short", f"file is {size} bytes, too short for the 8-byte header "
                  f"length — was it truncated?")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_SIZE:
        raise bad("header-over-cap", f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte cap")
    if 8 + n > size:
        raise bad("header-past-end", f"header length {n} + 8 is past the end of a {size}-byte "
                  f"file — was it truncated?")
    data = f.read(n)
    if len(data) < n:
        raise bad("header-past-end", f"header length {n} + 8 is past the end of a "
                  f"{8 + len(data)}-byte file — was it truncated?")
    dups: Dict[int, list] = {}
    try:
        obj = _loads(data, dups)
    except UnicodeDecodeError as e:
        raise bad("header-malformed", f"header is not valid JSON: not UTF-8: {e}") from None
    except ValueError as e:
        raise bad("header-malformed", f"header is not valid JSON: {e}") from None
    entries = _raw_entries(obj, dups)
    if isinstance(entries, str):
        raise bad("header-malformed", f"header is not valid JSON: {entries}")
    if id(obj) in dups:
        name = _first_dup(dups[id(obj)])
        raise bad("duplicate-tensor-name", f"tensor `{name}` appears twice in the header", name)
    data_len = size - 8 - n
    for key, e in entries:
        dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPE_SIZE:
            raise bad("unknown-dtype", f"tensor `{key}`: unsupported dtype `{dtype}`", key)
        nbytes = math.prod(shape) * DTYPE_SIZE[dtype]
        if math.prod(shape) >= _U64 or nbytes >= _U64:
            raise bad("shape-overflow", f"tensor `{key}`: shape {shape} overflows", key)
        if begin > end or end > data_len:
            raise bad("offsets-out-of-bounds", f"tensor `{key}`: data_offsets [{begin}, {end}] "
                      f"are outside the {data_len}-byte data section — was the file truncated?",
                      key)
        if end - begin != nbytes:
            raise bad("data-size-mismatch", f"tensor `{key}`: data_offsets span {end - begin} "
                      f"bytes but dtype and shape need {nbytes}", key)
    entries.sort(key=lambda kv: tuple(kv[1]["data_offsets"]))  # stable, as Rust's sort_by_key
    expected = 0
    for key, e in entries:
        begin, end = e["data_offsets"]
        if begin != expected:
            kind = "overlapping-offsets" if begin < expected else "data-gap"
            raise bad(kind, f"tensor `{key}`: data starts at {begin}, expected {expected} "
                      f"(tensors must be contiguous, without gaps or overlap, and cover the "
                      f"data section)", key)
        expected = max(expected, end)
    if expected != data_len:
        raise bad("trailing-bytes", f"{data_len - expected} bytes after the last tensor are not "
                  f"covered by any tensor")
    return dict(entries), 8 + n


# ---------------------------------------------------------------- the directory
# count_nonfinite(chunk, dtype, quant, length) -> int: the NaN/±Inf values in ``chunk``, a
# memoryview of whole elements of ``dtype`` (or, with ``quant``, of whole quantized rows of
# ``length`` values each). The readers give one in numpy or torch; this module imports
# neither.
CountNonFinite = Callable[[memoryview, str, Optional[str], int], int]


class Shards:
    """What :func:`open_shards` checked: ``where`` (stored name → shard path), ``headers``
    (shard path → (header, data start)) and ``values_checked`` (every factor was read and
    found finite, along with the sha256 of every shard)."""

    def __init__(self, where, headers, values_checked):
        self.where, self.headers, self.values_checked = where, headers, values_checked

    def __iter__(self):  # (where, headers), as ``index`` returned them
        return iter((self.where, self.headers))


def _hash_and_scan(f, size: int, header, data_start: int, scan: Dict[str, tuple],
                   count_nonfinite: Optional[CountNonFinite], bad: Dict[str, int]) -> str:
    """sha256 of the whole open file, read once in chunks; the factors named in ``scan``
    (stored name → (dtype, quant, length)) are counted for non-finite values on the way
    (counts into ``bad``). Without a usable header the file is only hashed."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    # Segments (start, end, unit, what to count): tensor boundaries, so a chunk of a
    # scanned factor holds whole elements (or whole quantized rows).
    segments = [(0, size, 1, None)]
    if header is not None and count_nonfinite is not None:
        segments = [(0, data_start, 1, None)]
        for key, e in header.items():
            begin, end = e["data_offsets"]
            what = scan.get(key)
            unit = 1
            if what is not None:
                dtype, quant, length = what
                unit = DTYPE_SIZE[dtype] if quant is None else max(1, e["shape"][1])
            segments.append((data_start + begin, data_start + end, unit,
                             None if what is None else (key, what)))
    f.seek(0)
    for start, end, unit, what in segments:
        step = max(unit, HASH_CHUNK // unit * unit)
        if step > len(buf):
            buf = bytearray(step)
            view = memoryview(buf)
        pos = start
        while pos < end:
            want = min(step, end - pos)
            got = f.readinto(view[:want])
            if not got:
                return h.hexdigest()  # the file shrank: the digest will not match
            h.update(view[:got])
            if what is not None and got == want:
                key, (dtype, quant, length) = what
                n = count_nonfinite(view[:got], dtype, quant, length)
                if n:
                    bad[key] = bad.get(key, 0) + n
            pos += got
    while True:  # bytes past the size first seen (a file that grew)
        got = f.readinto(view)
        if not got:
            return h.hexdigest()
        h.update(view[:got])


def nonfinite_error(directory: str, shard: str, stored: str, bad: int, total: int):
    """The error for a factor holding NaN or ±Inf (``non-finite-factor``)."""
    return issue(directory, "non-finite-factor", shard,
                 f"{bad} non-finite value(s) of {total}", tensor=stored)


def open_shards(directory: str, manifest: dict, verify_checksums: bool = True,
                count_nonfinite: Optional[CountNonFinite] = None) -> Shards:
    """Checks every shard against the manifest as ``cersa_loader::Checkpoint::open`` does,
    in its order, raising the first issue: each listed shard (a plain name listed once,
    present, its size, its sha256 when ``verify_checksums``, its safetensors header), a
    stored name in two shards, then every manifest entry by name (its shard listed, the
    rules of a factored entry, its stored tensors present, in its shard, with the dtype and
    shape the entry implies, claimed by no other entry), then stored tensors no entry
    claims. With ``verify_checksums`` and ``count_nonfinite``, the factors' values are
    checked for NaN/±Inf in the same single read of each shard (Rust's ``validate``
    check; the issue comes after every structural one). Without ``verify_checksums`` no
    tensor data is read."""
    directory = os.fspath(directory)
    tensors = manifest["tensors"]
    # Factors to count while hashing: of entries whose rules hold, as stored in their shard.
    scan: Dict[str, Dict[str, tuple]] = {}
    # stored factor → (entry name, 0/1/2 for u/s/vt, shard, values): the order of the issues
    order: Dict[str, tuple] = {}
    if verify_checksums and count_nonfinite is not None:
        for name, e, base, info in factored_units(tensors):
            try:
                expected_stored(directory, name, tensors[name])  # the whole entry's rules
                stored = expected_stored(directory, base, info)
            except CersaFormatError:
                continue
            m, n = info["matrix_shape"]
            r = info["rank"]
            for i, ((key, dtype, shape), length) in enumerate(zip(stored, (m, 0, n))):
                quant = info.get("quant") if i != 1 else None
                if key not in order:
                    # total values as Rust counts them: quantized rows without padding
                    total = math.prod(shape) if quant is None else r * length
                    order[key] = (name, e, i, info["shard"], total)
                    scan.setdefault(info["shard"], {})[key] = (dtype, quant, length, shape)
    bad: Dict[str, int] = {}
    shard_of_file: Dict[str, int] = {}
    headers: Dict[str, Tuple[Dict[str, dict], int]] = {}
    index: Dict[str, int] = {}  # stored name → shard index
    files = [s["file"] for s in manifest["shards"]]
    for k, info in enumerate(manifest["shards"]):
        file = info["file"]
        first = file not in shard_of_file
        if first:
            shard_of_file[file] = k
        if file == "" or "/" in file or "\\" in file or file.startswith("."):
            raise issue(directory, "shard-name-not-plain", MANIFEST_FILE,
                        f"shard file name {file!r} must be a plain file name")
        if not first:
            raise issue(directory, "shard-listed-twice", MANIFEST_FILE,
                        f"shard {file!r} listed twice")
        path = os.path.join(directory, file)
        try:
            size = _regular_size(path)
        except OSError as e:
            raise issue(directory, "shard-missing", file,
                        f"cannot read the shard: {_why(e)}") from None
        if size != info["bytes"]:
            raise issue(directory, "shard-size", file, "size mismatch", expected=info["bytes"],
                        found=size)
        try:
            with open(path, "rb") as f:
                try:
                    header, data_start = read_header(path, directory, file, f)
                    header_error = None
                except CersaFormatError as e:
                    header, data_start, header_error = None, 0, e
                if verify_checksums:
                    want = {key: (dtype, quant, length)
                            for key, (dtype, quant, length, shape) in scan.get(file, {}).items()
                            if header is not None and key in header
                            and header[key]["dtype"] == dtype
                            and list(header[key]["shape"]) == shape}
                    found = _hash_and_scan(f, size, header, data_start, want, count_nonfinite,
                                           bad)
                    if found.lower() != info["sha256"].lower():
                        raise issue(directory, "sha256", file, "sha256 mismatch",
                                    expected=info["sha256"], found=found)
        except OSError as e:
            raise issue(directory, "shard-missing", file,
                        f"cannot read the shard: {_why(e)}") from None
        if header_error is not None:
            raise header_error
        headers[path] = (header, data_start)
        for key in header:
            if key in index:
                raise issue(directory, "stored-in-two-shards", file,
                            "stored in more than one shard", tensor=key,
                            expected=files[index[key]], found=file)
            index[key] = k
    claimed = set()
    for name in sorted(tensors):
        info = tensors[name]
        k = shard_of_file.get(info["shard"])
        if k is None:
            raise issue(directory, "shard-not-listed", MANIFEST_FILE,
                        f"shard {info['shard']!r} is not in the shard list", tensor=name)
        stored = expected_stored(directory, name, info)
        for key, dtype, shape in stored:
            sk = index.get(key)
            if sk is None:
                raise issue(directory, "tensor-missing", files[k],
                            "listed in the manifest but missing from its shard", tensor=key)
            if sk != k:
                raise issue(directory, "wrong-shard", files[sk],
                            f"manifest says shard {files[k]!r}", tensor=key,
                            expected=files[k], found=files[sk])
            entry = headers[os.path.join(directory, files[k])][0][key]
            if entry["dtype"] != dtype:
                raise issue(directory, "dtype-mismatch", files[k],
                            "stored dtype differs from the manifest", tensor=key,
                            expected=dtype, found=entry["dtype"])
            if list(entry["shape"]) != shape:
                raise issue(directory, "shape-mismatch", files[k],
                            "stored shape differs from the manifest", tensor=key,
                            expected=shape, found=list(entry["shape"]))
        for key, _, _ in stored:
            if key in claimed:
                raise issue(directory, "claimed-twice", MANIFEST_FILE,
                            "stored tensor claimed by two manifest entries", tensor=key)
            claimed.add(key)
    for k, file in enumerate(files):
        header = headers[os.path.join(directory, file)][0]
        stray = sorted(key for key in header if key not in claimed)
        if stray:
            raise issue(directory, "stray-tensor", file,
                        "stored in a shard but not listed in the manifest", tensor=stray[0])
    if bad:  # the first in Rust's order: entries by name, experts in order, then u, s, vt
        key = min(bad, key=lambda key: order[key][:3])
        _, _, _, shard, total = order[key]
        raise nonfinite_error(directory, shard, key, bad[key], total)
    where = {key: os.path.join(directory, files[k]) for key, k in index.items()}
    return Shards(where, headers, verify_checksums and count_nonfinite is not None)


def index(directory: str, manifest: dict, verify_checksums: bool = False):
    """(stored tensor name → shard path, shard path → (header, data start)) after
    :func:`open_shards`' checks (kept for callers of the earlier API)."""
    return tuple(open_shards(directory, manifest, verify_checksums))


class ManifestEntries(ExpertEntries):
    """Lookups over ``self.manifest`` shared by the numpy and torch checkpoints."""

    dir: str
    manifest: dict

    def names(self):
        """Source tensor names, sorted."""
        return sorted(self.manifest["tensors"])

    def info(self, name: str) -> dict:
        """The manifest entry of source tensor ``name``, or of expert ``NAME.cersa_expert.e``
        of an experts entry (as an entry of its own)."""
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            pass
        x = self._expert_entry(name)
        if x is None:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        return x

    def is_factored(self, name: str) -> bool:
        return self.info(name)["kind"] == "factored"
