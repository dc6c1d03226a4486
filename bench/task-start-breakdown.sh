#!/usr/bin/env bash
# Where the time of `keelctl run --rm … /bin/busybox true` goes, phase by phase,
# from the kernel's process exec and exit tracepoints (perf), which cost little
# enough not to change the picture. Each run alternates with one of the floor
# (tests/examples/shim_floor.rs: the same steps straight through the shim, nothing
# recorded, no events), so each phase shows what keel adds to it. Medians over RUNS
# runs of each, in ms.
#
# usage: sudo bench/task-start-breakdown.sh [RUNS]    (default 20; needs perf)
#   KEEL_BIN=DIR takes keeld and keelctl from DIR instead of building them (to
#   compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
RUNS=${1:-20}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-breakdown}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
BIN=${KEEL_BIN:-target/release}
[ -n "${KEEL_BIN:-}" ] || cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example shim_floor >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    remove_tasks "$BIN/keelctl" --address "$DIR/keel.sock"
    kill "${KEELD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"
"$BIN/keeld" --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" 2>"$DIR/keeld.log" &
KEELD=$!
for _ in $(seq 200); do [ -S "$DIR/keel.sock" ] && break; sleep 0.05; done
K="$BIN/keelctl --address $DIR/keel.sock"
for i in 1 2 3; do $K run --rm --rootfs "$R" "warm$i" /bin/busybox true; done
floor_spec "$DIR/floor.json" "$DIR/state" "$R" $K
F="target/release/examples/shim_floor $DIR/floor.json $R $DIR/floor 1"

perf record -q -a -e sched:sched_process_exec,sched:sched_process_exit -o "$DIR/perf.data" -- \
    bash -c "for i in \$(seq $RUNS); do $K run --rm --rootfs $R b\$i /bin/busybox true; sleep 0.05; $F; sleep 0.05; done" >/dev/null 2>&1
perf script -i "$DIR/perf.data" -F pid,time,event,trace 2>/dev/null >"$DIR/trace.txt"

# One line per run: who ran it (keelctl or floor), the phase lengths; then the medians
# of each column for both, and what keel adds.
awk '
    function ms(a, b) { return sprintf("%.2f", (b - a) * 1000) }
    {
        pid = $1; t = $2 + 0; sub(":", "", $3)
        if ($3 ~ /exec/) {
            match($0, /filename=[^ ]+/); f = substr($0, RSTART + 9, RLENGTH - 9)
            if (f ~ /(keelctl|shim_floor)$/) {
                start = t; n = 0; shims = 0; box = 0
                live[pid] = f ~ /keelctl$/ ? "keelctl" : "floor"
            }
            else if (f ~ /containerd-shim-runc-v2$/ && shims++ == 0) shim = t
            else if (f ~ /\/runc$/) { runc[++n] = t; live[pid] = "runc" n }
            else if (f ~ /busybox$/) { box = t; live[pid] = "box" }
        } else if (pid in live) {
            w = live[pid]; delete live[pid]
            if (w == "box") boxend = t
            else if (w ~ /^runc/) rend[substr(w, 5) + 0] = t
            else if ((w == "keelctl" || w == "floor") && n == 3)
                print w, ms(start, shim), ms(shim, runc[1]), ms(runc[1], rend[1]), \
                      ms(rend[1], runc[2]), ms(runc[2], rend[2]), ms(box, boxend), \
                      ms(boxend, runc[3]), ms(runc[3], rend[3]), ms(rend[3], t), ms(start, t)
        }
    }' "$DIR/trace.txt" >"$DIR/phases.txt"

echo "phase medians over $(grep -c '^keelctl ' "$DIR/phases.txt") keel runs and" \
    "$(grep -c '^floor ' "$DIR/phases.txt") floor runs (ms):"
printf '%8s %8s %8s\n' keel floor added
names=("start to the shim's start (keel: container create, task create up to the shim)"
    "shim start to runc create (shim start and daemon, Connect, Create)"
    "runc create"
    "runc create done to runc start (shim, Create reply; keel: /tasks/create, Start)"
    "runc start"
    "the container's process"
    "its exit to runc delete (Wait reply; keel: exit record and event, Delete)"
    "runc delete"
    "runc delete done to the end (Shutdown, bundle; keel: events, container delete)"
    "total")
for c in $(seq 2 11); do
    k=$(grep '^keelctl ' "$DIR/phases.txt" | cut -d' ' -f"$c" | median)
    f=$(grep '^floor ' "$DIR/phases.txt" | cut -d' ' -f"$c" | median)
    printf '%8s %8s %8.2f  %s\n' "$k" "$f" "$(awk -v k="$k" -v f="$f" 'BEGIN {print k - f}')" "${names[$((c - 2))]}"
done
