"""Differential test of cersa's GGUF dequantization against gguf-py.

For every supported GGML type, the same block bytes (random bytes with valid scales,
edge-case blocks, and real blocks quantized by gguf-py from MiniLM weights) are written
into a GGUF file with gguf.GGUFWriter; `cersa convert --exclude '*' --dtype f32` stores
each tensor dense, dequantized to f32, and the result must equal
`gguf.quants.dequantize` bit for bit. gguf-py has no Q8_K dequantizer, so Q8_K is
checked against a numpy decode of ggml's block_q8_K (y = d * q)."""
import json
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import load_file

# Byte offsets of the f16 scales inside one block of each type (see ggml-common.h).
F16_SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0], T.TQ1_0: [52], T.TQ2_0: [64],
    T.MXFP4: [],  # an e8m0 byte: every value is a finite scale
    T.NVFP4: [],  # four e4m3 bytes: every value is a finite scale
    T.IQ2_XXS: [0], T.IQ2_XS: [0], T.IQ2_S: [0], T.IQ3_XXS: [0], T.IQ3_S: [0], T.IQ1_S: [0],
    T.IQ1_M: [],  # its f16 scale is spread over the top nibbles of 4 u16s (fixed below)
}
QUANTIZED = list(F16_SCALES) + [T.Q8_K]
# Types gguf-py can quantize: real blocks from MiniLM weights.
REAL = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4, T.TQ1_0, T.TQ2_0]


def finite_f16_bits(rng, n):
    """Random f16 bit patterns over the whole range (subnormals, ±0, large) except inf/NaN."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(0xBFFF)  # clear the top exponent bit: finite
    return bits


def random_blocks(rng, qtype, n_blocks):
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if qtype == T.Q8_K:
        d = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-8, 4, n_blocks)).astype(np.float32)
        raw[:, 0:4] = d.view(np.uint8).reshape(n_blocks, 4)
        return raw
    for off in F16_SCALES[qtype]:
        raw[:, off:off + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return finite_iq1_m(raw, qtype)


def finite_iq1_m(raw, qtype):
    """IQ1_M's f16 d is the top nibbles of its last 4 u16s; bit 14 of d (the exponent's top
    bit) is bit 6 of the block's last byte: clearing it keeps d finite."""
    if qtype == T.IQ1_M:
        raw[..., 55] &= np.uint8(0xBF)
    return raw


def edge_blocks(qtype):
    """All-zero and all-ones quant bits with extreme scales (max, -max, tiny subnormal, -0)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    out = []
    for fill in (0x00, 0xFF, 0x5A):
        for scale in (0x7BFF, 0xFBFF, 0x0001, 0x8000):
            b = np.full(type_size, fill, dtype=np.uint8)
            if qtype == T.Q8_K:
                b[0:4] = np.array([np.float32(65504.0) if scale == 0x7BFF else -1e-30],
                                  dtype=np.float32).view(np.uint8)
            else:
                for off in F16_SCALES[qtype]:
                    b[off:off + 2] = np.array([scale], dtype=np.uint16).view(np.uint8)
            out.append(finite_iq1_m(b, qtype))
    return np.stack(out)


def reference(raw, qtype):
    if qtype == T.Q8_K:
        d = raw[:, 0:4].copy().view(np.float32)  # (n, 1)
        q = raw[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    return gguf.quants.dequantize(raw, qtype).reshape(-1)


def convert_dense_f32(run_cersa, tmp_path, tensors):
    """Writes `tensors` (name -> (raw uint8 rows, qtype)) to a GGUF file, converts it with
    everything dense in f32, and returns the stored arrays."""
    path = tmp_path / "blocks.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    for name, (raw, qtype) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    run_cersa("convert", path, out, "--exclude", "*", "--dtype", "f32", "--quiet")
    manifest = json.load(open(out / "cersa.json"))
    stored = {}
    for shard in manifest["shards"]:
        stored.update(load_file(str(out / shard["file"])))
    return manifest, stored


def assert_bit_equal(name, ours, ref):
    assert ours.dtype == np.float32 and ours.size == ref.size, (name, ours.shape, ref.shape)
    a, b = ours.reshape(-1).view(np.uint32), ref.astype(np.float32).view(np.uint32)
    diff = np.nonzero(a != b)[0]
    assert diff.size == 0, (
        f"{name}: {diff.size} of {a.size} values differ; first at {diff[0]}: "
        f"ours {ours.reshape(-1)[diff[0]]!r} vs gguf-py {ref[diff[0]]!r}")


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_random_and_edge_blocks_bit_equal(run_cersa, tmp_path, qtype):
    rng = np.random.default_rng(1234 + int(qtype))
    block, type_size = GGML_QUANT_SIZES[qtype]
    # 3 rows x 32 blocks of random bytes (for the grid types, ~3000 random codebook rows),
    # then the edge blocks as one row each.
    rand = random_blocks(rng, qtype, 96).reshape(3, 32 * type_size)
    edges = edge_blocks(qtype)
    manifest, stored = convert_dense_f32(run_cersa, tmp_path, {
        "rand.weight": (rand, qtype),
        "edge.weight": (edges, qtype),
    })
    info = manifest["tensors"]["rand.weight"]
    assert info["shape"] == [3, 32 * block] and info["source_dtype"] == qtype.name
    assert info["stored_dtype"] == "F32"
    assert manifest["source"]["details"]["tensor_types"]["rand.weight"] == qtype.name
    assert_bit_equal("rand", stored["rand.weight"], reference(rand.reshape(-1, type_size), qtype))
    assert_bit_equal("edge", stored["edge.weight"], reference(edges, qtype))


@pytest.mark.parametrize("qtype", REAL, ids=lambda t: t.name)
def test_real_blocks_bit_equal(run_cersa, tmp_path, fixture_path, qtype):
    w = load_file(fixture_path("minilm-excerpt/model.safetensors"))[
        "encoder.layer.0.attention.self.query.weight"]
    block, _ = GGML_QUANT_SIZES[qtype]
    if w.shape[1] % block:
        w = w.reshape(-1, block)  # 384-wide rows: 256-element blocks need whole rows
    raw = gguf.quants.quantize(w, qtype)
    _, stored = convert_dense_f32(run_cersa, tmp_path, {"blk.0.attn_q.weight": (raw, qtype)})
    ours = stored["blk.0.attn_q.weight"]
    assert ours.shape == w.shape
    assert_bit_equal(qtype.name, ours, gguf.quants.dequantize(raw, qtype).reshape(-1))


def test_default_dense_dtype_is_bf16(run_cersa, tmp_path):
    """Without --dtype, quantized tensors kept dense are dequantized to BF16 (round to
    nearest even of gguf-py's f32 values)."""
    rng = np.random.default_rng(7)
    raw = random_blocks(rng, T.Q4_K, 2).reshape(1, -1)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    w.add_tensor("x.weight", raw, raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    run_cersa("convert", path, tmp_path / "out", "--exclude", "*", "--quiet")
    manifest = json.load(open(tmp_path / "out" / "cersa.json"))
    assert manifest["tensors"]["x.weight"]["stored_dtype"] == "BF16"
    shard = manifest["shards"][0]["file"]
    # safetensors.numpy cannot load bf16: read the raw bytes of the single tensor.
    data = open(tmp_path / "out" / shard, "rb").read()
    n = int.from_bytes(data[:8], "little")
    bits = np.frombuffer(data[8 + n:], dtype=np.uint16).astype(np.uint32)
    ref = gguf.quants.dequantize(raw, T.Q4_K).reshape(-1).view(np.uint32)
    # Round to nearest even on the upper 16 bits (finite values only here).
    expect = ((ref + 0x7FFF + ((ref >> 16) & 1)) >> 16).astype(np.uint32)
    np.testing.assert_array_equal(bits, expect)


def test_float_types_pass_through(run_cersa, tmp_path):
    """F32/F16/F64 tensors stay in their own dtype, byte-identical; BF16 too."""
    rng = np.random.default_rng(3)
    f16 = finite_f16_bits(rng, 64).view(np.float16).reshape(2, 32)
    f32 = rng.standard_normal((2, 32)).astype(np.float32)
    f64 = rng.standard_normal((2, 32))
    path = tmp_path / "f.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    w.add_tensor("a", f16)
    w.add_tensor("b", f32)
    w.add_tensor("c", f64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    run_cersa("convert", path, tmp_path / "out", "--quiet")
    manifest = json.load(open(tmp_path / "out" / "cersa.json"))
    stored = load_file(str(tmp_path / "out" / manifest["shards"][0]["file"]))
    for name, ref, dt in (("a", f16, "F16"), ("b", f32, "F32"), ("c", f64, "F64")):
        assert manifest["tensors"][name]["stored_dtype"] == dt
        assert stored[name].tobytes() == ref.tobytes()
    assert os.path.getsize(path) > 0
