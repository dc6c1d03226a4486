# Shared by the bench scripts; sourced, not run.

# busybox_rootfs DIR: a busybox rootfs (sh, sleep) at DIR.
busybox_rootfs() {
    mkdir -p "$1"/{bin,proc,dev,sys,tmp,etc}
    cp /bin/busybox "$1/bin/"
    ln -sf busybox "$1/bin/sh"
    ln -sf busybox "$1/bin/sleep"
}

# median: the median of the numbers on stdin, one per line (the lower of an even
# count's two middle values).
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# remove_tasks KEELCTL…: force-removes every task the given keelctl lists.
remove_tasks() {
    local id
    for id in $("$@" tasks ls --format json 2>/dev/null | sed -n 's/.*"id":"\([^"]*\)".*/\1/p'); do
        "$@" tasks rm -f "$id" >/dev/null 2>&1 || true
    done
}

# remove_dir DIR: unmounts whatever is left below DIR and removes it.
remove_dir() {
    umount -R "$1"/* 2>/dev/null || true
    rm -rf "$1"
}

# floor_spec OUT STATE ROOTFS KEELCTL…: copies to OUT the config.json keeld (its
# --state is STATE) writes for `run --rootfs ROOTFS … /bin/busybox true`, the spec
# tests/examples/shim_floor.rs runs.
floor_spec() {
    local out=$1 state=$2 rootfs=$3
    shift 3
    "$@" run -d --rootfs "$rootfs" floorspec /bin/busybox true >/dev/null
    cp "$state/tasks/default/floorspec/config.json" "$out"
    "$@" tasks rm -f floorspec >/dev/null
    "$@" containers rm floorspec >/dev/null
}

# start_daemons DIR BIN: a keeld from BIN (socket DIR/keel.sock) and a containerd
# of the run's own (socket DIR/ctd.sock, CRI off, keel's shim from BIN on its
# PATH), logs in DIR; sets KEELD and CTD to their pids and waits for both sockets.
start_daemons() {
    local dir=$1 bin
    bin=$(realpath "$2")
    "$bin/keeld" --root "$dir/keel-root" --state "$dir/keel-state" --address "$dir/keel.sock" 2>"$dir/keeld.log" &
    KEELD=$!
    printf 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' >"$dir/containerd.toml"
    PATH="$bin:$PATH" containerd --config "$dir/containerd.toml" --root "$dir/ctd-root" --state "$dir/ctd-state" \
        --address "$dir/ctd.sock" 2>"$dir/containerd.log" &
    CTD=$!
    for _ in $(seq 200); do [ -S "$dir/keel.sock" ] && [ -S "$dir/ctd.sock" ] && break; sleep 0.05; done
}
