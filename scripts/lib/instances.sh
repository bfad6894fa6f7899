# Shared by scripts/chaos.sh, scripts/stress.sh and scripts/compose-check.sh:
# waiting, starting a daemon until it reports ready, and reading what a
# process cost. Source it; it defines functions only.

# Polls "$@" until it succeeds, for at most $1 seconds.
wait_for() {
    local seconds=$1; shift
    local until=$(( $(date +%s) + seconds ))
    until "$@"; do
        [ "$(date +%s)" -lt "$until" ] || return 1
        sleep 0.2
    done
}

# start_daemon LOG_FILE PID_VARIABLE ENV... : starts "$binary" with exactly
# the given environment (plus PATH), appending to LOG_FILE, and waits for its
# `ready:` line. A process killed a moment ago may still hold its instance
# lock (the database ends its session only once it notices): then the start
# is retried until the lock is free, and the refused attempt's lines are
# moved from LOG_FILE to LOG_FILE.refused, so that they do not count as the
# run's errors. Sets the variable named PID_VARIABLE to the daemon's pid.
start_daemon() {
    local log_file=$1 pid_variable=$2; shift 2
    local attempt started
    touch "$log_file"
    for attempt in $(seq 1 50); do
        local from=$(( $(wc -l < "$log_file") + 1 ))
        env -i PATH="$PATH" "$@" "$binary" >>"$log_file" 2>&1 &
        started=$!
        printf -v "$pid_variable" '%s' "$started"
        local until=$(( $(date +%s) + 30 ))
        while [ "$(date +%s)" -lt "$until" ]; do
            if tail -n +"$from" "$log_file" | grep -q ': ready:'; then
                return 0
            fi
            kill -0 "$started" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$started" 2>/dev/null; then
            echo "$log_file: no ready line within 30 s" >&2; return 1
        fi
        wait "$started" 2>/dev/null || true
        if ! tail -n +"$from" "$log_file" | grep -q 'is in use'; then
            echo "$log_file: the daemon exited:" >&2; tail -n +"$from" "$log_file" | tail -5 >&2; return 1
        fi
        tail -n +"$from" "$log_file" >>"$log_file.refused"
        head -n $(( from - 1 )) "$log_file" >"$log_file.tmp" && mv "$log_file.tmp" "$log_file"
        sleep 0.2
    done
    echo "$log_file: the instance lock stayed taken" >&2; return 1
}

# process_cost PID: "PEAK_RSS_KB CPU_SECONDS" of a running process.
process_cost() {
    local pid=$1 rss fields ticks
    rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null || true)
    ticks=$(getconf CLK_TCK)
    # After the command name: state is field 1, utime 12 and stime 13.
    awk -v rss="${rss:-0}" -v ticks="$ticks" '{ printf "%s %.2f\n", rss, ($12 + $13) / ticks }' <<<"${fields:-x 0 0 0 0 0 0 0 0 0 0 0 0}"
}

# checker ARGS...: the judge (tests/chaos/check.rs, built as the chaos_check
# example at $checker_binary) on this run's servers, exchange and queue
# ($rabbitmq_url, $database_url, $run_id).
checker() {
    "$checker_binary" --rabbitmq-url "$rabbitmq_url" --database-url "$database_url" \
        --exchange "$run_id" --queue "$run_id" "$@"
}

# finish_run: for an EXIT trap. Stops the consumer ($consumer_pid, if any);
# then, if the run passed ($status 0) and --keep was not given ($keep),
# removes its queue, exchanges, schema and $work, and otherwise says what
# it kept for a post-mortem.
finish_run() {
    touch "$work/consumed.stop"
    if [ -n "${consumer_pid:-}" ]; then
        kill "$consumer_pid" 2>/dev/null
        wait "$consumer_pid" 2>/dev/null
    fi
    if [ "$status" -eq 0 ] && [ "${keep:-0}" -eq 0 ]; then
        checker cleanup --schema "$run_id" >/dev/null 2>&1
        rm -rf "$work"
    else
        log "kept $work (trees, logs, deliveries) and schema, exchange and queue $run_id"
    fi
}

# write_compose_env FILE: the .env for compose/docker-compose.host.yml that
# puts every watcher's tree at $work/<name> (created here, readable by the
# image's user 65534), on this run's exchange and schema, with free-looking
# metrics ports of its own.
write_compose_env() {
    local file=$1 name upper port=$(( 20000 + RANDOM % 20000 ))
    {
        echo "PUID=65534"
        echo "PGID=65534"
        for name in music downloads imports podcasts audiobooks; do
            upper=$(tr '[:lower:]' '[:upper:]' <<<"$name")
            mkdir -p "$work/$name"
            echo "${upper}_DIR=$work/$name"
            echo "${upper}_METRICS_PORT=$port"
            port=$(( port + 1 ))
        done
        echo "HOST_RABBITMQ_URL=$rabbitmq_url"
        echo "HOST_DATABASE_URL=$database_url"
        echo "HOST_EXCHANGE=$run_id"
        echo "HOST_DB_SCHEMA=$run_id"
    } >"$file"
    chmod -R a+rX "$work"
}

# stop_compose_watchers: `docker-compose stop` (each watcher drains and exits
# 0), then every watcher of $names has its log in $work/<name>.log, and each
# one that exited otherwise is added to $problems.
stop_compose_watchers() {
    local name container code
    compose stop -t 30 >>"$work/compose.log" 2>&1
    for name in "${names[@]}"; do
        container=$(compose ps -q "watcher-$name")
        docker logs "$container" >"$work/$name.log" 2>&1
        code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
        [ "$code" -eq 0 ] || problems+=("$name: the container exited $code")
    done
}

# connections_named: the broker lists a connection named file_watcher_<id>
# for every instance id in $names.
connections_named() {
    local connections name
    connections=$(rabbitmqctl -q list_connections client_properties 2>/dev/null || true)
    for name in "${names[@]}"; do grep -q "file_watcher_$name\b" <<<"$connections" || return 1; done
}

# conclude SUCCESS_LINE: prints $problems, fails the run ($status) on any,
# says how it ended, and exits with $status.
conclude() {
    local problem
    for problem in "${problems[@]}"; do echo "problem: $problem"; done
    [ "${#problems[@]}" -eq 0 ] || status=1
    if [ "$status" -eq 0 ]; then
        log "$1"
    else
        log "FAILED"
    fi
    exit "$status"
}
