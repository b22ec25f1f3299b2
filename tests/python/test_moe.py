"""Stacked mixture-of-experts tensors (formats/cersa-v1.md §2 "Stacked experts", revision
1.3) from a GGUF file written by gguf-py, checked against independent references.

The GGUF holds three stacked `[E, m, n]` expert tensors (F32, F16 and Q8_0) whose experts
have planted ranks 1–3 and, in one expert of each, a flat spectrum (no saving: dense),
next to an ordinary matrix and a norm. After `cersa convert`:
- each expert's kind, rank and energy are those of numpy's f64 SVD of the expert as
  `gguf.GGUFReader` + `gguf.quants.dequantize` read it (rank rule §4 rule 5, saving test
  rule 6), and its `rel_error` is that of the stored factors (dequantized by gguf-py);
- dense experts hold the source's bytes (F32, F16) or its values rounded to BF16 (Q8_0);
- the readers' one-expert reads equal `cersa export --to safetensors --dtype f32` (Rust's
  recomposition), and the torch reader reads no other expert's tensors for one.
"""
import json
import os
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402

TAU = 0.9
E, M, N = 4, 24, 64
SOURCES = {  # name → GGUF type of a stacked experts tensor
    "blk.0.ffn_up_exps.weight": T.F32,
    "blk.0.ffn_gate_exps.weight": T.Q8_0,
    "blk.0.ffn_down_exps.weight": T.F16,
}
FLAT = 3  # the expert with a flat spectrum: rank ⌈0.9·24⌉ = 22, no saving: dense


def planted(rng, rank, m, n):
    """A matrix of `rank` equal singular values plus 1 % noise: E(rank) ≈ 0.99 and
    E(rank − 1) ≤ 0.66, far from τ on both sides; rank 0 is a flat spectrum (all equal)."""
    k = min(m, n) if rank == 0 else rank
    q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
    w = q1 @ q2.T
    if rank:
        w += 0.1 * np.sqrt(k / (m * n)) * rng.standard_normal((m, n))
    return w


def write_moe_gguf(path):
    """The GGUF file and, per tensor, its source values as gguf-py dequantizes them."""
    rng = np.random.default_rng(2026)
    w = gguf.GGUFWriter(str(path), "llama")
    for name, qtype in SOURCES.items():
        m, n = (N, M) if "down" in name else (M, N)
        x = np.stack([planted(rng, 0 if e == FLAT else 1 + e % 3, m, n) for e in range(E)])
        x = x.astype(np.float32)
        if qtype == T.Q8_0:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x.astype(np.float16) if qtype == T.F16 else x)
    w.add_tensor("blk.0.attn_q.weight", planted(rng, 2, M, M).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(M).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf(path):
    """name → (GGUF type, raw data as stored, values f64 in the logical shape)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        shape = [int(d) for d in reversed(t.shape)]
        out[t.name] = (t.tensor_type, np.asarray(t.data), values.reshape(shape))
    return out


def rank_rule(w):
    """(kind, rank, energy) by §4 rules 5–6 from numpy's f64 SVD of `w` [m, n]."""
    m, n = w.shape
    s = np.linalg.svd(w, compute_uv=False)
    energy = np.cumsum(s ** 2) / (w ** 2).sum()
    r = int(np.argmax(energy >= TAU)) + 1 if energy[-1] >= TAU else min(m, n)
    kind = "dense" if r * (m + n + 1) >= m * n else "factored"
    return kind, r, float(energy[r - 1])


def stored_tensors(ckpt):
    """(manifest, stored name → (dtype, raw bytes, values in their shape)), read
    with struct/json/numpy (safetensors.numpy has no bfloat16)."""
    manifest = json.load(open(os.path.join(ckpt, "cersa.json")))
    out = {}
    for shard in manifest["shards"]:
        raw = open(os.path.join(ckpt, shard["file"]), "rb").read()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for key, e in header.items():
            b = raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]
            if e["dtype"] == "BF16":
                v = (np.frombuffer(b, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                v = np.frombuffer(b, {"F32": "<f4", "F16": "<f2", "U8": "u1"}[e["dtype"]])
            out[key] = (e["dtype"], b, v.reshape(e["shape"]))
    return manifest, out


def bf16(values):
    u = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def stored_values(stored, key, record, m, n):
    """U·diag σ·Vᵀ [m, n] in f64 from the stored factors of expert `key` (quantized rows
    dequantized by gguf-py: they are GGML blocks, §2)."""
    u, s, vt = (stored[key + sfx][2] for sfx in (".cersa_u", ".cersa_s", ".cersa_vt"))
    if record.get("quant"):
        q = T[record["quant"]]
        u = gguf.quants.dequantize(u, q)[:, :m].T
        vt = gguf.quants.dequantize(vt, q)[:, :n]
    u, s, vt = (np.asarray(a, dtype=np.float64) for a in (u, s, vt))
    return (u * s) @ vt


@pytest.fixture(scope="module")
def moe(tmp_path_factory, cersa_bin):
    import subprocess

    d = tmp_path_factory.mktemp("moe")
    write_moe_gguf(d / "moe.gguf")
    out = {}
    for dtype in ("source", "q8_0"):
        ckpt, export = d / f"cersa-{dtype}", d / f"export-{dtype}"
        for args in (["convert", d / "moe.gguf", ckpt, "--energy", str(TAU), "--dtype", dtype],
                     ["export", ckpt, export, "--to", "safetensors", "--dtype", "f32"]):
            p = subprocess.run([cersa_bin, *map(str, args), "--quiet"], capture_output=True,
                               text=True)
            assert p.returncode == 0, (args, p.stderr)
        exported = {}
        for f in sorted(os.listdir(export)):
            if f.endswith(".safetensors"):
                exported.update(load_file(str(export / f)))
        out[dtype] = (str(ckpt), exported)
    return read_gguf(d / "moe.gguf"), out


@pytest.mark.parametrize("dtype", ["source", "q8_0"])
def test_experts_ranks_energies_and_errors_match_f64_svd(moe, dtype):
    source, out = moe
    ckpt, _ = out[dtype]
    manifest, stored = stored_tensors(ckpt)
    assert manifest["format_minor"] == 3
    assert manifest["tensors"]["blk.0.attn_q.weight"]["kind"] == "factored"
    kinds = set()
    for name, qtype in SOURCES.items():
        info = manifest["tensors"][name]
        _, _, x = source[name]
        m, n = x.shape[1:]
        assert info["kind"] == "experts", (name, info["kind"])
        assert info["shape"] == [E, m, n] and info["matrix_shape"] == [m, n]
        assert info["source_dtype"] == qtype.name
        assert len(info["experts"]) == E
        residual, num = 0.0, 0.0
        for e, record in enumerate(info["experts"]):
            w = x[e]
            kind, r, energy = rank_rule(w)
            assert record["kind"] == kind, (name, e, record)
            key = f"{name}.cersa_expert.{e}"
            if kind == "dense":
                assert record["reason"] == "no-saving" and e == FLAT
                assert record["stored_dtype"] == info["stored_dtype"]
                stored_dtype, b, got = stored[key]
                assert list(got.shape) == [m, n] and stored_dtype == record["stored_dtype"]
                if qtype == T.Q8_0:  # quantized source: the dense copy is BF16
                    assert stored_dtype == "BF16"
                    np.testing.assert_array_equal(np.frombuffer(b, "<u2"),
                                                  bf16(w).reshape(-1))
                else:  # the source's bytes of expert e
                    assert stored_dtype == qtype.name
                    assert b == source[name][1][e].tobytes(), (name, e)
                num += (w ** 2).sum()
                continue
            kinds.add(record.get("quant") or record["stored_dtype"])
            assert record["rank"] == r, (name, e, record["rank"], r)
            assert abs(record["energy"] - energy) < 1e-5, (name, e, record["energy"], energy)
            got = stored_values(stored, key, record, m, n)
            rel = np.linalg.norm(w - got) / np.linalg.norm(w)
            assert abs(record["rel_error"] - rel) <= 1e-4 * rel + 1e-7, (name, e, record, rel)
            # The truncation alone costs √(1 − energy); rounding adds at most a little.
            assert rel >= np.sqrt(1 - energy) * (1 - 1e-3)
            residual += ((w - got) ** 2).sum()
            num += energy * (w ** 2).sum()
        # The writer (and verify --source) counts a dense expert as exact — it is the slice
        # of the tensor's dense copy — even where that copy is rounded (BF16 of a Q8_0 source).
        total = np.sqrt(residual / (x ** 2).sum())
        assert abs(info["rel_error"] - total) <= 1e-4 * total + 1e-7, (name, info, total)
        assert abs(info["energy"] - num / (x ** 2).sum()) < 1e-5
    # Factors in each source's float dtype (BF16 for Q8_0), or in Q8_0 blocks.
    assert kinds == ({"F32", "F16", "BF16"} if dtype == "source" else {"Q8_0"}), kinds


@pytest.mark.parametrize("dtype", ["source", "q8_0"])
@pytest.mark.parametrize("which", ["numpy", "torch"])
def test_one_expert_reads_equal_rust_export(moe, dtype, which):
    """`reconstruct_expert` of both readers equals Rust's recomposition (export, f64
    products rounded to f32) expert by expert; `experts` gives the stacked tensor."""
    _, out = moe
    ckpt_dir, exported = out[dtype]
    ckpt = (cersa_torch.load_cersa if which == "numpy" else cersa_torch.open_checkpoint)(
        ckpt_dir)
    for name in SOURCES:
        want = exported[name]
        assert ckpt.is_experts(name) and ckpt.expert_count(name) == E
        for e in range(E):
            got = np.asarray(ckpt.reconstruct_expert(name, e), dtype=np.float32)
            assert got.shape == (want.shape[1], want.shape[2])
            np.testing.assert_allclose(got, want[e], rtol=0, atol=2e-6 * np.abs(want[e]).max())
        stacked = np.asarray(ckpt.experts(name), dtype=np.float32)
        assert stacked.shape == want.shape
        np.testing.assert_allclose(stacked, want, rtol=0, atol=2e-6 * np.abs(want).max())
    with pytest.raises(ValueError, match="out of range"):
        ckpt.reconstruct_expert(name, E)
    with pytest.raises(ValueError, match="stacked experts"):
        ckpt.dense(name)


def test_torch_reader_reads_only_the_experts_tensors(moe):
    """Reading expert e opens only `NAME.cersa_expert.e[.cersa_u|_s|_vt]`."""
    _, out = moe
    ckpt = cersa_torch.open_checkpoint(out["source"][0], verify_checksums=False)
    name = "blk.0.ffn_gate_exps.weight"
    for e in range(E):
        read = []
        raw = ckpt._raw
        ckpt._raw = lambda key: (read.append(key), raw(key))[1]
        try:
            ckpt.reconstruct_expert(name, e)
        finally:
            ckpt._raw = raw
        base = f"{name}.cersa_expert.{e}"
        want = [base] if e == FLAT else [base + s for s in (".cersa_u", ".cersa_vt", ".cersa_s")]
        assert sorted(read) == sorted(want), (e, read)


def test_readers_match_the_experts_vector():
    """formats/vectors/valid/experts (written by make_vectors.py with numpy only): the
    stacked tensor of both readers equals expected.json (torch in float64: to rounding)."""
    d = os.path.join(ROOT, "formats", "vectors", "valid", "experts")
    name = "blk.0.ffn_up_exps.weight"
    want = json.load(open(os.path.join(d, "expected.json")))["tensors"][name]
    values = np.array(want["values"])
    import torch

    got64 = cersa_torch.open_checkpoint(d).experts(name, torch.float64).numpy()
    assert list(got64.shape) == want["shape"]
    np.testing.assert_allclose(got64.reshape(-1), values, rtol=0, atol=1e-12)
    got32 = cersa_torch.load_cersa(d).experts(name)
    np.testing.assert_allclose(got32.reshape(-1), values, rtol=0, atol=1e-5)
