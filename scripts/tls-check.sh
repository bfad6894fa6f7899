#!/usr/bin/env bash
# The static musl binary with TLS: builds it, shows it is static, and runs
# it against TLS listeners (certificates made on the spot, verify-full for
# both) in front of the local RabbitMQ and PostgreSQL: amqps:// with
# RABBITMQ_CA_FILE and DATABASE_URL with sslmode=verify-full. Passes when the
# daemon connects to both over TLS and a file it saw is published.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh >/dev/null

source scripts/lib/musl.sh
build_static_binary
ls -l "$binary"
# `ldd` answers "statically linked" for a static-pie, and `file` names it.
if ! ldd "$binary" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
    echo "tls-check: FAILED: $binary is dynamically linked"
    ldd "$binary" || true
    exit 1
fi
file "$binary" 2>/dev/null || true
cargo build --locked --example tls_listeners

work=$(mktemp -d)
listeners_pid=
daemon_pid=
cleanup() {
    [[ -n "$daemon_pid" ]] && kill "$daemon_pid" 2>/dev/null || true
    [[ -n "$listeners_pid" ]] && kill "$listeners_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkfifo "$work/control"
target/debug/examples/tls_listeners <"$work/control" >"$work/listeners.out" &
listeners_pid=$!
exec 3>"$work/control"
for _ in $(seq 100); do
    grep -q '^READY$' "$work/listeners.out" && break
    sleep 0.1
done
grep -q '^READY$' "$work/listeners.out" || { echo "tls-check: FAILED: no listeners"; exit 1; }
set -a
# shellcheck disable=SC1090
source <(grep -E '^(RABBITMQ_URL|RABBITMQ_CA_FILE|DATABASE_URL)=' "$work/listeners.out" | sed -E "s/^([A-Z_]+)=(.*)$/\1='\2'/")
set +a
echo "RABBITMQ_URL=$RABBITMQ_URL"
echo "RABBITMQ_CA_FILE=$RABBITMQ_CA_FILE"
echo "DATABASE_URL=$DATABASE_URL"

mkdir "$work/watched"
schema="tls_check_$$"
EXCHANGE="tls_check_$$" DB_SCHEMA="$schema" SETTLE_MS=100 DATA_DIR="$work/watched" \
    "$binary" >"$work/daemon.out" 2>"$work/daemon.err" &
daemon_pid=$!
for _ in $(seq 150); do
    grep -q 'ready: watching' "$work/daemon.err" && break
    sleep 0.1
done
echo checked >"$work/watched/tls-check.flac"
published=
for _ in $(seq 150); do
    if psql -h 127.0.0.1 -U postgres -d test -tAc \
        "SELECT count(*) FROM $schema.files WHERE published_at IS NOT NULL" 2>/dev/null | grep -qx 1; then
        published=yes
        break
    fi
    sleep 0.1
done
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=
exec 3>&-
wait "$listeners_pid" || true
listeners_pid=
grep -E 'connected to RabbitMQ|registry ready|ready: watching|WARN|ERROR' "$work/daemon.err" || true
grep -E 'handshakes' "$work/listeners.out"
psql -h 127.0.0.1 -U postgres -d test -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true

status=0
grep -q 'connected to RabbitMQ at amqps://' "$work/daemon.err" || { echo "tls-check: FAILED: no amqps connection"; status=1; }
grep -q 'registry ready' "$work/daemon.err" || { echo "tls-check: FAILED: no registry"; status=1; }
grep -qE '^broker TLS handshakes: [1-9]' "$work/listeners.out" || { echo "tls-check: FAILED: no broker TLS handshake"; status=1; }
grep -qE '^database TLS handshakes: [1-9]' "$work/listeners.out" || { echo "tls-check: FAILED: no database TLS handshake"; status=1; }
[[ -n "$published" ]] || { echo "tls-check: FAILED: the file was not recorded as published"; status=1; }
[[ $status -eq 0 ]] && echo "tls-check: OK: the static musl binary connected to both TLS listeners (verify-full) and published"
exit $status
