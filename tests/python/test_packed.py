"""``load_hf(packed=True)``: quantized factors kept as their stored U8 rows and dequantized in
each forward (``cersa_torch.PackedCersaLinear``, issue 16).

Tiny random Llama (``nn.Linear``) and GPT-2 (``Conv1D``, transposed) models are converted by
the cersa binary with ``--dtype q8_0`` and ``q4_0``. Checked against two independent paths:
the dequantize-at-load model (``packed=False``, plain ``CersaLinear`` s), which must give the
same outputs in every mode that allows packing, and gguf-py's dequantization of the stored
rows (numpy f64), which each packed layer's matrix must equal. Also: the bytes held are the
U8 rows' (from the manifest's shapes and the GGML block sizes), training moves only the
adapter, adapter files round-trip between packed and unpacked models, ``factors`` mode is
refused, bfloat16 compute works, and ``TorchCheckpoint.packed_factors`` hands out the
stored bytes and refuses non-finite scales.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402
from cersa_torch.packed import PackedCersaLinear  # noqa: E402
from helpers import gguf_dequant_rows, perturb_trainable, stored_tensors  # noqa: E402

# GGML block sizes (formats/cersa-v1.md §2), bytes per 32 values.
BLOCK = {"Q8_0": 34, "Q4_0": 18}
MODES = ["frozen", "scale", "core", "cersa"]


def tiny(family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4,
                                       n_positions=32, architectures=["GPT2LMHeadModel"])
    # intermediate 80: rows of 80 values are padded to 96 (3 blocks).
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def converted(cersa_bin, tmp_path_factory):
    """(family, quant) → (config, source dir, cersa dir), converted once per module."""
    help_text = subprocess.run([cersa_bin, "convert", "--help"], capture_output=True,
                               text=True).stdout
    if "q8_0" not in help_text:
        pytest.skip(f"{cersa_bin} has no --dtype q8_0 (quantized factors)")
    made = {}

    def get(family, quant):
        if (family, quant) not in made:
            config = tiny(family)
            work = tmp_path_factory.mktemp(f"{family}-{quant}")
            torch.manual_seed(0)
            getattr(transformers, config.architectures[0])(config).save_pretrained(work / "src")
            args = ["convert", "-q", "--force-factor", "--energy", "0.8"]
            if quant != "F32":
                args += ["--dtype", quant.lower()]
            subprocess.run([cersa_bin, *args, str(work / "src"), str(work / "cersa")],
                           check=True, capture_output=True)
            made[family, quant] = config, work / "src", work / "cersa"
        return made[family, quant]
    return get


def load(cersa_dir, src, mode, packed, **kw):
    return cersa_torch.load_hf(cersa_dir, config=src, mode=mode, k=3, beta=0.5, packed=packed,
                               **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids_for(config):
    return torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))


def factored_entries(cersa_dir):
    manifest = json.load(open(os.path.join(cersa_dir, "cersa.json")))
    return {n: i for n, i in manifest["tensors"].items() if i["kind"] == "factored"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_forward_equals_dequantized_at_load(family, quant, mode, converted):
    config, src, cdir = converted(family, quant)
    ids = ids_for(config)
    outs = []
    for packed in (False, True):
        torch.manual_seed(7)  # core's A is drawn at load
        model = load(cdir, src, mode, packed)
        # The same trainable state in both (parameters are registered in the same order).
        perturb_trainable(model, torch.Generator().manual_seed(5))
        outs.append(logits(model, ids))
    entries = factored_entries(cdir)
    layers = [m for m in model.modules() if isinstance(m, cersa_torch.CersaLinear)]
    assert len(layers) == len(entries) > 0
    assert all(isinstance(m, PackedCersaLinear) and m.quant == quant for m in layers)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_packed_layers_apply_gguf_dequantized_factors(family, quant, converted):
    """Each packed layer's matrix is U·diag σ·Vᵀ from gguf-py's dequantization of the stored
    rows (numpy f64), transposed for a GPT-2 Conv1D layer."""
    config, src, cdir = converted(family, quant)
    manifest, stored = stored_tensors(cdir)
    model = load(cdir, src, "frozen", True)
    layers = {m.cersa_name: m for m in model.modules() if isinstance(m, PackedCersaLinear)}
    assert set(layers) == set(factored_entries(cdir))
    for name, layer in layers.items():
        m, n = manifest["tensors"][name]["matrix_shape"]
        w = (gguf_dequant_rows(stored[name + ".cersa_u"], quant, m).T
             * stored[name + ".cersa_s"].astype(np.float64)) @ \
            gguf_dequant_rows(stored[name + ".cersa_vt"], quant, n)
        assert layer.cersa_transposed == (family == "gpt2")
        got = layer.adapted_weight().numpy()
        want = w.T if layer.cersa_transposed else w
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_packed_model_holds_the_u8_rows(family, quant, converted):
    config, src, cdir = converted(family, quant)
    entries = factored_entries(cdir)
    # Σ r·(⌈m/32⌉ + ⌈n/32⌉)·block bytes, from the manifest alone.
    want = sum(i["rank"] * (-(-i["matrix_shape"][0] // 32) - (-i["matrix_shape"][1] // 32))
               * BLOCK[quant] for i in entries.values())
    f32 = sum(i["rank"] * sum(i["matrix_shape"]) * 4 for i in entries.values())
    packed, plain = load(cdir, src, "core", True), load(cdir, src, "core", False)
    held = {n: b for n, b in packed.named_buffers()}
    rows = [b for n, b in held.items() if n.endswith((".u_rows", ".vt_rows"))]
    assert all(b.dtype == torch.uint8 for b in rows)
    assert sum(b.numel() * b.element_size() for b in rows) == want
    assert sum(m.packed_bytes() for m in packed.modules()
               if isinstance(m, PackedCersaLinear)) == want
    # No float copy of a factor is held: per layer only σ (and the bias) besides the rows.
    for name, layer in packed.named_modules():
        if isinstance(layer, PackedCersaLinear):
            assert set(layer._buffers) <= {"u_rows", "vt_rows", "s", "bias"}, name
    # The unpacked model holds the f32 factors, r·(m+n)·4 bytes.
    assert sum(b.numel() * b.element_size() for n, b in plain.named_buffers()
               if n.endswith((".u", ".vt"))) == f32
    if family == "gpt2":  # every dimension a multiple of 32: exactly the block ratio
        assert want / f32 == BLOCK[quant] / 128
    else:  # the 80-value rows pad to 96
        assert want / f32 > BLOCK[quant] / 128


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["scale", "core", "cersa"])
def test_packed_training_step_and_adapter_round_trip(family, mode, converted, tmp_path):
    config, src, cdir = converted(family, "Q8_0")
    ids = ids_for(config)
    model = load(cdir, src, mode, True).train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in {"s", "a", "b", "c"} for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # core's A gets a gradient once B is off zero
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for n, p in model.named_parameters() if n in trainable)
        opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable, changed - trainable
    assert any(n.endswith(".u_rows") for n in before)  # …and those stayed as they were
    model.eval()
    trained = logits(model, ids)

    adapter = tmp_path / "adapter.safetensors"
    cersa_torch.save_adapter(model, adapter)
    fresh = load(cdir, src, mode, True)
    cersa_torch.load_adapter(fresh, adapter)
    torch.testing.assert_close(logits(fresh, ids), trained, rtol=0, atol=0)
    # Trained packed, applied to a dequantize-at-load model: the same function.
    plain = load(cdir, src, mode, False)
    cersa_torch.load_adapter(plain, adapter)
    torch.testing.assert_close(logits(plain, ids), trained, rtol=1e-5, atol=1e-6)
    # …and the plain model writes back the same adapter file contents.
    again = tmp_path / "again.safetensors"
    cersa_torch.save_adapter(plain, again)
    from safetensors.torch import load_file
    a, b = load_file(adapter), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_factors_mode_is_refused(converted):
    config, src, cdir = converted("llama", "Q8_0")
    with pytest.raises(ValueError, match="factors.*packed=False|packed=False.*factors"):
        load(cdir, src, "factors", True)
    with pytest.raises(ValueError, match="factors"):
        PackedCersaLinear(torch.zeros(2, 34, dtype=torch.uint8), torch.ones(2),
                          torch.zeros(2, 34, dtype=torch.uint8), "Q8_0", (32, 32),
                          mode="factors")
    # Without packing, factors mode still loads the quantized checkpoint.
    model = load(cdir, src, "factors", False)
    assert any(m.mode == "factors" for m in model.modules()
               if isinstance(m, cersa_torch.CersaLinear))


def test_packed_on_unquantized_checkpoint_warns_and_changes_nothing(converted):
    config, src, cdir = converted("llama", "F32")
    ids = ids_for(config)
    with pytest.warns(UserWarning, match="nothing is packed"):
        model = load(cdir, src, "core", True)
    assert not any(isinstance(m, PackedCersaLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), logits(load(cdir, src, "core", False), ids),
                               rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_bfloat16(family, converted):
    config, src, cdir = converted(family, "Q4_0")
    ids = ids_for(config)
    packed = load(cdir, src, "cersa", True, dtype=torch.bfloat16)
    plain = load(cdir, src, "cersa", False, dtype=torch.bfloat16)
    layer = next(m for m in packed.modules() if isinstance(m, PackedCersaLinear))
    assert layer.u.dtype == layer.vt.dtype == torch.bfloat16
    # The same bf16 values of U and Vᵀ in both models.
    ref = next(m for m in plain.modules() if getattr(m, "cersa_name", None) == layer.cersa_name)
    assert torch.equal(layer.u, ref.u) and torch.equal(layer.vt, ref.vt)
    got, want = logits(packed, ids), logits(plain, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # A gradient reaches the trainable cores in bf16.
    packed.train()(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in packed.parameters() if p.requires_grad)


def test_packed_layer_follows_model_dtype(converted):
    """``.to(float64)`` casts σ and the cores, not the U8 rows; the factors are then
    dequantized in float64 and the outputs match an unpacked model cast the same way."""
    config, src, cdir = converted("gpt2", "Q8_0")
    ids = ids_for(config)
    packed = load(cdir, src, "frozen", True).to(torch.float64)
    plain = load(cdir, src, "frozen", False).to(torch.float64)
    layer = next(m for m in packed.modules() if isinstance(m, PackedCersaLinear))
    assert layer.u_rows.dtype == torch.uint8 and layer.vt.dtype == torch.float64
    torch.testing.assert_close(logits(packed, ids), logits(plain, ids), rtol=1e-12, atol=1e-12)


def _shard_offset(path, tensor):
    """Byte offset of ``tensor``'s data in the safetensors file ``path``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return 8 + size + header[tensor]["data_offsets"][0]


def test_packed_factors_accessor(converted, tmp_path):
    import shutil

    config, src, cdir = converted("llama", "Q8_0")
    manifest, stored = stored_tensors(cdir)
    ckpt = cersa_torch.open_checkpoint(cdir)
    name = sorted(factored_entries(cdir))[0]
    rows_u, s, rows_vt, quant, (m, n) = ckpt.packed_factors(name)
    assert quant == "Q8_0" and [m, n] == manifest["tensors"][name]["matrix_shape"]
    assert np.array_equal(rows_u.numpy(), stored[name + ".cersa_u"])
    assert np.array_equal(rows_vt.numpy(), stored[name + ".cersa_vt"])
    assert np.array_equal(s.numpy(), stored[name + ".cersa_s"])
    dense = next(k for k, i in manifest["tensors"].items() if i["kind"] == "dense")
    with pytest.raises(ValueError, match="not factored"):
        ckpt.packed_factors(dense)
    f32 = converted("llama", "F32")[2]
    with pytest.raises(ValueError, match="not quantized"):
        cersa_torch.open_checkpoint(f32).packed_factors(name)

    # A NaN block scale in the stored rows: refused on first read when the shards were not
    # read at open (both accessors), naming the stored tensor.
    bad = tmp_path / "bad"
    shutil.copytree(cdir, bad)
    shard = os.path.join(bad, manifest["tensors"][name]["shard"])
    at = _shard_offset(shard, name + ".cersa_vt") + BLOCK["Q8_0"]  # row 0, block 1's scale
    with open(shard, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<e", float("nan")))
    for read in ("packed_factors", "factors"):
        ckpt = cersa_torch.open_checkpoint(bad, verify_checksums=False)
        with pytest.raises(cersa_torch.CersaFormatError, match="non-finite") as err:
            getattr(ckpt, read)(name)
        assert err.value.tensor == name + ".cersa_vt"
        assert "32 non-finite value(s)" in str(err.value), str(err.value)


# ---------------------------------------------------------------- gradients (training peak)
def _grads(model, ids):
    """d loss / d input embeddings, and d loss / d every trainable parameter (by name)."""
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=x, labels=ids).loss.backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_gradients_equal_unpacked(family, mode, dtype, converted):
    """The backward pass through the packed layers (factors dequantized again there, not
    saved) gives the gradients of the dequantize-at-load model: of the input and of every
    trainable tensor (σ, A and B, C; none in ``frozen`` mode)."""
    config, src, cdir = converted(family, "Q8_0")
    ids = ids_for(config)
    got = []
    for packed in (False, True):
        torch.manual_seed(7)
        model = load(cdir, src, mode, packed, dtype=dtype).eval()  # no dropout
        perturb_trainable(model, torch.Generator().manual_seed(5))  # B off zero, C off diag
        got.append(_grads(model, ids))
    (gx0, gp0), (gx1, gp1) = got
    assert any(isinstance(m, PackedCersaLinear) for m in model.modules())
    assert gp1.keys() == gp0.keys() and (mode == "frozen") == (not gp0)
    assert all(n.rpartition(".")[2] in {"s", "a", "b", "c"} for n in gp0)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    assert gx1.dtype == dtype and gx1.abs().max() > 0
    torch.testing.assert_close(gx1, gx0, **tol)
    for n in gp0:
        assert gp0[n] is not None and gp0[n].abs().max() > 0, n
        torch.testing.assert_close(gp1[n], gp0[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


def _saved_by_forward(layer, x):
    """Every tensor autograd saves for the backward pass during ``layer(x)``."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


def _factor_shaped(saved, layer, x):
    """The saved tensors shaped like U [m, r] or Vᵀ [r, n] (or transposed), those sharing
    storage with the input excepted."""
    m, n, r = layer.out_features, layer.in_features, layer.rank
    shapes = {(m, r), (r, m), (r, n), (n, r)}
    xs = x.untyped_storage().data_ptr()
    return [t for t in saved
            if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() != xs]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_forward_saves_no_dequantized_factor(family, mode, converted):
    """What autograd keeps of a packed layer's forward for the backward pass: no tensor of
    U's or Vᵀ's shape (only the U8 rows the layer holds anyway), where the plain layer keeps
    its U and Vᵀ buffers and the packed layer through ``CersaLinear.forward`` (the path
    before the autograd functions) keeps freshly dequantized copies of both."""
    config, src, cdir = converted(family, "Q8_0")
    torch.manual_seed(7)
    packed = load(cdir, src, mode, True)
    torch.manual_seed(7)
    plain = load(cdir, src, mode, False)
    ref = {m.cersa_name: m for m in plain.modules() if isinstance(m, cersa_torch.CersaLinear)}
    layers = [m for m in packed.modules() if isinstance(m, PackedCersaLinear)]
    assert layers
    for layer in layers:
        m, n, r = layer.out_features, layer.in_features, layer.rank
        tokens = next(t for t in range(7, 40) if 2 * t not in (m, n, r) and t not in (m, n, r))
        x = torch.randn(2, tokens, n, requires_grad=True)
        saved = _saved_by_forward(layer, x)
        assert _factor_shaped(saved, layer, x) == [], layer.cersa_name
        held = {b.untyped_storage().data_ptr() for b in (layer.u_rows, layer.vt_rows)}
        assert all(t.untyped_storage().data_ptr() in held for t in saved
                   if t.dtype == torch.uint8)
        # The test can fail: the plain layer saves U and Vᵀ (views of its buffers) …
        plain_saved = _factor_shaped(_saved_by_forward(ref[layer.cersa_name], x), layer, x)
        assert {tuple(t.shape) for t in plain_saved} == {(n, r), (r, m)}, layer.cersa_name
        # … and the packed layer through the parent's forward saves dequantized copies.
        old = []
        pack = lambda t: old.append(t) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cersa_torch.CersaLinear.forward(layer, x)
        old = _factor_shaped(old, layer, x)
        assert {tuple(t.shape) for t in old} == {(n, r), (r, m)}, layer.cersa_name
        assert all(t.dtype == torch.float32 for t in old)


def test_packed_factor_products_gradcheck():
    """The two autograd functions' gradients (and second gradients: each is the other's
    backward) against finite differences, in float64."""
    from cersa_torch._quant import row_bytes
    from cersa_torch.packed import _Rows, _RowsT

    g = torch.Generator().manual_seed(3)
    r, length = 3, 40
    rows = torch.randint(0, 256, (r, row_bytes("Q8_0", length)), dtype=torch.uint8,
                         generator=g).view(r, -1, 34)
    rows[..., :2] = torch.tensor([0.02], dtype=torch.float16).view(torch.uint8)  # finite d
    rows = rows.reshape(r, -1)
    x = torch.randn(2, 5, length, dtype=torch.float64, generator=g, requires_grad=True)
    z = torch.randn(2, 5, r, dtype=torch.float64, generator=g, requires_grad=True)
    for fn, inp in ((_RowsT.apply, x), (_Rows.apply, z)):
        f = lambda a, fn=fn: fn(a, rows, "Q8_0", length, torch.float64)  # noqa: E731
        assert torch.autograd.gradcheck(f, (inp,))
        assert torch.autograd.gradgradcheck(f, (inp,))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_gradients_under_autocast(family, converted):
    """Under CPU autocast (bf16) the products run in bf16 and their gradients come back in
    bf16: the backward pass dequantizes in the gradient's dtype, as the plain layer's matmul
    backward does with its autocast copies; the gradients are the plain model's."""
    config, src, cdir = converted(family, "Q8_0")
    ids = ids_for(config)
    got = []
    for packed in (False, True):
        torch.manual_seed(7)
        model = load(cdir, src, "core", packed).eval()
        perturb_trainable(model, torch.Generator().manual_seed(5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got.append(_grads(model, ids))
    (gx0, gp0), (gx1, gp1) = got
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
    assert gp0 and gp1.keys() == gp0.keys()
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-6, atol=1e-7)
