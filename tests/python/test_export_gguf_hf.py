"""`cersa export --to gguf` of checkpoints converted from Hugging Face Llama directories,
checked with the real consumers: transformers' own GGUF loader (which maps llama.cpp's names
back and un-permutes the Q/K rows) gives the same logits as transformers loading the
`--to safetensors` export of the same checkpoint, its GGUF tokenizer encodes like the
original, and gguf-py reads the hyperparameters llama.cpp needs. Architectures and settings
the mapping does not cover are refused with an error naming them."""
import json
import os

import gguf
import numpy as np
import pytest
from helpers import smollm2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("The history of the printing press begins when movable type made books cheaper to "
        "produce and ideas faster to spread across Europe. Printers copied grammars, bibles "
        "and almanacs; scholars wrote letters about them.")


def byte_level_tokenizer(vocab_size=300):
    """A byte-level BPE tokenizer (GPT-2 style) trained here on a few sentences."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")


def tiny_llama(path, family="llama", **config):
    """A random Llama (or Qwen2: Q/K/V biases) with grouped-query attention (4 heads, 2
    key/value heads) and its tokenizer, saved as a Hugging Face directory."""
    tok = byte_level_tokenizer()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    cfg = config_class(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **config)
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so logits differ
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def load_gguf(out):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file="model.gguf", dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_llama_gguf_export_equals_the_safetensors_export(family, run_cersa, tmp_path):
    src, ck = tmp_path / "hf", tmp_path / "ck"
    tok = tiny_llama(src, family)
    # Layer 1's attention stays dense: its Q/K rows are permuted from stored bytes, layer
    # 0's from recomposed factors.
    run_cersa("convert", src, ck, "--force-factor", "--energy", "0.9",
              "--exclude", "*layers.1.self_attn*", "-q")
    manifest = json.load(open(ck / "cersa.json"))
    assert manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"].get("rank")
    assert not manifest["tensors"]["model.layers.1.self_attn.k_proj.weight"].get("rank")
    gg, st = tmp_path / "gguf", tmp_path / "st"
    report = json.loads(run_cersa("export", ck, gg, "--to", "gguf", "--json", "-q").stdout)
    run_cersa("export", ck, st, "-q")
    assert report["tensors"] == len(manifest["tensors"])
    assert any("tokenizer.ggml.pre" in n for n in report["notes"])

    r = gguf.GGUFReader(str(gg / "model.gguf"))
    value = lambda k: r.fields[k].contents()  # noqa: E731
    assert value("general.architecture") == family
    assert value(f"{family}.attention.head_count") == 4
    assert value(f"{family}.attention.head_count_kv") == 2
    assert value(f"{family}.block_count") == 2
    assert value(f"{family}.rope.dimension_count") == 16
    assert value(f"{family}.rope.freq_base") == 5000.0
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight",
            "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert ("blk.0.attn_k.bias" in names) == (family == "qwen2")

    ids = tok(TEXT, return_tensors="pt").input_ids
    exported = transformers.AutoModelForCausalLM.from_pretrained(st, dtype=torch.float32).eval()
    from_gguf = load_gguf(gg)
    a, b = logits(exported, ids), logits(from_gguf, ids)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    # The stored Q/K rows are llama.cpp's order: for llama, convert_hf_to_gguf.py's
    # LlamaModel.permute (numpy reshape/swapaxes) of the safetensors export's weights, K over
    # the 2 KV heads; qwen2 keeps transformers' order (llama.cpp runs it with NeoX rope).
    from safetensors.numpy import load_file
    plain = load_file(str(st / "model.safetensors"))

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    stored = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape))) for t in r.tensors}
    for layer in (0, 1):
        for proj, short, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
            w = plain[f"model.layers.{layer}.self_attn.{proj}.weight"]
            got = stored[f"blk.{layer}.{short}.weight"]
            if family == "llama":
                assert np.array_equal(got, permute(w, heads)), (layer, proj)
                assert not np.array_equal(got, w)
            else:
                assert np.array_equal(got, w), (layer, proj)

    gtok = transformers.AutoTokenizer.from_pretrained(str(gg), gguf_file="model.gguf")
    assert gtok(TEXT).input_ids == tok(TEXT).input_ids


def test_gguf_export_refuses_what_it_does_not_map(run_cersa, tmp_path):
    # Llama 3's rope scaling needs a rope_freqs tensor llama.cpp's converter computes.
    src = tmp_path / "rope"
    tiny_llama(src, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64})
    run_cersa("convert", src, tmp_path / "ck1", "-q")
    p = run_cersa("export", tmp_path / "ck1", tmp_path / "o1", "--to", "gguf", check=False)
    assert p.returncode == 2 and "rope_scaling type \"llama3\"" in p.stderr, p.stderr
    assert not (tmp_path / "o1").exists()

    # Another architecture.
    gpt2 = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(gpt2)
    run_cersa("convert", gpt2, tmp_path / "ck2", "-q")
    p = run_cersa("export", tmp_path / "ck2", tmp_path / "o2", "--to", "gguf", check=False)
    assert p.returncode == 2 and "GPT2LMHeadModel" in p.stderr and "Llama family" in p.stderr

    # A tokenizer with ids beyond config.json's vocab_size (no embedding row for them).
    small = tmp_path / "small"
    tiny_llama(small)
    cfg = json.load(open(small / "config.json"))
    cfg["vocab_size"] -= 10
    json.dump(cfg, open(small / "config.json", "w"))
    run_cersa("convert", small, tmp_path / "ck4", "-q")
    p = run_cersa("export", tmp_path / "ck4", tmp_path / "o4", "--to", "gguf", check=False)
    assert p.returncode == 2 and "beyond config.json's vocab_size" in p.stderr, p.stderr

    # A Llama without its tokenizer.
    bare = tmp_path / "bare"
    tiny_llama(bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bare / f).exists():
            os.remove(bare / f)
    run_cersa("convert", bare, tmp_path / "ck3", "-q")
    p = run_cersa("export", tmp_path / "ck3", tmp_path / "o3", "--to", "gguf", check=False)
    assert p.returncode == 2 and "tokenizer.json" in p.stderr, p.stderr


@pytest.mark.skipif(not os.path.exists(smollm2()), reason="SmolLM2 GGUF not downloaded "
                    "(python3 bench/fetch_smollm2.py)")
def test_smollm2_hf_directory_exports_to_gguf(run_cersa, tmp_path):
    """The real SmolLM2-135M as a Hugging Face directory (transformers' GGUF loader →
    save_pretrained), converted, exported to GGUF: transformers loads it with the logits of
    the safetensors export of the same checkpoint."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from quality import smollm2_dense  # GGUF → dense Hugging Face directory (f32)
    src = smollm2_dense(str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ck = tmp_path / "ck"
    run_cersa("convert", src, ck, "--energy", "0.95", "-q")
    run_cersa("export", ck, tmp_path / "gguf", "--to", "gguf", "-q")
    run_cersa("export", ck, tmp_path / "st", "-q")
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]
    a = logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "st", dtype=torch.float32).eval(), ids)
    b = logits(load_gguf(tmp_path / "gguf"), ids)
    assert np.isfinite(b.numpy()).all()
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), float((a - b).abs().max())
    gtok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "gguf"), gguf_file="model.gguf")
    assert gtok(TEXT).input_ids == tok(TEXT).input_ids
