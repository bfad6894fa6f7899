#!/usr/bin/env bash
# What the periodic rescan (RESCAN_INTERVAL) costs on a tree of unchanged
# files: wall time, CPU time of the daemon and its peak memory, and that it
# publishes nothing and hashes nothing.
#
#   scripts/rescan-bench.sh                       # 100 000 files, memory mode and PostgreSQL
#   scripts/rescan-bench.sh --files 20000 --modes memory
#
# Options, defaults in brackets:
#   --files N [100000]        files in the tree (16 bytes each, .flac)
#   --per-directory N [100]   files per directory (so 1 000 directories)
#   --interval S [20]         RESCAN_INTERVAL in seconds
#   --rounds N [2]            periodic rescans measured per mode
#   --modes LIST [memory,postgres]
#   --binary PATH [target/release/file-watcher, built if missing]
#
# Each mode starts the daemon on a fresh tree on /dev/shm (memory mode notes
# the files at start without hashing; PostgreSQL mode records them all in the
# start-up scan, in a schema of its own that is dropped afterwards), waits
# until the daemon is idle (no CPU used for 2 s), then measures each periodic
# rescan from its `full scan of … (periodic rescan` log line to the next idle
# moment. CPU is utime+stime from /proc/PID/stat; memory is VmHWM. The idle
# wait makes the wall time up to ~2 s long; the CPU time is exact.
#
# Talks to PostgreSQL at 127.0.0.1:5432 (user postgres, database test).
set -euo pipefail
cd "$(dirname "$0")/.."

files=100000 per_directory=100 interval=20 rounds=2 modes=memory,postgres binary=''
while [ $# -gt 0 ]; do
    case "$1" in
        --files) files=$2; shift 2 ;;
        --per-directory) per_directory=$2; shift 2 ;;
        --interval) interval=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --modes) modes=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "rescan-bench: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$binary" ]; then
    binary=target/release/file-watcher
    [ -x "$binary" ] || cargo build --release --quiet
fi
database_url=postgres://postgres@127.0.0.1:5432/test
ticks=$(getconf CLK_TCK)
work=$(mktemp -d /dev/shm/rescan-bench.XXXXXX)
pid=''
schema=''
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    [ -n "$schema" ] && psql -q "$database_url" -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1
    rm -rf "$work"
    return 0
}
trap cleanup EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
now_ms() { date +%s%3N; }

# Waits until the daemon has used no CPU for 2 s; prints the time (ms) it
# last used some.
wait_idle() {
    local last last_change current
    last=$(cpu_ticks "$pid") last_change=$(now_ms)
    while :; do
        sleep 0.1
        current=$(cpu_ticks "$pid")
        if [ "$current" != "$last" ]; then
            last=$current last_change=$(now_ms)
        elif [ $(( $(now_ms) - last_change )) -ge 2000 ]; then
            echo "$last_change"
            return
        fi
    done
}

make_tree() {
    python3 - "$1" "$files" "$per_directory" <<'EOF'
import os, sys
root, files, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for number in range(files):
    directory = os.path.join(root, f"d{number // per:05}")
    if number % per == 0:
        os.makedirs(directory)
    with open(os.path.join(directory, f"{number:06}.flac"), "w") as file:
        file.write(f"track {number:09}\n")
EOF
}

for mode in ${modes//,/ }; do
    tree=$work/$mode
    mkdir -p "$tree"
    make_tree "$tree"
    log=$work/$mode.log out=$work/$mode.out
    environment=(DATA_DIR="$tree" RESCAN_INTERVAL="${interval}s" SETTLE_MS=100 LOG_LEVEL=info)
    if [ "$mode" = postgres ]; then
        schema=rescan_bench_$$
        environment+=(DATABASE_URL="$database_url" DB_SCHEMA="$schema")
    fi
    env -i PATH="$PATH" "${environment[@]}" "$binary" >"$out" 2>"$log" &
    pid=$!
    started=$(now_ms)
    until grep -q 'ready: watching' "$log"; do sleep 0.1; done
    wait_idle >/dev/null
    echo "$mode: $files files in $(( (files + per_directory - 1) / per_directory )) directories; start-up took $(( $(now_ms) - started - 2000 )) ms (to idle)"
    for round in $(seq "$rounds"); do
        seen=$(grep -c 'periodic rescan' "$log" || true)
        messages=$(wc -l <"$out")
        until [ "$(grep -c 'periodic rescan' "$log" || true)" -gt "$seen" ]; do sleep 0.05; done
        begin=$(now_ms) begin_cpu=$(cpu_ticks "$pid")
        end=$(wait_idle)
        end_cpu=$(cpu_ticks "$pid")
        published=$(( $(wc -l <"$out") - messages ))
        echo "  rescan $round: wall $(( end - begin )) ms, cpu $(( (end_cpu - begin_cpu) * 1000 / ticks )) ms, published $published, peak RSS $(awk '/VmHWM/ { print $2 " " $3 }' "/proc/$pid/status")"
    done
    kill -TERM "$pid"
    wait "$pid" || true
    pid=''
    grep -o 'stopped: .*' "$log" | sed 's/^/  /'
    if [ -n "$schema" ]; then
        psql -q "$database_url" -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
        schema=''
    fi
    rm -rf "$tree"
done
