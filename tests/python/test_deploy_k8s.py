"""deploy/k8s: the manifests are valid objects of the Kubernetes API (its JSON schemas,
strict: an unknown or misspelt field fails), the Jobs agree with each other, and their
container commands, run here one completion index at a time with /data in a temp dir and
JOB_COMPLETION_INDEX set as the Job controller sets it, give parts that `cersa assemble`
joins into the bytes of a one-machine `cersa convert`."""
import hashlib
import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml  # PyYAML, a dependency of kubernetes-validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "deploy", "k8s")
EXCERPT = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")
MANIFESTS = ["cersa-data-pvc.yaml", "cersa-convert-job.yaml", "cersa-assemble-job.yaml"]
# backoffLimitPerIndex is GA (and its API fields final) from 1.33; also the newest
# version the installed schemas know.
VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]


def load(name):
    with open(os.path.join(K8S, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1, f"{name}: one object per file"
    return docs[0]


def container(job):
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_api_schema(name, version):
    kubernetes_validate.validate(load(name), version, strict=True)


def test_jobs_agree():
    pvc, convert, assemble = (load(n) for n in MANIFESTS)
    spec = convert["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 4 and 1 <= spec["parallelism"] <= spec["completions"]
    # A failed index is retried alone, without failing the others.
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
    script = container(convert)["args"][0]
    assert f"--part auto --parts {spec['completions']} --resume" in script
    assert "part=/data/parts/part-$JOB_COMPLETION_INDEX" in script
    assert "/data/parts/part-*" in container(assemble)["args"][0]
    for job in (convert, assemble):
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        (mount,) = container(job)["volumeMounts"]
        assert (mount["name"], mount["mountPath"]) == (volume["name"], "/data")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def quantity(text):
    """A Kubernetes quantity with a binary suffix (the ones the manifests use), in bytes."""
    units = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    digits = text.rstrip("KMGTi")
    return int(digits) * units[text[len(digits):]]


def pod_env(c, index):
    """The container's environment as the kubelet builds it, plus the Job controller's
    JOB_COMPLETION_INDEX."""
    env = {"JOB_COMPLETION_INDEX": str(index)} if index is not None else {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            value = quantity(c["resources"][kind][resource])
            env[var["name"]] = str(value // quantity(ref.get("divisor", "1")))
    return env


def run_pod(job, data, bin_dir, index=None):
    """Runs the Job's container command here, /data being `data`."""
    c = container(job)
    argv = [a.replace("/data", str(data)) for a in c["command"] + c.get("args", [])]
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **pod_env(c, index)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def digest(root):
    """Every entry under `root` with its type, every file with its sha256."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.isfile(path) and not os.path.islink(path):
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                out[rel] = "dir" if os.path.isdir(path) else "other"
    return out


def test_jobs_run_as_pods_give_the_one_machine_bytes(cersa_bin, run_cersa, tmp_path):
    convert, assemble = load("cersa-convert-job.yaml"), load("cersa-assemble-job.yaml")
    n = convert["spec"]["completions"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(os.path.abspath(cersa_bin), bin_dir / "cersa")
    data = tmp_path / "data"
    src = data / "src"  # a Hugging Face model directory, side file included
    src.mkdir(parents=True)
    shutil.copy(EXCERPT, src / "model.safetensors")
    (src / "config.json").write_text('{"model_type": "bert", "hidden_size": 384}\n')

    # The indices in any order, as the Pods may run; the last one after an early assemble.
    order = [3, 0, 2, 1]
    for index in order[:-1]:
        p = run_pod(convert, data, bin_dir, index)
        assert p.returncode == 0, f"index {index}: {p.stdout}{p.stderr}"
        assert (data / "parts" / f"part-{index}" / "cersa-part.json").is_file()
    p = run_pod(assemble, data, bin_dir)
    assert p.returncode != 0, "assemble succeeded with a part missing"
    assert not (data / "out").exists()
    p = run_pod(convert, data, bin_dir, order[-1])
    assert p.returncode == 0, p.stderr

    # A retried or re-created Pod of a complete index changes nothing.
    parts = digest(data / "parts")
    p = run_pod(convert, data, bin_dir, 2)
    assert p.returncode == 0 and "complete already" in p.stdout, p.stderr
    assert digest(data / "parts") == parts
    assert sorted(os.listdir(data / "parts")) == [f"part-{i}" for i in range(n)]

    p = run_pod(assemble, data, bin_dir)
    assert p.returncode == 0, p.stderr
    one = tmp_path / "one"
    run_cersa("convert", "-q", "--threads", "1", src, one)
    want = digest(one)
    assert "config.json" in want
    assert digest(data / "out") == want
