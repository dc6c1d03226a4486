#!/usr/bin/env bash
# Restart cost with TASKS running tasks: keeld is killed with SIGKILL and started
# again, ROUNDS times; restore_bench (tests/examples/restore_bench.rs) times, from
# the new process's start, the API answering Version and `Tasks.List` being fully
# correct: exactly the TASKS tasks listed before the first kill, all RUNNING, each
# with the pid it had then. Last, with keeld stopped, the time to ask every shim
# directly what a restore asks it: the floor the shims set.
#
# usage: sudo bench/restore.sh [ROUNDS] [TASKS]    (default 10 rounds, 200 tasks)
#   KEEL_BIN=DIR takes keeld and keelctl from DIR instead of building them (to
#   compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
ROUNDS=${1:-10}
TASKS=${2:-200}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-restore}
BIN=${KEEL_BIN:-target/release}
[ -n "${KEEL_BIN:-}" ] || cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example restore_bench >&2
rm -rf "$DIR"
mkdir -p "$DIR"
KEELD_CMD=("$BIN/keeld" --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock")
K="$BIN/keelctl --address $DIR/keel.sock --namespace bench"
start_keeld() {
    "${KEELD_CMD[@]}" 2>>"$DIR/keeld.log" &
    KEELD=$!
    for _ in $(seq 200); do $K version >/dev/null 2>&1 && return; sleep 0.05; done
    echo "keeld did not start" >&2; exit 1
}
cleanup() {
    pkill -f "keeld --root $DIR/root" 2>/dev/null || true
    sleep 0.5
    "${KEELD_CMD[@]}" 2>>"$DIR/keeld.log" &
    for _ in $(seq 200); do $K version >/dev/null 2>&1 && break; sleep 0.05; done
    remove_tasks $K
    pkill -f "keeld --root $DIR/root" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"

start_keeld
for i in $(seq "$TASKS"); do $K run -d --rootfs "$R" "idle$i" sleep 100000 >/dev/null; done
# The truth, from before any kill: every task's id and pid.
$K tasks ls --format json >"$DIR/truth.json"
kill -9 "$KEELD"; wait "$KEELD" 2>/dev/null || true
target/release/examples/restore_bench "${KEELD_CMD[@]}" -- "$DIR/keel.sock" bench "$ROUNDS" \
    "$DIR/truth.json" "$TASKS" | tee "$DIR/rounds.json"
api=$(sed -n 's/.*"api_ms":\([0-9.]*\).*/\1/p' "$DIR/rounds.json" | median)
ok=$(sed -n 's/.*"correct_ms":\([0-9.]*\).*/\1/p' "$DIR/rounds.json" | median)
floor=$(sed -n 's/.*"shims_floor_ms":\([0-9.]*\).*/\1/p' "$DIR/rounds.json")
echo "median over $ROUNDS restarts with $TASKS tasks: API answering ${api} ms, tasks ls fully correct ${ok} ms"
echo "the shims' floor (each asked Connect and State directly, keeld stopped): ${floor} ms"
