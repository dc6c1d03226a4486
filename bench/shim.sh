#!/usr/bin/env bash
# keel's shim (io.containerd.keel.v1) beside containerd's Go shim, in one run:
#   1. a burst of N detached busybox tasks started PAR at a time, until all are
#      running: keel with its shim, keel with the Go shim, containerd with the Go
#      shim, containerd with the keel shim (each on its own root and socket);
#   2. memory of the shims with N running tasks, from /proc/PID/smaps_rollup:
#      private (clean + dirty), proportional (PSS) and resident (RSS) per shim, for
#      keel's shims under keeld and the Go shims under containerd;
#   3. each shim's own start, alternating, 20 times: its `start` subcommand until
#      it prints an address, and until the shim there answers Connect
#      (bench/lib/shim_start.py).
#
# usage: sudo bench/shim.sh [N] [PAR]    (default 200 8)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
. bench/common.sh
N=${1:-200}
PAR=${2:-8}
DIR=${KEEL_BENCH_DIR:-/var/tmp/keel-bench-shim}
BIN=target/release
cargo build --release --locked --bins >&2
rm -rf "$DIR"
mkdir -p "$DIR"
K="$BIN/keelctl --address $DIR/keel.sock"
C="ctr --address $DIR/ctd.sock"
ctr_clean() {
    local id
    for id in $($C task ls -q 2>/dev/null); do
        $C task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $($C task ls -q 2>/dev/null); do $C task delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $($C container ls -q 2>/dev/null); do $C container delete "$id" >/dev/null 2>&1 || true; done
}
keel_clean() {
    remove_tasks $K
    local id
    for id in $($K containers ls -q 2>/dev/null); do $K containers rm "$id" >/dev/null 2>&1 || true; done
}
cleanup() {
    keel_clean || true
    ctr_clean || true
    kill "${KEELD:-}" "${CTD:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    remove_dir "$DIR"
}
trap cleanup EXIT

R="$DIR/rootfs"
busybox_rootfs "$R"
start_daemons "$DIR" "$BIN"

# burst NAME COMMAND…: starts N tasks PAR at a time with COMMAND, whose {} is
# each task's id (NAME1, NAME2…); prints ms.
burst() {
    local name=$1 s e
    shift
    s=$EPOCHREALTIME
    seq "$N" | sed "s/^/$name/" | xargs -P "$PAR" -I{} "$@" >/dev/null
    e=$EPOCHREALTIME
    echo $(((${e/./} - ${s/./}) / 1000))
}
# mem PATTERN: average private, PSS and RSS (KiB) over the processes matching.
mem() {
    local pids
    pids=$(pgrep -f "$1") || true
    for p in $pids; do cat "/proc/$p/smaps_rollup" 2>/dev/null; done | awk -v n="$(echo "$pids" | wc -w)" '
        /^Private_(Clean|Dirty):/ { priv += $2 } /^Pss:/ { pss += $2 } /^Rss:/ { rss += $2 }
        END { if (n > 0) printf "%d shims: private %d KiB, PSS %d KiB, RSS %d KiB per shim\n", n, priv / n, pss / n, rss / n }'
}

KS="--runtime io.containerd.keel.v1"
echo "# burst of $N detached tasks, $PAR at a time, until all run (ms)"
kk=$(burst kk $K run -d $KS --rootfs "$R" {} /bin/sleep 100000)
echo "keel + keel shim:        $kk"
echo "keel shims under keeld, $N running: $(mem "containerd-shim-keel-v1 -namespace default -id kk")"
keel_clean
kg=$(burst kg $K run -d --rootfs "$R" {} /bin/sleep 100000)
echo "keel + Go shim:          $kg"
keel_clean
cg=$(burst cg $C run -d --rootfs "$R" {} /bin/sleep 100000)
echo "containerd + Go shim:    $cg"
echo "Go shims under containerd, $N running: $(mem "containerd-shim-runc-v2 -namespace default -id cg")"
ctr_clean
ck=$(burst ck $C run -d $KS --rootfs "$R" {} /bin/sleep 100000)
echo "containerd + keel shim:  $ck"
ctr_clean
awk -v kk="$kk" -v kg="$kg" -v cg="$cg" -v ck="$ck" 'BEGIN {
    printf "keel+keel-shim / containerd %.2f   keel+Go-shim / containerd %.2f   containerd keel-shim / Go-shim %.2f\n", kk / cg, kg / cg, ck / cg }'

echo "# shim start, median of 20 (µs): start printed its address / the shim answered Connect"
SB="$DIR/shim-bundle"
mkdir -p "$SB"
echo '{"ociVersion":"1.0.2"}' >"$SB/config.json"
mkfifo "$SB/log"
exec 9<>"$SB/log"
: >"$DIR/keel-start.us"; : >"$DIR/go-start.us"
for i in $(seq 20); do
    python3 bench/lib/shim_start.py "$(realpath "$BIN")/containerd-shim-keel-v1" "$SB" "s$i" >>"$DIR/keel-start.us"
    python3 bench/lib/shim_start.py "$(command -v containerd-shim-runc-v2)" "$SB" "s$i" >>"$DIR/go-start.us"
done
exec 9<&-
for s in keel go; do
    printf '%-5s shim: %s / %s\n' "$s" "$(cut -d' ' -f1 <"$DIR/$s-start.us" | median)" "$(cut -d' ' -f2 <"$DIR/$s-start.us" | median)"
done
