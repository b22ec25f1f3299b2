#!/usr/bin/env bash
# Device check of the `cuda` route, run from the repo root on a machine with an NVIDIA GPU,
# CUDA 13 libraries (here the torch venv's nvidia-* wheels), python3 with numpy, safetensors
# and torch. B holds release binaries built with `--features cuda`:
#   cargo build --release --features cuda --bin cersa --example bench_decompose
#   cargo test --release --features cuda --no-run --lib   # prints the unit-test executable
#   mkdir -p .devbin && strip -o .devbin/cersa target/release/cersa && strip -o \
#     .devbin/bench_decompose target/release/examples/bench_decompose && strip -o \
#     .devbin/cersa-tests target/release/deps/cersa-<hash> && cp bench/tools.py .devbin/
#   OUT=/tmp/cudacheck bash bench/cuda_device_check.sh
# Writes log.txt, bench_cuda.tsv, bench_cpu.tsv, sha_cuda{1,2}.txt, ranks.txt under $OUT.
# (The run of 2026-11-27 used a version whose `exec > >(tee …)` made the bare `wait` below
# hang on the tee; this version pipes one function through tee and waits on explicit pids.)
set -u
B=${B:-.devbin}
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT"
main() {
G=/tmp/cersa_bench
mkdir -p $G
T0=$(date +%s)
t() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }

t "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nvidia-smi | head -4 | tail -1
nproc; python3 --version

# cuBLAS/cuSOLVER: the torch venv's CUDA 13 wheels (nvidia-cublas, nvidia-cusolver, ...).
NVDIR=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
LIBDIRS=$(find "$NVDIR" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"
t "nvidia wheels at $NVDIR"
find "$NVDIR" /usr/local/cuda/lib64 \( -name 'libcusolver.so*' -o -name 'libcublas.so*' -o -name 'libcublasLt.so*' -o -name 'libcusparse.so*' \) 2>/dev/null | head -20
ldconfig -p | grep -E 'libcuda\.so' | head -3

# Test binary has CARGO_MANIFEST_DIR=/work/wt-gpu compiled in (fixtures are read from it).
mkdir -p /work && ln -sfn "$PWD" /work/wt-gpu

t "== unit tests (cuda)"
$B/cersa-tests cuda --nocapture --test-threads 4 2>&1 | tail -40

t "== generate matrices (power-law spectra, numpy; one process)"
export OPENBLAS_NUM_THREADS=16 OMP_NUM_THREADS=16 MKL_NUM_THREADS=16
timeout 90 python3 -c "
import sys; sys.path.insert(0, '.devbin'); import tools
for s in ['2048x2048', '4096x4096', '4096x11008', '32000x2048']:
    tools.gen_matrices('$G/m' + s + '.safetensors', s); print(s, flush=True)
"
ls -la $G

t "== bench: cuda route, one matrix at a time"
for s in 2048x2048 4096x4096 4096x11008 32000x2048; do
    $B/bench_decompose $G/m$s.safetensors --routes cuda --gemm off
done | tee $OUT/bench_cuda.tsv

t "== bench: CPU routes gram, svd (1 thread each; the 4 files run side by side on 16 cores)"
pids=()
for s in 2048x2048 4096x4096 4096x11008 32000x2048; do
    r=gram; [ $s = 2048x2048 ] && r=gram,svd
    timeout 200 $B/bench_decompose $G/m$s.safetensors --routes $r --cap 100 --gemm off > $G/cpu_$s.tsv &
    pids+=($!)
done
wait "${pids[@]}"
cat $G/cpu_*.tsv | tee $OUT/bench_cpu.tsv
t "== CPU GEMM rate lines (alone on the machine; gram again as a by-product)"
timeout 120 $B/bench_decompose $G/m4096x11008.safetensors --routes gram | tee -a $OUT/bench_cpu.tsv

t "== generate Llama-shaped checkpoint"
timeout 60 python3 $B/tools.py gen-llama $G/llama
t "== convert Llama-shaped BF16 (hidden 2048, 4 layers, ffn 5632, vocab 32000)"
M=$G/llama/model.safetensors
for run in cuda1 cuda2; do
    echo "$run wall_s peak_rss_mib: $(python3 $B/tools.py measure -- timeout 40 $B/cersa convert $M $G/out_$run --algorithm cuda --quiet)"
done
echo "gram16 wall_s peak_rss_mib: $(python3 $B/tools.py measure -- timeout 70 $B/cersa convert $M $G/out_gram16 --algorithm gram --threads 16 --quiet)"
(cd $G/out_cuda1 && sha256sum * | sort -k2) > $OUT/sha_cuda1.txt
(cd $G/out_cuda2 && sha256sum * | sort -k2) > $OUT/sha_cuda2.txt
if cmp -s $OUT/sha_cuda1.txt $OUT/sha_cuda2.txt; then echo "DETERMINISM: cuda runs 1 and 2 byte-identical"; else echo "DETERMINISM: DIFFER"; diff $OUT/sha_cuda1.txt $OUT/sha_cuda2.txt; fi
cat $OUT/sha_cuda1.txt
python3 - $G/out_cuda1/cersa.json $G/out_gram16/cersa.json <<'EOF' | tee $OUT/ranks.txt
import json, sys
a, b = (json.load(open(p))["tensors"] for p in sys.argv[1:3])
fa = {k: v.get("rank") for k, v in a.items() if v.get("kind") == "factored"}
fb = {k: v.get("rank") for k, v in b.items() if v.get("kind") == "factored"}
same = [k for k in fa if fa[k] == fb.get(k)]
print(f"factored: cuda {len(fa)}, gram {len(fb)}; identical ranks {len(same)}/{len(fa)}")
for k in sorted(fa):
    if fa[k] != fb.get(k):
        print("  differ", k, fa[k], fb.get(k), a[k].get("energy"), b.get(k, {}).get("energy"))
for k in sorted(fa)[:6]:
    print("  ", k, fa[k], a[k].get("energy"), b.get(k, {}).get("energy"), a[k].get("rel_error"), b.get(k, {}).get("rel_error"))
EOF
t "== done"
}
main 2>&1 | tee "$OUT/log.txt"
