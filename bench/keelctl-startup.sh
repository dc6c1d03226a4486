#!/usr/bin/env bash
# keelctl's start-up cost: `keelctl version` (start, connect, one request, exit)
# against `/bin/true`, for this build's keelctl and, with KEEL_BASE_BIN=DIR, the
# keelctl in DIR (another build), in alternating rounds against one release keeld.
#
# usage: sudo [KEEL_BASE_BIN=DIR] bench/keelctl-startup.sh [ROUNDS] [RUNS_PER_ROUND]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
ROUNDS=${1:-5}
RUNS=${2:-300}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-keelctl}
[ -n "${KEEL_BIN:-}" ] || cargo build --release --locked --bins >&2
BIN=${KEEL_BIN:-target/release}
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    kill -9 "${KEELD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
: >"$DIR/keel.toml"
"$BIN/keeld" --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" \
    --config "$DIR/keel.toml" 2>>"$DIR/keeld.log" &
KEELD=$!
until "$BIN/keelctl" --address "$DIR/keel.sock" version >/dev/null 2>&1; do sleep 0.01; done

# per_run CMD…: microseconds per run of CMD, over RUNS runs.
per_run() {
    local t0 i
    t0=$(date +%s%N)
    for ((i = 0; i < RUNS; i++)); do "$@" >/dev/null; done
    echo $((($(date +%s%N) - t0) / RUNS / 1000))
}

printf '%-6s %12s %12s %12s %14s %14s\n' round true_us new_us base_us new-true_us base-true_us
new_all=() base_all=()
for ((r = 1; r <= ROUNDS; r++)); do
    t=$(per_run /bin/true)
    b=-
    # The two builds take turns going first.
    if [ -n "${KEEL_BASE_BIN:-}" ] && ((r % 2 == 0)); then
        b=$(per_run "$KEEL_BASE_BIN/keelctl" --address "$DIR/keel.sock" version)
    fi
    n=$(per_run "$BIN/keelctl" --address "$DIR/keel.sock" version)
    if [ -n "${KEEL_BASE_BIN:-}" ] && ((r % 2 == 1)); then
        b=$(per_run "$KEEL_BASE_BIN/keelctl" --address "$DIR/keel.sock" version)
    fi
    [ "$b" = - ] || base_all+=($((b - t)))
    new_all+=($((n - t)))
    printf '%-6s %12s %12s %12s %14s %14s\n' "$r" "$t" "$n" "$b" "$((n - t))" \
        "$([ "$b" = - ] && echo - || echo $((b - t)))"
done
echo "median keelctl version minus /bin/true: new $(printf '%s\n' "${new_all[@]}" | median) µs" \
    "${KEEL_BASE_BIN:+base $(printf '%s\n' "${base_all[@]}" | median) µs}"
