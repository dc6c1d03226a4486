#!/usr/bin/env bash
# Event delivery over ttrpc: a release keeld on its own root, the events_bench client
# (tests/examples/events_bench.rs) with 1 and 16 subscribers publishing as fast as
# four publisher connections go, then 16 subscribers at a paced 10,000 events/s for
# publish-to-delivery latency.
#
# usage: sudo bench/events.sh [EVENTS]    (default 100000 per throughput run)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
EVENTS=${1:-100000}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-events}
cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example events_bench >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    kill "${KEELD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

target/release/keeld --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" 2>"$DIR/keeld.log" &
KEELD=$!
for _ in $(seq 200); do [ -S "$DIR/keel.sock" ] && break; sleep 0.05; done

B=target/release/examples/events_bench
echo "# throughput, as fast as publishers go"
"$B" "$DIR/keel.sock" 1 "$EVENTS" 0
"$B" "$DIR/keel.sock" 16 "$((EVENTS / 4))" 0
echo "# latency at 10,000 events/s published, 16 subscribers"
"$B" "$DIR/keel.sock" 16 50000 10000
echo "# keeld RSS after the runs: $(awk '/VmRSS/ {print $2, $3}' /proc/$KEELD/status)"
