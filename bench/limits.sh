#!/usr/bin/env bash
# What hostile load costs a release keeld on its own root, with limits_bench
# (tests/examples/limits_bench.rs):
#   1. keeld's RSS before and after 300 events of 3.5 MiB are published (1 GiB in
#      all), and again after a kill -9 and restart, for two retention budgets;
#   2. Version latency every 10 ms for 15 s with nothing else going on, then while 4
#      connections keep having the largest filters the default limits allow
#      compiled (15 filters of 1 KiB of heavy `~=` expressions per request).
#
# usage: sudo bench/limits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-limits}
cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example limits_bench >&2
B=target/release/examples/limits_bench
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    kill -9 "${KEELD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

start() {
    target/release/keeld --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" \
        --config "$DIR/keel.toml" 2>>"$DIR/keeld.log" &
    KEELD=$!
    local t0
    t0=$(date +%s%N)
    until target/release/keelctl --address "$DIR/keel.sock" version >/dev/null 2>&1; do sleep 0.01; done
    READY_MS=$((($(date +%s%N) - t0) / 1000000))
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$KEELD/status"; }

echo "# RSS (KiB) with 300 events of 3.5 MiB published"
printf '%-14s %10s %12s %14s %12s\n' retain_bytes before after_publish after_restart restart_ms
for budget in 33554432 134217728; do
    rm -rf "$DIR/root" "$DIR/state"
    printf '[events]\nretain_bytes = %s\n[limits]\nevent_bytes = 3932160\n' "$budget" >"$DIR/keel.toml"
    start
    before=$(rss)
    "$B" publish "$DIR/keel.sock" 300 3670016 >/dev/null
    sleep 1.5 # the lazy flush
    after=$(rss)
    kill -9 "$KEELD"
    wait "$KEELD" 2>/dev/null || true
    start
    restarted=$(rss)
    printf '%-14s %10s %12s %14s %12s\n' "$budget" "$before" "$after" "$restarted" "$READY_MS"
    kill -9 "$KEELD"
    wait "$KEELD" 2>/dev/null || true
done

echo "# Version latency, every 10 ms for 15 s"
rm -rf "$DIR/root" "$DIR/state"
: >"$DIR/keel.toml"
start
"$B" version "$DIR/keel.sock" 15 0
"$B" version "$DIR/keel.sock" 15 4
echo "# keeld CPU: $(awk '{print ($14 + $15) / 100 " s"}' "/proc/$KEELD/stat")"
