#!/usr/bin/env bash
# Installs keel's dependencies, then checks formatting and lints and runs every test:
# unit tests and the integration tests against real keeld processes (root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/test.sh: the integration tests need root (runc, cgroups, other uids); run it as root" >&2
    exit 1
fi
bash deploy/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== build"
cargo build --locked --workspace --bins
echo "== tests"
# Two cores: two test threads; the gigabyte tests serialise themselves.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
RUST_TEST_THREADS=${RUST_TEST_THREADS:-2} cargo test --locked --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "keel: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
