#!/usr/bin/env bash
# Installs keel's dependencies, builds keel in release mode and runs keeld in the
# foreground on its built-in defaults (root /var/lib/keel, state /run/keel, socket
# /run/keel/keel.sock). Extra arguments go to keeld, e.g. --config deploy/keel.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
bash deploy/install-deps.sh
cargo build --release --locked --bins
exec target/release/keeld "$@"
