#!/usr/bin/env bash
# Ingest throughput of keel's content store, paired in one run with the disk's own
# limits on the same filesystem:
#   dd bs=1M conv=fsync   writing the same bytes durably (the bound for a durable store)
#   sha256sum             hashing them (the bound for a content-addressed one)
#   keelctl content ingest   the whole path: client → ttrpc → storage actor → fsync/rename
# The input is read from the page cache in every case.
#
# usage: sudo bench/content-ingest.sh [SIZE_MIB] [RUNS]     (defaults 1024 and 5)
#   KEEL_BIN=DIR takes keeld and keelctl from DIR instead of building them (to
#   compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
SIZE_MIB=${1:-1024}
RUNS=${2:-5}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench}
BIN=${KEEL_BIN:-target/release}
[ -n "${KEEL_BIN:-}" ] || cargo build --release --locked --bins >&2
rm -rf "$DIR"
mkdir -p "$DIR"
trap 'kill "$KEELD" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

head -c "$((SIZE_MIB << 20))" /dev/urandom >"$DIR/data"
cat "$DIR/data" >/dev/null
SOCK="$DIR/run/keel.sock"
"$BIN/keeld" --root "$DIR/root" --state "$DIR/state" --address "$SOCK" 2>"$DIR/keeld.log" &
KEELD=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
CTL="$BIN/keelctl --address $SOCK"

secs() { local s; s=$(date +%s.%N); "$@" >/dev/null; awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'; }
mibps() { awk -v n="$SIZE_MIB" -v t="$1" 'BEGIN { printf "%.0f", n / t }'; }

printf '%-4s %12s %12s %12s %10s\n' run "dd+fsync" sha256sum keel keel/dd
ratios=()
for run in $(seq "$RUNS"); do
    sync
    t_dd=$(secs dd if="$DIR/data" of="$DIR/dd.out" bs=1M conv=fsync status=none)
    rm -f "$DIR/dd.out"; sync
    t_sha=$(secs sha256sum "$DIR/data")
    t_keel=$(secs sh -c "$CTL content ingest bench-$run < '$DIR/data'")
    digest=$($CTL content ls --format json | sed -n 's/.*"digest":"\([^"]*\)".*/\1/p' | head -n 1)
    $CTL content rm "$digest" >/dev/null; sync
    r=$(awk -v a="$t_dd" -v b="$t_keel" 'BEGIN { printf "%.2f", a / b }')
    ratios+=("$r")
    printf '%-4s %8s MiB/s %6s MiB/s %6s MiB/s %10s\n' "$run" "$(mibps "$t_dd")" "$(mibps "$t_sha")" "$(mibps "$t_keel")" "$r"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
echo "median keel/dd+fsync: $median  (size ${SIZE_MIB} MiB, $RUNS runs, $(nproc) cores, $(df --output=source "$DIR" | tail -n 1))"
