"""`pip install ./python` works: the package installs into a fresh virtual environment and
is imported from there (not from the source tree), and loads a converted checkpoint.

The environment sees the system site-packages, so torch/safetensors/transformers installed
by tests/python/requirements.txt satisfy the package's dependencies without a second
download; pip still resolves them against python/pyproject.toml.
"""
import os
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXCERPT = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")


def test_pip_install_into_a_fresh_venv(run_cersa, tmp_path):
    pytest.importorskip("torch")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # From a copy: setuptools writes build/ and *.egg-info beside the sources. pip builds
    # in its own isolated environment (setuptools from the registry).
    src = tmp_path / "python"
    shutil.copytree(os.path.join(ROOT, "python"), src,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    p = subprocess.run([py, "-m", "pip", "install", "--quiet", str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "ckpt"
    run_cersa("convert", "-q", EXCERPT, out)
    script = f"""
import cersa_torch, torch
print(cersa_torch.__file__)
ckpt = cersa_torch.open_checkpoint({str(out)!r})
name = "encoder.layer.0.attention.self.query.weight"
layer = cersa_torch.linear_from_checkpoint(ckpt, name, mode="core", k=4)
y = layer(torch.randn(3, 384))
print(tuple(y.shape), layer.rank == ckpt.info(name)["rank"])
"""
    # Run outside the source tree so `python/` cannot be picked up from the working dir.
    p = subprocess.run([py, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    where, result = p.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(env_dir)), where
    assert result == "(3, 384) True", result
