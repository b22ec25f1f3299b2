"""python/cersa_torch.py reads CERSA directories with numpy + safetensors only, and its
numpy `apply` reproduces the Rust reference `cersa_loader::Checkpoint::apply` (run through
the loader's `apply` example binary) on the same random inputs, and the PyTorch modules
reproduce the numpy path (torch is installed by tests/python/requirements.txt)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402

EXCERPT = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")


@pytest.fixture(scope="session")
def apply_bin():
    path = os.environ.get("CERSA_APPLY_BIN",
                          os.path.join(ROOT, "target", "release", "examples", "apply"))
    if not os.path.exists(path):
        subprocess.run(["cargo", "build", "--release", "-p", "cersa-loader", "--example",
                        "apply"], cwd=ROOT, check=True)
    return path


def rust_apply(apply_bin, directory, name, x, tmp_path):
    xp, yp = tmp_path / "x.f32", tmp_path / "y.f32"
    np.ascontiguousarray(x, dtype="<f4").tofile(xp)
    p = subprocess.run([apply_bin, directory, name, str(x.shape[0]), str(xp), str(yp)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return np.fromfile(yp, dtype="<f4").reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_numpy_apply_matches_rust_loader(dtype, run_cersa, apply_bin, tmp_path):
    out = tmp_path / "ckpt"
    # `--exclude` keeps one matrix dense so both apply routes are compared.
    run_cersa("convert", "-q", "--energy", "0.8", "--dtype", dtype,
              "--exclude", "*output.dense.weight", EXCERPT, out)
    ckpt = cersa_torch.load_cersa(str(out))
    source = load_file(EXCERPT)
    rng = np.random.default_rng(7)
    kinds = set()
    for name in ckpt.names():
        info = ckpt.info(name)
        if len(info["shape"]) != 2 or info["source_dtype"] != "F32":
            continue
        kinds.add(info["kind"])
        n = info["shape"][1]
        x = rng.standard_normal((5, n)).astype(np.float32)
        y_py = ckpt.apply(name, x)
        y_rs = rust_apply(apply_bin, str(out), name, x, tmp_path)
        assert y_py.shape == y_rs.shape == (5, info["shape"][0])
        scale = np.abs(y_rs).max()
        assert np.abs(y_py - y_rs).max() <= 1e-5 * scale, name
        # Independent anchor: the source weights. Factors keep `energy` of ‖W‖², so
        # the output error is bounded by the manifest's rel_error times ‖x‖·‖W‖.
        w = source[name].astype(np.float64)
        exact = x.astype(np.float64) @ w.T
        if info["kind"] == "dense":
            assert np.abs(y_py - exact).max() <= 1e-5 * np.abs(exact).max(), name
        else:
            bound = info["rel_error"] * np.linalg.norm(w) * np.linalg.norm(x, axis=1).max()
            assert np.linalg.norm(y_py - exact, axis=1).max() <= bound * (1 + 1e-3) + 1e-6
            np.testing.assert_allclose(ckpt.reconstruct(name) @ x.T.astype(np.float64),
                                       y_py.T, rtol=1e-4, atol=1e-4 * scale)
    assert kinds == {"factored", "dense"}


def test_load_cersa_rejects_inconsistent_manifest(run_cersa, tmp_path):
    out = tmp_path / "ckpt"
    run_cersa("convert", "-q", EXCERPT, out)
    manifest = json.load(open(out / "cersa.json"))
    name = next(n for n, i in manifest["tensors"].items() if i["kind"] == "factored")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    manifest["tensors"][name]["rank"] += 1
    json.dump(manifest, open(bad / "cersa.json", "w"))
    with pytest.raises(cersa_torch.CersaFormatError, match="cersa_u"):
        cersa_torch.load_cersa(str(bad))


def test_torch_modes_match_numpy(run_cersa, tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "ckpt"
    run_cersa("convert", "-q", EXCERPT, out)
    ckpt = cersa_torch.load_cersa(str(out))
    name = "encoder.layer.0.attention.self.query.weight"
    x = np.random.default_rng(3).standard_normal((4, 384)).astype(np.float32)
    bias = ckpt.dense("encoder.layer.0.attention.self.query.bias")
    expected = ckpt.apply(name, x) + bias
    for mode in cersa_torch.MODES:
        layer = cersa_torch.linear_from_checkpoint(
            ckpt, name, "encoder.layer.0.attention.self.query.bias", mode=mode, k=4)
        y = layer(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"frozen": set(), "scale": {"s"}, "core": {"a", "b"},
                             "factors": {"left", "right"}, "cersa": {"c"}}[mode]


def test_torch_patch_linears_and_core_training(run_cersa, tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    out = tmp_path / "ckpt"
    run_cersa("convert", "-q", EXCERPT, out)
    ckpt = cersa_torch.load_cersa(str(out))
    # A module tree with the checkpoint's names (encoder.layer.0.attention.self.query).
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList([nn.Module()])
    model.encoder.layer[0].attention = nn.Module()
    setattr(model.encoder.layer[0].attention, "self", nn.Module())
    model.encoder.layer[0].attention.self.query = nn.Linear(384, 384)
    model.encoder.layer[0].attention.self.extra = nn.Linear(384, 8)  # not in the checkpoint
    replaced = cersa_torch.patch_linears(model, ckpt, mode="core", k=4)
    assert replaced == ["encoder.layer.0.attention.self.query"]
    layer = model.encoder.layer[0].attention.self.query
    u0, vt0 = layer.u.clone(), layer.vt.clone()
    torch.manual_seed(0)
    # Teacher: the same layer with W perturbed inside its subspace (rank-4 core change).
    delta = torch.randn(layer.rank, 4) @ torch.randn(4, layer.rank) * 0.05
    w_teacher = layer.u @ (torch.diag(layer.s) + delta) @ layer.vt
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    losses = []
    for _ in range(150):
        x = torch.randn(64, 384)
        loss = ((layer(x) - (x @ w_teacher.T + layer.bias)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < losses[0] / 100, (losses[0], losses[-10:])
    assert torch.equal(layer.u, u0) and torch.equal(layer.vt, vt0)
