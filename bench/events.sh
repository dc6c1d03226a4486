#!/usr/bin/env bash
# Event delivery over ttrpc: a release keeld on its own root, the events_bench client
# (tests/examples/events_bench.rs) with 1 and 16 subscribers publishing as fast as
# four publisher connections go, then 16 subscribers at a paced 10,000 events/s for
# publish-to-delivery latency. Then the same 16-subscriber runs against
# raw_events_server (tests/examples), keel's Events API reduced to ttrpc streaming
# from a broadcast channel (no log, no flush, no filter, one thread as keeld), with
# the same client, payloads and connections: keel's figures as a ratio of it.
#
# usage: sudo bench/events.sh [EVENTS]    (default 100000 per throughput run)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
EVENTS=${1:-100000}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-events}
cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example events_bench --example raw_events_server >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    kill "${KEELD:-}" "${RAW:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

target/release/keeld --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" 2>"$DIR/keeld.log" &
KEELD=$!
for _ in $(seq 200); do [ -S "$DIR/keel.sock" ] && break; sleep 0.05; done

B=target/release/examples/events_bench
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
echo "# keel: throughput, as fast as publishers go"
"$B" "$DIR/keel.sock" 1 "$EVENTS" 0
keel16=$("$B" "$DIR/keel.sock" 16 "$((EVENTS / 4))" 0)
echo "$keel16"
echo "# keel: latency at 10,000 events/s published, 16 subscribers"
keellat=$("$B" "$DIR/keel.sock" 16 50000 10000)
echo "$keellat"
echo "# keeld RSS after the runs: $(awk '/VmRSS/ {print $2, $3}' /proc/$KEELD/status)"
kill "$KEELD"
wait "$KEELD" 2>/dev/null || true
KEELD=

target/release/examples/raw_events_server "$DIR/raw.sock" &
RAW=$!
for _ in $(seq 200); do [ -S "$DIR/raw.sock" ] && break; sleep 0.05; done
echo "# raw ttrpc streaming: throughput, 16 subscribers"
raw16=$("$B" "$DIR/raw.sock" 16 "$((EVENTS / 4))" 0)
echo "$raw16"
echo "# raw ttrpc streaming: latency at 10,000 events/s, 16 subscribers"
rawlat=$("$B" "$DIR/raw.sock" 16 50000 10000)
echo "$rawlat"
k=$(echo "$keel16" | field delivered_per_sec)
r=$(echo "$raw16" | field delivered_per_sec)
echo "# keel / raw delivered to 16 subscribers: $(awk -v k="$k" -v r="$r" 'BEGIN { printf "%.2f", k / r }')"
echo "# p99 at 10k/s: keel $(echo "$keellat" | field p99_ms) ms, raw $(echo "$rawlat" | field p99_ms) ms;" \
    "publish rate achieved: keel $(echo "$keellat" | field published_per_sec)/s, raw $(echo "$rawlat" | field published_per_sec)/s"
