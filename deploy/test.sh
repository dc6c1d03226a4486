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
# The tests' keeld carries fault injection (KEEL_FAULTS); release builds never do.
cargo clippy --locked --workspace --all-targets --features keel-supervisor/faults -- -D warnings
echo "== cargo doc (every link resolved; keel-client: every public item documented)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace
echo "== build"
cargo build --locked --workspace --bins --features keel-supervisor/faults
cargo build --locked -p keel-client -p keel-tests --examples
echo "== tests"
# Two cores: two test threads; the gigabyte tests serialise themselves.
log=$(mktemp)
# Tests that cannot run here (no working CRIU) write a line each to this file.
export KEEL_SKIP_LOG
KEEL_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$KEEL_SKIP_LOG"' EXIT
status=0
RUST_TEST_THREADS=${RUST_TEST_THREADS:-2} cargo test --locked --workspace --no-fail-fast \
    --features keel-supervisor/faults 2>&1 | tee "$log" || status=$?
echo "== integration tests again on containerd's runc shim (io.containerd.runc.v2)"
# The pass above runs containers on keel's own shim, keeld's default runtime.
# The tests that run containers, again with containerd's runc shim (and runc)
# as every test keeld's default runtime: it stays selectable by name.
# tests/tests/options.rs (runc's own options) and the checkpoint restores across
# the two shims ran on it above already.
KEEL_TEST_RUNTIME=io.containerd.runc.v2 RUST_TEST_THREADS=${RUST_TEST_THREADS:-2} \
    cargo test --locked --workspace --no-fail-fast --features keel-supervisor/faults \
    --test tasks --test restore --test client --test supervision --test rootfs \
    --test paths --test daemon --test powerloss --test hostile --test checkpoint_options \
    2>&1 | tee -a "$log" || status=$?
if [ -s "$KEEL_SKIP_LOG" ]; then
    echo "== SKIPPED (cargo reports them as passed; the summary below counts them as skipped):"
    sed 's/^/   /' "$KEEL_SKIP_LOG"
fi
# One closing line for the whole run, summed over every test binary; a test that
# skipped itself counts as skipped, not passed.
skipped=$(wc -l <"$KEEL_SKIP_LOG")
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "keel: %d passed, %d failed, %d skipped\n", p - s, f, i + s }' "$log"
# On a machine this project's installer prepared (CI), CRIU works: a skipped
# checkpoint test there is a failure, not a pass. KEEL_ALLOW_SKIPS=1 overrides.
if [ "$skipped" -gt 0 ] && [ "${CI:-}" = true ] && [ "${KEEL_ALLOW_SKIPS:-0}" != 1 ]; then
    echo "== FAILED: $skipped test(s) skipped under CI, where deploy/install-deps.sh provides everything they need" >&2
    status=1
fi
exit "$status"
