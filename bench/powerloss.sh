#!/usr/bin/env bash
# Power cuts: keeld's root on keel-powercut (powercut/), which drops every byte
# and directory entry no fsync made durable when the power is cut. CUTS cuts at
# random moments of a mixed workload (ingests, publishes, `run --rm`, detached
# runs waited for, removals) on two clients, then ROUNDS times one cut right
# after each fsync of a content commit; after every cut keeld is started again
# and everything it ever acknowledged is checked: blobs listed, sized and intact
# (`content fsck`), tasks and exits as acknowledged, events in the log or inside
# a gap notice, the log's lifecycle events matching the records.
#
# usage: bench/powerloss.sh [CUTS] [ROUNDS]   (default 200 cuts, 3 rounds; root)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
CUTS=${1:-200}
ROUNDS=${2:-3}
cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example powerloss_bench >&2
OUT=${KEEL_BENCH_OUT:-/var/tmp/keel-bench-powerloss.json}
KEEL_BIN_DIR=$PWD/target/release \
    target/release/examples/powerloss_bench "$CUTS" "$ROUNDS" | tee "$OUT"
echo "every cut: $OUT"
