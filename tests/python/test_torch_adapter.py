"""Adapters trained in PyTorch are the Rust crate's adapter files: `save_adapter` →
`load_adapter` round-trips, and `cersa merge` folds them into a new checkpoint whose factors
are the SVD of the matrix the PyTorch layer applied (numpy float64 reference), for nn.Linear
(BERT) and transposed GPT-2 Conv1D layers, in every trainable mode."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402
from helpers import perturb_trainable  # noqa: E402


def tiny(family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=48, n_layer=1, n_head=4,
                                       n_positions=32, bos_token_id=0, eos_token_id=0,
                                       architectures=["GPT2LMHeadModel"])
    return transformers.BertConfig(vocab_size=96, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   architectures=["BertModel"])


def run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None
            else out.last_hidden_state).numpy()


def trained_tiny(family, mode, run_cersa, tmp_path, seed):
    """A tiny `family` model converted (forced factors, τ = 0.8), loaded in `mode` and moved
    as training would: (config, source dir, cersa dir, model, generator)."""
    config = tiny(family)
    torch.manual_seed(0)
    src = tmp_path / "src"
    getattr(transformers, config.architectures[0])(config).save_pretrained(src)
    base = tmp_path / "base"
    run_cersa("convert", "-q", "--force-factor", "--energy", "0.8", src, base)
    model = cersa_torch.load_hf(base, config=src, mode=mode, k=3, beta=0.5)
    g = torch.Generator().manual_seed(seed)
    perturb_trainable(model, g)
    return config, src, base, model, g


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("mode", ["core", "scale", "factors", "cersa"])
def test_adapter_round_trip_and_merge(family, mode, run_cersa, tmp_path):
    config, src, base, model, g = trained_tiny(family, mode, run_cersa, tmp_path, seed=2)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=g)
    trained = run(model, ids)
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    assert layers and all(v["mode"] == mode for v in layers.values())

    fresh = cersa_torch.load_hf(base, config=src, mode=mode, k=3, beta=0.5)
    assert np.abs(run(fresh, ids) - trained).max() > 0
    cersa_torch.load_adapter(fresh, adapter)
    np.testing.assert_array_equal(run(fresh, ids), trained)

    merged = tmp_path / "merged"
    run_cersa("merge", base, adapter, merged)
    manifest = json.load(open(merged / "cersa.json"))
    stored = {}
    for shard in manifest["shards"]:
        stored.update(load_file(str(merged / shard["file"])))
    layers_by_name = {m.cersa_name: m for m in model.modules()
                      if isinstance(m, cersa_torch.CersaLinear)}
    for name in layers:
        layer = layers_by_name[name]
        w = layer.adapted_weight().numpy()  # [out, in], what PyTorch applied
        if layer.cersa_transposed:
            w = w.T  # Conv1D: the checkpoint matrix is [in, out]
        info = manifest["tensors"][name]
        if info["kind"] == "dense":
            np.testing.assert_allclose(stored[name], w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
            continue
        sigma = np.linalg.svd(w, compute_uv=False)
        r = info["rank"]
        ms = stored[name + ".cersa_s"].astype(np.float64)
        np.testing.assert_allclose(ms, sigma[:r], rtol=1e-4, atol=1e-6 * sigma[0])
        u = stored[name + ".cersa_u"].astype(np.float64)
        vt = stored[name + ".cersa_vt"].astype(np.float64)
        rel = np.linalg.norm(w - (u * ms) @ vt) / np.linalg.norm(w)
        assert abs(rel - info["rel_error"]) < 1e-4, (name, rel, info["rel_error"])


@pytest.fixture(scope="session")
def candle_apply_bin():
    """The candle reference (loader/examples/candle_apply.rs): CERSA_CANDLE_APPLY_BIN, else
    target/release/examples/candle_apply, built here when missing."""
    import subprocess

    path = os.environ.get("CERSA_CANDLE_APPLY_BIN",
                          os.path.join(ROOT, "target", "release", "examples", "candle_apply"))
    if not os.path.exists(path):
        subprocess.run(["cargo", "build", "--release", "-p", "cersa-loader", "--features",
                        "candle", "--example", "candle_apply"], cwd=ROOT, check=True)
    return path


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("mode", ["core", "scale", "factors", "cersa"])
def test_candle_and_torch_agree_on_the_same_adapter(family, mode, run_cersa, candle_apply_bin,
                                                     tmp_path):
    import subprocess

    config, src, base, model, g = trained_tiny(family, mode, run_cersa, tmp_path, seed=5)
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    by_name = {m.cersa_name: m for m in model.modules()
               if isinstance(m, cersa_torch.CersaLinear)}
    checked = 0
    for name, info in layers.items():
        layer = by_name[name]
        m, n = info["matrix_shape"]
        x = torch.randn(5, n, generator=g)
        xp, yp = tmp_path / "x.f32", tmp_path / "y.f32"
        x.numpy().astype("<f4").tofile(xp)
        p = subprocess.run([candle_apply_bin, str(base), str(adapter), name, "5", str(xp),
                            str(yp)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        y_candle = np.fromfile(yp, dtype="<f4").reshape(5, m)
        with torch.no_grad():
            if layer.cersa_transposed:
                # Conv1D: the checkpoint matrix is [in, out]; candle applies it as x·Wᵀ.
                want = (x.double() @ layer.adapted_weight().double()).numpy()
            else:
                y = layer(x)
                want = (y if layer.bias is None else y - layer.bias).double().numpy()
        scale = np.abs(want).max()
        assert np.abs(y_candle - want).max() <= 1e-5 * scale, (name, mode)
        checked += 1
    assert checked == len(layers) > 0
