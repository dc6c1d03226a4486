#!/usr/bin/env bash
# Checkpoint and restore of a counter container, ROUNDS times: wall time of
# `keelctl tasks checkpoint` (CRIU check, pause, dump, resume, blobs and index into
# the content store), how long the counter is frozen meanwhile (the largest gap
# between two of its 20 Hz ticks), the checkpoint's size, and the wall time of
# `keelctl run -d --checkpoint` (verify, unpack, restore). Needs a working CRIU.
#
# usage: sudo bench/checkpoint.sh [ROUNDS]    (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
ROUNDS=${1:-10}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-checkpoint}
criu check >/dev/null 2>&1 || { echo "criu check fails: run deploy/install-deps.sh" >&2; exit 1; }
cargo build --release --locked --bins >&2
rm -rf "$DIR"
mkdir -p "$DIR"
K="target/release/keelctl --address $DIR/keel.sock --namespace bench"
target/release/keeld --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" 2>>"$DIR/keeld.log" &
KEELD=$!
cleanup() {
    remove_tasks $K
    kill "$KEELD" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT
for _ in $(seq 200); do $K version >/dev/null 2>&1 && break; sleep 0.05; done

R="$DIR/rootfs"
busybox_rootfs "$R"
# Each tick prints the time in centiseconds, so the log shows the longest freeze.
COUNTER='while true; do cat /proc/uptime; sleep 0.05; done'
ms() { date +%s%N; }
echo "round checkpoint_ms frozen_ms image_bytes restore_ms"
for i in $(seq "$ROUNDS"); do
    $K run -d --rootfs "$R" "c$i" sh -c "$COUNTER" >/dev/null
    sleep 1
    t0=$(ms)
    digest=$($K tasks checkpoint "c$i")
    t1=$(ms)
    sleep 0.5
    frozen=$($K tasks logs "c$i" | awk '{t=$1*1000} NR>1 && t-p>m {m=t-p} {p=t} END {printf "%.0f", m}')
    size=$($K content get "$digest" | sed -n 's/.*criu.tar","digest":"[^"]*","size":\([0-9]*\).*/\1/p')
    $K tasks rm -f "c$i" >/dev/null
    $K containers rm "c$i" >/dev/null
    t2=$(ms)
    $K run -d --checkpoint "$digest" "r$i" >/dev/null
    t3=$(ms)
    $K tasks rm -f "r$i" >/dev/null
    $K containers rm "r$i" >/dev/null
    echo "$i $(( (t1 - t0) / 1000000 )) $frozen $size $(( (t3 - t2) / 1000000 ))"
done | tee "$DIR/rounds.txt"
col() { awk -v c="$1" '{print $c}' "$DIR/rounds.txt" | median; }
echo "median over $ROUNDS rounds: checkpoint $(col 2) ms, counter frozen $(col 3) ms (ticks every 50), image $(col 4) bytes, restore $(col 5) ms"
