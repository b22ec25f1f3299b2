"""`load_hf` on per-expert (Mixtral-style) MoE checkpoints: experts factored and trainable.

Tiny random Mixtral and Qwen2-MoE models are built by transformers itself, with planted
per-expert ranks (expert e of rank e, expert 0 flat so the converter keeps it dense) in the
experts' fused parameters, and saved by `save_pretrained`, which in transformers 5 writes the
per-expert layout of real checkpoints (`block_sparse_moe.experts.N.w1|w2|w3.weight`,
`mlp.experts.N.gate_proj|up_proj|down_proj.weight`; checked below). After `cersa convert
--energy 0.9`, `cersa_torch.load_hf` must give the logits of transformers' own model loaded
from `cersa export --to safetensors --dtype f32` (Rust's recomposition, merged into
`gate_up_proj`/`down_proj` by transformers' converters), without allocating the fused
tensors; a `core` step must train only the adapters; and the adapter must fold back
(`export --adapter`, `merge` → `export`) into a model transformers runs with the trained
logits.
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
if not hasattr(transformers, "MixtralConfig") or not hasattr(transformers, "Qwen2MoeConfig"):
    pytest.skip("transformers without Mixtral/Qwen2-MoE", allow_module_level=True)
try:
    from transformers.core_model_loading import WeightConverter  # noqa: F401
except ImportError:
    pytest.skip("transformers < 5 keeps per-expert modules", allow_module_level=True)

import cersa_torch  # noqa: E402
from helpers import planted_torch as planted  # noqa: E402
from cersa_torch.dense import DenseSubspaceLinear  # noqa: E402
from cersa_torch.moe import CersaExperts, DenseExpertLinear  # noqa: E402
from safetensors import safe_open  # noqa: E402

E, H, I = 4, 32, 24
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 14, 3, 8, 60], [4, 4, 90, 17, 23, 6, 41, 11, 0, 2]])


def config(family):
    common = dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=I, num_local_experts=E,
                                          head_dim=8, **common)
    return transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=I,
                                       shared_expert_intermediate_size=40, num_experts=E,
                                       decoder_sparse_step=1, mlp_only_layers=[], **common)


#: The per-expert checkpoint name of (layer, expert, role) as the family's checkpoints have it.
NAMES = {
    "mixtral": lambda l, e, role: f"model.layers.{l}.block_sparse_moe.experts.{e}."
                                  f"{dict(gate='w1', up='w3', down='w2')[role]}.weight",
    "qwen2_moe": lambda l, e, role: f"model.layers.{l}.mlp.experts.{e}.{role}_proj.weight",
}
ROLE_RANK = {"gate": 0, "up": 1, "down": 2}  # expert e ≥ 1, role → rank e + 1 + this


def rank_of(e, role):
    return 0 if e == 0 else e + 1 + ROLE_RANK[role]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tmp_path_factory, cersa_bin):
    family = request.param
    cfg = config(family)
    torch.manual_seed(0)
    cls = (transformers.MixtralForCausalLM if family == "mixtral"
           else transformers.Qwen2MoeForCausalLM)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for e in range(E):
                ex.gate_up_proj[e, :I] = planted(gen, rank_of(e, "gate"), I, H)
                ex.gate_up_proj[e, I:] = planted(gen, rank_of(e, "up"), I, H)
                ex.down_proj[e] = planted(gen, rank_of(e, "down"), H, I)
    d = tmp_path_factory.mktemp(family)
    model.save_pretrained(d / "src")
    for args in (["convert", d / "src", d / "ckpt", "--energy", "0.9"],
                 ["export", d / "ckpt", d / "export", "--to", "safetensors", "--dtype", "f32"]):
        p = subprocess.run([cersa_bin, *map(str, args), "--quiet"], capture_output=True,
                           text=True)
        assert p.returncode == 0, (args, p.stderr)
    ref = cls.from_pretrained(d / "export").eval()
    return family, cls, model, ref, d


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_source_and_checkpoint_are_per_expert(moe):
    family, _, _, _, d = moe
    with safe_open(str(d / "src" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert not any("gate_up_proj" in k for k in keys), "save_pretrained wrote fused experts"
    tensors = json.load(open(d / "ckpt" / "cersa.json"))["tensors"]
    for layer in range(2):
        for e in range(E):
            for role in ROLE_RANK:
                name = NAMES[family](layer, e, role)
                assert name in keys
                info = tensors[name]
                if e == 0:
                    assert (info["kind"], info.get("reason")) == ("dense", "no-saving"), name
                else:
                    assert (info["kind"], info["rank"]) == ("factored", rank_of(e, role)), name


@pytest.mark.parametrize("mode", ["frozen", "core", "cersa", "factors"])
def test_load_hf_logits_match_transformers_on_the_export(moe, mode):
    family, _, model, ref, d = moe
    ours = cersa_torch.load_hf(d / "ckpt", mode=mode, k=2)
    want, got, orig = logits(ref), logits(ours), logits(model)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    # the experts were truncated: the source model differs by far more
    assert (orig - want).abs().max().item() > 1e-3 * scale
    for layer in range(2):
        experts = ours.model.layers[layer].mlp.experts
        assert isinstance(experts, CersaExperts)
        for e in range(E):
            for role in ROLE_RANK:
                lin = getattr(experts, f"{role}_proj")[e]
                if e == 0:  # kept dense: its subspace adapter in the modes that have one
                    dense_sub = mode in ("core", "cersa")
                    assert isinstance(lin, DenseSubspaceLinear if dense_sub
                                      else DenseExpertLinear)
                else:
                    assert type(lin) is cersa_torch.CersaLinear and lin.mode == mode
                    assert lin.rank == rank_of(e, role)
                if hasattr(lin, "cersa_name"):
                    assert lin.cersa_name == NAMES[family](layer, e, role)
                    assert lin.cersa_transposed is False


def test_no_dense_expert_tensor_is_allocated(moe):
    family, _, _, _, d = moe
    ours = cersa_torch.load_hf(d / "ckpt", mode="frozen")
    tensors = dict(ours.named_parameters())
    tensors.update(ours.named_buffers())
    fused = [n for n, t in tensors.items() if t.ndim == 3 or "gate_up_proj" in n]
    assert not fused, fused
    for layer in range(2):
        experts = ours.model.layers[layer].mlp.experts
        held = sum(t.numel() for t in list(experts.parameters()) + list(experts.buffers()))
        # factors r·(m+n+1) per factored expert matrix, W for expert 0's three
        want = 3 * I * H + sum(rank_of(e, role) * (I + H + 1)
                                   for e in range(1, E) for role in ROLE_RANK)
        assert held == want, (held, want)
        assert held < E * 3 * I * H / 2   # under half of the dense experts


def test_packed_q8_0_experts_hold_their_rows_and_give_the_same_logits(moe, run_cersa, tmp_path):
    """--dtype q8_0 with load_hf(packed=True): every factored expert matrix is a
    PackedCersaLinear holding U8 rows, with the logits of the same checkpoint dequantized
    at load."""
    _, _, _, _, d = moe
    run_cersa("convert", "-q", "--energy", "0.9", "--dtype", "q8_0", d / "src", tmp_path / "q8")
    packed = cersa_torch.load_hf(tmp_path / "q8", mode="core", k=2, packed=True)
    plain = cersa_torch.load_hf(tmp_path / "q8", mode="core", k=2)
    experts = packed.model.layers[0].mlp.experts
    kinds = [type(m).__name__ for role in ("gate_proj", "up_proj", "down_proj")
             for m in getattr(experts, role)]
    assert kinds.count("PackedCersaLinear") == 3 * (E - 1), kinds
    for model in (packed, plain):  # the same non-zero cores in both
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
    torch.testing.assert_close(logits(packed), logits(plain), rtol=1e-5, atol=1e-6)


def test_core_step_trains_only_adapters(moe):
    family, _, _, _, d = moe
    ours = cersa_torch.load_hf(d / "ckpt", mode="core", k=2)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in ("a", "b") for n in trainable), trainable
    # every expert of every role has its adapter
    for layer in range(2):
        for role in ROLE_RANK:
            for e in range(E):
                assert f"model.layers.{layer}.mlp.experts.{role}_proj.{e}.b" in trainable
    before = {n: t.clone() for n, t in ours.state_dict().items()}
    start = logits(ours)
    train(ours)
    after = ours.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable, changed - trainable
    assert any(".experts." in n for n in changed)
    assert (logits(ours) - start).abs().max().item() > 1e-4 * start.abs().max().item()


def train(model, steps=3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(IDS, labels=IDS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("mode", ["core", "cersa"])
def test_adapter_folds_back_into_a_transformers_model(moe, mode, run_cersa, tmp_path):
    family, cls, _, _, d = moe
    ours = cersa_torch.load_hf(d / "ckpt", mode=mode, k=2)
    train(ours)
    trained = logits(ours)
    adapter = tmp_path / "adapter.safetensors"
    layers = cersa_torch.save_adapter(ours, adapter)
    assert NAMES[family](1, 3, "up") in layers and NAMES[family](0, 0, "down") in layers
    scale = trained.abs().max().item()

    # export --adapter folds it exactly (no re-truncation)
    run_cersa("export", "-q", d / "ckpt", tmp_path / "folded", "--adapter", adapter,
              "--to", "safetensors", "--dtype", "f32")
    folded = logits(cls.from_pretrained(tmp_path / "folded").eval())
    assert (folded - trained).abs().max().item() <= 1e-5 * scale

    # merge re-truncates at τ = 0.9. An adapted expert U·M·Vᵀ still has rank ≤ r, and with
    # the planted equal spectra no component falls below τ: merge keeps the rank and its
    # rel_error is float rounding (measured ≤ 7e-8), so the merged model's logits get the
    # export's tolerance. A re-truncating merge would show here as a larger rel_error first.
    report = json.loads(run_cersa("merge", "--json", d / "ckpt", adapter,
                                  tmp_path / "merged").stdout)
    assert {x["name"] for x in report["layers"]} == set(layers)
    tensors = json.load(open(tmp_path / "merged" / "cersa.json"))["tensors"]
    for name in layers:
        info = tensors[name]
        if info["kind"] == "factored":
            assert info["rank"] == layers[name]["rank"], name
            assert info["rel_error"] < 1e-6, (name, info["rel_error"])
    run_cersa("export", "-q", tmp_path / "merged", tmp_path / "mexport", "--to", "safetensors",
              "--dtype", "f32")
    merged = logits(cls.from_pretrained(tmp_path / "mexport").eval())
    assert (merged - trained).abs().max().item() <= 1e-5 * scale
    # and the adapter changed the model
    assert (trained - logits(cersa_torch.load_hf(d / "ckpt"))).abs().max().item() > 1e-4 * scale


def test_unsupported_experts_module_is_refused(moe, monkeypatch):
    family, _, _, _, d = moe
    experts_cls = (transformers.models.mixtral.modeling_mixtral.MixtralExperts
                   if family == "mixtral"
                   else transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts)
    init = experts_cls.__init__

    def biased(self, *a, **kw):
        init(self, *a, **kw)
        self.has_bias = True

    monkeypatch.setattr(experts_cls, "__init__", biased)
    with pytest.raises(ValueError, match=rf"{experts_cls.__name__}.*has_bias=True"):
        cersa_torch.load_hf(d / "ckpt")


def test_pairing_follows_transformers_converters_and_refuses_gaps(moe):
    """The checkpoint names are paired with experts and roles by transformers' own
    converters; a missing expert, or a merge that is not per-expert stacking, is an error."""
    from cersa_torch.hf import _model_names
    from cersa_torch.moe import swap_experts

    family, cls, _, _, d = moe
    names = json.load(open(d / "ckpt" / "cersa.json"))["tensors"]
    model = cls(transformers.AutoConfig.from_pretrained(d / "ckpt"))
    merged = {}
    _model_names(model, names, "ckpt", merged=merged)
    assert set(merged) == {NAMES[family](l, e, r) for l in range(2) for e in range(E)
                           for r in ROLE_RANK}
    built = {}
    swap_experts(model, merged, "ckpt", lambda key, want: built.setdefault(
        key, torch.nn.Linear(want[1], want[0], bias=False)))
    experts = model.model.layers[1].mlp.experts
    for e in range(E):
        for role in ROLE_RANK:
            assert getattr(experts, f"{role}_proj")[e] is built[NAMES[family](1, e, role)]

    gap = dict(merged)
    del gap[NAMES[family](0, 2, "up")]
    with pytest.raises(ValueError, match="has 4 experts; the checkpoint has 3 up matrices"):
        swap_experts(cls(model.config), gap, "ckpt", lambda key, want: None)
    odd = {"model.layers.0.self_attn.qkv.weight": ("model.layers.0.self_attn.qkv_proj",
                                                   "self_attn.q_proj.weight")}
    with pytest.raises(ValueError, match="merges it with other tensors on loading"):
        swap_experts(cls(model.config), odd, "ckpt", lambda key, want: None)


def other_family(family):
    common = dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=I, num_experts=E, head_dim=8, **common)
    if family == "olmoe":
        return transformers.OlmoeForCausalLM, transformers.OlmoeConfig(
            intermediate_size=I, num_experts=E, **common)
    common["num_key_value_heads"] = 4   # MLA: as many as the query heads
    return transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=I, n_routed_experts=E, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_other_per_expert_families_match_the_export(family, run_cersa, tmp_path):
    """The families transformers maps to the qwen2_moe conversion: rank-2 experts, factored,
    logits of transformers' own model on the export (DeepSeek-V3: layer 0 dense, one MoE)."""
    if not hasattr(transformers, {"qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig",
                                  "deepseek_v3": "DeepseekV3Config"}[family]):
        pytest.skip(f"transformers without {family}")
    cls, cfg = other_family(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor):
                for p in (mod.gate_up_proj, mod.down_proj):
                    p.copy_(torch.stack([planted(gen, 2, *p.shape[1:]) for _ in range(E)]))
    model.save_pretrained(tmp_path / "src")
    run_cersa("convert", "-q", "--energy", "0.9", tmp_path / "src", tmp_path / "ckpt")
    run_cersa("export", "-q", tmp_path / "ckpt", tmp_path / "export", "--to", "safetensors",
              "--dtype", "f32")
    ref = cls.from_pretrained(tmp_path / "export").eval()
    ours = cersa_torch.load_hf(tmp_path / "ckpt", mode="core", k=2)
    experts = [m for m in ours.modules() if isinstance(m, CersaExperts)]
    assert len(experts) == (1 if family == "deepseek_v3" else 2)
    assert all(type(lin) is cersa_torch.CersaLinear and lin.rank == 2
               for m in experts for lin in m.gate_proj + m.up_proj + m.down_proj)
    want = logits(ref, IDS[:1])
    assert (logits(ours, IDS[:1]) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
