#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder and validator a client reaches
# (fuzz/src/lib.rs lists the targets), with libFuzzer on the stable toolchain.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET]      default 60
#
# Builds fuzz/libfuzzer with the coverage instrumentation cargo-fuzz uses (plain
# rustc flags, no nightly), runs each target for SECONDS_PER_TARGET on a scratch copy
# of its corpus, merges the inputs that add coverage back into fuzz/corpus/<target>
# (so the repository keeps them, and `cargo test` replays them), and prints one
# line per target: executions, executions per second, corpus size, crashes. A
# crash's input is left in fuzz/artifacts/<target>/ and the script exits 1.
#
# Environment: FUZZ_JOBS (parallel runs per target, default 1), FUZZ_MAX_LEN
# (default 4096 bytes), FUZZ_TARGETS (space-separated; default every target).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
jobs=${FUZZ_JOBS:-1}
max_len=${FUZZ_MAX_LEN:-4096}
triple=$(rustc -vV | sed -n 's/^host: //p')
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# --target keeps the instrumentation off build scripts and proc macros.
RUSTFLAGS="$flags" cargo build --release --manifest-path fuzz/libfuzzer/Cargo.toml \
    --target "$triple" --target-dir target/fuzz >&2
bin=target/fuzz/$triple/release
targets=${FUZZ_TARGETS:-$(sed -n 's/^    ("\([a-z_]*\)", .*/\1/p' fuzz/src/lib.rs)}

work=$(mktemp -d /var/tmp/keel-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
total=0
failed=0
printf '%-18s %12s %10s %8s %8s\n' target runs "runs/s" corpus crashes
for t in $targets; do
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    cp fuzz/corpus/"$t"/* "$work/$t"/
    log="$work/$t.log"
    status=0
    "$bin/$t" "$work/$t" -max_total_time="$secs" -max_len="$max_len" -jobs="$jobs" \
        -workers="$jobs" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
    # With -jobs, each job logs to fuzz-N.log in the working directory.
    if [ "$jobs" -gt 1 ]; then cat fuzz-*.log >>"$log" 2>/dev/null || true; rm -f fuzz-*.log; fi
    runs=$(awk '/stat::number_of_executed_units:/ { s += $2 } END { print s + 0 }' "$log")
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    # Keep what adds coverage (minimised against what is kept already).
    "$bin/$t" -merge=1 -max_len="$max_len" "fuzz/corpus/$t" "$work/$t" >/dev/null 2>&1 || true
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    printf '%-18s %12d %10d %8d %8d\n' "$t" "$runs" $((runs / secs)) "$corpus" "$crashes"
    total=$((total + runs))
    if [ "$status" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        failed=1
        tail -n 40 "$log" >&2
    fi
done
rmdir fuzz/artifacts/* 2>/dev/null || true
rmdir fuzz/artifacts 2>/dev/null || true
echo "total executions: $total"
exit "$failed"
