"""`cersa merge` folds an adapter (written here with Python's safetensors, as a trainer
would) into its CERSA checkpoint; checked against an independent numpy float64 SVD of
the adapted matrix W' = U·(diag σ + A·B)ᵀ·Vᵀ."""
import hashlib
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
import cersa_torch  # noqa: E402

EXCERPT = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")


def test_merge_core_adapter_matches_numpy(run_cersa, tmp_path):
    base = tmp_path / "base"
    run_cersa("convert", "-q", "--energy", "0.8", EXCERPT, base)
    ckpt = cersa_torch.load_cersa(str(base))
    name = "encoder.layer.0.attention.self.query.weight"
    info = ckpt.info(name)
    r, (m, n), k = info["rank"], info["matrix_shape"], 4
    rng = np.random.default_rng(11)
    u, s, vt = (a.astype(np.float64) for a in ckpt.factors(name))
    a = rng.standard_normal((r, k)).astype(np.float32)
    b = (rng.standard_normal((k, r)) * 0.05 * s[0] / np.sqrt(r)).astype(np.float32)
    sha = hashlib.sha256(open(base / "cersa.json", "rb").read()).hexdigest()
    layers = {name: {"mode": "core", "k": k, "rank": r, "matrix_shape": [m, n]}}
    adapter = tmp_path / "adapter.safetensors"
    save_file({name + ".adapter_a": a, name + ".adapter_b": b}, str(adapter),
              metadata={"format": "cersa-adapter", "adapter_version": "1",
                        "manifest_sha256": sha, "layers": json.dumps(layers)})
    out = tmp_path / "merged"
    report = json.loads(run_cersa("merge", "--json", base, adapter, out).stdout)
    assert [l["name"] for l in report["layers"]] == [name]

    merged = cersa_torch.load_cersa(str(out))
    # The layer computes y = x·V·(diag σ + A·B)·Uᵀ, so W' = U·(diag σ + A·B)ᵀ·Vᵀ.
    w_adapted = u @ (np.diag(s) + (a.astype(np.float64) @ b.astype(np.float64)).T) @ vt
    sigma = np.linalg.svd(w_adapted, compute_uv=False)
    norm2 = float(np.sum(w_adapted ** 2))
    tau = merged.manifest["config"]["energy"]
    cum = np.cumsum(sigma ** 2) / norm2
    exact = int(np.nonzero(cum >= tau)[0][0] + 1)
    minfo = merged.info(name)
    new_r = minfo["rank"]
    assert abs(new_r - exact) <= 1 and (new_r == exact or abs(cum[min(new_r, exact) - 1] - tau) < 1e-5)
    mu, ms, mvt = (x.astype(np.float64) for x in merged.factors(name))
    np.testing.assert_allclose(ms, sigma[:new_r], rtol=1e-5)
    np.testing.assert_allclose(mu.T @ mu, np.eye(new_r), atol=1e-5)
    np.testing.assert_allclose(mvt @ mvt.T, np.eye(new_r), atol=1e-5)
    rel = np.linalg.norm(w_adapted - (mu * ms) @ mvt) / np.sqrt(norm2)
    assert abs(rel - minfo["rel_error"]) < 1e-5
    assert abs(rel - np.sqrt(max(0.0, 1 - cum[new_r - 1]))) < 1e-4
    # Everything else is byte-identical to the base.
    before, after = {}, {}
    for d, into in ((base, before), (out, after)):
        for shard in json.load(open(d / "cersa.json"))["shards"]:
            into.update(load_file(str(d / shard["file"])))
    for key in before:
        if not key.startswith(name + "."):
            np.testing.assert_array_equal(before[key], after[key])
    details = merged.manifest["source"]["details"]
    assert details["merged_base_manifest_sha256"] == sha


def test_merge_refuses_adapter_of_another_checkpoint(run_cersa, tmp_path):
    base = tmp_path / "base"
    run_cersa("convert", "-q", EXCERPT, base)
    ckpt = cersa_torch.load_cersa(str(base))
    name = "encoder.layer.0.attention.self.query.weight"
    info = ckpt.info(name)
    r, (m, n) = info["rank"], info["matrix_shape"]
    layers = {name: {"mode": "scale", "rank": r, "matrix_shape": [m, n]}}
    adapter = tmp_path / "adapter.safetensors"
    save_file({name + ".adapter_s": np.ones(r, np.float32)}, str(adapter),
              metadata={"format": "cersa-adapter", "adapter_version": "1",
                        "manifest_sha256": "0" * 64, "layers": json.dumps(layers)})
    p = run_cersa("merge", base, adapter, tmp_path / "out", check=False)
    assert p.returncode == 2 and "sha256" in p.stderr
    assert not (tmp_path / "out").exists()
