"""`cersa inspect` metrics checked against numpy f64 on the real MiniLM excerpt."""
import csv
import io
import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

ENERGIES = [0.9, 0.95, 0.99]


@pytest.fixture(scope="module")
def inspected(cersa_bin):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = os.path.join(root, "fixtures", "minilm-excerpt", "model.safetensors")
    args = [cersa_bin, "inspect", src, "-q", "--energy", ",".join(map(str, ENERGIES))]
    report = json.loads(
        subprocess.run(args + ["--json", "--singular-values"], check=True, capture_output=True, text=True).stdout
    )
    table = subprocess.run(args + ["--csv"], check=True, capture_output=True, text=True).stdout
    return src, report, table


def numpy_kind(name):
    """Independent of the Rust rule: drop everything up to the first numeric segment, other
    numeric segments and a trailing weight/bias."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)]
    rest = parts[idx[0] + 1:] if idx else parts
    rest = [p for p in rest if not re.fullmatch(r"\d+", p)]
    if len(rest) > 1 and rest[-1] in ("weight", "bias"):
        rest = rest[:-1]
    return ".".join(rest), (int(parts[idx[0]]) if idx else None)


def test_metrics_match_numpy_f64(inspected):
    src, report, _ = inspected
    assert report["schema_version"] == 3
    weights = load_file(src)
    analysed = [t for t in report["tensors"] if t["matrix_shape"]]
    assert len(analysed) == 6
    for t in analysed:
        w = weights[t["name"]].astype(np.float64)
        m, n = t["matrix_shape"]
        w = w.reshape(m, n)
        s = np.linalg.svd(w, compute_uv=False)
        norm2 = float((w * w).sum())
        got = np.array(t["singular_values"])
        assert got.shape == s.shape
        assert np.max(np.abs(got - s)) <= 1e-5 * s[0], t["name"]
        mt = t["metrics"]
        # F32 sources are decomposed in f32: σ carries ~1e-5·σ₁ error (checked above), so
        # σ-derived quantities get a relative tolerance of 5e-5; ‖W‖_F is summed in f64.
        assert mt["spectral_norm"] == pytest.approx(s[0], rel=5e-5)
        assert mt["frobenius_norm"] == pytest.approx(math.sqrt(norm2), rel=1e-12)
        assert mt["stable_rank"] == pytest.approx(norm2 / s[0] ** 2, rel=5e-5)
        p = s / s.sum()
        p = p[p > 0]
        assert mt["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=5e-5)
        k = max(1, math.ceil(0.01 * min(m, n)))
        assert mt["top1pct_directions"] == k
        assert mt["top1pct_energy"] == pytest.approx((s[:k] ** 2).sum() / norm2, rel=5e-5)
        assert t["break_even_rank"] == (m * n - 1) // (m + n + 1)
        cum = np.cumsum(s ** 2) / norm2
        for tau, r in zip(ENERGIES, t["ranks"]):
            exact = int(np.argmax(cum >= tau)) + 1
            if r["rank"] != exact:  # only a boundary case may differ, by one
                assert abs(r["rank"] - exact) == 1 and abs(cum[min(r["rank"], exact) - 1] - tau) < 1e-5
            rk = r["rank"]
            assert r["rank_fraction"] == pytest.approx(rk / min(m, n), rel=1e-15)
            assert r["saves"] == (rk * (m + n + 1) < m * n)
            expected_bytes = rk * (m + n) * 4 + 4 * rk if r["saves"] else m * n * 4
            assert r["stored_bytes"] == expected_bytes
        assert (t["module_kind"], t["layer"]) == numpy_kind(t["name"])


def test_groups_and_totals_add_up(inspected):
    _, report, _ = inspected
    tensors = report["tensors"]
    source_bytes = sum(t["source_bytes"] for t in tensors)
    assert report["totals"]["source_bytes"] == source_bytes
    for k, tau in enumerate(ENERGIES):
        stored = sum(t["ranks"][k]["stored_bytes"] if t["ranks"] else t["source_bytes"] for t in tensors)
        total = report["totals"]["at_energy"][k]
        assert total["threshold"] == tau
        assert total["stored_bytes"] == stored
        assert total["byte_ratio"] == pytest.approx(stored / source_bytes)
        for groups in ("by_kind", "by_layer"):
            assert sum(g["at_energy"][k]["stored_bytes"] for g in report[groups]) == stored
    kinds = {}
    for t in tensors:
        kinds.setdefault(numpy_kind(t["name"])[0], []).append(t)
    assert {g["key"] for g in report["by_kind"]} == set(kinds)
    for g in report["by_kind"]:
        members = kinds[g["key"]]
        assert g["params"] == sum(t["params"] for t in members)
        fr = [t["ranks"][0]["rank_fraction"] for t in members if t["ranks"]]
        if fr:
            assert g["at_energy"][0]["mean_rank_fraction"] == pytest.approx(sum(fr) / len(fr))
    assert [g["key"] for g in report["by_layer"]] == ["0", "-"]


def test_csv_matches_json(inspected):
    _, report, table = inspected
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [r["name"] for r in rows] == [t["name"] for t in report["tensors"]]
    for r, t in zip(rows, report["tensors"]):
        if t["metrics"]:
            assert float(r["stable_rank"]) == t["metrics"]["stable_rank"]
            assert int(r["rank@0.95"]) == t["ranks"][1]["rank"]
        else:
            assert r["stable_rank"] == ""
