"""`load_hf` on a model whose experts transformers keeps fused in 3-D parameters.

A tiny random gpt-oss built by transformers (`mlp.experts.gate_up_proj` [E, H, 2I] and
`down_proj` [E, I, H], saved as such by `save_pretrained`) with planted per-expert ranks (and
one flat, dense expert per tensor) is converted at τ = 0.9: both fused tensors become
`experts` entries. `cersa_torch.load_hf` must then give the logits of transformers' own model
loaded from `cersa export --to safetensors --dtype f32` (Rust's recomposition), with the
experts frozen in every mode.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GptOssConfig"):
    pytest.skip("transformers without gpt-oss", allow_module_level=True)

import cersa_torch  # noqa: E402
from helpers import planted_torch as planted  # noqa: E402

E, H, I = 4, 32, 24
FUSED = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, cersa_bin):
    cfg = transformers.GptOssConfig(
        vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for attr in FUSED:
                p = getattr(layer.mlp.experts, attr)
                p.copy_(torch.stack([planted(gen, 0 if e == 0 else e, *p.shape[1:])
                                     for e in range(E)]))
    d = tmp_path_factory.mktemp("gptoss")
    model.save_pretrained(d / "src")
    for args in (["convert", d / "src", d / "ckpt", "--energy", "0.9"],
                 ["export", d / "ckpt", d / "export", "--to", "safetensors", "--dtype", "f32"]):
        p = subprocess.run([cersa_bin, *map(str, args), "--quiet"], capture_output=True,
                           text=True)
        assert p.returncode == 0, (args, p.stderr)
    return model, d


def test_fused_experts_are_experts_entries(gpt_oss):
    _, d = gpt_oss
    tensors = json.load(open(d / "ckpt" / "cersa.json"))["tensors"]
    for layer in range(2):
        for attr in FUSED:
            info = tensors[f"model.layers.{layer}.mlp.experts.{attr}"]
            assert info["kind"] == "experts"
            kinds = [x["kind"] for x in info["experts"]]
            ranks = [x.get("rank") for x in info["experts"]]
            # planted: expert 0 flat (dense), expert e of rank e
            assert kinds == ["dense", "factored", "factored", "factored"], kinds
            assert ranks == [None, 1, 2, 3], ranks
        # the 2-D biases of the experts stay ordinary dense tensors
        assert tensors[f"model.layers.{layer}.mlp.experts.down_proj_bias"]["kind"] == "dense"


@pytest.mark.parametrize("mode", ["frozen", "core"])
def test_load_hf_logits_match_exported_model(gpt_oss, mode):
    model, d = gpt_oss
    ref = transformers.GptOssForCausalLM.from_pretrained(d / "export").eval()
    ours = cersa_torch.load_hf(d / "ckpt", mode=mode, train_dense=True)
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 14, 3, 8, 60]])
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
        orig = model(ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    # the experts were truncated: the source model differs by far more
    assert (orig - want).abs().max().item() > 1e-3 * scale
    for layer in range(2):
        for attr in FUSED:
            name = f"model.layers.{layer}.mlp.experts.{attr}"
            p = ours.get_parameter(name)
            assert not p.requires_grad, name
            exported = ref.get_parameter(name)
            torch.testing.assert_close(p.detach(), exported, rtol=0,
                                       atol=2e-6 * exported.abs().max().item())


def test_load_hf_refuses_mismatched_expert_shape(gpt_oss, tmp_path):
    """A config whose experts do not match the checkpoint's is an error naming both."""
    _, d = gpt_oss
    cfg = transformers.AutoConfig.from_pretrained(d / "ckpt")
    cfg.intermediate_size = I + 8
    with pytest.raises(ValueError, match="stacked experts tensor of shape"):
        cersa_torch.load_hf(d / "ckpt", config=cfg)
