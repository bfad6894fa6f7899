# A static musl binary in an empty (scratch) image: nothing but /file-watcher.
# No shell, no libc, no certificate store: the binary is the whole image. TLS
# trusts Mozilla's roots compiled into it; a private CA is mounted read-only
# and named by RABBITMQ_CA_FILE or sslrootcert (see OPERATIONS.md, TLS).
#
# Where a registry is reachable, build everything inside the image:
#   DOCKER_BUILDKIT=1 docker build --target self-contained -t file-watcher:local .
# Where it is not (only FROM scratch works), build the binary first; BuildKit
# then skips the unused build stage:
#   cargo build --release --locked --target x86_64-unknown-linux-musl
#   DOCKER_BUILDKIT=1 docker build -t file-watcher:local .
# (`rustup target add x86_64-unknown-linux-musl` if the target is missing.)

FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl

# What both final stages share. A non-root user by number (scratch has no
# /etc/passwd): 65534 is `nobody`; compose overrides it with PUID:PGID, which
# must be able to read the watched tree. It runs as PID 1 and handles SIGTERM
# itself: it stops watching, finishes the files in hand, waits for the
# broker's confirms and exits 0. The healthcheck is the binary's own
# `healthcheck` subcommand (exec form: there is no shell), which asks this
# instance's /healthz at METRICS_ADDR; 0.0.0.0 makes /metrics reachable from
# outside the container too (publish the port only where it is needed).
FROM scratch AS base
USER 65534:65534
ENV DATA_DIR=/data/music \
    METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/file-watcher", "healthcheck"]
ENTRYPOINT ["/file-watcher"]

FROM base AS self-contained
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/file-watcher /file-watcher

# The default target: the binary built beforehand on the host.
FROM base AS prebuilt
COPY target/x86_64-unknown-linux-musl/release/file-watcher /file-watcher
