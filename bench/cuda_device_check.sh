#!/usr/bin/env bash
# Device check of the `cuda` route, run from the repo root on a machine with an NVIDIA GPU,
# CUDA 13 libraries (here the torch venv's nvidia-* wheels), python3 with numpy, safetensors
# and torch. B holds release binaries built with `--features cuda`:
#   cargo build --release --features cuda --bin cersa --example bench_decompose
#   cargo test --release --features cuda --no-run --lib   # prints the unit-test executable
#   mkdir -p .devbin && strip -o .devbin/cersa target/release/cersa && strip -o \
#     .devbin/bench_decompose target/release/examples/bench_decompose && strip -o \
#     .devbin/cersa-tests target/release/deps/cersa-<hash>
#   OUT=/tmp/cudacheck bash bench/cuda_device_check.sh
# Writes log.txt, bench_cuda.tsv, bench_torch.tsv, bench_cpu.tsv, sha_cuda{1,2}.txt, ranks.txt
# under $OUT. Every step has a time cap so that the whole script ends inside ~8 minutes.
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
nproc; python3 --version; lscpu | grep -E 'Model name|^CPU\(s\)'

# cuBLAS/cuSOLVER: the torch venv's CUDA 13 wheels (nvidia-cublas, nvidia-cusolver, ...).
NVDIR=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
LIBDIRS=$(find "$NVDIR" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"
find "$NVDIR" \( -name 'libcusolver.so*' -o -name 'libcublas.so*' \) 2>/dev/null | head -4

# The test binary reads fixtures from the CARGO_MANIFEST_DIR it was built in (/work/main).
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }

t "== generate matrices and the Llama-shaped checkpoint (side by side, untimed)"
export OPENBLAS_NUM_THREADS=8 OMP_NUM_THREADS=8 MKL_NUM_THREADS=8
timeout 120 python3 -c "
import sys; sys.path.insert(0, 'bench'); import tools
for s in ['2048x2048', '4096x4096', '4096x11008', '32000x2048']:
    tools.gen_matrices('$G/m' + s + '.safetensors', s); print(s, flush=True)
" &
gm=$!
timeout 120 python3 bench/tools.py gen-llama $G/llama &
gl=$!

t "== unit tests (cuda)"
timeout 120 $B/cersa-tests cuda --nocapture --test-threads 4 2>&1 | tail -25
wait $gm $gl
export OPENBLAS_NUM_THREADS=16 OMP_NUM_THREADS=16 MKL_NUM_THREADS=16
ls -la $G $G/llama

t "== bench: cuda route, one matrix at a time (with CERSA_TRACE_CUDA phase times)"
for s in 2048x2048 4096x4096 4096x11008 32000x2048; do
    CERSA_TRACE_CUDA=1 timeout 60 $B/bench_decompose $G/m$s.safetensors --routes cuda --gemm off 2>&1 | grep -v '64×48'
done | tee $OUT/bench_cuda.tsv

t "== bench: torch.linalg.svd on the GPU (what PiSSA calls), same matrices"
timeout 150 python3 bench/torch_gpu_svd.py --reps 2 $G/m2048x2048.safetensors $G/m4096x4096.safetensors \
    $G/m4096x11008.safetensors $G/m32000x2048.safetensors | tee $OUT/bench_torch.tsv

t "== bench: CPU route gram on this host (1 thread each; the 4 files side by side)"
pids=()
for s in 2048x2048 4096x4096 4096x11008 32000x2048; do
    timeout 100 $B/bench_decompose $G/m$s.safetensors --routes gram --cap 90 --gemm off > $G/cpu_$s.tsv &
    pids+=($!)
done
wait "${pids[@]}"
cat $G/cpu_*.tsv | tee $OUT/bench_cpu.tsv

t "== convert Llama-shaped BF16 (hidden 2048, 4 layers, ffn 5632, vocab 32000)"
M=$G/llama/model.safetensors
for run in cuda1 cuda2; do
    echo "$run wall_s peak_rss_mib: $(python3 bench/tools.py measure -- timeout 60 $B/cersa convert $M $G/out_$run --algorithm cuda --quiet)"
done
echo "cuda-threads4 wall_s peak_rss_mib: $(python3 bench/tools.py measure -- timeout 60 $B/cersa convert $M $G/out_cuda_t4 --algorithm cuda --threads 4 --quiet)"
echo "cuda-threads1 wall_s peak_rss_mib: $(python3 bench/tools.py measure -- timeout 60 $B/cersa convert $M $G/out_cuda_t1 --algorithm cuda --threads 1 --quiet)"
echo "gram16 wall_s peak_rss_mib: $(python3 bench/tools.py measure -- timeout 90 $B/cersa convert $M $G/out_gram16 --algorithm gram --threads 16 --quiet)"
(cd $G/out_cuda1 && sha256sum * | sort -k2) > $OUT/sha_cuda1.txt
(cd $G/out_cuda2 && sha256sum * | sort -k2) > $OUT/sha_cuda2.txt
(cd $G/out_cuda_t1 && sha256sum * | sort -k2) > $G/sha_t1.txt
(cd $G/out_cuda_t4 && sha256sum * | sort -k2) > $G/sha_t4.txt
for o in $OUT/sha_cuda2.txt $G/sha_t4.txt $G/sha_t1.txt; do
    if cmp -s $OUT/sha_cuda1.txt $o; then echo "DETERMINISM: cuda1 = $o"; else echo "DETERMINISM: DIFFER $o"; diff $OUT/sha_cuda1.txt $o; fi
done
cat $OUT/sha_cuda1.txt
python3 - $G/out_cuda1/cersa.json $G/out_gram16/cersa.json <<'EOF2' | tee $OUT/ranks.txt
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
EOF2
t "== reference Python converter (numpy, 16 threads), same checkpoint"
echo "python-ref wall_s peak_rss_mib: $(python3 bench/tools.py measure -- timeout 120 python3 bench/reference_convert.py $M $G/out_ref)"
[ -f $G/out_ref/ranks.json ] && python3 bench/tools.py compare-ranks $G/out_cuda1/cersa.json $G/out_ref/ranks.json
t "== done"
}
main 2>&1 | tee "$OUT/log.txt"
