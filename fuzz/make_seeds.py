#!/usr/bin/env python3
"""Seeds for the fuzz targets from the committed corpus (formats/vectors, fixtures/mixed)
and the crash reproducers in regressions/. Writes fuzz/seeds/<target>/ (ignored by git)."""
import glob
import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEP = b"\0CERSA\0"


def put(target, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def main():
    for case in sorted(glob.glob(os.path.join(ROOT, "formats/vectors/*/*"))):
        shards = sorted(glob.glob(os.path.join(case, "*.safetensors")))
        for s in shards:
            put("safetensors_header", open(s, "rb").read())
        manifest = open(os.path.join(case, "cersa.json"), "rb").read()
        # The target names shards cersa-0000{1,2}-of-00002; rename them in the manifest.
        parts = [manifest]
        for k, s in enumerate(shards[:2]):
            name = os.path.basename(s).encode()
            new = f"cersa-{k + 1:05}-of-00002.safetensors".encode()
            parts[0] = parts[0].replace(name, new)
            parts.append(open(s, "rb").read())
        put("cersa_checkpoint", SEP.join(parts))
    mixed = os.path.join(ROOT, "fixtures/mixed/model.safetensors")
    if os.path.getsize(mixed) < 1 << 20:
        put("safetensors_header", open(mixed, "rb").read())
    for target in ("safetensors_header", "cersa_checkpoint"):
        for f in glob.glob(os.path.join(HERE, "regressions", target, "*")):
            put(target, open(f, "rb").read())


if __name__ == "__main__":
    main()
