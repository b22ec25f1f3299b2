"""cersa_torch.memory: the bytes predicted from the manifest are the bytes a model holds.

The prediction (:func:`cersa_torch.memory.estimate`, from shapes and ranks in cersa.json)
is checked against :func:`~cersa_torch.memory.measure` of the model that ``load_hf`` builds
(counting its tensors), for every mode and for bf16, and the LoRA baseline against a PEFT
model built on the dense source by PEFT itself.
"""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402
from cersa_torch import memory  # noqa: E402
from test_torch_hf import tiny  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, cersa_bin):
    d = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny("llama")).save_pretrained(d / "src")
    # Forced: every projection factored. Plain: tiny random weights have flat spectra, so
    # the square projections are kept dense (no-saving).
    for out, extra in (("forced", ["--force-factor"]), ("plain", [])):
        subprocess.run([cersa_bin, "convert", "-q", "--energy", "0.9", *extra, d / "src",
                        d / out], check=True)
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", cersa_torch.MODES)
def test_estimate_is_what_load_hf_holds(llama, mode, dtype):
    est = memory.estimate(llama / "forced", mode, k=3, dtype=dtype)
    assert est.dense_base_layers == 0
    model = cersa_torch.load_hf(llama / "forced", mode=mode, k=3, dtype=dtype)
    assert memory.measure(model) == est.cersa
    if mode != "frozen":
        assert est.cersa.trainable > 0 and est.cersa.optimizer == 3 * est.cersa.trainable


def test_estimate_with_beta_counts_the_leading_blocks(llama):
    est = memory.estimate(llama / "forced", "cersa", dtype=torch.float32, beta=0.5)
    model = cersa_torch.load_hf(llama / "forced", mode="cersa", beta=0.5)
    assert memory.measure(model) == est.cersa
    assert est.cersa.trainable < memory.estimate(llama / "forced", "cersa").cersa.trainable


def test_lora_baseline_is_peft_on_the_dense_model(llama):
    import peft

    est = memory.estimate(llama / "forced", "core", k=4)
    dense = transformers.LlamaForCausalLM.from_pretrained(llama / "src", dtype=torch.float32)
    lora = peft.get_peft_model(dense, peft.LoraConfig(r=4, target_modules=PROJ))
    assert memory.measure(lora) == est.lora


def test_dense_kept_layers_get_bases_within_the_bound(llama):
    import json

    est = memory.estimate(llama / "plain", "core", k=3)
    tensors = json.load(open(llama / "plain" / "cersa.json"))["tensors"]
    kept = [n for n, i in tensors.items() if i.get("reason") == "no-saving"]
    assert kept and est.dense_base_layers == len(kept)
    frozen = cersa_torch.load_hf(llama / "plain", mode="core", k=3, dense_subspace=False)
    assert memory.measure(frozen) == est.cersa
    based = memory.measure(cersa_torch.load_hf(llama / "plain", mode="core", k=3))
    assert 0 < based.total - est.cersa.total <= est.dense_base_bound


def test_cli_prints_every_mode(llama):
    p = subprocess.run([sys.executable, "-m", "cersa_torch.memory", str(llama / "forced"),
                        "--k", "3"], capture_output=True, text=True,
                       cwd=os.path.join(ROOT, "python"), check=True)
    for label in ("cersa frozen", "cersa core", "cersa factors", "cersa (paper core)",
                  "dense + LoRA r=3"):
        assert label in p.stdout, p.stdout


def test_core_k_is_capped_at_a_layer_rank_below_it(llama, cersa_bin):
    """A budget plan or a rule can leave a layer at rank 1: core k = 4 then gives that layer
    a full r×r core instead of failing the load, and the estimate counts the same."""
    out = llama / "rank2"
    subprocess.run([cersa_bin, "convert", "-q", "--force-factor", "--rank", "*q_proj*=2",
                    llama / "src", out], check=True)
    model = cersa_torch.load_hf(out, mode="core", k=4)
    cores = {m.cersa_name: tuple(m.a.shape) for m in model.modules()
             if isinstance(m, cersa_torch.CersaLinear)}
    assert {n: a for n, a in cores.items() if "q_proj" in n} == {
        f"model.layers.{i}.self_attn.q_proj.weight": (2, 2) for i in range(2)}
    assert all(a[1] == 4 for n, a in cores.items() if "q_proj" not in n)
    assert memory.measure(model) == memory.estimate(out, "core", k=4).cersa


@pytest.mark.parametrize("mode", ["frozen", "scale", "core", "cersa"])
def test_packed_estimate_counts_the_stored_rows(llama, cersa_bin, mode):
    out = llama / "q8"
    if not out.exists():
        subprocess.run([cersa_bin, "convert", "-q", "--force-factor", "--dtype", "q8_0",
                        llama / "src", out], check=True)
    est = memory.estimate(out, mode, k=3, packed=True)
    model = cersa_torch.load_hf(out, mode=mode, k=3, packed=True)
    assert memory.measure(model) == est.cersa
    # Q8_0: 34 bytes per 32 values, against 4 per value dequantized.
    assert est.cersa.frozen < memory.estimate(out, mode, k=3).cersa.frozen
