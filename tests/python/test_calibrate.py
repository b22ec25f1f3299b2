"""cersa_torch.calibrate and cersa_torch.evaluate on tiny random transformers models.

The references are independent of cersa_torch: the input activations of every linear layer
captured by plain forward pre-hooks and multiplied in float64 numpy (G = XᵀX), the token
chunks cut here again, and perplexity from the model's own ``labels=`` loss.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from test_torch_hf import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
    "disposition, seemed to unite some of the best blessings of existence.",
] * 3
MAX_LENGTH, MAX_SEQUENCES = 24, 5


def tiny_tokenizer():
    """A BPE tokenizer of 100 entries (within the tiny models' vocabulary of 128), trained
    on TEXTS, with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100,
                                                       special_tokens=["<unk>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for family in ("llama", "gpt2"):
        d = tmp_path_factory.mktemp(family)
        config = tiny(family)
        torch.manual_seed(0)
        getattr(transformers, config.architectures[0])(config).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        dirs[family] = d
    return dirs


def reference_chunks(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for i, t in enumerate(TEXTS):
        ids += ([tok.eos_token_id] if i else []) + tok(t, add_special_tokens=False)["input_ids"]
    n = min(len(ids) // MAX_LENGTH, MAX_SEQUENCES)
    assert n == MAX_SEQUENCES  # the texts are long enough for the test to mean something
    return [ids[i * MAX_LENGTH:(i + 1) * MAX_LENGTH] for i in range(n)]


def reference_activations(model_dir):
    """{checkpoint weight name: (input activations [tokens, n_in] f64, input axis)} of every
    nn.Linear/Conv1D whose weight is in model.safetensors (the tiny models' state-dict names
    are the checkpoint's)."""
    conv1d = transformers.pytorch_utils.Conv1D
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        stored = set(f.keys())
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    seen, handles = {}, []
    for path, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, conv1d)) and f"{path}.weight" in stored:
            axis = 1 if isinstance(m, torch.nn.Linear) else 0
            seen[f"{path}.weight"] = ([], axis)
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, acts=seen[f"{path}.weight"][0]:
                acts.append(args[0].detach().double().numpy().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for chunk in reference_chunks(model_dir):
            model(input_ids=torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return {k: (np.concatenate(acts), axis) for k, (acts, axis) in seen.items()}, model


def read(path):
    with safe_open(str(path), "np") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_statistics_match_numpy_reference(family, model_dirs, tmp_path):
    src = model_dirs[family]
    out = tmp_path / "calib.safetensors"
    doc = cersa_torch.calibrate(src, TEXTS, out, max_length=MAX_LENGTH,
                                max_sequences=MAX_SEQUENCES)
    meta, tensors = read(out)
    assert meta["format"] == "cersa-calibration" and meta["version"] == "1"
    assert json.loads(meta["cersa_calibration"]) == doc
    chunks = reference_chunks(src)
    assert doc["version"] == 1
    assert doc["model"] == {
        "config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest(),
        "architectures": tiny(family).architectures}
    token_bytes = np.asarray(sum(chunks, []), dtype="<i8").tobytes()
    assert doc["text"] == {"sequences": MAX_SEQUENCES, "tokens": MAX_SEQUENCES * MAX_LENGTH,
                           "max_length": MAX_LENGTH,
                           "sha256": hashlib.sha256(token_bytes).hexdigest()}
    acts, model = reference_activations(src)
    assert set(doc["weights"]) == set(acts)
    weights = dict(model.named_parameters())
    for name, (x, axis) in acts.items():
        entry = doc["weights"][name]
        assert entry["input_axis"] == axis, name
        g = tensors[entry["stat"]]
        assert g.dtype == np.float32 and g.shape == (weights[name].shape[axis],) * 2, name
        want = x.T @ x
        assert np.abs(g - want).max() <= 1e-5 * np.abs(want).max(), name
        # A shared statistic is shared because the layers read the very same input.
        owner = acts[entry["stat"]][0]
        assert owner is x or np.array_equal(owner, x), name
    stats = {e["stat"] for e in doc["weights"].values()}
    assert stats == set(tensors)
    if family == "llama":
        for layer in range(2):
            p = f"model.layers.{layer}."
            q, gate = p + "self_attn.q_proj.weight", p + "mlp.gate_proj.weight"
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                assert doc["weights"][p + name + ".weight"]["stat"] == q
            for name in ("mlp.gate_proj", "mlp.up_proj"):
                assert doc["weights"][p + name + ".weight"]["stat"] == gate
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                assert doc["weights"][p + name + ".weight"]["stat"] == p + name + ".weight"
        assert len(tensors) == 2 * 4 and len(doc["weights"]) == 2 * 7
    else:
        assert len(tensors) == len(doc["weights"]) == 2 * 4  # c_attn is one fused Conv1D
        assert {e["input_axis"] for e in doc["weights"].values()} == {0}


def test_bounded_memory_passes_give_the_same_file(model_dirs, tmp_path):
    src = model_dirs["llama"]
    one, several = tmp_path / "one.safetensors", tmp_path / "several.safetensors"
    calls = []
    cersa_torch.calibrate(src, TEXTS, one, max_length=MAX_LENGTH, max_sequences=MAX_SEQUENCES,
                          progress=lambda done, total: calls.append(total))
    assert set(calls) == {MAX_SEQUENCES}
    calls.clear()
    # Room for one 64×64 f64 statistic: 8 statistics over 8 passes (160×160 ones alone).
    cersa_torch.calibrate(src, TEXTS, several, max_length=MAX_LENGTH,
                          max_sequences=MAX_SEQUENCES, max_stat_bytes=64 * 64 * 8,
                          progress=lambda done, total: calls.append(total))
    assert set(calls) == {8 * MAX_SEQUENCES} and len(calls) == 8 * MAX_SEQUENCES
    (meta_a, a), (meta_b, b) = read(one), read(several)
    assert meta_a == meta_b and a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_writes_the_same_file(model_dirs, tmp_path):
    src = model_dirs["gpt2"]
    texts = []
    for i, t in enumerate(TEXTS):
        texts.append(tmp_path / f"{i}.txt")
        texts[-1].write_text(t, encoding="utf-8")
    cli, api = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    args = [a for t in texts for a in ("--text", str(t))]
    p = subprocess.run([sys.executable, "-m", "cersa_torch.calibrate", str(src), *args,
                        "-o", str(cli), "--max-length", str(MAX_LENGTH),
                        "--max-sequences", str(MAX_SEQUENCES)],
                       capture_output=True, text=True, cwd=os.path.join(ROOT, "python"))
    assert p.returncode == 0, p.stderr
    assert "8 weights, 8 statistics" in p.stdout
    cersa_torch.calibrate(src, TEXTS, api, max_length=MAX_LENGTH, max_sequences=MAX_SEQUENCES)
    (meta_a, a), (meta_b, b) = read(cli), read(api)
    assert meta_a == meta_b
    assert all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_perplexity_matches_the_models_own_loss(model_dirs):
    src = model_dirs["llama"]
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([c]), labels=torch.tensor([c])).loss.item()
                  for c in reference_chunks(src)]
    want = float(np.exp(np.mean(losses)))  # equal-length chunks: mean of means is the mean
    got = cersa_torch.perplexity(model, tok, TEXTS, max_length=MAX_LENGTH,
                                 max_sequences=MAX_SEQUENCES)
    assert got == pytest.approx(want, rel=1e-6)
    assert 20 < got < 1000  # a random model over a 128-entry vocabulary: near-uniform


def test_embedding_similarity_pools_over_the_attention_mask(tmp_path):
    config = tiny("bert")
    torch.manual_seed(0)
    dense = transformers.BertModel(config).eval()
    other = transformers.BertModel(config).eval()  # other random weights
    tok = tiny_tokenizer()
    tok.pad_token = "<unk>"
    texts = [t[:n] for t, n in zip(TEXTS, (200, 40, 90))]  # different lengths: padding

    def alone(model, text):  # one text, no padding: a plain mean over its tokens
        with torch.no_grad():
            ids = torch.tensor([tok(text)["input_ids"]])
            return model(input_ids=ids).last_hidden_state[0].double().mean(0).numpy()

    want = []
    for t in texts:
        a, b = alone(dense, t), alone(other, t)
        want.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    got = cersa_torch.embedding_similarity(dense, other, tok, texts, batch_size=2)
    assert got["texts"] == 3
    assert got["mean"] == pytest.approx(np.mean(want), abs=1e-5)
    assert got["min"] == pytest.approx(np.min(want), abs=1e-5)
    same = cersa_torch.embedding_similarity(dense, dense, tok, texts)
    assert same["min"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibrate_then_convert_verify_evaluate(family, model_dirs, tmp_path, run_cersa):
    """The whole user path on the file calibrate wrote: convert --calibration, verify
    --calibration, evaluate. Each manifest output error equals ‖(W − Ŵ)·X‖/‖W·X‖ in numpy
    float64 on the activations captured here (not on calibrate's G)."""
    from helpers import stored_tensors

    src = model_dirs[family]
    calib = tmp_path / "calib.safetensors"
    cersa_torch.calibrate(src, TEXTS, calib, max_length=MAX_LENGTH, max_sequences=MAX_SEQUENCES)
    out = tmp_path / "white"
    run_cersa("convert", src, out, "--energy", 0.99, "--calibration", calib, "--force-factor",
              "--dtype", "f32", "-q")
    manifest, stored = stored_tensors(str(out))
    acts, _ = reference_activations(src)
    with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
        weights = {k: f.get_tensor(k).astype(np.float64) for k in acts}
    whitened = 0
    for name, (x, axis) in acts.items():
        info = manifest["tensors"][name]
        if info["kind"] != "factored":
            continue
        assert info["whitening"]["input_axis"] == axis, name
        w = weights[name]
        w_hat = (stored[name + ".cersa_u"].astype(np.float64) * stored[name + ".cersa_s"]) \
            @ stored[name + ".cersa_vt"].astype(np.float64)
        y, y_hat = (x @ w.T, x @ w_hat.T) if axis == 1 else (x @ w, x @ w_hat)
        want = np.linalg.norm(y - y_hat) / np.linalg.norm(y)
        # G is stored in f32 by default: its rounding moves the error by ~1e-7 relative.
        assert info["whitening"]["output_rel_error"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        whitened += 1
    assert whitened == len(acts)
    p = run_cersa("verify", out, "--source", src, "--calibration", calib, "--json", "-q")
    report = json.loads(p.stdout)
    assert report["ok"] and report["counts"]["output_errors_compared"] == whitened, report
    # Kept output energy ≥ 0.99 at every layer: the model's own perplexity barely moves.
    from cersa_torch.evaluate import evaluate

    r = evaluate(out, src, "\n".join(TEXTS), max_length=MAX_LENGTH,
                             max_sequences=MAX_SEQUENCES)
    assert r["metric"] == "perplexity"
    assert r["cersa"] == pytest.approx(r["dense"], rel=0.01), r
