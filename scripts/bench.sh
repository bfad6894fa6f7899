#!/usr/bin/env bash
# Benchmark: how fast changes go from the filesystem to a confirmed message,
# and how much memory the daemon needs while doing it.
#
#   scripts/bench.sh                      # 2000 files of 64 KiB, stdout mode
#   scripts/bench.sh --sinks              # same, recorded in PostgreSQL and confirmed by RabbitMQ
#   scripts/bench.sh --files 20000 --size 4 --sinks
#   scripts/bench.sh --big 2048           # one 2 GiB file: hashing speed and flat memory
#
# Prints files/s, MB/s hashed and the daemon's peak resident memory (VmHWM).
# Talks to 127.0.0.1 only; uses its own schema (dropped afterwards) and the
# exchange file_watcher_bench.
set -euo pipefail
cd "$(dirname "$0")/.."

files=2000 size_kib=64 sinks=0 big_mib=0
while [ $# -gt 0 ]; do
    case "$1" in
        --files) files=$2; shift 2 ;;
        --size) size_kib=$2; shift 2 ;;
        --sinks) sinks=1; shift ;;
        --big) big_mib=$2; shift 2 ;;
        *) echo "usage: $0 [--files N] [--size KiB] [--sinks] [--big MiB]" >&2; exit 2 ;;
    esac
done

cargo build --release --quiet
binary=target/release/file-watcher
work=$(mktemp -d /tmp/file-watcher-bench.XXXXXX)
tree=$work/tree
mkdir -p "$tree"
id="bench$$"
schema="bench_$$"
# One fixed exchange, declared the same way every run (rabbitmqctl cannot delete exchanges).
exchange="file_watcher_bench"
env_args=(DATA_DIR="$tree" INSTANCE_ID="$id" SETTLE_MS=200 LOG_LEVEL=info)
if [ "$sinks" = 1 ]; then
    scripts/services.sh
    env_args+=(DATABASE_URL=postgres://postgres@127.0.0.1:5432/test DB_SCHEMA="$schema"
               RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE="$exchange")
fi

cleanup() {
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    if [ "$sinks" = 1 ]; then
        psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

env -i PATH="$PATH" "${env_args[@]}" "$binary" >"$work/out" 2>"$work/err" &
pid=$!
until grep -q "ready:" "$work/err" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "bench: the daemon exited" >&2; cat "$work/err" >&2; exit 1; }
    sleep 0.1
done

expected=$files
if [ "$big_mib" -gt 0 ]; then expected=1; fi

confirmed() {
    if [ "$sinks" = 1 ]; then
        psql -tA -h 127.0.0.1 -U postgres test \
            -c "SELECT count(*) FROM $schema.files WHERE published_at IS NOT NULL" 2>/dev/null || echo 0
    else
        wc -l <"$work/out"
    fi
}

start=$(date +%s.%N)
if [ "$big_mib" -gt 0 ]; then
    head -c "$((big_mib * 1024 * 1024))" /dev/urandom >"$tree/big.flac"
    bytes=$((big_mib * 1024 * 1024))
else
    head -c "$((size_kib * 1024))" /dev/urandom >"$work/payload"
    for ((i = 0; i < files; i++)); do
        dir="$tree/album$((i / 100))"
        [ -d "$dir" ] || mkdir -p "$dir"
        # Unique content per file (the first bytes differ), same size.
        { printf '%08d' "$i"; cat "$work/payload"; } >"$dir/track$i.flac"
    done
    bytes=$((files * (size_kib * 1024 + 8)))
fi
written=$(date +%s.%N)

deadline=$(( $(date +%s) + 600 ))
while [ "$(confirmed)" -lt "$expected" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "bench: timed out; see $work/err" >&2; cat "$work/err" >&2; exit 1; }
    sleep 0.1
done
done_at=$(date +%s.%N)
peak=$(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")

awk -v s="$start" -v w="$written" -v d="$done_at" -v n="$expected" -v b="$bytes" -v peak="$peak" -v sinks="$sinks" 'BEGIN {
    total = d - s
    printf "mode: %s\n", (sinks ? "PostgreSQL + RabbitMQ (confirmed)" : "stdout")
    printf "files: %d, bytes: %.1f MB\n", n, b / 1e6
    printf "writing took %.2f s; last confirmation %.2f s after the first write, %.2f s after the last (settle time %s ms included)\n", w - s, total, d - w, 200
    printf "throughput: %.0f files/s, %.1f MB/s\n", n / total, b / 1e6 / total
    printf "peak resident memory: %s\n", peak
}'
