# Shared by scripts/bench.sh --musl, scripts/compose-check.sh and
# scripts/tls-check.sh: building the static musl binary users ship. Source
# it; it defines functions only.

# build_static_binary [CARGO FLAGS...]: builds the release binary for the
# musl target, first adding the target and musl-gcc where they are missing
# (ring and jemalloc compile C for it). A fresh machine has no package
# lists yet, so they are fetched when the first install attempt fails.
# Sets `binary` to the path of the binary.
build_static_binary() {
    local target=x86_64-unknown-linux-musl
    rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
    if ! command -v musl-gcc >/dev/null 2>&1; then
        apt-get install -y musl-tools >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y musl-tools >/dev/null; }
    fi
    cargo build --release --locked "$@" --target "$target" --bin file-watcher
    binary=target/$target/release/file-watcher
}
