#!/usr/bin/env bash
# Many watchers at once against the shared RabbitMQ and PostgreSQL: does every
# change arrive, once, from the right instance?
#
#     scripts/stress.sh --instances 5 --files 200     # about a minute; in the test suite
#     scripts/stress.sh --instances 3 --files 2000
#     scripts/stress.sh --containers --instances 5    # the compose watchers instead
#
# Starts N instances (3 to 5), one tree each, one registry schema, one
# exchange, and a consumer reading a queue bound with `file.#` from before the
# first start. In every tree, at once:
#   - M small files written as fast as the shell can (in two subdirectories);
#   - a few files written slowly, open across several settle times;
#   - renames within a directory and moves between subdirectories;
#   - deletions;
#   - the same file copied into every tree (one content, N owners);
#   - then a burst in every tree while instance 1 is killed (kill -9) and
#     restarted.
# Then it waits until every registry agrees with its disk and everything is
# published, and checks per instance (tests/chaos/check.rs, `chaos_check`):
#   - every file on disk has a registry row with its content, and the last
#     message the consumer got for its path describes that content; nothing
#     gone is still present in either (keyed by message_id and path);
#   - every message carries its own instance's id, in the body and in the
#     x-instance-id header;
#   - no change was announced twice, and no message id was delivered twice
#     except by the killed instance (it republishes what it had not seen
#     confirmed: at-least-once);
#   - no ERROR line in any instance's log;
#   - the broker lists each instance's connection as file_watcher_<id>.
# It prints a table (events, events/s, latency from the file's last write to
# the consumer p50/p99, peak RSS, CPU seconds per instance) and exits non-zero
# on any loss, unexpected duplicate, wrong id or error.
#
# Options:
#   --instances N    3 to 5 (default 3)
#   --files M        small files per tree (default 1000; at least 20)
#   --containers     run compose/docker-compose.host.yml's watchers (music,
#                    downloads, imports, + podcasts, audiobooks for N = 5)
#                    instead of processes; builds the image if it is missing
#   --binary PATH    the daemon to run (default: a fresh release build)
#   --checker PATH   the chaos_check example (default: a fresh release build)
#   --keep           keep the trees, logs, queue and schema even on success
#
# Talks to 127.0.0.1 only; never stops the shared servers, so it can run
# beside other tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/instances.sh

instance_count=3
files=1000
containers=0
binary=""
checker_binary=""
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --instances) instance_count="$2"; shift 2 ;;
        --files) files="$2"; shift 2 ;;
        --containers) containers=1; shift ;;
        --binary) binary="$2"; shift 2 ;;
        --checker) checker_binary="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "stress: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$instance_count" in 3|4|5) ;; *) echo "stress: --instances must be 3, 4 or 5, not $instance_count" >&2; exit 2 ;; esac
case "$files" in ''|*[!0-9]*) echo "stress: --files expects a whole number, not $files" >&2; exit 2 ;; esac
[ "$files" -ge 20 ] || { echo "stress: --files must be at least 20" >&2; exit 2; }

rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/%2f"
database_url="postgres://postgres@127.0.0.1:5432/test"
settle_ms=200

log() { printf '%s stress: %s\n' "$(date +%H:%M:%S)" "$*"; }

scripts/services.sh >/dev/null
if [ -z "$binary" ] || [ -z "$checker_binary" ]; then
    log "building the release binary"
    cargo build --release --locked --quiet --bin file-watcher --example chaos_check
fi
binary=${binary:-target/release/file-watcher}
checker_binary=${checker_binary:-target/release/examples/chaos_check}

run_id="stress_$(date +%s)_$$"
work=$(mktemp -d /tmp/file-watcher-stress-XXXXXX)
# Readable by the containers' non-root user.
chmod 755 "$work"
compose_files=(-f compose/docker-compose.host.yml)
compose_profile=()
[ "$instance_count" -eq 5 ] && compose_profile=(--profile extended)
if [ "$containers" -eq 1 ]; then
    all_names=(music downloads imports podcasts audiobooks)
    # compose's services come in threes or fives; a fourth runs only with the fifth.
    [ "$instance_count" -eq 4 ] && { echo "stress: --containers runs 3 or 5 instances" >&2; exit 2; }
    names=("${all_names[@]:0:$instance_count}")
else
    suffix=$(printf '%04x' $((RANDOM)))
    names=()
    for i in $(seq 1 "$instance_count"); do names+=("stress-$suffix-$i"); done
fi
declare -A pid=() tree=() cpu=() rss=()
consumer_pid=""
load_pids=()
status=1

compose() { docker-compose --env-file "$work/compose.env" -p "$run_id" "${compose_files[@]}" "${compose_profile[@]}" "$@"; }

cleanup() {
    set +e
    for load_pid in "${load_pids[@]}"; do kill "$load_pid" 2>/dev/null; wait "$load_pid" 2>/dev/null; done
    if [ "$containers" -eq 1 ]; then
        compose down -t 30 >/dev/null 2>&1
    else
        for name in "${names[@]}"; do
            if [ -n "${pid[$name]:-}" ] && kill -0 "${pid[$name]}" 2>/dev/null; then
                kill -TERM "${pid[$name]}"; wait "${pid[$name]}" 2>/dev/null
            fi
        done
    fi
    finish_run
}
trap cleanup EXIT

# ----- the instances ----------------------------------------------------------

start_instance() {
    local name=$1
    if [ "$containers" -eq 1 ]; then
        compose up -d --no-build "watcher-$name" >>"$work/compose.log" 2>&1
        local container
        container=$(compose ps -q "watcher-$name")
        wait_for 60 container_ready "$container" || { log "$name: no ready line"; return 1; }
        pid[$name]=$(docker inspect -f '{{.State.Pid}}' "$container")
    else
        start_daemon "$work/$name.log" "pid[$name]" \
            DATA_DIR="${tree[$name]}" INSTANCE_ID="$name" SETTLE_MS="$settle_ms" \
            DATABASE_URL="$database_url" DB_SCHEMA="$run_id" \
            RABBITMQ_URL="$rabbitmq_url" EXCHANGE="$run_id"
    fi
}

container_ready() { docker logs "$1" 2>&1 | grep -q 'ready: watching'; }

# Adds what the running incarnation of $1 cost to its totals.
account() {
    local name=$1 cost
    cost=$(process_cost "${pid[$name]}")
    rss[$name]=$(( ${rss[$name]:-0} > ${cost% *} ? ${rss[$name]:-0} : ${cost% *} ))
    cpu[$name]=$(awk -v a="${cpu[$name]:-0}" -v b="${cost#* }" 'BEGIN { printf "%.2f", a + b }')
}

kill_instance() {
    local name=$1
    account "$name"
    if [ "$containers" -eq 1 ]; then
        # `kill`, not `stop`: no drain, as a crash; the container is started
        # again by hand (its restart policy would too).
        docker kill -s KILL "$(compose ps -q "watcher-$name")" >/dev/null
    else
        kill -9 "${pid[$name]}"; wait "${pid[$name]}" 2>/dev/null || true
    fi
}

# ----- the load -----------------------------------------------------------------

small_files() {
    local root=$1 count=$2 prefix=$3 k
    for k in $(seq 1 "$count"); do
        head -c 4096 /dev/urandom >"$root/$((k % 2 == 0 ? 0 : 1))/$prefix$k.flac"
    done
}

# One file held open across several settle times, written in pieces.
slow_file() {
    local path=$1 piece
    {
        for piece in 1 2 3 4 5; do
            head -c 8192 /dev/urandom
            sleep 0.3
        done
    } >"$path"
}

load() {
    local root=$1 k
    small_files "$root" "$files" f
    for k in 1 2 3; do slow_file "$root/slow/s$k.flac" & done
    sleep 1
    # Renames within a directory, moves between the two, deletions: a tenth each.
    for k in $(seq 1 $(( files / 10 ))); do
        local a=$(( k * 10 - 9 )) b=$(( k * 10 - 8 )) c=$(( k * 10 - 7 ))
        mv "$root/$((a % 2 == 0 ? 0 : 1))/f$a.flac" "$root/$((a % 2 == 0 ? 0 : 1))/r$a.flac"
        mv "$root/$((b % 2 == 0 ? 0 : 1))/f$b.flac" "$root/$((b % 2 == 0 ? 1 : 0))/m$b.flac"
        rm "$root/$((c % 2 == 0 ? 0 : 1))/f$c.flac"
    done
    cp "$work/shared.flac" "$root/shared/everywhere.flac"
    wait
}

# ----- the run ------------------------------------------------------------------

head -c 65536 /dev/urandom >"$work/shared.flac"
for name in "${names[@]}"; do
    tree[$name]="$work/$name"
    mkdir -p "${tree[$name]}"/{0,1,slow,shared}
done
chmod -R a+rX "$work"
checker declare
checker consume --out "$work/consumed.jsonl" --until "$work/consumed.stop" &
consumer_pid=$!

if [ "$containers" -eq 1 ]; then
    if ! docker image inspect file-watcher:local >/dev/null 2>&1; then
        log "building the image file-watcher:local"
        scripts/compose-check.sh --build-only
    fi
    write_compose_env "$work/compose.env"
fi

for name in "${names[@]}"; do start_instance "$name"; done
log "${#names[@]} instances ready in $work; schema, exchange and queue $run_id"
started=$(date +%s.%N)

for name in "${names[@]}"; do
    load "${tree[$name]}" &
    load_pids+=($!)
done
for load_pid in "${load_pids[@]}"; do wait "$load_pid"; done
load_pids=()

victim=${names[0]}
log "kill -9 of $victim, a burst in every tree while it is down, restart"
kill_instance "$victim"
for name in "${names[@]}"; do
    small_files "${tree[$name]}" $(( files / 4 )) burst &
    load_pids+=($!)
done
for load_pid in "${load_pids[@]}"; do wait "$load_pid"; done
load_pids=()
start_instance "$victim"
log "load done in $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"

# The broker's view of who is connected, while everything runs.
connections=$(rabbitmqctl -q list_connections client_properties 2>/dev/null || true)
problems=()
for name in "${names[@]}"; do
    grep -q "file_watcher_$name\b" <<<"$connections" \
        || problems+=("$name: no broker connection named file_watcher_$name")
done

# Wait for quiet while the instances still run, then measure and stop them.
checker_args=()
for name in "${names[@]}"; do
    if [ "$containers" -eq 1 ]; then
        # The registry and the messages name the path inside the container.
        checker_args+=(--instance "$name=${tree[$name]}@/data/$name")
    else
        checker_args+=(--instance "$name=${tree[$name]}")
    fi
done
checker quiet --schema "$run_id" --wait 180 "${checker_args[@]}" || problems+=("not quiet within 180 s")
for name in "${names[@]}"; do account "$name"; done
log "stopping the instances"
if [ "$containers" -eq 1 ]; then
    stop_compose_watchers
else
    for name in "${names[@]}"; do
        kill -TERM "${pid[$name]}"
        wait "${pid[$name]}" || problems+=("$name: exited $? after SIGTERM")
    done
fi
touch "$work/consumed.stop"
wait "$consumer_pid" || problems+=("the consumer failed")
consumer_pid=""

for name in "${names[@]}"; do
    errors=$(grep -cE '( ERROR |"level":"ERROR")' "$work/$name.log" || true)
    [ "$errors" -eq 0 ] || problems+=("$name: $errors ERROR lines, e.g. $(grep -m1 -E '( ERROR |"level":"ERROR")' "$work/$name.log")")
done

resources=()
for name in "${names[@]}"; do resources+=(--resources "$name=${rss[$name]},${cpu[$name]}"); done
set +e
checker check --schema "$run_id" --wait 60 --consumed "$work/consumed.jsonl" \
    --deliveries "$work/deliveries.txt" --may-repeat "$victim" "${checker_args[@]}" "${resources[@]}"
status=$?
set -e
echo
echo "events by type (all instances): $(awk '{ print $2 }' "$work/deliveries.txt" | sort | uniq -c | awk '{ printf "%s %s  ", $2, $1 }')"
conclude "no change lost, duplicated or misattributed; no errors"
