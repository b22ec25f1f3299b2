"""The CERSA v1 manifest and shard headers, checked without numpy or torch.

Every size read from a file is treated as hostile: header lengths are capped, byte ranges
must match dtype × shape and lie inside the file, and every stored tensor must be the one
the manifest implies (formats/cersa-v1.md). Errors name the file and the tensor.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

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
# 2 whitened factors (one side not orthonormal; read and recomposed exactly as before).
FORMAT_MINOR = 2


class CersaFormatError(ValueError):
    """The directory is not a valid CERSA v1 checkpoint (message names file and tensor)."""


def read_manifest(directory: str) -> dict:
    """``cersa.json`` of ``directory``, checked for format, version and basic structure."""
    mpath = os.path.join(directory, MANIFEST_FILE)
    try:
        size = os.path.getsize(mpath)
    except OSError as e:
        raise CersaFormatError(f"{mpath}: cannot read the manifest ({e.strerror}) — is "
                               f"{directory} a CERSA directory?") from None
    if size > MAX_MANIFEST_SIZE:
        raise CersaFormatError(f"{mpath}: manifest exceeds {MAX_MANIFEST_SIZE} bytes")
    try:
        with open(mpath, "rb") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CersaFormatError(f"{mpath}: not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "cersa" \
            or manifest.get("format_version") != 1:
        raise CersaFormatError(f"{mpath}: not a CERSA v1 manifest")
    if not isinstance(manifest.get("shards"), list) or \
            not isinstance(manifest.get("tensors"), dict):
        raise CersaFormatError(f"{mpath}: manifest lacks its shards or tensors")
    minor = manifest.get("format_minor", 0)
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        raise CersaFormatError(f"{mpath}: format_minor: expected an integer >= 0, "
                               f"found {minor!r}")
    if minor > FORMAT_MINOR:
        raise CersaFormatError(f"{mpath}: format_minor {minor}: this checkpoint needs a newer "
                               f"cersa_torch (this one reads format revisions up to "
                               f"1.{FORMAT_MINOR})")
    return manifest


def quant_of(mpath: str, name: str, info: dict):
    """The ``quant`` of a factored entry (None when its factors are floats), checked: a known
    GGML type with ``stored_dtype`` U8."""
    from ._quant import BLOCK_BYTES

    quant = info.get("quant")
    if quant is None:
        return None
    if quant not in BLOCK_BYTES:
        raise CersaFormatError(f"{mpath}: {name}: quant: expected one of {sorted(BLOCK_BYTES)}, "
                               f"found {quant!r} (a newer cersa_torch may know it)")
    if info.get("stored_dtype") != "U8":
        raise CersaFormatError(f"{mpath}: {name}: quant {quant}: stored_dtype expected U8, "
                               f"found {info.get('stored_dtype')!r}")
    return quant


def read_header(path: str) -> Tuple[dict, int]:
    """The safetensors header of ``path`` (without ``__metadata__``) and where data starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CersaFormatError(f"{path}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_SIZE:
            raise CersaFormatError(f"{path}: header length {n} exceeds {MAX_HEADER_SIZE}")
        if 8 + n > size:
            raise CersaFormatError(f"{path}: header of {n} bytes runs past the end of the "
                                   f"{size}-byte file — was it truncated?")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CersaFormatError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise CersaFormatError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CersaFormatError(f"{path}: {key}: malformed header entry") from None
        if dtype not in DTYPE_SIZE:
            raise CersaFormatError(f"{path}: {key}: unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            if not isinstance(d, int) or d < 0:
                raise CersaFormatError(f"{path}: {key}: bad shape {shape}")
            numel *= d
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise CersaFormatError(f"{path}: {key}: byte range {begin}..{end} outside the "
                                   f"{data_len} data bytes — was the file truncated?")
        if end - begin != numel * DTYPE_SIZE[dtype]:
            raise CersaFormatError(f"{path}: {key}: {end - begin} bytes for {dtype} {shape}")
    return header, 8 + n


def index(directory: str, manifest: dict) -> Tuple[Dict[str, str], Dict[str, Tuple[dict, int]]]:
    """Checks every shard against the manifest; returns stored tensor name → shard path, and
    shard path → (its header, where its data starts)."""
    mpath = os.path.join(directory, MANIFEST_FILE)
    where: Dict[str, str] = {}
    headers: Dict[str, Tuple[dict, int]] = {}
    for shard in manifest["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise CersaFormatError(f"{mpath}: shard name {name!r} is not a plain file name")
        path = os.path.join(directory, name)
        if path in headers:
            raise CersaFormatError(f"{mpath}: shard {name} is listed twice")
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CersaFormatError(f"{path}: shard listed in the manifest is missing") from None
        if size != shard.get("bytes"):
            raise CersaFormatError(f"{path}: size {size} != {shard.get('bytes')} in the manifest")
        header, data_start = read_header(path)
        headers[path] = (header, data_start)
        for key in header:
            if key in where:
                raise CersaFormatError(f"{path}: {key} stored in more than one shard")
            where[key] = path
    claimed = set()

    def check(key: str, shape, dtypes=None):
        if key not in where:
            raise CersaFormatError(f"{mpath}: {key} is listed in the manifest but missing")
        entry = headers[where[key]][0][key]
        if list(entry["shape"]) != list(shape):
            raise CersaFormatError(
                f"{where[key]}: {key} has shape {list(entry['shape'])}, expected {list(shape)}")
        if dtypes is not None and entry["dtype"] not in dtypes:
            raise CersaFormatError(f"{where[key]}: {key} has dtype {entry['dtype']}, "
                                   f"expected one of {list(dtypes)}")
        claimed.add(key)

    for name, info in manifest["tensors"].items():
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind == "factored":
            m, n = info["matrix_shape"]
            r = info.get("rank")
            if not isinstance(r, int) or not 1 <= r <= min(m, n):
                raise CersaFormatError(f"{mpath}: {name}: rank {r} outside 1..=min({m}, {n})")
            quant = quant_of(mpath, name, info)
            if quant is None:
                u_shape, vt_shape, dtypes = [m, r], [r, n], FACTOR_DTYPES
            else:  # rows are singular vectors in GGML blocks (§2 "Quantized factors")
                from ._quant import row_bytes

                u_shape, vt_shape = [r, row_bytes(quant, m)], [r, row_bytes(quant, n)]
                dtypes = ("U8",)
            check(name + SUFFIX_U, u_shape, dtypes)
            check(name + SUFFIX_S, [r], ("F32",))
            check(name + SUFFIX_VT, vt_shape, dtypes)
        elif kind == "dense":
            check(name, info["shape"])
        else:
            raise CersaFormatError(f"{mpath}: {name}: unknown kind {kind!r}")
    stray = sorted(set(where) - claimed)
    if stray:
        raise CersaFormatError(f"{where[stray[0]]}: {stray[0]} is stored but not in the manifest")
    return where, headers


class ManifestEntries:
    """Lookups over ``self.manifest`` shared by the numpy and torch checkpoints."""

    dir: str
    manifest: dict

    def names(self):
        """Source tensor names, sorted."""
        return sorted(self.manifest["tensors"])

    def info(self, name: str) -> dict:
        """The manifest entry of source tensor ``name``."""
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise KeyError(f"{self.dir}: no tensor {name!r}") from None

    def is_factored(self, name: str) -> bool:
        return self.info(name)["kind"] == "factored"
