"""FP8 safetensors (F8_E4M3, F8_E5M2) decode to f32 and are factored; ranks match a numpy
float64 SVD of the bytes decoded in numpy. A tensor with a `*_scale_inv` companion
(block-scaled FP8) passes through dense with its bytes unchanged."""
import json
import struct

import numpy as np
from safetensors.numpy import load_file


def decode_e4m3(b):
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    val = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))
    return np.where((exp == 15) & (man == 7), np.nan, sign * val)


def decode_e5m2(b):
    return (b.astype(np.uint16) << 8).view(np.float16).astype(np.float64)


def write_safetensors(path, tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def rank(w, tau):
    s = np.linalg.svd(w, compute_uv=False)
    e = np.cumsum(s ** 2) / np.sum(w * w)
    return int(np.nonzero(e >= tau)[0][0]) + 1


def test_fp8_decoded_and_factored(run_cersa, tmp_path):
    rng = np.random.default_rng(5)
    # Low-rank-ish matrices so factoring saves; bytes chosen finite (no NaN codes).
    base = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96)) + 0.05 * rng.standard_normal((64, 96))
    e4 = np.clip(np.round(np.abs(base) * 8), 0, 0x7E).astype(np.uint8) | np.where(base < 0, 0x80, 0).astype(np.uint8)
    e5 = rng.integers(0, 0x7B, (64, 96), dtype=np.uint8) | (rng.integers(0, 2, (64, 96), dtype=np.uint8) << 7)
    e5[:, :] = np.where(np.abs(base) > 1, e5 & 0x80 | 0x3C, e5)  # structure + random low values
    scaled = rng.integers(0, 0x7E, (64, 96), dtype=np.uint8)
    src = tmp_path / "fp8.safetensors"
    write_safetensors(src, {
        "a.weight": ("F8_E4M3", [64, 96], e4.tobytes()),
        "b.weight": ("F8_E5M2", [64, 96], e5.tobytes()),
        "c.weight": ("F8_E4M3", [64, 96], scaled.tobytes()),
        "c.weight_scale_inv": ("F32", [1, 1], np.float32(0.5).tobytes()),
    })
    out = tmp_path / "out"
    run_cersa("convert", src, out, "--energy", "0.9", "--quiet")
    m = json.load(open(out / "cersa.json"))
    for name, w in (("a.weight", decode_e4m3(e4)), ("b.weight", decode_e5m2(e5))):
        info = m["tensors"][name]
        assert info["kind"] == "factored", (name, info)
        assert info["source_dtype"].startswith("F8_") and info["stored_dtype"] == "BF16"
        exact = rank(w, 0.9)
        assert abs(info["rank"] - exact) <= 1, (name, info["rank"], exact)
        if info["rank"] != exact:
            s = np.linalg.svd(w, compute_uv=False)
            e = np.cumsum(s ** 2) / np.sum(w * w)
            assert abs(e[min(info["rank"], exact) - 1] - 0.9) < 1e-5
    c = m["tensors"]["c.weight"]
    assert c["kind"] == "dense" and c["stored_dtype"] == "F8_E4M3"
    data = open(out / m["shards"][0]["file"], "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    lo, hi = hdr["c.weight"]["data_offsets"]
    assert data[8 + n + lo:8 + n + hi] == scaled.tobytes()
