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
