"""Black-box mutation fuzz of cersa's input readers through the CLI: mutates seed files
(truncation, header bytes, extreme little-endian integers, digits in JSON headers, NaN/Inf in
the data), runs `cersa inspect` and `cersa convert` on each, and reports panics, signals,
timeouts (20 s) and exit codes other than 0/1/2; failing inputs are copied to /tmp/x/, and
the exit status is 1 when there was any.

    cargo build --release --bin cersa
    cd fixtures && python3 ../fuzz/mutate_cli.py gguf/kquants.gguf,mixed/model.safetensors,pytorch/pnet.pt 300 [SEED]

A seed `DIR:ENTRY` is a multi-file checkpoint: DIR is copied, one random file in it is
mutated, and the commands run on DIR/ENTRY (`.` for the directory itself), e.g.
`pytorch/sharded:.` or `/tmp/split:m-00001-of-00003.gguf` (a split GGUF).
"""
import os, random, subprocess, sys, shutil, tempfile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CERSA = os.environ.get("CERSA_BIN", os.path.join(ROOT, "target", "release", "cersa"))
os.makedirs("/tmp/x", exist_ok=True)
seeds = sys.argv[1].split(",")
n = int(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
work = tempfile.mkdtemp(prefix="mutfuzz")
bad = 0
def mutate(b):
    b = bytearray(b)
    k = rng.randrange(6)
    if k == 0:  # truncate
        return b[: rng.randrange(len(b))]
    if k == 1:  # flip random bytes near the start (headers)
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(min(len(b), 4096))
            b[i] = rng.randrange(256)
        return b
    if k == 2:  # random bytes anywhere
        for _ in range(rng.randrange(1, 32)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        return b
    if k == 3:  # overwrite a little-endian integer field with an extreme value
        i = rng.randrange(min(len(b), 8192) - 8)
        v = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40, 1 << 62, 3, 255])
        b[i:i + 8] = v.to_bytes(8, "little")
        return b
    if k == 4:  # digits in a JSON header
        i = b.find(b"[", rng.randrange(min(len(b), 2000)))
        if i > 0:
            b[i + 1:i + 1] = str(rng.choice([0, 1 << 33, 99999999999, -1])).encode() + b","
        return b
    # NaN/inf injection into data region
    for _ in range(16):
        i = rng.randrange(len(b) // 2, len(b) - 4)
        b[i:i + 4] = bytes.fromhex(rng.choice(["0000c07f", "0000807f", "000080ff"]))
    return b
def prepare(seed):
    """The path to run on, with one file mutated; the path to keep when it fails."""
    if ":" in seed:
        src, entry = seed.split(":", 1)
        d = os.path.join(work, "in-dir")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        victim = os.path.join(d, rng.choice(sorted(os.listdir(d))))
        data = open(victim, "rb").read()
        open(victim, "wb").write(mutate(data) if data else data)
        return os.path.normpath(os.path.join(d, entry)), d
    f = os.path.join(work, "in" + os.path.splitext(seed)[1])
    open(f, "wb").write(mutate(open(seed, "rb").read()))
    return f, f
def keep(path, it):
    dst = f"/tmp/x/crash_{it}_{os.path.basename(path)}"
    (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, dst)
for it in range(n):
    seed = rng.choice(seeds)
    f, kept = prepare(seed)
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    for cmd in ([CERSA, "inspect", f, "--json", "-q"], [CERSA, "convert", f, out, "-q", "--include", "*"]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            print("TIMEOUT", cmd[1], seed); keep(kept, it); bad += 1; continue
        err = p.stderr
        if p.returncode not in (0, 1, 2) or "panicked" in err or "RUST_BACKTRACE" in err:
            bad += 1
            keep(kept, it)
            print("BAD", cmd[1], p.returncode, seed, err[-600:])
        elif p.returncode == 0 and cmd[1] == "convert" and not os.path.exists(os.path.join(out, "cersa.json")):
            bad += 1
            keep(kept, it)
            print("NO OUTPUT but rc 0", seed)
shutil.rmtree(work, ignore_errors=True)
print("done", n, "bad", bad)
sys.exit(1 if bad else 0)
