#!/usr/bin/env bash
# Task start cost, paired in one run on the same busybox bundle:
#   keel   keelctl run --rm … /bin/busybox true        (keeld → shim → runc)
#   ctr    ctr run --rm --rootfs … /bin/busybox true   (a containerd this script starts
#                                                       on its own root and socket)
#   runc   runc run of the same rootfs                 (the floor)
# plus keeld's CPU per task start and keeld's RSS with 200 running tasks.
#
# usage: sudo bench/task-start.sh [RUNS]    (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
RUNS=${1:-30}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-tasks}
cargo build --release --locked --bins >&2
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() {
    remove_tasks target/release/keelctl --address "$DIR/keel.sock"
    kill "${KEELD:-}" "${CTD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"

target/release/keeld --root "$DIR/keel-root" --state "$DIR/keel-state" --address "$DIR/keel.sock" 2>"$DIR/keeld.log" &
KEELD=$!
printf 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' >"$DIR/containerd.toml"
containerd --config "$DIR/containerd.toml" --root "$DIR/ctd-root" --state "$DIR/ctd-state" --address "$DIR/ctd.sock" 2>"$DIR/containerd.log" &
CTD=$!
for _ in $(seq 200); do [ -S "$DIR/keel.sock" ] && [ -S "$DIR/ctd.sock" ] && break; sleep 0.05; done

# runc bundle over the same rootfs.
B="$DIR/bundle"
mkdir -p "$B"
(cd "$B" && runc spec)
sed -i -e 's|"terminal": true|"terminal": false|' -e "s|\"path\": \"rootfs\"|\"path\": \"$R\"|" \
    -e 's|"sh"|"/bin/busybox", "true"|' "$B/config.json"

K="target/release/keelctl --address $DIR/keel.sock"
C="ctr --address $DIR/ctd.sock"
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cpu() { awk '{print $14 + $15}' "/proc/$KEELD/stat"; }

: >"$DIR/keel.us"; : >"$DIR/ctr.us"; : >"$DIR/runc.us"
c0=$(cpu)
for i in $(seq "$RUNS"); do
    ms $K run --rm --rootfs "$R" "k$i" /bin/busybox true >>"$DIR/keel.us"
    ms $C run --rm --rootfs "$R" "c$i" /bin/busybox true >>"$DIR/ctr.us"
    ms runc run -b "$B" "r$i" >>"$DIR/runc.us"
done
c1=$(cpu)
keel=$(median <"$DIR/keel.us"); ctrm=$(median <"$DIR/ctr.us"); runcm=$(median <"$DIR/runc.us")
echo "median start-to-exit, $RUNS runs each (µs): keel $keel  ctr $ctrm  runc $runcm"
awk -v k="$keel" -v c="$ctrm" -v r="$runcm" 'BEGIN { printf "keel/runc %.2f   containerd/runc %.2f\n", k / r, c / r }'
awk -v t="$((c1 - c0))" -v n="$RUNS" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "keeld CPU per task run: %.1f ms\n", 1000 * t / hz / n }'

rss() { awk '/^VmRSS/ {print $2}' "/proc/$KEELD/status"; }
r0=$(rss)
for i in $(seq 200); do $K run -d --rootfs "$R" "idle$i" sleep 100000 >/dev/null; done
sleep 2
r1=$(rss)
echo "keeld RSS: $r0 KiB idle, $r1 KiB with 200 running tasks: $(( (r1 - r0) * 1024 / 200 / 1024 )) KiB per task"
