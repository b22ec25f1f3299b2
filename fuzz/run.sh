#!/usr/bin/env bash
# Runs each fuzz target for a bounded time, seeded from the committed corpus; fails on any
# crash, timeout or OOM (libFuzzer exits non-zero and leaves the input in artifacts/).
#
#   fuzz/run.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
#
# Needs a nightly toolchain (`rustup toolchain install nightly`). Uses `cargo fuzz` when it
# is installed, else builds the same instrumented binaries directly with the flags
# cargo-fuzz passes (sancov + libFuzzer from the libfuzzer-sys crate; no ASan: the
# targets are safe Rust).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors_header cersa_checkpoint gguf_header ggml_dequant
    pytorch_pickle pytorch_zip pytorch_legacy index_json manifest plan)
rss_mb=${FUZZ_RSS_MB:-2048}
jobs_flags=(-max_total_time="$secs" -rss_limit_mb="$rss_mb" -timeout=10 -print_final_stats=1)

python3 make_seeds.py
# cersa_checkpoint writes a temp directory per input: tmpfs makes it ~25× faster.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi

triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    for t in "${targets[@]}"; do
        mkdir -p "artifacts/$t"
        cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- "${jobs_flags[@]}" \
            -artifact_prefix="artifacts/$t/"
    done
    exit 0
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo +nightly build --release --target "$triple" --bins
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "=== $t for ${secs}s"
    "target/$triple/release/$t" "corpus/$t" "seeds/$t" "${jobs_flags[@]}" \
        -artifact_prefix="artifacts/$t/"
done
