#!/usr/bin/env python3
"""Reference converter: what a user would write instead of cersa.

Per tensor: the same selection as cersa's default (formats/cersa-v1.md §4: float, ≥ 2 dims,
name ends in `weight`, not *embed*/*lm_head*/*wte*/*wpe*/*norm*), numpy.linalg.svd in f32
(f64 for f64 sources), the same rank rule (E(r) over ‖W‖_F² computed in f64 from the
entries, smallest r with E(r) ≥ τ), the same saving test, factors saved in the source dtype
with safetensors. Writes OUT_DIR/model.safetensors and OUT_DIR/ranks.json
({name: rank or null when stored dense}).

  reference_convert.py SRC.safetensors OUT_DIR [--energy 0.9]
"""
import fnmatch
import json
import os
import sys

import numpy as np

EXCLUDE = ["*embed*", "*lm_head*", "*wte*", "*wpe*", "*norm*"]


# numpy has no bfloat16: BF16 is read and written as its uint16 bit pattern (no torch
# import, whose start-up would be charged to the reference's wall time).
NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16,
      "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load(path):
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    header.pop("__metadata__", None)
    for name, h in header.items():
        a, b = h["data_offsets"]
        yield name, h["dtype"], np.frombuffer(data[a:b], dtype=NP[h["dtype"]]).reshape(h["shape"])


def save(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, a) in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def to_float(dtype, a):
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64 if dtype == "F64" else np.float32)


def from_float(dtype, a):
    if dtype == "BF16":  # round to nearest even
        b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return a.astype(NP[dtype])


def selected(name, dtype, a):
    return (
        dtype in ("F32", "F64", "F16", "BF16")
        and a.ndim >= 2
        and name.endswith("weight")
        and not any(fnmatch.fnmatchcase(name, g) for g in EXCLUDE)
    )


def rank_rule(sigma, norm2, tau):
    cum = np.cumsum(sigma.astype(np.float64) ** 2) / norm2
    hit = np.nonzero(cum >= tau)[0]
    r = int(hit[0]) + 1 if hit.size else len(sigma)
    return max(1, min(r, len(sigma)))


def main():
    src, out_dir = sys.argv[1], sys.argv[2]
    tau = float(sys.argv[sys.argv.index("--energy") + 1]) if "--energy" in sys.argv else 0.9
    out, ranks = {}, {}
    for name, dtype, t in load(src):
        if not selected(name, dtype, t):
            out[name] = (dtype, t)
            continue
        m = t.shape[0]
        a = to_float(dtype, t.reshape(m, -1))
        norm2 = float(np.sum(a.astype(np.float64) ** 2))
        if norm2 == 0.0:
            out[name] = (dtype, t)
            ranks[name] = None
            continue
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        n = a.shape[1]
        r = rank_rule(s, norm2, tau)
        if r * (m + n + 1) >= m * n:
            out[name] = (dtype, t)
            ranks[name] = None
            continue
        ranks[name] = r
        out[name + ".u"] = (dtype, from_float(dtype, u[:, :r]))
        out[name + ".s"] = ("F32", s[:r].astype(np.float32))
        out[name + ".vt"] = (dtype, from_float(dtype, vt[:r]))
    os.makedirs(out_dir, exist_ok=True)
    save(os.path.join(out_dir, "model.safetensors"), out)
    with open(os.path.join(out_dir, "ranks.json"), "w") as fh:
        json.dump(ranks, fh, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
