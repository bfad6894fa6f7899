//! The registry's tables: every migration, and the start-up step that applies
//! the ones a schema lacks. The tables themselves are described in the module
//! docs of [`super`].

use std::collections::HashSet;

use postgres::Client;

use super::faults::query_error;
use crate::registry::RegistryError;

/// One schema change. Versions only grow; an applied migration is never edited.
///
/// Versions need not be contiguous, and a schema may have a version without
/// one below it: branches that each add a migration are merged later, and a
/// build with both then applies whichever the schema lacks, in version order
/// (see [`pending`]). So a migration must not depend on one with a higher
/// version, and migrations of different branches must not touch the same
/// object. A later migration may change what an earlier one made (6 drops
/// an index 1 created), as long as builds before it keep working.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first. Run with `search_path` set to the registry schema.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "files and outbox",
        sql: r#"
CREATE TABLE files (
    file_path         text COLLATE "C" PRIMARY KEY,
    state             text NOT NULL CHECK (state IN ('present', 'deleted')),
    sha256            text NOT NULL,
    xxh128            text NOT NULL,
    size_bytes        bigint NOT NULL CHECK (size_bytes >= 0),
    mtime_ns          bigint NOT NULL,
    ctime_ns          bigint NOT NULL,
    last_event        text NOT NULL
                      CHECK (last_event IN ('created', 'modified', 'deleted', 'moved', 'renamed')),
    old_path          text COLLATE "C",
    instance_id       text NOT NULL,
    watched_directory text NOT NULL,
    message_id        uuid NOT NULL,
    published_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_present_sha256 ON files (sha256) WHERE state = 'present';
CREATE INDEX files_unpublished ON files (message_id) WHERE published_at IS NULL;

CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    message_id  uuid NOT NULL UNIQUE,
    file_path   text COLLATE "C" NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"#,
    },
    Migration {
        version: 2,
        description: "outbox rows name the instance that recorded them",
        sql: r#"
ALTER TABLE outbox ADD COLUMN instance_id text;
UPDATE outbox SET instance_id = (body::jsonb) ->> 'instance_id' WHERE instance_id IS NULL;
ALTER TABLE outbox ALTER COLUMN instance_id SET NOT NULL;
"#,
    },
    Migration {
        version: 3,
        description: "files rows remember the file's device and inode",
        sql: r#"
ALTER TABLE files ADD COLUMN device bigint, ADD COLUMN inode bigint;
"#,
    },
    Migration {
        version: 4,
        description: "outbox rows that can never be published are set aside",
        sql: r#"
ALTER TABLE outbox
    ADD COLUMN set_aside_at timestamptz,
    ADD COLUMN set_aside_reason text,
    ADD CONSTRAINT outbox_set_aside_has_a_reason
        CHECK ((set_aside_at IS NULL) = (set_aside_reason IS NULL));
"#,
    },
    Migration {
        version: 5,
        description: "instances and their heartbeats; replays and their cursors",
        sql: r#"
CREATE TABLE instances (
    instance_id        text PRIMARY KEY,
    hostname           text NOT NULL,
    pid                integer NOT NULL,
    watched_directory  text NOT NULL,
    version            text NOT NULL,
    started_at         timestamptz NOT NULL,
    heartbeat_at       timestamptz NOT NULL,
    stopped_at         timestamptz,
    messages_recorded  bigint NOT NULL DEFAULT 0,
    messages_confirmed bigint NOT NULL DEFAULT 0,
    files_hashed       bigint NOT NULL DEFAULT 0,
    bytes_hashed       bigint NOT NULL DEFAULT 0,
    events_dropped     bigint NOT NULL DEFAULT 0,
    errors             bigint NOT NULL DEFAULT 0
);

CREATE TABLE replays (
    replay_id          uuid PRIMARY KEY,
    prefix             text COLLATE "C",
    routing_key_prefix text NOT NULL,
    exchange           text NOT NULL,
    cursor             text COLLATE "C",
    sent               bigint NOT NULL DEFAULT 0,
    started_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
"#,
    },
    Migration {
        version: 6,
        description: "file rows are marked published in place",
        // Marking a row published changes `published_at` only. While that
        // column was in `files_unpublished`'s predicate, every mark wrote a
        // new row version on another page and new entries in every index,
        // left for vacuum. With no index on the column and room on the
        // row's page, the mark is a HOT update: the new version stays on
        // the page and the indexes are not touched (BENCHMARKS.md, "Marking
        // published in place"). A full index on `message_id` serves the
        // mark instead; builds before this one mark with the same condition
        // and use it too.
        //
        // Room: the rows of a page are written together and marked
        // together, in one transaction, before any old version can be
        // pruned, so a page needs room for a second version of every row
        // on it, 8 bytes longer (`published_at` set). Fillfactor 45 leaves
        // that; at 50 the last row of a page could miss it by a few bytes,
        // at 80 three marks in four left the page. It applies to pages
        // written from now on.
        //
        // The table is locked first, whole: building the index takes a
        // lock that lets readers through but not writers, and dropping the
        // old one needs the table to itself. Taking the weaker lock first
        // and then the stronger one deadlocks with a transaction of an
        // older build that locked rows before the migration and writes
        // them after it started. Readers and writers of `files` wait for
        // the migration instead (half a second per million rows here).
        sql: r#"
LOCK TABLE files IN ACCESS EXCLUSIVE MODE;
DROP INDEX files_unpublished;
CREATE INDEX files_message_id ON files (message_id);
ALTER TABLE files SET (fillfactor = 45);
"#,
    },
];

/// Creates the schema if needed and applies the migrations it lacks.
pub(super) fn migrate(client: &mut Client, schema: &str) -> Result<(), RegistryError> {
    let mut transaction = client
        .transaction()
        .map_err(query_error("begin the migration transaction"))?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("file-watcher migrations {schema}")],
        )
        .map_err(query_error("lock the schema for migration"))?;
    // Checked before creating, so that a role without CREATE on the database
    // can use a schema an administrator made for it.
    let exists: bool = transaction
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .map_err(query_error("look for the schema"))?
        .get(0);
    let quoted = quote_identifier(schema);
    if !exists {
        log::info!("creating registry schema {schema}");
        transaction
            .batch_execute(&format!("CREATE SCHEMA {quoted}"))
            .map_err(query_error("create the schema"))?;
    }
    transaction
        .batch_execute(&format!(
            "SET LOCAL search_path TO {quoted}; \
             CREATE TABLE IF NOT EXISTS schema_migrations ( \
                 version integer PRIMARY KEY, \
                 description text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .map_err(query_error("create schema_migrations"))?;
    let applied: HashSet<i32> = transaction
        .query("SELECT version FROM schema_migrations", &[])
        .map_err(query_error("read schema_migrations"))?
        .iter()
        .map(|record| record.get(0))
        .collect();
    for migration in pending(MIGRATIONS, &applied) {
        log::info!(
            "applying registry migration {} ({}) to schema {schema}",
            migration.version,
            migration.description
        );
        transaction
            .batch_execute(migration.sql)
            .map_err(query_error("apply a migration"))?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                &[&migration.version, &migration.description],
            )
            .map_err(query_error("record a migration"))?;
    }
    let unknown = unknown(MIGRATIONS, &applied);
    if !unknown.is_empty() {
        log::warn!(
            "schema {schema} has registry migrations {unknown:?} that this build does not know \
             (a newer build ran here); carrying on, as migrations keep what older builds use"
        );
    }
    transaction.commit().map_err(query_error("commit the migrations"))
}

/// The migrations a schema with `applied` lacks, in version order: every
/// one of them, also below a version the schema already has.
fn pending<'a>(
    migrations: &'a [Migration],
    applied: &'a HashSet<i32>,
) -> impl Iterator<Item = &'a Migration> {
    migrations
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
}

/// Versions the schema has that `migrations` does not know, in order.
fn unknown(migrations: &[Migration], applied: &HashSet<i32>) -> Vec<i32> {
    let mut unknown: Vec<i32> = applied
        .iter()
        .copied()
        .filter(|version| !migrations.iter().any(|migration| migration.version == *version))
        .collect();
    unknown.sort_unstable();
    unknown
}

/// Quoted although `Config` checks that the schema name is plain: quoting
/// costs nothing and keeps the statement correct for any name a caller that
/// builds `PostgresSettings` itself passes.
pub(super) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_whole() {
        assert_eq!(quote_identifier("file_watcher"), "\"file_watcher\"");
        assert_eq!(quote_identifier("a\"b; drop"), "\"a\"\"b; drop\"");
    }

    fn migration(version: i32) -> Migration {
        Migration {
            version,
            description: "test",
            sql: "",
        }
    }

    /// A schema migrated by builds of two branches, each with a migration of
    /// its own, gets the one it lacks, whichever number it has.
    #[test]
    fn every_missing_version_is_pending_in_order() {
        let known = [migration(1), migration(2), migration(3), migration(4)];
        let versions = |applied: &[i32]| -> Vec<i32> {
            let applied = applied.iter().copied().collect();
            pending(&known, &applied)
                .map(|migration| migration.version)
                .collect()
        };
        assert_eq!(versions(&[]), [1, 2, 3, 4]);
        assert_eq!(versions(&[1, 2]), [3, 4]);
        assert_eq!(versions(&[1, 2, 4]), [3]);
        assert_eq!(versions(&[1, 2, 3]), [4]);
        assert!(versions(&[1, 2, 3, 4, 5]).is_empty());
    }

    #[test]
    fn versions_this_build_lacks_are_named() {
        let known = [migration(1), migration(2), migration(4)];
        let applied = [1, 2, 3, 4, 5].into_iter().collect();
        assert_eq!(unknown(&known, &applied), [3, 5]);
        assert!(unknown(&known, &[1, 2].into_iter().collect()).is_empty());
    }

    #[test]
    fn migration_versions_only_grow() {
        assert!(MIGRATIONS
            .windows(2)
            .all(|pair| pair[0].version < pair[1].version));
    }
}
