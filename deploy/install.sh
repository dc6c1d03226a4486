#!/usr/bin/env bash
# Installs a release build of keel as a systemd service: binaries (keeld, keelctl
# and keel's shim, containerd-shim-keel-v1) in /usr/local/bin,
# the default configuration in /etc/keel/keel.toml (kept if present), the unit in
# /etc/systemd/system. Enables and starts keeld when systemd runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
bash deploy/install-deps.sh
cargo build --release --locked --bins
install -m 0755 target/release/keeld target/release/keelctl \
    target/release/containerd-shim-keel-v1 /usr/local/bin/
install -d -m 0755 /etc/keel
[ -e /etc/keel/keel.toml ] || install -m 0644 deploy/keel.toml /etc/keel/keel.toml
install -m 0644 deploy/keeld.service /etc/systemd/system/keeld.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now keeld.service
    systemctl --no-pager status keeld.service || true
else
    echo "install.sh: systemd is not running here; start keeld with: keeld --config /etc/keel/keel.toml"
fi
