#!/usr/bin/env python3
"""Renders `cersa report` output in headless Chromium: the page must not be blank, must show
coloured plots, and the browser console must stay free of errors. Controls (a blank page and
a page that logs a console error) prove the checks can fail.

usage: check_report.py CERSA_BIN [CHROMIUM]
"""
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chromium_bin(arg):
    for name in ([arg] if arg else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("check_report: no chromium found (apt-get install chromium)")


def run_chromium(chromium, html, out_dir, *extra):
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=out_dir)
    args = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--window-size=1400,2400", *extra, "file://" + os.path.abspath(html),
    ]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return p


def decode_png(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color_type, _, _, interlace = ihdr
    assert depth == 8 and color_type in (2, 6) and interlace == 0, ihdr
    bpp = 3 if color_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(line)
        prev = line
    return width, height, bpp, rows


def pixel_stats(png):
    width, height, bpp, rows = decode_png(png)
    non_white = coloured = 0
    for line in rows:
        for x in range(0, width * bpp, bpp):
            r, g, b = line[x], line[x + 1], line[x + 2]
            if min(r, g, b) < 245:
                non_white += 1
            if max(r, g, b) - min(r, g, b) > 60:
                coloured += 1
    total = width * height
    return non_white / total, coloured / total


def console_errors(stderr):
    return [
        line for line in stderr.splitlines()
        if re.search(r"CONSOLE|Uncaught|ERR_FILE_NOT_FOUND|Failed to load", line)
    ]


def screenshot(chromium, html, work, name):
    png = os.path.join(work, name + ".png")
    p = run_chromium(chromium, html, work, f"--screenshot={png}")
    if p.returncode != 0 or not os.path.exists(png):
        sys.exit(f"chromium failed on {html} ({p.returncode}):\n{p.stderr[-3000:]}")
    return png, p.stderr


def main():
    cersa = sys.argv[1]
    chromium = chromium_bin(sys.argv[2] if len(sys.argv) > 2 else None)
    work = tempfile.mkdtemp(prefix="cersa-browser-")
    src = os.path.join(ROOT, "fixtures", "minilm-excerpt", "model.safetensors")
    out_dir = os.path.join(work, "out")
    subprocess.run([cersa, "convert", src, out_dir, "-q"], check=True, stdout=subprocess.DEVNULL)
    pages = {
        "source": os.path.join(work, "source.html"),
        "cersa": os.path.join(work, "cersa.html"),
    }
    subprocess.run([cersa, "report", src, "-o", pages["source"], "-q"], check=True)
    subprocess.run([cersa, "report", out_dir, "-o", pages["cersa"], "-q"], check=True)

    # Controls: the checks below must reject these.
    blank = os.path.join(work, "blank.html")
    open(blank, "w").write("<!DOCTYPE html><html><body></body></html>")
    noisy = os.path.join(work, "noisy.html")
    open(noisy, "w").write('<!DOCTYPE html><html><body><p>x</p><script>console.error("boom")</script></body></html>')
    png, _ = screenshot(chromium, blank, work, "blank")
    assert pixel_stats(png)[0] < 0.001, "blank control should be blank"
    _, err = screenshot(chromium, noisy, work, "noisy")
    assert console_errors(err), "console-error control was not detected:\n" + err[-2000:]

    for kind, html in pages.items():
        text = open(html, encoding="utf-8").read()
        assert "<script" not in text and not re.search(r"""(src|href)=["']?https?:""", text), kind
        for section in ("memory", "energy", "heatmap", "spectra"):
            m = re.search(rf'<div class="plots" id="{section}">(.*?)</div>', text, re.S)
            assert m and "<svg" in m.group(1), f"{kind}: plot section {section} has no SVG"
        png, err = screenshot(chromium, html, work, kind)
        errors = console_errors(err)
        assert not errors, f"{kind}: console errors:\n" + "\n".join(errors)
        non_white, coloured = pixel_stats(png)
        print(f"{kind}: {non_white:.1%} non-white, {coloured:.1%} coloured pixels ({png})")
        assert non_white > 0.03, f"{kind}: page looks blank ({non_white:.2%} non-white)"
        assert coloured > 0.005, f"{kind}: no coloured plots visible ({coloured:.2%})"
        dom = run_chromium(chromium, html, work, "--dump-dom")
        assert dom.returncode == 0 and dom.stdout.count("<svg") >= 4, f"{kind}: DOM lacks the plots"
    print("browser check passed")


if __name__ == "__main__":
    main()
