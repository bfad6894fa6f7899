#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests of the real binary
# against the real PostgreSQL and RabbitMQ on this machine (started if needed).
# Every test isolates itself (own directory, exchange, queue and schema), so
# they run in parallel and can be rerun without cleanup.
#
# Two phases: everything in parallel, then the few tests named `serial_…`
# one at a time, because they stop or restart the shared broker or database
# that every other test needs. Extra arguments go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The judge of the stress test (tests/e2e/deploy.rs) as a plain binary: the
# test run below builds examples only inside a test harness.
cargo build --locked --quiet --example chaos_check
status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --all-targets --no-fail-fast -E 'not test(/serial_/)' "$@" || status=$?
    if grep -rqs "fn serial_" tests src; then
        scripts/services.sh
        cargo nextest run --locked --all-targets --no-fail-fast --test-threads 1 -E 'test(/serial_/)' "$@" || status=$?
    fi
else
    cargo test --locked --all-targets --no-fail-fast "$@" -- --skip serial_ || status=$?
    scripts/services.sh
    cargo test --locked --all-targets --no-fail-fast "$@" -- --test-threads 1 serial_ || status=$?
fi
# Leave the shared services running, whatever a fault test did.
scripts/services.sh
exit "$status"
