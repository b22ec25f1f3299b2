#!/usr/bin/env python3
"""Generates the CERSA v1 test vectors under formats/vectors/ (spec §7).

    python3 formats/vectors/make_vectors.py

Bytes are written here with `struct`/`json`/`numpy` only, independently of the Rust
writer, so the Rust reader is checked against a second implementation of the spec.

valid/<case>/    a checkpoint + expected.json: for every tensor its kind, shape and the
                 values `reconstruct` must give (f64, from the factors as stored: numpy
                 U·diag(s)·Vᵀ; dense: the stored values), flattened row-major.
                 quant-q8_0, quant-q5_0, quant-q4_0 hold quantized factors (spec §2
                 "Quantized factors", format_minor 1), written by the numpy quantizers
                 below; their expected values come from the dequantized rows.
                 experts holds a stacked experts entry (spec §2 "Stacked experts",
                 format_minor 3): one expert factored in F16, one dense, one factored in
                 Q8_0; its expected values are the whole reconstructed [E, d1, …] tensor.
invalid/<case>/  a broken checkpoint + expected_issues.json:
                 {"validate": [kinds], "open": {"kind", "file", "tensor"} or null}
                 `validate` lists the `IssueKind` names (kebab-case, as serialized) that
                 `cersa_loader::validate` must return, in order; `open` is the issue
                 `Checkpoint::open` (with sha256 verification) must stop at — the first of
                 `validate` — or null where open must succeed (issues only `validate` checks,
                 such as non-finite factors). Its message must name the file and the tensor.
"""
import copy
import hashlib
import json
import os
import shutil
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
META = {"format": "cersa", "cersa_version": "1"}
SHARD1 = "cersa-00001-of-00001.safetensors"
SHARD2 = "cersa-00002-of-00002.safetensors"
MANIFEST = "cersa.json"


# ---------------------------------------------------------------- encoding helpers
def bf16_bytes(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype("<u2").tobytes()


def bf16_values(x):
    b = np.frombuffer(bf16_bytes(x), dtype="<u2").astype(np.uint32) << 16
    return b.view(np.float32).astype(np.float64)


def encode(dtype, x):
    """(bytes, values as stored in f64)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "F32":
        v = x.astype("<f4")
        return v.tobytes(), v.astype(np.float64)
    if dtype == "F64":
        v = x.astype("<f8")
        return v.tobytes(), v.astype(np.float64)
    if dtype == "F16":
        v = x.astype("<f2")
        return v.tobytes(), v.astype(np.float64)
    if dtype == "BF16":
        return bf16_bytes(x.astype(np.float32)), bf16_values(x.astype(np.float32))
    raise ValueError(dtype)


# ---------------------------------------------------------------- GGML blocks (§2, 1.1)
# The writer rules of formats/cersa-v1.md §2 "Quantized factors", in numpy f32: every
# operation one f32 rounding, d stored as f16 (nearest-even), q from the unrounded 1/d.
QK = 32
QUANT_BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18}
F32 = np.float32


def _inverse(d):
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def round_half_away(a):
    """f32 round half away from zero: floor(|a|) + floor(2(|a| − floor(|a|))), signed."""
    m = np.abs(a)
    f = np.floor(m)
    return (np.sign(a) * (f + np.floor(F32(2) * (m - f)))).astype(F32)


def quantize_blocks(quant, x):
    """f32 blocks [nb, 32] → block bytes [nb, B] (uint8), as ggml's quantize_row_*_ref."""
    x = np.ascontiguousarray(x, dtype=F32)
    nb = x.shape[0]
    if quant == "Q8_0":
        d = (np.abs(x).max(axis=1, keepdims=True) / F32(127)).astype(F32)
        q = round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([d.astype("<f2").view(np.uint8), q], axis=1)
    if quant not in ("Q4_0", "Q5_0"):
        raise ValueError(quant)
    imax = np.abs(x).argmax(axis=1)[:, None]  # first of the largest magnitude
    xmax = np.take_along_axis(x, imax, axis=1)
    half = F32(8) if quant == "Q4_0" else F32(16)
    d = (xmax / -half).astype(F32)
    q = np.trunc(x * _inverse(d) + (half + F32(0.5))).astype(np.int64)
    q = np.minimum(q, 2 * int(half) - 1).astype(np.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    parts = [d.astype("<f2").view(np.uint8)]
    if quant == "Q5_0":
        hbits = ((q >> 4) & 1).astype(np.uint64) << np.arange(QK, dtype=np.uint64)
        parts.append(hbits.sum(axis=1).astype("<u4").view(np.uint8).reshape(nb, 4))
    parts.append(qs.astype(np.uint8))
    return np.concatenate(parts, axis=1)


def dequantize_blocks(quant, b):
    """Block bytes [nb, B] → f32 values [nb, 32] (the spec's table, d·q in f32)."""
    d = np.ascontiguousarray(b[:, :2]).view("<f2").astype(F32)
    if quant == "Q8_0":
        q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(F32)
    else:
        qs = b[:, -16:].astype(np.int64)
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        if quant == "Q4_0":
            q = (nib - 8).astype(F32)
        else:
            qh = np.ascontiguousarray(b[:, 2:6]).view("<u4").astype(np.int64)  # [nb, 1]
            q = ((nib | (((qh >> np.arange(QK)) & 1) << 4)) - 16).astype(F32)
    return (d * q).astype(F32)


def quantize_rows(quant, rows):
    """Vectors [r, L] → (U8 rows [r, ⌈L/32⌉·B], the stored values [r, L] in f64)."""
    rows = np.asarray(rows, dtype=np.float64).astype(F32)
    r, length = rows.shape
    nb = -(-length // QK)
    padded = np.zeros((r, nb * QK), dtype=F32)
    padded[:, :length] = rows
    raw = quantize_blocks(quant, padded.reshape(r * nb, QK)).reshape(r, nb * QUANT_BLOCK_BYTES[quant])
    vals = dequantize_blocks(quant, raw.reshape(r * nb, -1)).reshape(r, nb * QK)[:, :length]
    return np.ascontiguousarray(raw), vals.astype(np.float64)


def safetensors(tensors, metadata=META, pad=True):
    """tensors: list of (name, dtype, shape, raw) in data order → file bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    return raw_safetensors(json.dumps(header, separators=(",", ":")).encode(),
                           b"".join(t[3] for t in tensors), pad)


def raw_safetensors(header_json, data, pad=True):
    h = header_json + (b" " * (-len(header_json) % 8) if pad else b"")
    return struct.pack("<Q", len(h)) + h + data


# ---------------------------------------------------------------- checkpoint model
class Ckpt:
    """An in-memory checkpoint: shard name → list of stored tensors, plus the manifest."""

    def __init__(self):
        self.shards = {}  # name → list of (stored name, dtype, shape, raw)
        self.tensors = {}  # manifest entries
        self.expected = {}  # name → (kind, shape, values f64)
        self.config_dtype = "source"
        self.format_minor = None  # 1 once a quantized entry is added (§2, revision 1.1)

    @staticmethod
    def svd(w):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        # §4.7 sign rule: largest-magnitude entry of each u_i positive.
        for i in range(len(s)):
            j = int(np.argmax(np.abs(u[:, i])))
            if u[j, i] < 0:
                u[:, i] *= -1
                vt[i, :] *= -1
        return u, s, vt

    def add_quantized(self, name, shard, w, rank, quant):
        """A factored F32 source matrix with Q8_0/Q5_0/Q4_0 factors, rows = singular vectors."""
        w = np.asarray(w, dtype=np.float64)
        m, n = w.shape
        parts, rec, energy, rel = self.factor_parts(w, rank, None, quant)
        self.shards.setdefault(shard, []).extend((name + sfx, d, shp, raw)
                                                 for sfx, d, shp, raw in parts)
        self.tensors[name] = {
            "kind": "factored", "shape": [m, n], "source_dtype": "F32", "stored_dtype": "U8",
            "quant": quant, "shard": shard, "matrix_shape": [m, n], "rank": rank,
            "energy": energy, "rel_error": rel,
        }
        self.expected[name] = ("factored", [m, n], rec.reshape(-1))
        self.config_dtype = quant.lower()
        self.format_minor = 1

    def add_factored(self, name, shard, w, rank, dtype, shape=None):
        w = np.asarray(w, dtype=np.float64)
        m, n = w.shape
        parts, rec, energy, rel = self.factor_parts(w, rank, dtype)
        self.shards.setdefault(shard, []).extend((name + sfx, d, shp, raw)
                                                 for sfx, d, shp, raw in parts)
        shape = list(shape or [m, n])
        self.tensors[name] = {
            "kind": "factored", "shape": shape, "source_dtype": dtype, "stored_dtype": dtype,
            "shard": shard, "matrix_shape": [m, n], "rank": rank, "energy": energy,
            "rel_error": rel,
        }
        self.expected[name] = ("factored", shape, rec.reshape(-1))

    def factor_parts(self, w, rank, dtype, quant=None):
        """One matrix's stored factors (suffix, dtype, shape, raw), its reconstruction from
        them as stored (f64), its energy and rel_error; `quant` makes U8 rows (§2)."""
        m, n = w.shape
        u, s, vt = self.svd(w)
        sb, sv = encode("F32", s[:rank])
        if quant is None:
            ub, uv = encode(dtype, u[:, :rank])
            vb, vv = encode(dtype, vt[:rank, :])
            parts = [(".cersa_u", dtype, [m, rank], ub), (".cersa_vt", dtype, [rank, n], vb)]
            rec = uv.reshape(m, rank) @ np.diag(sv) @ vv.reshape(rank, n)
        else:
            ub, uv = quantize_rows(quant, u[:, :rank].T)
            vb, vv = quantize_rows(quant, vt[:rank, :])
            parts = [(".cersa_u", "U8", list(ub.shape), ub.tobytes()),
                     (".cersa_vt", "U8", list(vb.shape), vb.tobytes())]
            rec = uv.T @ np.diag(sv) @ vv
        parts.insert(1, (".cersa_s", "F32", [rank], sb))
        energy = float((s[:rank] ** 2).sum() / (w ** 2).sum())
        rel = float(np.linalg.norm(w - rec) / np.linalg.norm(w))
        return parts, rec, energy, rel

    def add_experts(self, name, shard, ws, how, dtype="F32"):
        """A stacked experts entry (§2 "Stacked experts", revision 1.3) of the source
        tensor `ws` [E, d1, d2, …]: expert e stored as `how[e]`, one of ("factored", dtype,
        rank), ("quant", quant, rank) or ("dense", reason); the dense copy is in `dtype`."""
        ws = np.asarray(ws, dtype=np.float64)
        shape = list(ws.shape)
        m, n = shape[1], int(np.prod(shape[2:]))
        lst = self.shards.setdefault(shard, [])
        records, recs, num = [], [], 0.0
        for e, h in enumerate(how):
            base = f"{name}.cersa_expert.{e}"
            w = ws[e].reshape(m, n)
            if h[0] == "dense":
                raw, vals = encode(dtype, w.reshape(-1))
                lst.append((base, dtype, shape[1:], raw))
                records.append({"kind": "dense", "stored_dtype": dtype, "reason": h[1]})
                recs.append(vals.reshape(m, n))
                num += (w ** 2).sum()
                continue
            quant = h[1] if h[0] == "quant" else None
            parts, rec, energy, rel = self.factor_parts(w, h[2], h[1], quant)
            lst.extend((base + suffix, d, shp, raw) for suffix, d, shp, raw in parts)
            record = {"kind": "factored", "stored_dtype": "U8" if quant else h[1]}
            if quant:
                record["quant"] = quant
            records.append({**record, "rank": h[2], "energy": energy, "rel_error": rel})
            recs.append(rec)
            num += energy * (w ** 2).sum()
        rec = np.stack(recs)
        self.tensors[name] = {
            "kind": "experts", "shape": shape, "source_dtype": dtype, "stored_dtype": dtype,
            "shard": shard, "matrix_shape": [m, n], "energy": float(num / (ws ** 2).sum()),
            "rel_error": float(np.linalg.norm(ws.reshape(-1) - rec.reshape(-1))
                               / np.linalg.norm(ws)),
            "experts": records,
        }
        self.expected[name] = ("experts", shape, rec.reshape(-1))
        self.format_minor = 3

    def add_dense(self, name, shard, x, dtype, reason="not-a-matrix", shape=None):
        x = np.asarray(x, dtype=np.float64)
        shape = list(shape if shape is not None else x.shape)
        raw, vals = encode(dtype, x.reshape(-1))
        self.shards.setdefault(shard, []).append((name, dtype, shape, raw))
        self.tensors[name] = {"kind": "dense", "shape": shape, "source_dtype": dtype,
                              "stored_dtype": dtype, "shard": shard, "reason": reason}
        self.expected[name] = ("dense", shape, vals)

    def shard_bytes(self):
        return {k: safetensors(v) for k, v in self.shards.items()}

    def manifest(self, shard_bytes):
        head = {"format": "cersa", "format_version": 1}
        if self.format_minor is not None:
            head["format_minor"] = self.format_minor
        return {
            **head,
            "producer": {"name": "make_vectors.py", "version": "1"},
            "config": {"energy": 0.9, "min_rank": 1, "max_rank": None, "rank_multiple": 1,
                       "dtype": self.config_dtype, "algorithm": "svd", "force_factor": False,
                       "include": [], "exclude": [], "max_shard_size": 5000000000},
            "source": {"format": "safetensors",
                       "files": [{"file": "model.safetensors", "bytes": 0}]},
            "shards": [{"file": k, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                       for k, b in sorted(shard_bytes.items())],
            "tensors": dict(sorted(self.tensors.items())),
            "totals": {"source_params": 0, "source_bytes": 0, "stored_params": 0,
                       "stored_bytes": 0, "factored_tensors": 0, "dense_tensors": 0},
        }


def rng(seed):
    return np.random.default_rng(seed)


def base():
    """The checkpoint the invalid cases break: one shard, a factored 4×3 (rank 2), a bias."""
    c = Ckpt()
    c.add_factored("layer.weight", SHARD1, rng(1).standard_normal((4, 3)), 2, "F32")
    c.add_dense("layer.bias", SHARD1, rng(2).standard_normal(3), "F32")
    return c


def quant_base(quant="Q8_0"):
    """The checkpoint the quantized invalid cases break: a 40×70 matrix, rank 3, in `quant`
    blocks (rows padded from 40 and 70 to 64 and 96 values), and a bias."""
    c = Ckpt()
    c.add_quantized("layer.weight", SHARD1, rng(11).standard_normal((40, 70)), 3, quant)
    c.add_dense("layer.bias", SHARD1, rng(12).standard_normal(40), "F32")
    return c


EXPERTS = "moe.experts"


def experts_base():
    """The checkpoint the experts invalid cases break: a stacked [3, 4, 6] tensor whose
    expert 0 is factored (F32, rank 2), expert 1 dense, expert 2 factored in Q8_0 (rank 1),
    and a bias."""
    c = Ckpt()
    c.add_experts(EXPERTS, SHARD1, rng(50).standard_normal((3, 4, 6)),
                  [("factored", "F32", 2), ("dense", "no-saving"), ("quant", "Q8_0", 1)])
    c.add_dense("layer.bias", SHARD1, rng(51).standard_normal(3), "F32")
    return c


def write_dir(path, manifest, shard_bytes, manifest_text=None):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    for name, b in shard_bytes.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(b)
    with open(os.path.join(path, "cersa.json"), "w") as f:
        f.write(manifest_text if manifest_text is not None else json.dumps(manifest, indent=2) + "\n")


def rehash(manifest, shard_bytes):
    for s in manifest["shards"]:
        if s["file"] in shard_bytes:
            b = shard_bytes[s["file"]]
            s["bytes"], s["sha256"] = len(b), hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- valid vectors
def valid_cases():
    cases = {}
    c = base()
    cases["basic"] = c

    c = Ckpt()
    s1, s2 = "cersa-00001-of-00002.safetensors", "cersa-00002-of-00002.safetensors"
    c.add_factored("a.weight", s1, rng(3).standard_normal((6, 5)), 3, "BF16")
    c.add_factored("b.weight", s1, rng(4).standard_normal((5, 7)), 2, "F16")
    c.add_dense("b.bias", s2, rng(5).standard_normal(5), "F64")
    c.add_dense("norm.weight", s2, rng(6).standard_normal((2, 3)), "F16", reason="excluded")
    cases["multi-shard-dtypes"] = c

    c = Ckpt()
    conv = rng(7).standard_normal((4, 2, 2, 2))
    c.add_factored("conv.weight", SHARD1, conv.reshape(4, 8), 3, "F32", shape=[4, 2, 2, 2])
    c.add_factored("f64.weight", SHARD1, rng(8).standard_normal((3, 3)), 3, "F64")
    cases["conv4d-full-rank"] = c

    c = Ckpt()
    c.add_dense("empty.weight", SHARD1, np.zeros((0, 3)), "F32", reason="zero")
    c.add_dense("zero.weight", SHARD1, np.zeros((2, 2)), "F32", reason="zero")
    c.add_dense("one.weight", SHARD1, [[1.5]], "F32", reason="no-saving")
    cases["zero-and-tiny"] = c

    # Quantized factors (§2, revision 1.1): odd sizes so every row ends in padding, and
    # one matrix with m < 32 (its u rows are a single, mostly padded block).
    for i, quant in enumerate(("Q8_0", "Q5_0", "Q4_0")):
        c = Ckpt()
        c.add_quantized("big.weight", SHARD1, rng(20 + i).standard_normal((40, 70)), 3, quant)
        c.add_quantized("small.weight", SHARD1, rng(30 + i).standard_normal((20, 45)), 2, quant)
        c.add_dense("big.bias", SHARD1, rng(40 + i).standard_normal(40), "F32")
        cases["quant-" + quant.lower()] = c

    # Stacked experts (§2, revision 1.3): a 4-D [E, d1, d2, d3] tensor (matrix view
    # [d1, d2·d3]) whose experts are stored three ways, next to ordinary entries. Expert 0
    # is rank 1 plus a little noise, so its rank-2 factors are a close fit.
    c = Ckpt()
    ws = rng(60).standard_normal((3, 6, 5, 8))
    ws[0] = 3 * np.outer(rng(61).standard_normal(6), rng(62).standard_normal(40)).reshape(
        6, 5, 8) + 0.1 * ws[0]
    c.add_experts("blk.0.ffn_up_exps.weight", SHARD1, ws,
                  [("factored", "F16", 2), ("dense", "no-saving"), ("quant", "Q8_0", 3)])
    c.add_factored("blk.0.attn_q.weight", SHARD1, rng(63).standard_normal((6, 5)), 2, "F32")
    c.add_dense("blk.0.attn_norm.weight", SHARD1, rng(64).standard_normal(6), "F32")
    cases["experts"] = c

    for name, c in cases.items():
        sb = c.shard_bytes()
        d = os.path.join(HERE, "valid", name)
        write_dir(d, c.manifest(sb), sb)
        expected = {t: {"kind": k, "shape": shape, "values": [float(v) for v in vals]}
                    for t, (k, shape, vals) in sorted(c.expected.items())}
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump({"tensors": expected}, f, indent=1)
            f.write("\n")
    return len(cases)


# ---------------------------------------------------------------- invalid vectors
def invalid_cases():
    """Each case: a function (manifest, shard_bytes) → optional manifest text; the issue
    kind `open` stops at with its file and tensor, and the further kinds `validate` lists
    after it (`opens`: open succeeds, only `validate` sees the issues). Shards are
    re-hashed after the edit unless the case says not."""
    cases = []

    def case(name, kind, file, tensor=None, more=(), rehash_after=True, opens=False,
             make=base):
        def deco(fn):
            first = None if opens else {"kind": kind, "file": file, "tensor": tensor}
            expected = {"validate": [kind, *more], "open": first}
            cases.append((name, fn, expected, rehash_after, make))
            return fn
        return deco

    W = "layer.weight"

    def shard_with(mutate_header=None, extra=None, drop=None, data_suffix=b""):
        """Re-encodes the base shard with a mutated stored-tensor list."""
        c = base()
        lst = [list(t) for t in c.shards[SHARD1]]
        if drop:
            lst = [t for t in lst if t[0] != drop]
        if mutate_header:
            mutate_header(lst)
        if extra:
            lst.append(extra)
        return safetensors([tuple(t) for t in lst]) + data_suffix

    @case("bad-format", "wrong-format", MANIFEST)
    def _(m, sb):
        m["format"] = "notcersa"

    @case("bad-version", "unsupported-version", MANIFEST)
    def _(m, sb):
        m["format_version"] = 2

    @case("manifest-not-json", "manifest-not-json", MANIFEST)
    def _(m, sb):
        return '{"format": "cersa", '

    @case("manifest-missing-tensors", "manifest-invalid", MANIFEST)
    def _(m, sb):
        del m["tensors"]

    @case("manifest-unknown-kind", "manifest-invalid", MANIFEST)
    def _(m, sb):
        m["tensors"][W]["kind"] = "lowrank"

    @case("manifest-negative-rank", "manifest-invalid", MANIFEST)
    def _(m, sb):
        m["tensors"][W]["rank"] = -1

    @case("shard-name-with-slash", "shard-name-not-plain", MANIFEST)
    def _(m, sb):
        m["shards"][0]["file"] = "../" + SHARD1
        m["tensors"][W]["shard"] = m["tensors"]["layer.bias"]["shard"] = "../" + SHARD1

    @case("shard-name-hidden", "shard-name-not-plain", MANIFEST,
          more=["shard-not-listed", "shard-not-listed"])
    def _(m, sb):
        # The entries still name the unhidden file, which is no longer in the list.
        m["shards"][0]["file"] = "." + SHARD1

    @case("shard-listed-twice", "shard-listed-twice", MANIFEST)
    def _(m, sb):
        m["shards"].append(dict(m["shards"][0]))

    @case("shard-file-missing", "shard-missing", SHARD2)
    def _(m, sb):
        m["shards"].append({"file": SHARD2, "bytes": 8,
                            "sha256": "0" * 64})

    @case("shard-size-mismatch", "shard-size", SHARD1, rehash_after=False)
    def _(m, sb):
        m["shards"][0]["bytes"] += 1

    @case("checksum-mismatch", "sha256", SHARD1, rehash_after=False)
    def _(m, sb):
        b = bytearray(sb[SHARD1])
        b[-1] ^= 0x01  # same size, one bit of the last tensor's data flipped
        sb[SHARD1] = bytes(b)

    @case("truncated-shard", "shard-size", SHARD1,
          more=["sha256", "offsets-out-of-bounds"], rehash_after=False)
    def _(m, sb):
        sb[SHARD1] = sb[SHARD1][:-5]

    @case("truncated-shard-rehashed", "offsets-out-of-bounds", SHARD1, "layer.bias")
    def _(m, sb):
        # The manifest agrees with the truncated file, so the safetensors bounds catch it.
        sb[SHARD1] = sb[SHARD1][:-5]

    @case("shard-too-short", "shard-too-short", SHARD1)
    def _(m, sb):
        sb[SHARD1] = b"\x10\x00\x00"

    @case("shard-header-past-end", "header-past-end", SHARD1)
    def _(m, sb):
        sb[SHARD1] = struct.pack("<Q", 4096) + b"{}"

    @case("shard-header-over-cap", "header-over-cap", SHARD1)
    def _(m, sb):
        sb[SHARD1] = struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6

    @case("shard-header-invalid-json", "header-malformed", SHARD1)
    def _(m, sb):
        sb[SHARD1] = raw_safetensors(b'{"layer.bias": {"dtype": "F32",', b"")

    @case("shard-header-not-utf8", "header-malformed", SHARD1)
    def _(m, sb):
        sb[SHARD1] = raw_safetensors(b'{"\xff\xfe": 1}', b"")

    @case("shard-duplicate-name", "duplicate-tensor-name", SHARD1, "layer.bias")
    def _(m, sb):
        h = (b'{"layer.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
             b'"layer.bias":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
        sb[SHARD1] = raw_safetensors(h, b"\0" * 8)

    @case("shard-unknown-dtype", "unknown-dtype", SHARD1, "layer.bias")
    def _(m, sb):
        h = b'{"layer.bias":{"dtype":"Q4_0","shape":[3],"data_offsets":[0,12]}}'
        sb[SHARD1] = raw_safetensors(h, b"\0" * 12)

    @case("shard-shape-overflow", "shape-overflow", SHARD1, "layer.bias")
    def _(m, sb):
        h = (b'{"layer.bias":{"dtype":"F32","shape":[4294967296,4294967296,16],'
             b'"data_offsets":[0,12]}}')
        sb[SHARD1] = raw_safetensors(h, b"\0" * 12)

    @case("shard-dtype-size-mismatch", "data-size-mismatch", SHARD1, "layer.bias")
    def _(m, sb):
        h = b'{"layer.bias":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'
        sb[SHARD1] = raw_safetensors(h, b"\0" * 8)

    @case("shard-overlapping-offsets", "overlapping-offsets", SHARD1, "b")
    def _(m, sb):
        h = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
             b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}')
        sb[SHARD1] = raw_safetensors(h, b"\0" * 12)

    @case("shard-gap-in-data", "data-gap", SHARD1, "b")
    def _(m, sb):
        h = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
             b'"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}')
        sb[SHARD1] = raw_safetensors(h, b"\0" * 12)

    @case("shard-trailing-bytes", "trailing-bytes", SHARD1)
    def _(m, sb):
        sb[SHARD1] = sb[SHARD1] + b"\0" * 4

    @case("wrong-factor-shape", "shape-mismatch", SHARD1, W + ".cersa_u")
    def _(m, sb):
        def mut(lst):
            u = lst[0]
            u[2], u[3] = [4, 1], u[3][:16]
        sb[SHARD1] = shard_with(mut)

    @case("sigma-not-f32", "dtype-mismatch", SHARD1, W + ".cersa_s")
    def _(m, sb):
        def mut(lst):
            lst[1][1], lst[1][3] = "F16", lst[1][3][:4]
        sb[SHARD1] = shard_with(mut)

    @case("rank-above-min-dim", "rank-out-of-range", MANIFEST, W)
    def _(m, sb):
        m["tensors"][W]["rank"] = 4

    @case("rank-zero", "rank-out-of-range", MANIFEST, W)
    def _(m, sb):
        m["tensors"][W]["rank"] = 0

    @case("rank-disagrees-with-shard", "shape-mismatch", SHARD1, W + ".cersa_u",
          more=["shape-mismatch", "shape-mismatch"])
    def _(m, sb):
        m["tensors"][W]["rank"] = 1

    @case("factored-without-rank", "factored-without-rank", MANIFEST, W)
    def _(m, sb):
        del m["tensors"][W]["rank"]

    @case("matrix-shape-mismatch", "matrix-shape-mismatch", MANIFEST, W)
    def _(m, sb):
        m["tensors"][W]["matrix_shape"] = [2, 6]

    @case("factor-dtype-integer", "factor-dtype-not-float", MANIFEST, W)
    def _(m, sb):
        m["tensors"][W]["stored_dtype"] = "I32"

    @case("dense-dtype-mismatch", "dtype-mismatch", SHARD1, "layer.bias")
    def _(m, sb):
        m["tensors"]["layer.bias"]["stored_dtype"] = "F16"

    @case("dense-shape-mismatch", "shape-mismatch", SHARD1, "layer.bias")
    def _(m, sb):
        m["tensors"]["layer.bias"]["shape"] = [1, 3]

    @case("tensor-missing-from-shard", "tensor-missing", SHARD1, "layer.bias")
    def _(m, sb):
        sb[SHARD1] = shard_with(drop="layer.bias")

    @case("stray-tensor", "stray-tensor", SHARD1, "stray")
    def _(m, sb):
        sb[SHARD1] = shard_with(extra=["stray", "F32", [1], b"\0" * 4])

    @case("tensor-shard-not-listed", "shard-not-listed", MANIFEST, "layer.bias")
    def _(m, sb):
        m["tensors"]["layer.bias"]["shard"] = "cersa-00009-of-00009.safetensors"

    @case("tensor-in-other-shard", "wrong-shard", SHARD2, "layer.bias")
    def _(m, sb):
        c = base()
        s2 = "cersa-00002-of-00002.safetensors"
        sb[SHARD1] = safetensors(c.shards[SHARD1][:3])
        sb[s2] = safetensors(c.shards[SHARD1][3:])
        m["shards"].append({"file": s2})
        # the manifest still says the bias is in shard 1

    @case("tensor-in-two-shards", "stored-in-two-shards", SHARD2, "layer.bias")
    def _(m, sb):
        c = base()
        s2 = "cersa-00002-of-00002.safetensors"
        sb[s2] = safetensors(c.shards[SHARD1][3:])
        m["shards"].append({"file": s2})

    @case("stored-name-claimed-twice", "claimed-twice", MANIFEST,
          W + ".cersa_u", more=["stray-tensor"])
    def _(m, sb):
        # A dense entry named like a factor of another entry, plus a stray tensor: the
        # counts of claimed and stored tensors agree, the names do not.
        sb[SHARD1] = shard_with(extra=["stray", "F32", [1], b"\0" * 4])
        u = m["tensors"][W]
        m["tensors"][W + ".cersa_u"] = {
            "kind": "dense", "shape": [4, 2], "source_dtype": "F32", "stored_dtype": "F32",
            "shard": u["shard"], "reason": "excluded"}

    @case("factored-without-matrix-shape", "factored-without-matrix-shape", MANIFEST, W)
    def _(m, sb):
        del m["tensors"][W]["matrix_shape"]

    @case("factor-non-finite", "non-finite-factor", SHARD1, W + ".cersa_vt", opens=True)
    def _(m, sb):
        # Structurally sound and correctly hashed: only the value check sees the NaN.
        def mut(lst):
            vt = lst[2]
            vt[3] = struct.pack("<f", float("nan")) + vt[3][4:]
        sb[SHARD1] = shard_with(mut)

    @case("several-issues", "shape-mismatch", SHARD1, "layer.bias",
          more=["rank-out-of-range", "stray-tensor"])
    def _(m, sb):
        # validate lists all three; open stops at the first (entries in name order).
        m["tensors"]["layer.bias"]["shape"] = [1, 3]
        m["tensors"][W]["rank"] = 0
        sb[SHARD1] = shard_with(extra=["stray", "F32", [1], b"\0" * 4])

    # Quantized factors (§2, revision 1.1).
    @case("quant-stored-dtype-not-u8", "quant-stored-dtype", MANIFEST, W, make=quant_base)
    def _(m, sb):
        m["tensors"][W]["stored_dtype"] = "F32"  # the shard still holds the U8 rows

    @case("quant-wrong-factor-shape", "shape-mismatch", SHARD1, W + ".cersa_u",
          make=quant_base)
    def _(m, sb):
        def mut(lst):
            u = lst[0]  # [3, 2·34]: keep one block per row instead of two
            r, width = u[2]
            rows = np.frombuffer(u[3], dtype=np.uint8).reshape(r, width)
            u[2], u[3] = [r, width - 34], rows[:, :width - 34].tobytes()
        c = quant_base()
        lst = [list(t) for t in c.shards[SHARD1]]
        mut(lst)
        sb[SHARD1] = safetensors([tuple(t) for t in lst])

    @case("quant-unknown-type", "manifest-invalid", MANIFEST, make=quant_base)
    def _(m, sb):
        m["tensors"][W]["quant"] = "Q3_K"

    @case("format-minor-too-new", "unsupported-version", MANIFEST, make=quant_base)
    def _(m, sb):
        m["format_minor"] = 4

    @case("whitening-bad-axis", "whitening-invalid", MANIFEST, W)
    def _(m, sb):
        m["format_minor"] = 2
        m["tensors"][W]["whitening"] = {"input_axis": 2, "output_rel_error": 0.25}

    # Stacked experts (§2, revision 1.3): rules of the entry are `experts-invalid` (the
    # entry's stored tensors are then claimed, not stray); an expert's own rules and stored
    # tensors are reported under its name NAME.cersa_expert.e.
    X = EXPERTS

    @case("experts-count-mismatch", "experts-invalid", MANIFEST, X,
          more=["stray-tensor"] * 3, make=experts_base)
    def _(m, sb):
        # Two records for a first dimension of 3: expert 2's factors claimed by none.
        m["tensors"][X]["experts"].pop()

    @case("experts-matrix-shape", "experts-invalid", MANIFEST, X, make=experts_base)
    def _(m, sb):
        m["tensors"][X]["matrix_shape"] = [4, 18]  # the [E, m·n] view, not one expert's

    @case("experts-nested-kind", "experts-invalid", MANIFEST, X, make=experts_base)
    def _(m, sb):
        m["tensors"][X]["experts"][1]["kind"] = "experts"

    @case("experts-shape-2d", "experts-invalid", MANIFEST, X, make=experts_base)
    def _(m, sb):
        m["tensors"][X]["shape"] = [3, 24]

    @case("experts-list-on-dense", "experts-invalid", MANIFEST, "layer.bias",
          make=experts_base)
    def _(m, sb):
        m["tensors"]["layer.bias"]["experts"] = [{"kind": "dense", "stored_dtype": "F32"}]

    @case("experts-expert-rank-zero", "rank-out-of-range", MANIFEST, X + ".cersa_expert.0",
          make=experts_base)
    def _(m, sb):
        m["tensors"][X]["experts"][0]["rank"] = 0

    @case("experts-missing-expert-tensor", "tensor-missing", SHARD1, X + ".cersa_expert.1",
          make=experts_base)
    def _(m, sb):
        c = experts_base()
        sb[SHARD1] = safetensors([t for t in c.shards[SHARD1] if t[0] != X + ".cersa_expert.1"])

    @case("experts-quant-factor-shape", "shape-mismatch", SHARD1,
          X + ".cersa_expert.2.cersa_u", more=["shape-mismatch"], make=experts_base)
    def _(m, sb):
        m["tensors"][X]["experts"][2]["quant"] = "Q4_0"  # rows of 18 bytes, stored 34

    for name, fn, expected, rehash_after, make in cases:
        c = make()
        sb = c.shard_bytes()
        m = c.manifest(sb)
        text = fn(m, sb)
        if rehash_after:
            rehash(m, sb)
        d = os.path.join(HERE, "invalid", name)
        write_dir(d, m, sb, manifest_text=text)
        with open(os.path.join(d, "expected_issues.json"), "w") as f:
            json.dump(expected, f, indent=1)
            f.write("\n")
    return len(cases)


if __name__ == "__main__":
    for sub in ("valid", "invalid"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    v = valid_cases()
    n = invalid_cases()
    print(f"wrote {v} valid and {n} invalid vectors under {HERE}")
