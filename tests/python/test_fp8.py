"""FP8 safetensors (F8_E4M3, F8_E5M2) decode to f32 and are factored; ranks match a numpy
float64 SVD of the bytes decoded in numpy. A tensor with a `*_scale_inv` companion
(block-scaled FP8, one scale per 128×128 block) is decoded with its scales applied."""
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
    cbase = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 300)) + 0.05 * rng.standard_normal((200, 300))
    scaled = np.clip(np.round(np.abs(cbase) * 8), 0, 0x7E).astype(np.uint8) | np.where(cbase < 0, 0x80, 0).astype(np.uint8)
    scales = np.array([[0.5, 2.0, 0.25], [4.0, 1.0, 0.125]], dtype=np.float32)
    src = tmp_path / "fp8.safetensors"
    write_safetensors(src, {
        "a.weight": ("F8_E4M3", [64, 96], e4.tobytes()),
        "b.weight": ("F8_E5M2", [64, 96], e5.tobytes()),
        "c.weight": ("F8_E4M3", [200, 300], scaled.tobytes()),
        "c.weight_scale_inv": ("F32", [2, 3], scales.tobytes()),
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
    cw = decode_e4m3(scaled) * np.repeat(np.repeat(scales.astype(np.float64), 128, 0), 128, 1)[:200, :300]
    c = m["tensors"]["c.weight"]
    assert c["kind"] == "factored" and c["source_dtype"] == "F8_E4M3", c
    assert abs(c["rank"] - rank(cw, 0.9)) <= 1, (c["rank"], rank(cw, 0.9))
    assert m["source"]["details"]["fp8_block_scaled"] == ["c.weight"]
    # rel_error is measured against the scaled matrix: Eckart–Young gives sqrt(1 - energy).
    assert abs(c["rel_error"] - (1 - c["energy"]) ** 0.5) < 1e-2, c
    # Wrong scale shape: a clear error naming both tensors, no output.
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, {
        "c.weight": ("F8_E4M3", [200, 300], scaled.tobytes()),
        "c.weight_scale_inv": ("F32", [1, 3], scales[:1].tobytes()),
    })
    p = run_cersa("convert", bad, tmp_path / "bad-out", "--quiet", check=False)
    assert p.returncode == 2 and "c.weight_scale_inv" in p.stderr and "128" in p.stderr, p.stderr
    assert not (tmp_path / "bad-out").exists()
