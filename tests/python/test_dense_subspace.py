"""Layers a checkpoint keeps dense (`no-saving`) get a trainable path in `load_hf` (issue 16):
the exact W frozen plus the mode's adaptation in W's own top-r subspace, computed at load.
Checked against numpy float64: the basis and its rank (the converter's rule), a start that is
the dense model bit for bit, adapters that round-trip with their basis, and `cersa merge` /
`cersa export` folding W + U·(M − diag σ)·Vᵀ into the dense tensor, and candle giving the
PyTorch layer's outputs for the same adapter."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402
from cersa_torch.dense import DenseSubspaceLinear  # noqa: E402
from helpers import perturb_trainable, stored_tensors  # noqa: E402
from test_torch_adapter import candle_apply_bin  # noqa: E402,F401 (the fixture)

MODES = ["core", "scale", "cersa"]


def tiny(family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=48, n_layer=1, n_head=4,
                                       n_positions=32, bos_token_id=0, eos_token_id=0,
                                       architectures=["GPT2LMHeadModel"])
    return transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=32,
                                    architectures=["LlamaForCausalLM"])


# Llama: q_proj factored at rank 4, the MLP at τ = 0.95 and the rest at τ = 0.9: random
# weights have flat spectra, so every matrix but q_proj is stored dense (`no-saving`).
RULES = {"llama": ["--rank", "*q_proj*=4", "--energy", "*mlp*=0.95", "--energy", "0.9"],
         "gpt2": ["--energy", "0.9", "--min-rank", "3", "--rank-multiple", "4"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, cersa_bin):
    import subprocess

    out = {}
    for family in ("llama", "gpt2"):
        d = tmp_path_factory.mktemp(family)
        config = tiny(family)
        torch.manual_seed(0)
        getattr(transformers, config.architectures[0])(config).save_pretrained(d / "src")
        subprocess.run([cersa_bin, "convert", "-q", *RULES[family], d / "src", d / "base"],
                       check=True)
        out[family] = (config, d / "base")
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def numpy_rank(sigma, norm2, tau, min_rank=1, multiple=1):
    cum = np.cumsum(sigma.astype(np.float64) ** 2) / norm2
    r = max(int(np.argmax(cum >= tau)) + 1 if (cum >= tau).any() else len(sigma), min_rank)
    return min(-(-r // multiple) * multiple, len(sigma))


def dense_layers(model):
    return {m.cersa_name: m for m in model.modules() if isinstance(m, DenseSubspaceLinear)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_layers_start_exact_in_their_top_subspace(family, bases):
    config, base = bases[family]
    manifest, stored = stored_tensors(base)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    frozen = cersa_torch.load_hf(base, mode="frozen")
    assert not dense_layers(cersa_torch.load_hf(base, mode="frozen"))
    assert not dense_layers(cersa_torch.load_hf(base, mode="core", k=3, dense_subspace=False))
    want_dense = {n for n, t in manifest["tensors"].items() if t.get("reason") == "no-saving"}
    assert len(want_dense) >= 4
    for mode in MODES:
        model = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
        layers = dense_layers(model)
        assert set(layers) == want_dense, mode
        # ΔM starts at exactly 0: the dense model's outputs bit for bit.
        np.testing.assert_array_equal(logits(model, ids), logits(frozen, ids))
        assert all(any(p.requires_grad for p in m.parameters()) for m in layers.values())
    cfg = manifest["config"]
    for name, layer in layers.items():
        w = stored[name].astype(np.float64)  # checkpoint orientation [m, n]
        u_np, s_np, vt_np = np.linalg.svd(w, full_matrices=False)
        norm2 = float((w * w).sum())
        tau = 0.95 if family == "llama" and "mlp" in name else cfg["energy"]
        r = numpy_rank(s_np, norm2, tau, cfg["min_rank"], cfg["rank_multiple"])
        assert layer.rank == r, (name, layer.rank, r)
        u, vt = ((layer.vt.T, layer.u.T) if layer.cersa_transposed else (layer.u, layer.vt))
        u, vt = u.double().numpy(), vt.double().numpy()
        np.testing.assert_allclose(layer.s0.double().numpy(), s_np[:r], rtol=1e-6)
        # The same singular vectors (up to the sign rule: largest |entry| of uᵢ positive).
        for i in range(r):
            assert u[np.abs(u[:, i]).argmax(), i] > 0
            assert abs(abs(u[:, i] @ u_np[:, i]) - 1) < 1e-4, (name, i)
        np.testing.assert_allclose((u * s_np[:r]) @ vt, (u_np[:, :r] * s_np[:r]) @ vt_np[:r],
                                   atol=1e-5 * s_np[0])


def numpy_adapted(adapter_path, name, w):
    """W + U·(M − diag σ)·Vᵀ from the adapter file's own tensors, numpy float64."""
    with safe_open(str(adapter_path), framework="np") as f:
        info = json.loads(f.metadata()["layers"])[name]
        t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()
             if k.startswith(name + ".")}
    u, s, vt = t[name + ".adapter_u"], t[name + ".adapter_sigma"], t[name + ".adapter_vt"]
    r = info["rank"]
    if info["mode"] == "scale":
        delta = np.diag(t[name + ".adapter_s"] - s)
    elif info["mode"] == "core":
        delta = (t[name + ".adapter_a"] @ t[name + ".adapter_b"]).T
    else:
        c = t[name + ".adapter_c"]
        delta = np.zeros((r, r))
        delta[:len(c), :len(c)] = c - np.diag(s[:len(c)])
    return w + u @ delta @ vt


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_dense_adapter_round_trips_and_merges(family, mode, bases, run_cersa, tmp_path):
    config, base = bases[family]
    model = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
    g = torch.Generator().manual_seed(3)
    perturb_trainable(model, g)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    trained = logits(model, ids)
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    dense = {n for n, v in layers.items() if v.get("base") == "dense"}
    assert dense == set(dense_layers(model))
    with safe_open(str(adapter), framework="np") as f:
        assert f.metadata()["adapter_version"] == "2"

    # A fresh model computes its own basis; the adapter's replaces it.
    fresh = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
    assert np.abs(logits(fresh, ids) - trained).max() > 0
    cersa_torch.load_adapter(fresh, adapter)
    np.testing.assert_array_equal(logits(fresh, ids), trained)
    with pytest.raises(ValueError, match="model layer 'missing'|no CersaLinear"):
        cersa_torch.load_adapter(cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5,
                                                     dense_subspace=False), adapter)

    _, src = stored_tensors(base)
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    report = json.loads(run_cersa("merge", "--json", base, adapter, merged).stdout)
    assert {l["name"] for l in report["layers"] if l.get("dense")} == dense
    run_cersa("export", "-q", base, exported, "--adapter", adapter, "--dtype", "f32")
    man, out = stored_tensors(merged)
    exp = load_file(str(exported / "model.safetensors"))
    by_name = dense_layers(model)
    for name in dense:
        assert man["tensors"][name]["kind"] == "dense"
        want = numpy_adapted(adapter, name, src[name].astype(np.float64))
        assert np.abs(want - src[name]).max() > 1e-6, "the update is not empty"
        tol = dict(rtol=0, atol=2e-7 * np.abs(want).max())   # one f32 rounding
        np.testing.assert_allclose(out[name], want, **tol)
        np.testing.assert_allclose(exp[name], want, **tol)
        layer = by_name[name]
        w = layer.adapted_weight().numpy()
        np.testing.assert_allclose(w.T if layer.cersa_transposed else w, want,
                                   rtol=0, atol=1e-5 * np.abs(want).max())
    # Tensors the adapter does not name are copied byte for byte.
    for name, info in man["tensors"].items():
        if info["kind"] == "dense" and name not in dense:
            np.testing.assert_array_equal(out[name], src[name])


def test_factored_only_adapters_stay_version_1(bases, tmp_path):
    _, base = bases["llama"]
    model = cersa_torch.load_hf(base, mode="core", k=3, dense_subspace=False)
    perturb_trainable(model, torch.Generator().manual_seed(4))
    adapter = tmp_path / "a.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    assert list(layers) == ["model.layers.0.self_attn.q_proj.weight"]
    assert "base" not in layers["model.layers.0.self_attn.q_proj.weight"]
    with safe_open(str(adapter), framework="np") as f:
        assert f.metadata()["adapter_version"] == "1"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_candle_and_torch_agree_on_dense_base_layers(family, mode, bases, candle_apply_bin,
                                                      tmp_path):
    """loader/examples/candle_apply.rs builds a dense-base layer from the checkpoint's W and
    the adapter's basis (`CersaLinear::dense_base`) and gives the PyTorch layer's outputs."""
    import subprocess

    _, base = bases[family]
    model = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
    g = torch.Generator().manual_seed(6)
    perturb_trainable(model, g)
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    by_name = dense_layers(model)
    assert by_name
    for name, layer in by_name.items():
        m, n = layers[name]["matrix_shape"]
        x = torch.randn(5, n, generator=g)
        xp, yp = tmp_path / "x.f32", tmp_path / "y.f32"
        x.numpy().astype("<f4").tofile(xp)
        p = subprocess.run([candle_apply_bin, str(base), str(adapter), name, "5", str(xp),
                            str(yp)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        y_candle = np.fromfile(yp, dtype="<f4").reshape(5, m)
        with torch.no_grad():
            if layer.cersa_transposed:  # Conv1D: candle applies the [in, out] matrix as x·Wᵀ
                want = (x.double() @ layer.adapted_weight()).numpy()
            else:
                y = layer(x)
                want = (y if layer.bias is None else y - layer.bias).double().numpy()
        assert np.abs(y_candle - want).max() <= 1e-5 * np.abs(want).max(), (name, mode)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_export_of_dense_base_layers(family, bases, run_cersa, tmp_path):
    """`export --to peft` writes a dense-base layer's update U·ΔM·Vᵀ as its LoRA: on the
    plain export, PEFT gives the trained model's outputs."""
    peft = pytest.importorskip("peft")
    config, base = bases[family]
    model = cersa_torch.load_hf(base, mode="core", k=3)
    g = torch.Generator().manual_seed(7)
    perturb_trainable(model, g)
    adapter, plain, lora = tmp_path / "a.safetensors", tmp_path / "plain", tmp_path / "lora"
    layers = cersa_torch.save_adapter(model, adapter)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    trained = logits(model, ids)
    run_cersa("export", "-q", base, plain)
    report = json.loads(run_cersa("export", "--to", "peft", "--adapter", adapter, "--json",
                                  base, lora).stdout)
    assert {m["module"] + ".weight" for m in report["modules"]} == set(layers)
    assert all(m["rank"] == 3 for m in report["modules"])
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(plain), str(lora)).eval()
    got = logits(peft_model, ids)
    assert np.abs(got - trained).max() <= 1e-5 * np.abs(trained).max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_bases_replace_the_svds_at_load(family, bases, tmp_path, monkeypatch):
    """save_bases → load_hf(bases=) builds the same layers without one SVD; an adapter file
    serves as well; a file for another checkpoint is refused."""
    config, base = bases[family]
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model = cersa_torch.load_hf(base, mode="cersa", beta=0.5)
    n = cersa_torch.save_bases(model, tmp_path / "bases.safetensors")
    assert n == len(dense_layers(model)) >= 4
    perturb_trainable(model, torch.Generator().manual_seed(3))
    cersa_torch.save_adapter(model, tmp_path / "adapter.safetensors")

    def no_svd(*a, **kw):
        raise AssertionError("an SVD was computed")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    for source in ("bases.safetensors", "adapter.safetensors"):
        again = cersa_torch.load_hf(base, mode="cersa", beta=0.5, bases=tmp_path / source)
        for name, layer in dense_layers(again).items():
            want = dense_layers(model)[name]
            assert layer.rank == want.rank and layer.c.shape == want.c.shape, name
            for attr in ("u", "vt", "s0", "weight"):
                torch.testing.assert_close(getattr(layer, attr), getattr(want, attr),
                                           rtol=0, atol=0)
    cersa_torch.load_adapter(again, tmp_path / "adapter.safetensors")
    np.testing.assert_array_equal(logits(again, ids), logits(model, ids))
    other = "gpt2" if family == "llama" else "llama"
    with pytest.raises(ValueError, match="another CERSA checkpoint"):
        cersa_torch.load_hf(bases[other][1], mode="core", k=3,
                            bases=tmp_path / "bases.safetensors")


def test_bases_file_with_wrong_shapes_or_nan_is_refused(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    config, base = bases["llama"]
    model = cersa_torch.load_hf(base, mode="core", k=3)
    cersa_torch.save_bases(model, tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    good = load_file(tmp_path / "b.safetensors")
    name = sorted(k for k in good if k.endswith(".adapter_u"))[0][:-len(".adapter_u")]
    for what, edit, msg in (
            ("shape", lambda t: t[:, :-1].contiguous(), "do not fit"),
            ("nan", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "NaN")):
        bad = dict(good)
        bad[f"{name}.adapter_u"] = edit(good[f"{name}.adapter_u"])
        save_file(bad, tmp_path / f"{what}.safetensors", metadata=meta)
        with pytest.raises(ValueError, match=msg) as e:
            cersa_torch.load_hf(base, mode="core", k=3, bases=tmp_path / f"{what}.safetensors")
        assert name in str(e.value) and f"{what}.safetensors" in str(e.value)
