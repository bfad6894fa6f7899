#!/usr/bin/env bash
# Makes sure the local PostgreSQL and RabbitMQ the tests talk to are up,
# starting them when they are not (a fresh machine starts both; a fault test
# or an operator may have stopped one). Talks to 127.0.0.1 only.
set -euo pipefail

deadline() { echo $(( $(date +%s) + $1 )); }

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "services: starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    until_time=$(deadline 60)
    until pg_isready -q -h 127.0.0.1 -p 5432; do
        [ "$(date +%s)" -lt "$until_time" ] || { echo "services: PostgreSQL did not start" >&2; exit 1; }
        sleep 0.5
    done
fi

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }
if ! rabbit_up; then
    # A fault test may have left the application stopped inside a running node.
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
fi
if ! rabbit_up; then
    echo "services: starting RabbitMQ" >&2
    rabbitmq-server -detached >/dev/null 2>&1 || true
    until_time=$(deadline 120)
    until rabbit_up; do
        [ "$(date +%s)" -lt "$until_time" ] || { echo "services: RabbitMQ did not start" >&2; exit 1; }
        sleep 1
    done
fi
