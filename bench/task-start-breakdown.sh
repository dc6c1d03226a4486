#!/usr/bin/env bash
# Where the time of `keelctl run --rm … /bin/busybox true` goes, phase by phase,
# from the kernel's process exec and exit tracepoints (perf), which cost little
# enough not to change the picture. Medians over RUNS runs, in ms.
#
# usage: sudo bench/task-start-breakdown.sh [RUNS]    (default 20; needs perf)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
RUNS=${1:-20}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-breakdown}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --locked --bins >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    remove_tasks target/release/keelctl --address "$DIR/keel.sock"
    kill "${KEELD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"
target/release/keeld --root "$DIR/root" --state "$DIR/state" --address "$DIR/keel.sock" 2>"$DIR/keeld.log" &
KEELD=$!
for _ in $(seq 200); do [ -S "$DIR/keel.sock" ] && break; sleep 0.05; done
K="target/release/keelctl --address $DIR/keel.sock"
for i in 1 2 3; do $K run --rm --rootfs "$R" "warm$i" /bin/busybox true; done

perf record -q -a -e sched:sched_process_exec,sched:sched_process_exit -o "$DIR/perf.data" -- \
    bash -c "for i in \$(seq $RUNS); do $K run --rm --rootfs $R b\$i /bin/busybox true; sleep 0.05; done" >/dev/null 2>&1
perf script -i "$DIR/perf.data" -F pid,time,event,trace 2>/dev/null >"$DIR/trace.txt"

# One line per run: the phase lengths, then the medians of each column.
awk '
    function ms(a, b) { return sprintf("%.2f", (b - a) * 1000) }
    {
        pid = $1; t = $2 + 0; sub(":", "", $3)
        if ($3 ~ /exec/) {
            match($0, /filename=[^ ]+/); f = substr($0, RSTART + 9, RLENGTH - 9)
            if (f ~ /keelctl$/) { start = t; n = 0; shims = 0; box = 0; live[pid] = "keelctl" }
            else if (f ~ /containerd-shim-runc-v2$/ && shims++ == 0) shim = t
            else if (f ~ /\/runc$/) { runc[++n] = t; live[pid] = "runc" n }
            else if (f ~ /busybox$/) { box = t; live[pid] = "box" }
        } else if (pid in live) {
            w = live[pid]; delete live[pid]
            if (w == "box") boxend = t
            else if (w ~ /^runc/) rend[substr(w, 5) + 0] = t
            else if (w == "keelctl" && n == 3)
                print ms(start, shim), ms(shim, runc[1]), ms(runc[1], rend[1]), \
                      ms(rend[1], runc[2]), ms(runc[2], rend[2]), ms(box, boxend), \
                      ms(boxend, runc[3]), ms(runc[3], rend[3]), ms(rend[3], t), ms(start, t)
        }
    }' "$DIR/trace.txt" >"$DIR/phases.txt"

echo "phase medians over $(wc -l <"$DIR/phases.txt") runs (ms):"
names=("keelctl start to the shim's start (container create, task create up to the shim)"
    "shim start to runc create (shim start and daemon, Connect, Create)"
    "runc create"
    "runc create done to runc start (shim, task create reply and event, Start)"
    "runc start"
    "the container's process"
    "its exit to runc delete (exit event, Wait reply, Delete)"
    "runc delete"
    "runc delete done to keelctl's exit (Shutdown, bundle, events, container delete)"
    "total")
for c in $(seq 10); do
    m=$(cut -d' ' -f"$c" "$DIR/phases.txt" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    printf '%8s  %s\n' "$m" "${names[$((c - 1))]}"
done
