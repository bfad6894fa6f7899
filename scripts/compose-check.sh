#!/usr/bin/env bash
# The container check, repeatable: build the static binary and the scratch
# image, start compose/docker-compose.host.yml's watchers against the host's
# RabbitMQ and PostgreSQL, write files into every tree, and check that
#   - each container becomes healthy (its HEALTHCHECK is the binary's own
#     `healthcheck` subcommand: no shell in the image);
#   - every file is recorded and announced, and every message carries its own
#     container's instance id (tests/chaos/check.rs judges, as for stress.sh);
#   - the broker lists each connection as file_watcher_<id>;
#   - the image runs as a non-root user and holds no shell;
#   - after `docker-compose stop`, every container exited 0 (it drained), and
#     `docker-compose down` removes them.
#
#     scripts/compose-check.sh               # music, downloads, imports
#     scripts/compose-check.sh --extended    # + podcasts, audiobooks
#     scripts/compose-check.sh --build-only  # the binary and the image only
#
# Needs the Docker engine and docker-compose (v1); on Debian:
#     apt-get install -y docker.io docker-compose && (dockerd &)
# It starts dockerd itself when it is installed but not running (as root).
# Only `FROM scratch` images are built, so no registry is needed. Talks to
# 127.0.0.1 only; isolates itself (own compose project, exchange, queue and
# schema) and leaves the shared servers running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/instances.sh
source scripts/lib/musl.sh

build_only=0
extended=0
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --build-only) build_only=1; shift ;;
        --extended) extended=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compose-check: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf '%s compose-check: %s\n' "$(date +%H:%M:%S)" "$*"; }

for tool in docker docker-compose; do
    command -v "$tool" >/dev/null || {
        echo "compose-check: $tool is not installed (apt-get install -y docker.io docker-compose)" >&2
        exit 2
    }
done
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null && [ "$(id -u)" -eq 0 ] || {
        echo "compose-check: the Docker engine is not running (start dockerd)" >&2
        exit 2
    }
    log "starting dockerd"
    (dockerd >/tmp/file-watcher-dockerd.log 2>&1 &)
    wait_for 60 docker info >/dev/null 2>&1 || { echo "compose-check: dockerd did not start; see /tmp/file-watcher-dockerd.log" >&2; exit 1; }
fi

# ----- the binary and the image -----------------------------------------------
log "building the static binary"
build_static_binary --quiet
file "$binary" | grep -Eq 'statically linked|static-pie linked' || { echo "compose-check: $binary is not statically linked" >&2; exit 1; }
log "binary: $(stat -c %s "$binary") bytes, statically linked"
# Debian's engine client (/usr/bin/docker) has BuildKit built in; a newer
# client elsewhere on the PATH may insist on the buildx plugin instead.
builder=docker
[ -x /usr/bin/docker ] && builder=/usr/bin/docker
DOCKER_BUILDKIT=1 "$builder" build -q -t file-watcher:local . >/dev/null
log "image file-watcher:local: $(docker image inspect -f '{{.Size}}' file-watcher:local) bytes"
[ "$build_only" -eq 1 ] && exit 0

problems=()
user=$(docker image inspect -f '{{.Config.User}}' file-watcher:local)
case "$user" in ''|0|0:*|root*) problems+=("the image runs as root ($user)") ;; esac
if docker run --rm --entrypoint /bin/sh file-watcher:local -c true >/dev/null 2>&1; then
    problems+=("the image has a shell")
fi

# ----- the stack ------------------------------------------------------------------
cargo build --release --locked --quiet --example chaos_check
checker_binary=target/release/examples/chaos_check
rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/%2f"
database_url="postgres://postgres@127.0.0.1:5432/test"
scripts/services.sh >/dev/null
run_id="compose_$(date +%s)_$$"
work=$(mktemp -d /tmp/file-watcher-compose-XXXXXX)
names=(music downloads imports)
profile=()
if [ "$extended" -eq 1 ]; then
    names+=(podcasts audiobooks)
    profile=(--profile extended)
fi
status=1
compose() { docker-compose --env-file "$work/compose.env" -p "$run_id" -f compose/docker-compose.host.yml "${profile[@]}" "$@"; }
cleanup() {
    set +e
    compose down -t 30 >/dev/null 2>&1
    finish_run
}
trap cleanup EXIT

# The trees at $work/<name>, readable by the image's non-root user.
write_compose_env "$work/compose.env"
for name in "${names[@]}"; do mkdir -p "$work/$name/albums"; done
checker declare
checker consume --out "$work/consumed.jsonl" --until "$work/consumed.stop" &
consumer_pid=$!

log "starting ${names[*]} (project $run_id)"
compose up -d --no-build >"$work/compose.log" 2>&1
healthy() {
    local name
    for name in "${names[@]}"; do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "watcher-$name")")" = healthy ] || return 1
    done
}
if wait_for 120 healthy; then
    log "every container is healthy"
else
    for name in "${names[@]}"; do
        problems+=("$name: health $(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "watcher-$name")")")
    done
fi

for name in "${names[@]}"; do
    for k in 1 2 3 4 5; do head -c 8192 /dev/urandom >"$work/$name/albums/track$k.flac"; done
    head -c 8192 /dev/urandom >"$work/$name/single.mp3"
    mv "$work/$name/single.mp3" "$work/$name/albums/single.mp3"
done

wait_for 30 connections_named || problems+=("the broker does not list every connection as file_watcher_<id>")

checker_args=()
for name in "${names[@]}"; do checker_args+=(--instance "$name=$work/$name@/data/$name"); done
checker quiet --schema "$run_id" --wait 60 "${checker_args[@]}" || problems+=("not every file was recorded and published within 60 s")

log "docker-compose stop"
stop_compose_watchers
for name in "${names[@]}"; do
    grep -q '"level":"ERROR"' "$work/$name.log" && problems+=("$name: ERROR lines in its log")
done
compose down -t 30 >>"$work/compose.log" 2>&1
[ -z "$(compose ps -q)" ] || problems+=("docker-compose down left containers")
touch "$work/consumed.stop"
wait "$consumer_pid" || problems+=("the consumer failed")
consumer_pid=""

set +e
checker check --schema "$run_id" --wait 5 --consumed "$work/consumed.jsonl" "${checker_args[@]}"
status=$?
set -e
conclude "every container healthy, every message from its own container, every exit 0"
