#!/usr/bin/env bash
# Fault injection against live instances: does any change get lost?
#
# Full run (about 2.5 minutes, every fault):
#     scripts/chaos.sh --duration 120
# Short run (about 40 s, fewer faults; what `serial_chaos_short` in tests/e2e/faults/chaos.rs runs):
#     scripts/chaos.sh --short
#
# Builds the release binary, starts 3 instances (one tree each, one registry
# schema, one exchange) and a durable queue bound with `file.#`, and keeps a
# steady stream of creates, modifies, renames/moves and deletes going in every
# tree while it injects faults one after another:
#   broker stop_app/start_app, kill -9 of the broker and a restart,
#   rabbitmqctl close_all_connections, a PostgreSQL restart,
#   kill -9 of instance 1 and a restart, SIGTERM of instance 2 with the load
#   going on while it is down and a restart, and a stall of instance 3's
#   notify thread (FILE_WATCHER_TEST_STALL_FILE) under a burst that overflows
#   the kernel's inotify queue.
# Then it stops the load, waits until the registry is quiet, drains the queue
# and compares, per instance, the tree on disk with the registry rows and with
# the last event the consumer got for each path (tests/chaos/check.rs):
#   expected  files on disk
#   recorded  of those, registry rows with the same content
#   published of those, paths whose last delivered event describes the file
#   lost      paths where the registry or the consumer's view disagrees with the disk
#   duplicated deliveries of a message_id already delivered (allowed here: the
#              broker faults make at-least-once redeliver)
#   wrong-id   deliveries carrying another instance's id
#   double     the same change announced twice under two message ids
# and exits non-zero on any loss.
#
# CHAOS_LOG_LEVEL=debug makes the instances log every change they record.
#
# Stops, kills and restarts the local RabbitMQ and PostgreSQL: never run it
# next to other tests. Talks to 127.0.0.1 only and leaves both servers
# running (scripts/services.sh) however it ends. Needs root for the broker
# and database restarts.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/instances.sh

duration=120
short=0
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="$2"; shift 2 ;;
        --duration=*) duration="${1#*=}"; shift ;;
        --short) short=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "chaos: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$duration" in ''|*[!0-9]*) echo "chaos: --duration expects whole seconds, not $duration" >&2; exit 2 ;; esac

rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/%2f"
database_url="postgres://postgres@127.0.0.1:5432/test"
instances=(1 2 3)

log() { printf '%s chaos: %s\n' "$(date +%H:%M:%S)" "$*"; }

scripts/services.sh
log "building the release binary"
cargo build --release --quiet --bin file-watcher --example chaos_check
binary=target/release/file-watcher
checker_binary=target/release/examples/chaos_check

run_id="chaos_$(date +%s)_$$"
work=$(mktemp -d /tmp/file-watcher-chaos-XXXXXX)
declare -A pid=()
load_pids=()
status=1

cleanup() {
    set +e
    touch "$work/stop"
    for load_pid in "${load_pids[@]}"; do kill "$load_pid" 2>/dev/null; wait "$load_pid" 2>/dev/null; done
    for i in "${instances[@]}"; do
        if [ -n "${pid[$i]:-}" ] && kill -0 "${pid[$i]}" 2>/dev/null; then
            kill -TERM "${pid[$i]}"; wait "${pid[$i]}" 2>/dev/null
        fi
    done
    scripts/services.sh >/dev/null
    finish_run
}
trap cleanup EXIT

broker_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }
broker_down() { ! broker_up; }

# Starts instance $1 and waits for its `ready:` line (retrying while a
# killed predecessor's lock is still held).
start_instance() {
    local i=$1
    start_daemon "$work/instance$i.log" "pid[$i]" \
        DATA_DIR="$work/tree$i" INSTANCE_ID="chaos-$i" SETTLE_MS=200 LOG_LEVEL="${CHAOS_LOG_LEVEL:-info}" \
        DATABASE_URL="$database_url" DB_SCHEMA="$run_id" \
        RABBITMQ_URL="$rabbitmq_url?heartbeat=5" EXCHANGE="$run_id" \
        FILE_WATCHER_TEST_STALL_FILE="$work/stall$i"
}

# A steady stream of changes in one tree until $work/stop exists: writes of
# new or existing files, appends, renames and moves (sometimes over an
# existing file) and deletions, about 30 a second.
load() {
    local tree=$1
    set +e # a failed step (a file renamed away meanwhile) is just a skipped step
    RANDOM=$2
    local target
    while [ ! -e "$work/stop" ]; do
        local file="$tree/d$((RANDOM % 4))/f$((RANDOM % 120)).flac"
        # Every step is logged (with bash's own clock: no fork) for post-mortems.
        case $((RANDOM % 10)) in
            0|1|2|3) echo "$EPOCHREALTIME write $file"; head -c $((RANDOM % 4096 + 1)) /dev/urandom >"$file" ;;
            4|5) [ -e "$file" ] && echo "$EPOCHREALTIME append $file" && head -c 64 /dev/urandom >>"$file" ;;
            6|7)
                target="$tree/d$((RANDOM % 4))/f$((RANDOM % 120)).flac"
                [ -e "$file" ] && echo "$EPOCHREALTIME move $file $target" && mv -f "$file" "$target"
                ;;
            8|9) [ -e "$file" ] && echo "$EPOCHREALTIME remove $file" && rm -f "$file" ;;
        esac
        sleep 0.03
    done >"$work/load-$(basename "$tree").log"
}

# ----- the faults -----------------------------------------------------------

fault_broker_stop_app() {
    log "fault: rabbitmqctl stop_app, 5 s down, start_app"
    rabbitmqctl -q stop_app >/dev/null
    sleep 5
    rabbitmqctl -q start_app >/dev/null
    wait_for 60 broker_up
}

fault_broker_kill() {
    local broker_pid
    broker_pid=$(rabbitmqctl -q eval 'os:getpid().' | tr -d '"[:space:]')
    log "fault: kill -9 of the broker (pid $broker_pid), then rabbitmq-server -detached"
    kill -9 "$broker_pid"
    wait_for 30 broker_down
    sleep 2
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_for 120 broker_up
}

fault_close_connections() {
    log "fault: rabbitmqctl close_all_connections"
    rabbitmqctl -q close_all_connections "chaos" >/dev/null
}

fault_postgres_restart() {
    log "fault: PostgreSQL restart"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main restart
    wait_for 60 pg_isready -q -h 127.0.0.1 -p 5432
}

fault_kill_instance() {
    log "fault: kill -9 of instance 1, 3 s down, restart"
    kill -9 "${pid[1]}"; wait "${pid[1]}" 2>/dev/null || true
    sleep 3
    start_instance 1
}

fault_stop_instance() {
    log "fault: SIGTERM of instance 2, 5 s down with the load going on, restart"
    kill -TERM "${pid[2]}"; wait "${pid[2]}" 2>/dev/null || true
    sleep 5
    start_instance 2
}

fault_overflow() {
    log "fault: instance 3's notify thread stalls under a burst past the kernel's inotify queue"
    local queued
    queued=$(cat /proc/sys/fs/inotify/max_queued_events)
    touch "$work/stall3"
    # Excluded names: events for the kernel queue, nothing for the registry.
    # touch + rm make about 5 events per file.
    local count=$(( queued / 4 + 1000 ))
    (cd "$work/tree3/churn" && seq 1 "$count" | sed 's/$/.tmp/' | xargs touch && seq 1 "$count" | sed 's/$/.tmp/' | xargs rm -f)
    sleep 2
    rm -f "$work/stall3"
}

if [ "$short" -eq 1 ]; then
    faults=(fault_close_connections fault_kill_instance fault_overflow fault_postgres_restart)
    gap=4
    quiet_wait=60
else
    faults=(fault_broker_stop_app fault_broker_kill fault_close_connections fault_postgres_restart
        fault_kill_instance fault_stop_instance fault_overflow)
    gap=$(( duration / (${#faults[@]} + 1) ))
    [ "$gap" -ge 1 ] || gap=1
    quiet_wait=120
fi

# ----- the run ----------------------------------------------------------------

checker declare
for i in "${instances[@]}"; do
    mkdir -p "$work/tree$i"/{d0,d1,d2,d3,churn}
    start_instance "$i"
done
log "3 instances ready in $work; schema, exchange and queue $run_id"
for i in "${instances[@]}"; do
    load "$work/tree$i" "$((i * 7919))" &
    load_pids+=($!)
done

for fault in "${faults[@]}"; do
    sleep "$gap"
    "$fault"
done
sleep "$gap"

log "stopping the load; waiting for quiet"
touch "$work/stop"
for load_pid in "${load_pids[@]}"; do wait "$load_pid" 2>/dev/null || true; done
load_pids=()
for i in "${instances[@]}"; do
    if ! kill -0 "${pid[$i]}" 2>/dev/null; then
        log "instance $i is not running:"; tail -5 "$work/instance$i.log"
    fi
done

set +e
checker check --schema "$run_id" --wait "$quiet_wait" --deliveries "$work/consumer.log" \
    --instance "chaos-1=$work/tree1" --instance "chaos-2=$work/tree2" --instance "chaos-3=$work/tree3" \
    --may-repeat chaos-1 --may-repeat chaos-2 --may-repeat chaos-3
status=$?
set -e
if [ "$status" -ne 0 ]; then
    for i in "${instances[@]}"; do
        log "instance $i: errors and warnings"
        grep -E ' (ERROR|WARN) ' "$work/instance$i.log" | grep -v ' lapin::' | tail -n 15 || true
    done
    log "FAILED: changes were lost"
else
    log "no change lost"
fi
exit "$status"
