#!/usr/bin/env bash
# Supply chain: `cargo deny check` (advisories, licenses, duplicate versions,
# sources) against deny.toml, with the RustSec advisory database taken from
# the snapshot beside the checkout, never fetched.
#
# The snapshot is ../shared/advisory-db.tar.gz (ADVISORY_DB_TARBALL to point
# elsewhere). Without it, and without network to fetch the database, the
# check is skipped with one line rather than failed: there is nothing to
# check against. cargo-deny is installed (`cargo install --locked`) when
# missing; that takes minutes once.
set -euo pipefail
cd "$(dirname "$0")/.."

tarball="${ADVISORY_DB_TARBALL:-../shared/advisory-db.tar.gz}"
if [[ ! -f "$tarball" && -f /work/shared/advisory-db.tar.gz ]]; then
    tarball=/work/shared/advisory-db.tar.gz
fi

if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "audit: installing cargo-deny (cargo install --locked cargo-deny)"
    started=$(date +%s)
    if ! cargo install --locked cargo-deny; then
        echo "audit: SKIPPED: cargo-deny could not be installed (no registry access?)"
        exit 0
    fi
    echo "audit: cargo-deny installed in $(( $(date +%s) - started )) s"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
config="$work/deny.toml"

if [[ -f "$tarball" ]]; then
    # cargo-deny looks for the database in <db-path>/advisory-db-<hash of its
    # URL> and reads the date of its git HEAD; the snapshot is a plain tree,
    # so it becomes a one-commit repository dated like the snapshot.
    tar -xzf "$tarball" -C "$work"
    database="$work/db/advisory-db-3157b0e258782691"
    mkdir -p "$work/db"
    mv "$work/advisory-db" "$database"
    # Dated like its newest advisory file (as stored in the tarball).
    newest=$(find "$database/crates" -name '*.md' -printf '%T@\n' 2>/dev/null | sort -n | tail -1 | cut -d. -f1)
    snapshot_date="@${newest:-0} +0000"
    (
        cd "$database"
        git init -q
        git add -A
        GIT_AUTHOR_DATE="$snapshot_date" GIT_COMMITTER_DATE="$snapshot_date" \
            git -c user.name=audit -c user.email=audit@localhost -c commit.gpgsign=false commit -q -m "RustSec snapshot"
    )
    sed "s|^\[advisories\]|[advisories]\ndb-path = \"$work/db\"|" deny.toml > "$config"
    echo "audit: advisories from the snapshot $tarball"
    # Offline, cargo-deny reads the metadata of every crate in Cargo.lock,
    # for every platform (winapi-util too), from cargo's cache; a fresh
    # machine's build downloaded only this platform's. Fetch the rest first
    # (a no-op when they are there; skipped, not failed, without registry).
    cargo fetch --locked --quiet || echo "audit: cargo fetch failed; checking with what is cached"
    exec cargo deny --offline --config "$config" check
fi

if curl -fsS -o /dev/null --max-time 10 https://github.com/rustsec/advisory-db 2>/dev/null; then
    echo "audit: no snapshot at $tarball; fetching the advisory database"
    exec cargo deny check
fi

echo "audit: SKIPPED: no advisory snapshot at $tarball and no network to fetch one"
