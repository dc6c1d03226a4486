#!/usr/bin/env bash
# Checkpoint and restore of a counter container on each shim, side by side:
# ROUNDS rounds, each taking one checkpoint and one restore on keel's shim
# (io.containerd.keel.v1) and on containerd's runc shim (io.containerd.runc.v2),
# in alternating order. Per checkpoint: wall time of `keelctl tasks checkpoint`
# (CRIU check, pause, dump, resume, blobs and index into the content store), how
# long the counter is frozen meanwhile (the largest gap between two of its 20 Hz
# ticks), the image's size; per restore, the wall time of `keelctl run -d
# --checkpoint` (verify, unpack, restore). Medians per shim and their ratios
# (keel's shim ÷ the runc shim). Needs a working CRIU.
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
RUNTIMES="io.containerd.runc.v2 io.containerd.keel.v1"
# one ROUND RUNTIME: a checkpoint and a restore on RUNTIME; prints a row.
one() {
    local i=$1 rt=$2 tag t0 t1 t2 t3 digest frozen size
    tag="${rt//./-}-$i"
    $K run -d --runtime "$rt" --rootfs "$R" "c-$tag" sh -c "$COUNTER" >/dev/null
    sleep 1
    t0=$(ms)
    digest=$($K tasks checkpoint "c-$tag")
    t1=$(ms)
    sleep 0.5
    frozen=$($K tasks logs "c-$tag" | awk '{t=$1*1000} NR>1 && t-p>m {m=t-p} {p=t} END {printf "%.0f", m}')
    size=$($K content get "$digest" | sed -n 's/.*criu.tar","digest":"[^"]*","size":\([0-9]*\).*/\1/p')
    $K tasks rm -f "c-$tag" >/dev/null
    $K containers rm "c-$tag" >/dev/null
    t2=$(ms)
    $K run -d --runtime "$rt" --checkpoint "$digest" "r-$tag" >/dev/null
    t3=$(ms)
    $K tasks logs "r-$tag" >/dev/null
    $K tasks rm -f "r-$tag" >/dev/null
    $K containers rm "r-$tag" >/dev/null
    echo "$i $rt $(( (t1 - t0) / 1000000 )) $frozen $size $(( (t3 - t2) / 1000000 ))"
}
echo "round runtime checkpoint_ms frozen_ms image_bytes restore_ms"
for i in $(seq "$ROUNDS"); do
    order=$RUNTIMES
    # Alternate which shim goes first, so neither always meets a warmer cache.
    [ $((i % 2)) -eq 0 ] && order=$(echo "$RUNTIMES" | tr ' ' '\n' | tac | tr '\n' ' ')
    for rt in $order; do one "$i" "$rt"; done
done | tee "$DIR/rounds.txt"
col() { awk -v rt="$1" -v c="$2" '$2 == rt {print $c}' "$DIR/rounds.txt" | median; }
for rt in $RUNTIMES; do
    echo "$rt, median over $ROUNDS rounds: checkpoint $(col "$rt" 3) ms, counter frozen $(col "$rt" 4) ms (ticks every 50), image $(col "$rt" 5) bytes, restore $(col "$rt" 6) ms"
done
ratio() { awk -v a="$(col io.containerd.keel.v1 "$1")" -v b="$(col io.containerd.runc.v2 "$1")" 'BEGIN {printf "%.2f", a / b}'; }
echo "keel shim / runc shim: checkpoint $(ratio 3), frozen $(ratio 4), image $(ratio 5), restore $(ratio 6)"
