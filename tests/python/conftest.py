"""Shared fixtures: the cersa binary (CERSA_BIN or target/release/cersa) and helpers."""
import os
import subprocess
import sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))


@pytest.fixture(scope="session")
def cersa_bin():
    path = os.environ.get("CERSA_BIN", os.path.join(ROOT, "target", "release", "cersa"))
    if not os.path.exists(path):
        subprocess.run(["cargo", "build", "--release", "--bin", "cersa"], cwd=ROOT, check=True)
    return path


@pytest.fixture
def run_cersa(cersa_bin):
    def run(*args, check=True):
        p = subprocess.run([cersa_bin, *map(str, args)], capture_output=True, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"cersa {args} exited {p.returncode}: {p.stderr}")
        return p
    return run


@pytest.fixture
def fixture_path():
    return lambda rel: os.path.join(ROOT, "fixtures", rel)
