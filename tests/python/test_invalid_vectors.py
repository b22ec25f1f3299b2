"""Both Python readers refuse every invalid test vector as the Rust loader does.

`cersa_torch.load_cersa` (numpy) and `cersa_torch.open_checkpoint` (torch) must raise
`CersaFormatError` for every directory of formats/vectors/invalid/ (discovered from the
filesystem), with the issue `expected_issues.json` gives as `open` — the first issue
`cersa_loader::Checkpoint::open` with sha256 verification stops at: its kind, and a message
naming DIR/file and the tensor. Where `open` is null (Rust's `open` accepts the directory and
only `validate` flags it: non-finite factors), the readers refuse it too, naming the file and
tensor the `validate` issue concerns, found here by reading the vector's shards with numpy.

Beyond the vectors, mutated copies of the valid vectors (header and manifest corner cases,
NaN/±Inf in every factor dtype and quantization) are compared with what the Rust validator
(`cersa verify --json`) reports first.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402

VECTORS = os.path.join(ROOT, "formats", "vectors")
INVALID = sorted(os.listdir(os.path.join(VECTORS, "invalid")))
VALID = sorted(os.listdir(os.path.join(VECTORS, "valid")))
OPENERS = ["numpy", "torch"]
FACTOR_SUFFIXES = (".cersa_u", ".cersa_s", ".cersa_vt")


def opener(which):
    if which == "torch":
        pytest.importorskip("torch")
        return cersa_torch.open_checkpoint
    return cersa_torch.load_cersa


def read_shard(path):
    """(header entries by name, data start, file bytes) of a safetensors file."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, 8 + n, raw


def factor_values(raw, start, entry, info, suffix):
    """The values of one stored factor as float64 (BF16 widened; quantized rows
    dequantized by the scale-and-integer rule of spec §2), read with numpy only."""
    begin, end = entry["data_offsets"]
    data = raw[start + begin:start + end]
    dtype = entry["dtype"]
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if dtype == "U8" and suffix != ".cersa_s":  # quantized: scale d · q per block
        from cersa_torch._quant import dequantize_numpy

        m, n = info["matrix_shape"]
        rows = np.frombuffer(data, dtype=np.uint8).reshape(entry["shape"])
        return dequantize_numpy(rows, info["quant"], m if suffix == ".cersa_u" else n)
    return np.frombuffer(data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]
                         ).astype(np.float64)


def factored_matrices(manifest):
    """(stored name, entry) of every factored matrix — factored entries, and the factored
    experts NAME.cersa_expert.e of stacked experts entries (spec §2, revision 1.3) — in the
    order Rust's validate scans them (entries by name, experts in order)."""
    out = []
    for name in sorted(manifest["tensors"]):
        info = manifest["tensors"][name]
        if info["kind"] == "factored":
            out.append((name, info))
        for e, x in enumerate(info.get("experts") or []):
            if x["kind"] == "factored":
                out.append((f"{name}.cersa_expert.{e}", {
                    **x, "shard": info["shard"], "matrix_shape": info["matrix_shape"]}))
    return out


def non_finite_factors(d):
    """[(shard file, stored factor name)] holding NaN/±Inf, in the order Rust's validate
    lists them (entries by name, experts in order, then u, s, vt)."""
    manifest = json.load(open(os.path.join(d, "cersa.json")))
    out = []
    for name, info in factored_matrices(manifest):
        header, start, raw = read_shard(os.path.join(d, info["shard"]))
        for suffix in FACTOR_SUFFIXES:
            with np.errstate(invalid="ignore", over="ignore"):  # d = ±Inf times q = 0
                values = factor_values(raw, start, header[name + suffix], info, suffix)
            if not np.isfinite(values).all():
                out.append((info["shard"], name + suffix))
    return out


def expected_open(d):
    """(kind, file, tensor) the readers must raise for vector directory ``d``."""
    expected = json.load(open(os.path.join(d, "expected_issues.json")))
    if expected["open"] is not None:
        e = expected["open"]
        return e["kind"], e["file"], e["tensor"]
    # Rust's open accepts it; the first validate issue must be one the readers check.
    kind = expected["validate"][0]
    assert kind == "non-finite-factor", f"{d}: open=null for {kind}: extend this test"
    found = non_finite_factors(d)
    assert found, f"{d}: no factor holds NaN/Inf"
    return (kind, *found[0])


def assert_refused(err, d, kind, file, tensor):
    msg = str(err)
    assert err.kind == kind, msg
    assert err.path == os.path.join(d, file), msg
    assert os.path.join(d, file) in msg, msg
    if tensor is not None:
        assert err.tensor == tensor, msg
        assert tensor in msg, msg


def test_every_invalid_vector_has_expected_issues():
    assert len(INVALID) >= 40
    for case in INVALID:
        assert os.path.isfile(os.path.join(VECTORS, "invalid", case, "expected_issues.json")), case


@pytest.mark.parametrize("which", OPENERS)
@pytest.mark.parametrize("case", INVALID)
def test_readers_refuse_invalid_vector(case, which):
    d = os.path.join(VECTORS, "invalid", case)
    kind, file, tensor = expected_open(d)
    with pytest.raises(cersa_torch.CersaFormatError) as err:
        opener(which)(d)
    assert_refused(err.value, d, kind, file, tensor)


@pytest.mark.parametrize("which", OPENERS)
@pytest.mark.parametrize("case", VALID)
def test_readers_open_valid_vector(case, which):
    d = os.path.join(VECTORS, "valid", case)
    for verify in (True, False):
        ckpt = opener(which)(d, verify_checksums=verify)
        assert ckpt.names() == sorted(json.load(open(os.path.join(d, "expected.json")))[
            "tensors"])
        for name in ckpt.names():
            if ckpt.is_experts(name):
                for e in range(ckpt.expert_count(name)):
                    ckpt.reconstruct_expert(name, e)
            elif ckpt.is_factored(name):
                ckpt.factors(name)
            else:
                ckpt.dense(name)


@pytest.mark.parametrize("which", OPENERS)
def test_verify_checksums_opt_out(which):
    """Without sha256 verification a shard edited in place (size kept) opens, as Rust's
    `Checkpoint::open` without `verify_checksums` does; nothing else is relaxed."""
    d = os.path.join(VECTORS, "invalid", "checksum-mismatch")
    opener(which)(d, verify_checksums=False)
    d = os.path.join(VECTORS, "invalid", "shard-trailing-bytes")
    with pytest.raises(cersa_torch.CersaFormatError):
        opener(which)(d, verify_checksums=False)


def test_torch_lazy_open_checks_factors_when_read():
    """`open_checkpoint(verify_checksums=False)` reads no tensor data when opening; a factor
    holding NaN is refused when it is read, naming the shard and the factor."""
    torch = pytest.importorskip("torch")  # noqa: F841
    d = os.path.join(VECTORS, "invalid", "factor-non-finite")
    _, file, tensor = expected_open(d)
    ckpt = cersa_torch.open_checkpoint(d, verify_checksums=False)
    ckpt.dense("layer.bias")
    with pytest.raises(cersa_torch.CersaFormatError) as err:
        ckpt.factors("layer.weight")
    assert_refused(err.value, d, "non-finite-factor", file, tensor)


# ---------------------------------------------------------------- against the Rust validator
def rehash(d):
    """Sets every listed shard's bytes and sha256 in the manifest to the files'."""
    mpath = os.path.join(d, "cersa.json")
    m = json.load(open(mpath))
    for s in m["shards"]:
        p = os.path.join(d, s["file"])
        if os.path.isfile(p):
            raw = open(p, "rb").read()
            s["bytes"], s["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    json.dump(m, open(mpath, "w"), indent=1)


def set_header(path, text, data=None):
    """Rewrites a shard with header JSON ``text`` (bytes) and its data section (or ``data``)."""
    _, start, raw = read_shard(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + (raw[start:] if data is None else data))


def header_text(path):
    raw = open(path, "rb").read()
    return raw[8:8 + struct.unpack("<Q", raw[:8])[0]]


SHARD = "cersa-00001-of-00001.safetensors"
W = "layer.weight"


def edit_manifest(fn):
    def mutate(d):
        mpath = os.path.join(d, "cersa.json")
        m = json.load(open(mpath))
        fn(m)
        json.dump(m, open(mpath, "w"), indent=1)
    return mutate


def edit_manifest_text(old, new):
    def mutate(d):
        mpath = os.path.join(d, "cersa.json")
        text = open(mpath).read()
        assert old in text, old
        open(mpath, "w").write(text.replace(old, new, 1))
    return mutate


def edit_header(old, new):
    def mutate(d):
        p = os.path.join(d, SHARD)
        text = header_text(p)
        assert old in text, old
        set_header(p, text.replace(old, new, 1))
        rehash(d)
    return mutate


def wrap_header(d):
    p = os.path.join(d, SHARD)
    set_header(p, b"[" + header_text(p) + b"]")
    rehash(d)


def _whitening(m, axis, err):
    m["format_minor"] = 2
    m["tensors"][W]["whitening"] = {"input_axis": axis, "output_rel_error": err}


def _drop(key):
    return edit_manifest(lambda m: m.pop(key))


# (mutation of a copy of valid/basic, the issue the readers must raise: kind, file, tensor;
# None: the directory is valid)
MUTATIONS = {
    "header-leading-whitespace": (edit_header(b"{", b" \n{"), None),
    "header-nan-in-unknown-field": (
        edit_header(b'"data_offsets":[0,32]', b'"data_offsets":[0,32],"x":NaN'),
        ("header-malformed", SHARD, None)),
    "header-unknown-field": (
        edit_header(b'"data_offsets":[0,32]', b'"data_offsets":[0,32],"x":[1,{"y":2}]'), None),
    "header-metadata-not-strings": (
        edit_header(b'"cersa_version":"1"', b'"cersa_version":1'),
        ("header-malformed", SHARD, None)),
    "header-metadata-twice": (
        edit_header(b'{"__metadata__"', b'{"__metadata__":{},"__metadata__"'),
        ("duplicate-tensor-name", SHARD, "__metadata__")),
    "header-shape-float": (edit_header(b'"shape":[4,2]', b'"shape":[4.0,2]'),
                           ("header-malformed", SHARD, None)),
    "header-three-offsets": (edit_header(b'"data_offsets":[0,32]', b'"data_offsets":[0,32,4]'),
                             ("header-malformed", SHARD, None)),
    "header-entry-field-twice": (
        edit_header(b'"shape":[4,2]', b'"shape":[4,2],"shape":[4,2]'),
        ("header-malformed", SHARD, None)),
    "header-not-object": (wrap_header, ("header-malformed", SHARD, None)),
    "sha256-uppercase": (edit_manifest(lambda m: m["shards"][0].update(
        sha256=m["shards"][0]["sha256"].upper())), None),
    "shard-is-directory": (lambda d: (os.remove(os.path.join(d, SHARD)),
                                      os.mkdir(os.path.join(d, SHARD))),
                           ("shard-missing", SHARD, None)),
    "shard-name-empty": (edit_manifest(lambda m: m["shards"][0].update(file="")),
                         ("shard-name-not-plain", "cersa.json", None)),
    "manifest-nan": (edit_manifest_text('"energy": 0.9,', '"energy": NaN,'),
                     ("manifest-not-json", "cersa.json", None)),
    "manifest-huge-number": (edit_manifest_text('"energy": 0.9,', '"energy": 1e400,'),
                             ("manifest-not-json", "cersa.json", None)),
    "manifest-not-utf8": (lambda d: open(os.path.join(d, "cersa.json"), "ab").write(b"\xff"),
                          ("manifest-not-json", "cersa.json", None)),
    "manifest-missing-producer": (_drop("producer"), ("manifest-invalid", "cersa.json", None)),
    "manifest-missing-totals": (_drop("totals"), ("manifest-invalid", "cersa.json", None)),
    "manifest-field-twice": (edit_manifest_text('"kind": "factored",',
                                                '"kind": "factored", "kind": "factored",'),
                             ("manifest-invalid", "cersa.json", None)),
    "manifest-unknown-reason": (edit_manifest(lambda m: m["tensors"]["layer.bias"].update(
        reason="bogus")), ("manifest-invalid", "cersa.json", None)),
    "manifest-bad-dtype-before-format": (
        edit_manifest(lambda m: (m.update(format="nope"),
                                 m["tensors"][W].update(stored_dtype="F33"))),
        ("manifest-invalid", "cersa.json", None)),
    "manifest-version-float": (edit_manifest(lambda m: m.update(format_version=1.0)),
                               ("manifest-invalid", "cersa.json", None)),
    "manifest-unknown-fields": (edit_manifest(lambda m: (m.update(future={"x": [1]}),
                                                         m["tensors"][W].update(later=1))),
                                None),
    "manifest-rank-null": (edit_manifest(lambda m: m["tensors"][W].update(rank=None)),
                           ("factored-without-rank", "cersa.json", W)),
    "whitening-axis-not-u8": (edit_manifest(lambda m: _whitening(m, 300, 0.1)),
                              ("manifest-invalid", "cersa.json", None)),
    "whitening-negative-error": (edit_manifest(lambda m: _whitening(m, 1, -0.5)),
                                 ("whitening-invalid", "cersa.json", W)),
    "whitening-valid": (edit_manifest(lambda m: _whitening(m, 0, 0.5)), None),
    "rank-before-dtype": (edit_manifest(lambda m: m["tensors"][W].update(
        rank=9, stored_dtype="I8")), ("rank-out-of-range", "cersa.json", W)),
    "missing-before-stray": (
        edit_header(b'"layer.bias"', b'"layer.other"'),
        ("tensor-missing", SHARD, "layer.bias")),
}


def rust_first_issue(cersa_bin, d):
    """(kind, file, tensor, detail) of the first failure `cersa verify --json` reports, None
    when it finds none, or "manifest" when it stops at the manifest (no JSON report)."""
    p = subprocess.run([cersa_bin, "verify", "--json", "-q", d], capture_output=True, text=True)
    if p.returncode == 2:
        assert os.path.join(d, "cersa.json") in p.stderr, p.stderr
        return "manifest"
    failures = json.loads(p.stdout)["failures"]
    if not failures:
        return None
    f = failures[0]
    return f["issue"], f["file"], f["tensor"], f["detail"]


def check_against_rust(cersa_bin, d, want):
    rust = rust_first_issue(cersa_bin, d)
    if want is None:
        assert rust is None, rust
    elif want[1] == "cersa.json" and want[0].startswith(("manifest-", "wrong-format",
                                                          "unsupported-version")):
        assert rust == "manifest", rust
    else:
        assert rust is not None and rust != "manifest" and rust[:3] == want, rust
    return rust


XN = "blk.0.ffn_up_exps.weight"  # valid/experts: expert 0 F16 factors, 1 dense, 2 Q8_0


def _expert(e, **fields):
    def edit(m):
        m["tensors"][XN]["experts"][e].update(fields)
        for k in [k for k, v in fields.items() if v is None]:
            del m["tensors"][XN]["experts"][e][k]
    return edit_manifest(edit)


def _extra_expert_tensor(d):
    p = os.path.join(d, SHARD)
    header, start, raw = read_shard(p)
    end = max(e["data_offsets"][1] for e in header.values())
    header[XN + ".cersa_expert.3"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
    set_header(p, json.dumps(header).encode(), raw[start:] + b"\0" * 4)
    rehash(d)


# (mutation of a copy of valid/experts, the issue: kind, file, tensor; None: valid)
EXPERT_MUTATIONS = {
    "without-format-minor": (_drop("format_minor"), None),
    "record-unknown-quant": (_expert(2, quant="Q3_K"), ("manifest-invalid", "cersa.json", None)),
    "record-without-stored-dtype": (_expert(0, stored_dtype=None),
                                    ("manifest-invalid", "cersa.json", None)),
    "record-without-rank": (_expert(2, rank=None),
                            ("factored-without-rank", "cersa.json", XN + ".cersa_expert.2")),
    "record-rank-above-min": (_expert(0, rank=7),
                              ("rank-out-of-range", "cersa.json", XN + ".cersa_expert.0")),
    "record-quant-not-u8": (_expert(2, stored_dtype="F16"),
                            ("quant-stored-dtype", "cersa.json", XN + ".cersa_expert.2")),
    "dense-expert-dtype": (_expert(1, stored_dtype="F16"),
                           ("dtype-mismatch", SHARD, XN + ".cersa_expert.1")),
    "factored-as-dense": (_expert(0, kind="dense"),
                          ("tensor-missing", SHARD, XN + ".cersa_expert.0")),
    "expert-past-the-last": (_extra_expert_tensor,
                             ("stray-tensor", SHARD, XN + ".cersa_expert.3")),
}


@pytest.mark.parametrize("vector,case", [("basic", c) for c in sorted(MUTATIONS)]
                         + [("experts", c) for c in sorted(EXPERT_MUTATIONS)])
def test_readers_match_rust_on_mutations(vector, case, cersa_bin, tmp_path):
    """Both readers stop where the Rust validator does. Stacked experts (revision 1.3):
    each record is checked as an entry of its own named NAME.cersa_expert.e."""
    mutate, want = (MUTATIONS if vector == "basic" else EXPERT_MUTATIONS)[case]
    d = str(tmp_path / case)
    shutil.copytree(os.path.join(VECTORS, "valid", vector), d)
    mutate(d)
    check_against_rust(cersa_bin, d, want)
    for which in OPENERS:
        if want is None:
            ckpt = opener(which)(d)
            if vector == "experts":
                assert np.asarray(ckpt.experts(XN)).shape == (3, 6, 5, 8)
            continue
        with pytest.raises(cersa_torch.CersaFormatError) as err:
            opener(which)(d)
        assert_refused(err.value, d, *want)


# Bits that make one element of each factor dtype non-finite (little-endian).
POISON = {"F16": struct.pack("<H", 0x7E00), "BF16": struct.pack("<H", 0x7FC0),
          "F32": struct.pack("<f", float("nan")), "F64": struct.pack("<d", float("-inf")),
          # quantized rows: the f16 scale d of the row's first block, +Inf
          "U8": struct.pack("<H", 0x7C00)}


def poisoned_factors():
    out = []
    for case in VALID:
        m = json.load(open(os.path.join(VECTORS, "valid", case, "cersa.json")))
        for name, _ in factored_matrices(m):
            out += [(case, name + suffix) for suffix in FACTOR_SUFFIXES]
    return out


@pytest.mark.parametrize("case,stored", poisoned_factors())
def test_non_finite_factor_refused_in_every_dtype(case, stored, cersa_bin, tmp_path):
    """One NaN/±Inf in one factor (any float dtype, or the scale of a quantized block): both
    readers refuse the directory with the issue Rust's validate reports, with its count."""
    d = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(VECTORS, "valid", case), d)
    m = json.load(open(os.path.join(d, "cersa.json")))
    info = dict(factored_matrices(m))[stored.rsplit(".cersa_", 1)[0]]
    path = os.path.join(d, info["shard"])
    header, start, raw = read_shard(path)
    entry = header[stored]
    at = start + entry["data_offsets"][0]
    poison = POISON[entry["dtype"]]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(poison)
    rehash(d)
    assert non_finite_factors(d) == [(info["shard"], stored)]
    rust = check_against_rust(cersa_bin, d, ("non-finite-factor", info["shard"], stored))
    detail = rust[3]  # "N non-finite value(s) of T"
    for which in OPENERS:
        for verify in (True, False):
            if which == "torch" and not verify:  # lazy: refused when the factor is read
                ckpt = opener(which)(d, verify_checksums=False)
                with pytest.raises(cersa_torch.CersaFormatError) as err:
                    ckpt.factors(stored.rsplit(".cersa_", 1)[0])
            else:
                with pytest.raises(cersa_torch.CersaFormatError) as err:
                    opener(which)(d, verify_checksums=verify)
            assert_refused(err.value, d, "non-finite-factor", info["shard"], stored)
            assert detail in str(err.value), (str(err.value), detail)


@pytest.mark.parametrize("dtype,quant,length", [
    ("F16", None, 0), ("BF16", None, 0), ("F32", None, 0), ("F64", None, 0),
    ("U8", "Q8_0", 70), ("U8", "Q5_0", 32), ("U8", "Q4_0", 5)])
def test_nonfinite_counters_agree(dtype, quant, length):
    """The torch-only counter (used when numpy is missing) counts as the numpy one and as
    decoding the values does."""
    torch = pytest.importorskip("torch")
    from cersa_torch._numpy import count_nonfinite as numpy_count
    from cersa_torch._quant import BLOCK_BYTES, dequantize_numpy
    from cersa_torch.checkpoint import count_nonfinite as torch_count

    rng = np.random.default_rng(1)
    if quant is None:
        np_dtype = {"F16": "<f2", "BF16": "<f4", "F32": "<f4", "F64": "<f8"}[dtype]
        values = rng.standard_normal(4096).astype(np_dtype)
        values[[3, 77, 4095]] = [np.nan, np.inf, -np.inf]
        if dtype == "BF16":  # the top halves of the f32 values
            raw = (values.view("<u4") >> 16).astype("<u2").tobytes()
        else:
            raw = values.tobytes()
        want = 3
    else:
        nb, b = -(-length // 32), BLOCK_BYTES[quant]
        rows = rng.integers(0, 256, (6, nb * b), dtype=np.uint8)
        blocks = rows.reshape(6, nb, b)
        blocks[..., :2] = np.frombuffer(np.full(6 * nb, 0.5, "<f2").tobytes(),
                                        np.uint8).reshape(6, nb, 2)
        blocks[1, -1, :2] = np.frombuffer(struct.pack("<H", 0x7C00), np.uint8)  # +Inf
        blocks[4, 0, :2] = np.frombuffer(struct.pack("<H", 0x7E00), np.uint8)  # NaN
        raw = rows.tobytes()
        with np.errstate(invalid="ignore", over="ignore"):
            want = int((~np.isfinite(dequantize_numpy(rows, quant, length))).sum())
        assert want > 0
    for count in (numpy_count, torch_count):
        assert count(memoryview(bytearray(raw)), dtype, quant, length) == want, count
    assert torch_count(memoryview(bytearray(len(raw))), dtype, quant, length) == 0
