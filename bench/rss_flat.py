#!/usr/bin/env python3
"""Resident memory of `cersa convert` and `cersa inspect` on a checkpoint and on the same
checkpoint repeated 4× (issue 20, memory): anonymous and file-backed shares, sampled.

    python3 bench/rss_flat.py CERSA WORK [--repeat 4] [--threads 2] [--llama-args "..."]

The checkpoint is `bench/tools.py gen-llama` (BF16, power-law spectra; default a small
shape, `--hidden 1024 --layers 2 --ffn 2816 --vocab 8000`), generated in WORK once per
repeat. Each command runs with `CERSA_PRINT_PEAK_RSS=1` (VmHWM, the kernel's peak RSS) while
this script samples /proc/PID/status every 2 ms for the largest RssAnon (heap) and RssFile
(mapped source pages still resident). Mapped pages a run has consumed are released with
MADV_DONTNEED (`MappedFile::release`), so the file-backed share should not grow with the
checkpoint; the printed ratios say whether it does.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure(cmd):
    """(VmHWM MiB, max RssAnon MiB, max RssFile MiB, wall s) of one run."""
    env = dict(os.environ, CERSA_PRINT_PEAK_RSS="1")
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    anon = file_ = 0
    while p.poll() is None:
        a, f = status_kib(p.pid, "RssAnon:"), status_kib(p.pid, "RssFile:")
        anon, file_ = max(anon, a or 0), max(file_, f or 0)
        time.sleep(0.002)
    err = p.stderr.read().decode()
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd}: exit {p.returncode}\n{err}")
    hwm = next(int(l.split()[1]) for l in err.splitlines() if l.startswith("cersa-peak-rss:"))
    return hwm / 1024, anon / 1024, file_ / 1024, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cersa")
    ap.add_argument("work")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--llama-args", default="--hidden 1024 --layers 2 --ffn 2816 --vocab 8000")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rows = {}
    for rep in (1, a.repeat):
        src_dir = os.path.join(a.work, f"llama-x{rep}")
        src = os.path.join(src_dir, "model.safetensors")
        if not os.path.exists(src):
            subprocess.run([sys.executable, os.path.join(HERE, "tools.py"), "gen-llama", src_dir,
                            *a.llama_args.split(), "--repeat", str(rep)], check=True)
        out = os.path.join(a.work, f"out-x{rep}")
        subprocess.run(["rm", "-rf", out], check=True)
        size = os.path.getsize(src) / 2**20
        rows[(rep, "convert")] = (size, *measure(
            [a.cersa, "convert", src, out, "--threads", a.threads, "-q"]))
        rows[(rep, "inspect")] = (size, *measure(
            [a.cersa, "inspect", src, "--threads", a.threads, "-q", "--json"]))
    print(f"| command | checkpoint | source MiB | peak RSS MiB | max RssAnon MiB | "
          f"max RssFile MiB | wall s |")
    print("|---|---|---|---|---|---|---|")
    for (rep, cmd), (size, hwm, anon, file_, wall) in sorted(rows.items(), key=lambda r: r[0][::-1]):
        print(f"| {cmd} | ×{rep} | {size:.0f} | {hwm:.0f} | {anon:.0f} | {file_:.0f} | {wall:.1f} |")
    for cmd in ("convert", "inspect"):
        one, many = rows[(1, cmd)], rows[(a.repeat, cmd)]
        print(f"{cmd}: ×{a.repeat}/×1 source {many[0] / one[0]:.2f}, peak RSS "
              f"{many[1] / one[1]:.2f}, RssAnon {many[2] / one[2]:.2f}, "
              f"RssFile {many[3] / max(one[3], 1e-9):.2f}")


if __name__ == "__main__":
    main()
