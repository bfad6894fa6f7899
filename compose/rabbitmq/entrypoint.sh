#!/bin/sh
# Writes the broker's boot definitions, the topology of definitions.json and
# the user named in compose/.env (RABBITMQ_USER, RABBITMQ_PASS), then starts
# the broker the image's usual way. The password is JSON-escaped, never
# printed, and lives only in this container's /tmp.
set -eu
: "${RABBITMQ_USER:?set RABBITMQ_USER in compose/.env}"
: "${RABBITMQ_PASS:?set RABBITMQ_PASS in compose/.env}"
mkdir -p /tmp/definitions
cp /etc/rabbitmq/file-watcher/definitions.json /tmp/definitions/10-topology.json
json_string() {
    printf '%s' "$1" | awk 'BEGIN { ORS = "" } {
        gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, "\\t")
        if (NR > 1) print "\\n"; print
    }'
}
user=$(json_string "$RABBITMQ_USER")
pass=$(json_string "$RABBITMQ_PASS")
umask 077
cat >/tmp/definitions/20-user.json <<JSON
{
  "users": [{"name": "$user", "password": "$pass", "tags": ["administrator"]}],
  "vhosts": [{"name": "/"}],
  "permissions": [{"user": "$user", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]
}
JSON
exec docker-entrypoint.sh rabbitmq-server
