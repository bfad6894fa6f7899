# A static musl binary in an empty (scratch) image: nothing but /file-watcher.
#
# Where a registry is reachable, build everything inside the image:
#   DOCKER_BUILDKIT=1 docker build --target self-contained -t file-watcher .
# Where it is not (only FROM scratch works), build the binary first; BuildKit
# then skips the unused build stage:
#   cargo build --release --target x86_64-unknown-linux-musl
#   DOCKER_BUILDKIT=1 docker build -t file-watcher .

FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl

FROM scratch AS self-contained
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/file-watcher /file-watcher
# Runs as PID 1: it handles SIGTERM/SIGINT itself and exits 0 after draining.
# The user must be able to read the watched tree (set `user:` in compose).
USER 65534:65534
ENV DATA_DIR=/data/music
ENTRYPOINT ["/file-watcher"]

FROM scratch AS prebuilt
COPY target/x86_64-unknown-linux-musl/release/file-watcher /file-watcher
USER 65534:65534
ENV DATA_DIR=/data/music
ENTRYPOINT ["/file-watcher"]
