#!/usr/bin/env bash
# The benchmark anyone can rerun: how fast changes go from the filesystem to
# a confirmed message, how much memory that takes, and what the broker, the
# database and `sha256sum` can do on the same machine in the same run.
#
#   scripts/bench.sh                      # everything, 3 runs, medians (about 20 minutes)
#   scripts/bench.sh --runs 1 --files 2000 --import-large 20000 --burst 20000
#   scripts/bench.sh --musl               # the static musl build users ship
#   scripts/bench.sh --variant NAME=VALUE # also the throughput run with NAME=VALUE set
#   scripts/bench.sh --only throughput,hashing
#   scripts/bench.sh --short              # tiny counts, 1 run: what the test suite runs
#
# Prints a table (each figure beside its ceiling or its target) and writes
# JSON (--json FILE, by default target/bench/bench-<date>.json). BENCHMARKS.md
# says what each figure means. Scenarios, in order, each run:
#   ceilings    raw publisher to the broker (persistent, window of unconfirmed
#               messages), multi-row upserts into PostgreSQL
#   hashing     sha256sum (and openssl) vs the daemon on one big file (--big MiB)
#   throughput  --instances × --files files of --size KiB written as fast as
#               possible, both sinks; events/s, latency p50/p99, RSS
#   variant     the same with each --variant NAME=VALUE set (only if given)
#   paced       --paced-rate files/s per instance for --paced-seconds; latency
#   import      --import-small then --import-large files moved into a tree,
#               one instance, both sinks; then restarts (catch-up)
#   burst       --burst files written one by one into a new directory, stdout mode
#   memory      stdout mode, settle time of an hour: bytes per watched
#               directory (--directories) and per pending path (--pending)
#   steady      --steady-files files rewritten until --steady-events messages
#               came out, both sinks; RSS warm, middle, end. First run only
#               (it is one long measurement, about 10 minutes here)
#
# Options, defaults in brackets (--short lowers every count and runs once):
#   --runs N [3]   --json FILE   --only LIST   --musl   --binary PATH
#   --env NAME=VALUE       for every daemon (repeatable)
#   --variant NAME=VALUE   runs the variant scenario with it (repeatable)
#   --settle-ms MS [100]   --instances N [3]   --files N per instance [10000]   --size KiB [4]
#   --paced-rate N [200] files/s per instance   --paced-seconds S [10]
#   --import-small N [10000]   --import-large N [100000]   --burst N [100000]
#   --pending N [100000]   --directories N [1000]   --big MiB [1024]
#   --steady-files N [10000]   --steady-events N [1000000]
#   --ceiling-messages N [30000]   --window N [4000]   --postgres-files N [30000]
#
# The watched trees are on /dev/shm. Talks to the PostgreSQL (user postgres,
# database test) and RabbitMQ (guest/guest) on 127.0.0.1 only, starting them
# if needed (scripts/services.sh). Each scenario uses its own exchange, queue,
# schema and instance ids and removes them afterwards; every wait is bounded.
# The tool that writes, paces, consumes and computes is tests/bench/ (the
# `bench` example), built here in release.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "bench: $*" >&2; exit 2; }

runs='' short=0 musl=0 binary='' json='' only=''
instances='' files='' size_kib='' settle_ms='' paced_rate='' paced_seconds=''
import_small='' import_large='' burst='' pending='' directories='' big_mib=''
ceiling_messages='' window='' postgres_files='' steady_files='' steady_events=''
env_args=() variants=()
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || case "$1" in --short|--musl|-h|--help) ;; *) fail "$1 needs a value (try --help)" ;; esac
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --short) short=1; shift ;;
        --musl) musl=1; shift ;;
        --binary) binary=$2; shift 2 ;;
        --json) json=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --instances) instances=$2; shift 2 ;;
        --files) files=$2; shift 2 ;;
        --size) size_kib=$2; shift 2 ;;
        --settle-ms) settle_ms=$2; shift 2 ;;
        --paced-rate) paced_rate=$2; shift 2 ;;
        --paced-seconds) paced_seconds=$2; shift 2 ;;
        --import-small) import_small=$2; shift 2 ;;
        --import-large) import_large=$2; shift 2 ;;
        --burst) burst=$2; shift 2 ;;
        --pending) pending=$2; shift 2 ;;
        --directories) directories=$2; shift 2 ;;
        --big) big_mib=$2; shift 2 ;;
        --ceiling-messages) ceiling_messages=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        --postgres-files) postgres_files=$2; shift 2 ;;
        --steady-files) steady_files=$2; shift 2 ;;
        --steady-events) steady_events=$2; shift 2 ;;
        --env) env_args+=(--env "$2"); shift 2 ;;
        --variant) variants+=("$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown option $1 (try --help)" ;;
    esac
done

# Defaults: the issue's figures; --short: just enough to run every scenario.
if [ "$short" = 1 ]; then
    : "${runs:=1}" "${files:=50}" "${paced_rate:=50}" "${paced_seconds:=1}"
    : "${import_small:=100}" "${import_large:=300}" "${burst:=300}" "${pending:=300}"
    : "${directories:=20}" "${big_mib:=16}" "${ceiling_messages:=500}" "${postgres_files:=500}"
    : "${steady_files:=50}" "${steady_events:=500}"
fi
: "${runs:=3}" "${instances:=3}" "${files:=10000}" "${size_kib:=4}" "${settle_ms:=100}"
: "${paced_rate:=200}" "${paced_seconds:=10}" "${import_small:=10000}" "${import_large:=100000}"
: "${burst:=100000}" "${pending:=100000}" "${directories:=1000}" "${big_mib:=1024}"
: "${ceiling_messages:=30000}" "${window:=4000}" "${postgres_files:=30000}"
: "${steady_files:=10000}" "${steady_events:=1000000}"
for setting in runs instances files size_kib settle_ms paced_rate paced_seconds import_small \
    import_large burst pending directories big_mib ceiling_messages window postgres_files \
    steady_files steady_events; do
    value=${!setting}
    case "$value" in ''|*[!0-9]*|0) fail "--${setting//_/-} expects a positive whole number, not '$value'" ;; esac
done
for variant in "${variants[@]}"; do
    case "$variant" in [A-Za-z_]*=*) ;; *) fail "--variant expects NAME=VALUE, not '$variant'" ;; esac
done
all_scenarios="ceilings,hashing,throughput,variant,paced,import,burst,memory,steady"
for scenario in ${only//,/ }; do
    case ",$all_scenarios," in *",$scenario,"*) ;; *) fail "--only: unknown scenario '$scenario' (one of $all_scenarios)" ;; esac
done
wanted() { [ -z "$only" ] || case ",$only," in *",$1,"*) true ;; *) false ;; esac; }

scripts/services.sh
if [ -n "$binary" ]; then
    [ -x "$binary" ] || fail "--binary $binary is not an executable"
    build="given"
elif [ "$musl" = 1 ]; then
    source scripts/lib/musl.sh
    build_static_binary --quiet
    build=musl
else
    cargo build --release --quiet --bin file-watcher
    binary=target/release/file-watcher build=glibc
fi
cargo build --release --quiet --example bench
tool=target/release/examples/bench
binary=$(realpath "$binary")
[ -n "$json" ] || json="target/bench/bench-$(date +%Y%m%d-%H%M%S).json"

work=$(mktemp -d /dev/shm/file-watcher-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
results=$work/results.jsonl
loadavg=$(cut -d' ' -f1-3 /proc/loadavg)

for ((run = 1; run <= runs; run++)); do
    echo "bench: run $run of $runs" >&2
    common=(--binary "$binary" --work "$work" --results "$results" --run "$run" --settle-ms "$settle_ms" "${env_args[@]}")
    if wanted ceilings; then
        "$tool" broker-ceiling "${common[@]}" --messages "$ceiling_messages" --window "$window"
        "$tool" postgres-ceiling "${common[@]}" --files "$postgres_files"
    fi
    if wanted hashing; then
        "$tool" hashing "${common[@]}" --mib "$big_mib"
    fi
    if wanted throughput; then
        "$tool" load "${common[@]}" --label throughput --instances "$instances" --files "$files" --size-kib "$size_kib"
    fi
    if wanted variant && [ ${#variants[@]} -gt 0 ]; then
        variant_env=()
        for variant in "${variants[@]}"; do variant_env+=(--env "$variant"); done
        "$tool" load "${common[@]}" "${variant_env[@]}" --label variant --instances "$instances" \
            --files "$files" --size-kib "$size_kib"
    fi
    if wanted paced; then
        "$tool" load "${common[@]}" --label paced --instances "$instances" \
            --files "$((paced_rate * paced_seconds))" --size-kib "$size_kib" --rate "$paced_rate"
    fi
    if wanted import; then
        "$tool" import "${common[@]}" --label import_small --files "$import_small" --size-kib "$size_kib"
        "$tool" import "${common[@]}" --label import_large --files "$import_large" --size-kib "$size_kib" --catch-up
    fi
    if wanted burst; then
        "$tool" burst "${common[@]}" --files "$burst" --size-kib "$size_kib"
    fi
    if wanted memory; then
        "$tool" memory "${common[@]}" --directories "$directories" --files "$pending"
    fi
    if wanted steady && [ "$run" = 1 ]; then
        "$tool" steady "${common[@]}" --files "$steady_files" --events "$steady_events" --size-kib "$size_kib"
    fi
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit="$commit+changes"
meta=(runs="$runs" short="$short" instances="$instances" files="$files" size_kib="$size_kib"
      settle_ms="$settle_ms" paced_rate="$paced_rate" paced_seconds="$paced_seconds"
      import_small="$import_small" import_large="$import_large" burst="$burst" pending="$pending"
      directories="$directories" big_mib="$big_mib" ceiling_messages="$ceiling_messages"
      window="$window" postgres_files="$postgres_files" steady_files="$steady_files"
      steady_events="$steady_events" binary="$binary ($build)"
      commit="$commit" date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" cpus="$(nproc)" loadavg="$loadavg"
      env="${env_args[*]:-}" variant="${variants[*]:-}" only="$only")
meta_args=()
for pair in "${meta[@]}"; do meta_args+=(--meta "$pair"); done
"$tool" report --results "$results" --json "$json" "${meta_args[@]}"
