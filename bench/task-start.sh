#!/usr/bin/env bash
# Task start cost, paired in one run on the same busybox bundle:
#   keel   keelctl run --rm … /bin/busybox true        (keeld → Go shim → runc)
#   keel+k the same with --runtime io.containerd.keel.v1 (keeld → keel's shim, which
#          makes the container in its own process)
#   ctr    ctr run --rm --rootfs … /bin/busybox true   (a containerd this script starts
#                                                       on its own root and socket)
#   ctr+k  the same containerd with --runtime io.containerd.keel.v1
#   floor  the same steps driven straight through the shim, nothing recorded and
#          no events (tests/examples/shim_floor.rs): what shim and runc cost alone
#   runc   runc run of the same rootfs
# plus keeld's CPU per task start and keeld's RSS with 200 running tasks.
#
# usage: sudo bench/task-start.sh [RUNS]    (default 30)
#   KEEL_BIN=DIR takes keeld and keelctl from DIR instead of building them (to
#   compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
RUNS=${1:-30}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-tasks}
BIN=${KEEL_BIN:-target/release}
[ -n "${KEEL_BIN:-}" ] || cargo build --release --locked --bins >&2
cargo build --release --locked -p keel-tests --example shim_floor >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    remove_tasks "$BIN/keelctl" --address "$DIR/keel.sock"
    kill "${KEELD:-}" "${CTD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"

start_daemons "$DIR" "$BIN"

# runc bundle over the same rootfs.
B="$DIR/bundle"
mkdir -p "$B"
(cd "$B" && runc spec)
sed -i -e 's|"terminal": true|"terminal": false|' -e "s|\"path\": \"rootfs\"|\"path\": \"$R\"|" \
    -e 's|"sh"|"/bin/busybox", "true"|' "$B/config.json"

K="$BIN/keelctl --address $DIR/keel.sock"
floor_spec "$DIR/floor.json" "$DIR/keel-state" "$R" $K
F="target/release/examples/shim_floor $DIR/floor.json $R $DIR/floor 1"
C="ctr --address $DIR/ctd.sock"
# µs a command takes; the clock is read without starting a process.
us() { local s=$EPOCHREALTIME e; "$@" >/dev/null 2>&1; e=$EPOCHREALTIME; echo $((${e/./} - ${s/./})); }
# keeld's CPU time so far in ns, over its threads (from the scheduler's own
# accounting, not clock ticks; those of its blocking pool that have ended are not
# counted), and its context switches.
cpu() { cat /proc/"$KEELD"/task/*/schedstat | awk '{s += $1} END {print s}'; }
switches() { cat /proc/"$KEELD"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }

: >"$DIR/keel.us"; : >"$DIR/ctr.us"; : >"$DIR/floor.us"; : >"$DIR/runc.us"
: >"$DIR/keelk.us"; : >"$DIR/ctrk.us"
KS="--runtime io.containerd.keel.v1"
c=0 sw=0
for i in $(seq "$RUNS"); do
    c0=$(cpu) s0=$(switches)
    us $K run --rm --rootfs "$R" "k$i" /bin/busybox true >>"$DIR/keel.us"
    c=$((c + $(cpu) - c0)) sw=$((sw + $(switches) - s0))
    us $K run --rm $KS --rootfs "$R" "kk$i" /bin/busybox true >>"$DIR/keelk.us"
    us $C run --rm --rootfs "$R" "c$i" /bin/busybox true >>"$DIR/ctr.us"
    us $C run --rm $KS --rootfs "$R" "ck$i" /bin/busybox true >>"$DIR/ctrk.us"
    us $F >>"$DIR/floor.us"
    us runc run -b "$B" "r$i" >>"$DIR/runc.us"
done
keel=$(median <"$DIR/keel.us"); ctrm=$(median <"$DIR/ctr.us"); floor=$(median <"$DIR/floor.us")
runcm=$(median <"$DIR/runc.us")
keelk=$(median <"$DIR/keelk.us"); ctrk=$(median <"$DIR/ctrk.us")
echo "median start-to-exit, $RUNS runs each (µs): keel $keel  keel+keel-shim $keelk  ctr $ctrm  ctr+keel-shim $ctrk  floor $floor  runc $runcm"
awk -v k="$keel" -v c="$ctrm" -v f="$floor" -v r="$runcm" \
    'BEGIN { printf "keel/runc %.2f   containerd/runc %.2f   floor/runc %.2f\n", k / r, c / r, f / r }'
awk -v k="$keelk" -v c="$ctrk" -v cg="$ctrm" -v r="$runcm" \
    'BEGIN { printf "with the keel shim: keel/runc %.2f   containerd/runc %.2f   containerd keel-shim/Go-shim %.2f\n", k / r, c / r, c / cg }'
awk -v t="$c" -v s="$sw" -v n="$RUNS" \
    'BEGIN { printf "keeld per task run: %.2f ms CPU, %d context switches\n", t / 1e6 / n, s / n }'

rss() { awk '/^VmRSS/ {print $2}' "/proc/$KEELD/status"; }
r0=$(rss)
for i in $(seq 200); do $K run -d --rootfs "$R" "idle$i" sleep 100000 >/dev/null; done
sleep 2
r1=$(rss)
echo "keeld RSS: $r0 KiB idle, $r1 KiB with 200 running tasks: $(( (r1 - r0) * 1024 / 200 / 1024 )) KiB per task"
