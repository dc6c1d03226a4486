#!/usr/bin/env bash
# Installs what keel needs on a Debian machine. Idempotent: a second run only checks.
#
#   runc, containerd-shim-runc-v2 (from Debian's containerd package; the containerd
#   service itself is never started or enabled), busybox-static, iptables, fuse3, and a CRIU
#   that passes `criu check` (>= 4.1 on kernels >= 6.13; built from Debian trixie's
#   upstream tarball when the packaged one fails, cached under $KEEL_CACHE).
#
# Environment:
#   KEEL_CACHE      where the CRIU build is cached (default /var/cache/keel)
#   KEEL_SKIP_CRIU  set to 1 to skip CRIU entirely (checkpoint tests then skip loudly)
set -euo pipefail

CACHE=${KEEL_CACHE:-/var/cache/keel}
CRIU_VERSION=4.1.1
CRIU_PREFIX=/usr/local/lib/keel/criu
export DEBIAN_FRONTEND=noninteractive

log() { printf 'install-deps: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (apt-get, runc and cgroups need it)"
    exit 1
fi

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have runc || need_pkgs+=(runc)
have containerd-shim-runc-v2 || need_pkgs+=(containerd)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
have iptables || need_pkgs+=(iptables)
have pkg-config || need_pkgs+=(pkg-config)
have mkfifo || need_pkgs+=(coreutils)
have xz || need_pkgs+=(xz-utils)
have setsid || need_pkgs+=(util-linux)
have ps || need_pkgs+=(procps)
# The power-loss tests mount keel-powercut (FUSE); fusermount3 unmounts it where
# umount(2) cannot.
have fusermount3 || need_pkgs+=(fuse3)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# keel launches shims itself; containerd's daemon must not run beside it.
if have systemctl && systemctl is-enabled containerd >/dev/null 2>&1; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
fi

criu_ok() { "$1" check >/dev/null 2>&1; }

install_criu() {
    if [ "${KEEL_SKIP_CRIU:-0}" = 1 ]; then
        log "KEEL_SKIP_CRIU=1: not installing CRIU (checkpoint tests will skip)"
        return 0
    fi
    if [ -x "$CRIU_PREFIX/criu" ] && criu_ok "$CRIU_PREFIX/criu"; then
        ln -sf "$CRIU_PREFIX/criu" /usr/local/sbin/criu
        return 0
    fi
    if have criu && criu_ok "$(command -v criu)"; then
        return 0
    fi
    log "building CRIU $CRIU_VERSION (no working criu on PATH)"
    apt_update_once
    apt-get install -y -qq --no-install-recommends \
        build-essential pkg-config libprotobuf-c-dev protobuf-c-compiler \
        protobuf-compiler libprotobuf-dev python3-protobuf libnl-3-dev libnl-route-3-dev \
        libnet1-dev libcap-dev libbsd-dev uuid-dev libaio-dev libgnutls28-dev \
        iptables ca-certificates >/dev/null

    mkdir -p "$CACHE/criu-src"
    local tarball="$CACHE/criu_${CRIU_VERSION}.orig.tar.xz"
    if [ ! -s "$tarball" ]; then
        # Fetch the upstream tarball that Debian trixie's criu source package carries,
        # with a private apt source list so the system's sources stay untouched.
        local aptdir="$CACHE/apt"
        mkdir -p "$aptdir/lists/partial"
        cat >"$aptdir/trixie-src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        local aptopts=(-o "Dir::Etc::SourceList=/dev/null"
            -o "Dir::Etc::SourceParts=$aptdir"
            -o "Dir::State::Lists=$aptdir/lists")
        apt-get "${aptopts[@]}" update -qq
        # Only the upstream tarball is needed. apt checks each file it fetches against the
        # signed Sources index, so a tarball that arrived is the right one even when the
        # mirror does not serve the .dsc or the Debian patches.
        (cd "$CACHE/criu-src" && apt-get "${aptopts[@]}" source --download-only -qq criu >/dev/null 2>&1) || true
        local got
        got=$(ls "$CACHE"/criu-src/criu_"$CRIU_VERSION".orig.tar.xz 2>/dev/null | head -n 1)
        if [ -z "$got" ]; then
            got=$(ls "$CACHE"/criu-src/criu_*.orig.tar.xz 2>/dev/null | sort -V | tail -n 1)
        fi
        if [ -z "$got" ]; then
            log "WARNING: could not download the CRIU source tarball; checkpoint tests will skip loudly"
            return 0
        fi
        mv "$got" "$tarball"
    fi
    local build="$CACHE/criu-build"
    rm -rf "$build"
    mkdir -p "$build"
    tar -xJf "$tarball" -C "$build" --strip-components=1
    make -C "$build" -j"$(nproc)" criu >"$CACHE/criu-build.log" 2>&1 || {
        tail -n 40 "$CACHE/criu-build.log" >&2
        log "CRIU build failed (log: $CACHE/criu-build.log)"
        return 1
    }
    mkdir -p "$CRIU_PREFIX" /usr/local/sbin
    install -m 0755 "$build/criu/criu" "$CRIU_PREFIX/criu"
    ln -sf "$CRIU_PREFIX/criu" /usr/local/sbin/criu
    rm -rf "$build"
    if criu_ok "$CRIU_PREFIX/criu"; then
        log "CRIU $("$CRIU_PREFIX/criu" --version | head -n 1) passes criu check"
    else
        log "WARNING: built CRIU fails 'criu check'; checkpoint tests will skip loudly"
        "$CRIU_PREFIX/criu" check >&2 || true
    fi
}

install_criu

for bin in runc containerd-shim-runc-v2; do
    have "$bin" || { log "missing $bin after install"; exit 1; }
done
[ -x /bin/busybox ] || { log "missing /bin/busybox after install"; exit 1; }
log "ok: runc $(runc --version | head -n 1 | awk '{print $3}'), $(command -v containerd-shim-runc-v2), busybox, criu: $(command -v criu || echo none)"
