#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests of the real binary
# against the real PostgreSQL and RabbitMQ on this machine (started if needed).
# Every test isolates itself (own directory, exchange, queue and schema), so
# they run in parallel and can be rerun without cleanup.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --no-fail-fast "$@"
else
    cargo test --all-targets --no-fail-fast "$@"
fi
