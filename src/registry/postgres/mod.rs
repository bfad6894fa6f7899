//! The PostgreSQL registry shared by every instance, and the lock that keeps
//! one instance id to one live process.
//!
//! This module owns the registry schema and its migrations, the connection pool,
//! the transaction that records a change together with its outbox messages,
//! the classification of database errors, and [`InstanceLock`]; each in a file
//! of its own (see "Where the code is" below).
//!
//! # Tables
//!
//! All tables live in one schema (`PostgresSettings::schema`, `public` when
//! unset); the DDL is in [`MIGRATIONS`].
//!
//! - `files`: one row per path the registry ever recorded, keyed by
//!   `file_path text COLLATE "C"` so that the primary key is in byte order and
//!   a directory's rows form one contiguous key range. `state` is `present` or
//!   `deleted`: a deleted file and the old path of a rename keep their row as a
//!   tombstone that says how the path was left (`last_event`) and whether that
//!   message went out. Content and stat columns describe the file as last
//!   observed (on a tombstone: as it was before it left). `message_id` is the
//!   last message the row's latest change produced; `published_at` is NULL
//!   while that message is still waiting for the sink's confirmation.
//!   `device` and `inode` (migration 3, NULL on rows recorded before it) say
//!   which file the row describes, so that a move the kernel did not report
//!   as a rename can still be recognised (stored bit for bit: they may read
//!   as negative).
//!   Tombstones are never pruned by the daemon; an operator may delete old ones
//!   (`DELETE FROM files WHERE state = 'deleted' AND published_at < now() - interval '30 days'`).
//! - `outbox`: messages recorded but not yet confirmed, in the order they were
//!   recorded (`id`). `body` is `Message::to_json()`, sent as stored, so every
//!   redelivery sends the same bytes. A row that can never be published (a
//!   body this build cannot read, or one the broker refuses) is *set aside*
//!   rather than left to block the rows behind it: `set_aside_at` and
//!   `set_aside_reason` are set (both or neither, migration 4), the row stays,
//!   `outgoing` skips it, and its file row keeps `published_at` NULL.
//! - `schema_migrations`: the migration versions already applied.
//!
//! # Queries worth knowing
//!
//! The same content in several places ([`PostgresRegistry::same_content`],
//! served by the partial index `files_present_sha256`):
//!
//! ```sql
//! SELECT file_path FROM files WHERE sha256 = $1 AND state = 'present' ORDER BY file_path;
//! ```
//!
//! Changes whose message has not been confirmed yet: the outbox holds them
//! in order; the file rows say the same, but no index serves
//! `published_at` (an index on it would keep the published mark from being
//! a HOT update, migration 6), so this reads the whole table:
//!
//! ```sql
//! SELECT message_id, file_path, created_at FROM outbox ORDER BY id;
//! SELECT file_path, last_event, message_id, updated_at FROM files WHERE published_at IS NULL;
//! ```
//!
//! Rows set aside, and how to requeue one once its cause is fixed:
//!
//! ```sql
//! SELECT id, message_id, file_path, set_aside_at, set_aside_reason FROM outbox
//!  WHERE set_aside_at IS NOT NULL ORDER BY id;
//! UPDATE outbox SET set_aside_at = NULL, set_aside_reason = NULL WHERE id = $1;
//! ```
//!
//! Rows under a directory use an exact byte-range test on the `"C"` key,
//! never `LIKE` (whose `_` and `%` would match too much):
//! `file_path > '/dir/' AND file_path < '/dir0'` (`'0'` is the byte after `'/'`).
//!
//! # Where the code is
//!
//! - `schema`: [`MIGRATIONS`] and the start-up step that applies them;
//! - `pool`: the connection pool, and telling an unreachable database from
//!   busy connections;
//! - `apply`: the transaction that records a change with its outbox messages,
//!   and how concurrent instances converge (its module docs: Concurrency);
//! - `faults`: which database errors are lost races, which mean the database
//!   is unreachable, and the retry loop (its module docs: Errors);
//! - `lock`: [`InstanceLock`].
//!
//! No error text or log line holds the password: the URL is a
//! [`SecretUrl`](crate::redact::SecretUrl), which prints through
//! [`redact_url`](crate::redact::redact_url) and is exposed only to the
//! client's configuration; PostgreSQL's own messages never include it.

/// The columns of a batch read of `files` rows: those `row_from_record`
/// reads, in its order, then `state = 'present'`, which `present_rows`
/// reads. A macro so that `concat!` can build the statements (`const`s) of
/// this module and of `apply` from it.
macro_rules! row_columns {
    () => {
        "file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128, device, inode, state = 'present'"
    };
}

mod apply;
mod faults;
mod lock;
mod pool;
mod schema;
mod statements;
mod tls;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r2d2::Pool;
use uuid::Uuid;

pub use lock::{InstanceLock, LockError};
pub use schema::{Migration, MIGRATIONS};
pub use tls::{DatabaseTls, SslMode};

use faults::{describe, fault, name_database, query_error};
use pool::{Connector, Manager};
use schema::migrate;

use super::{Applied, Change, FileId, Queued, Registry, RegistryError, Row, Stat};
use crate::message::{Encoded, Origin};
use crate::redact::SecretUrl;

/// Connections per process when the configuration does not say otherwise:
/// enough for a few workers and the publisher without crowding a server
/// shared by many instances.
pub const DEFAULT_POOL_SIZE: u32 = 4;

/// How long opening one connection may take, for callers without a limit of
/// their own. The daemon passes the same 5 s (`pipeline`'s
/// `DATABASE_CONNECT_TIMEOUT`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema used when `PostgresSettings::schema` is `None`.
pub const DEFAULT_SCHEMA: &str = "public";

/// `application_name` of pooled connections, so operators can find them in
/// `pg_stat_activity` (kept when the URL sets its own).
const APPLICATION_NAME: &str = "file-watcher";

/// How long a message recorded by another instance waits before this one
/// publishes it too (its recorder is presumably gone, or stuck).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// How to reach the registry database.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` or a `key=value`
    /// connection string. May hold a password; prints redacted.
    pub url: SecretUrl,
    /// Schema holding the registry tables; `None` means [`DEFAULT_SCHEMA`].
    /// Must be a plain lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63
    /// bytes, PostgreSQL's limit). `Config` checks that for `DB_SCHEMA`, where
    /// the error can name the variable; it is not checked again here.
    pub schema: Option<String>,
    /// Most connections this process opens; threads beyond that wait for one.
    pub pool_size: u32,
    /// Limit for opening one connection. Also how long a thread waits for a
    /// pooled connection before checking whether the pool is merely busy.
    pub connect_timeout: Duration,
}

impl PostgresSettings {
    fn schema_name(&self) -> &str {
        self.schema.as_deref().unwrap_or(DEFAULT_SCHEMA)
    }

    /// The driver's configuration and the TLS connector to open it with
    /// (see `tls` for how `sslmode` is followed).
    fn client_config(&self, application_name: &str) -> Result<(postgres::Config, Connector), RegistryError> {
        let tls = DatabaseTls::from_url(&self.url).map_err(|reason| RegistryError::Query {
            what: "read the TLS settings of the database URL",
            detail: format!("{}: {reason}", self.url),
        })?;
        let mut config =
            postgres::Config::from_str(tls.url.expose()).map_err(|error| RegistryError::Query {
                what: "parse the database URL",
                detail: format!("{}: {}", self.url, describe(&error)),
            })?;
        tls.apply(&mut config);
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        // The driver logs server notices at info level; "schema already exists,
        // skipping" at every start is not news.
        config
            .notice_callback(|notice| log::debug!("PostgreSQL {}: {}", notice.severity(), notice.message()));
        log::debug!(
            "database TLS for {}: sslmode {:?}, {:?}",
            self.url,
            tls.mode,
            tls.client
        );
        Ok((config, tls.connector()))
    }
}

/// One connection of its own, outside the pool, with the same `sslmode`
/// handling: for the heartbeat and the operator commands. `what` names the
/// failure ("connect").
pub fn connect_one(
    url: &SecretUrl,
    application_name: &str,
    connect_timeout: Duration,
) -> Result<postgres::Client, RegistryError> {
    let settings = PostgresSettings {
        url: url.clone(),
        schema: None,
        pool_size: 1,
        connect_timeout,
    };
    let (config, connector) = settings.client_config(application_name)?;
    config.connect(connector).map_err(|error| RegistryError::Query {
        what: "connect",
        detail: format!("{url}: {}", describe(&error)),
    })
}

/// The registry every instance shares; see the module docs.
pub struct PostgresRegistry {
    pool: Pool<Manager>,
    /// Stamped into every message, and the tree whose messages `outgoing` returns.
    origin: Origin,
    schema: String,
    /// Seed of the path-lock hash, derived from the schema, so registries in
    /// different schemas of one database do not wait on each other's paths.
    path_lock_seed: i64,
    /// The URL without its password, for error texts.
    database: String,
    pool_size: u32,
    connect_timeout: Duration,
    /// The last failure to open a pooled connection, described in full (r2d2
    /// keeps only the error's first line).
    last_connect_failure: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for PostgresRegistry {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PostgresRegistry")
            .field("database", &self.database)
            .field("schema", &self.schema)
            .field("origin", &self.origin)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PostgresRegistry {
    /// Connects, creates the schema if missing and applies pending migrations.
    ///
    /// Migrations run under a transaction-level advisory lock keyed on the
    /// schema, taken before anything else (even `CREATE SCHEMA IF NOT EXISTS`
    /// fails when two sessions race on it), so any number of processes may
    /// start at once. They run on a connection of their own, whose errors are
    /// typed: a wrong password or a missing database is reported as such
    /// instead of as a pool timeout.
    pub fn connect(settings: &PostgresSettings, origin: Origin) -> Result<PostgresRegistry, RegistryError> {
        let schema = settings.schema_name().to_owned();
        if settings.pool_size == 0 {
            return Err(RegistryError::Query {
                what: "check the pool size",
                detail: "pool_size must be at least 1".into(),
            });
        }
        if settings.connect_timeout.is_zero() {
            return Err(RegistryError::Query {
                what: "check the connect timeout",
                detail: "connect_timeout must be longer than zero".into(),
            });
        }
        let database = settings.url.to_string();
        let (config, connector) = settings.client_config(APPLICATION_NAME)?;

        // Start-up errors name the database even when they are not about
        // reaching it: a wrong password or a missing database is a setting.
        let at_database = |error: RegistryError| match error {
            RegistryError::Query { what, detail } => RegistryError::Query {
                what,
                detail: format!("{database}: {detail}"),
            },
            other => name_database(&database, other),
        };
        let mut client = config
            .connect(connector.clone())
            .map_err(|error| at_database(query_error("connect")(error)))?;
        migrate(&mut client, &schema).map_err(at_database)?;
        let path_lock_seed: i64 = client
            .query_one(
                "SELECT hashtextextended($1, 0)",
                &[&format!("file-watcher paths {schema}")],
            )
            .map_err(|error| at_database(query_error("derive the path lock seed")(error)))?
            .get(0);
        drop(client);

        let (pool, last_connect_failure) = pool::build(settings, config, connector, &schema, &database);
        log::info!(
            "registry ready: {database}, schema {schema}, up to {} connections",
            settings.pool_size
        );
        Ok(PostgresRegistry {
            pool,
            origin,
            schema,
            path_lock_seed,
            database,
            pool_size: settings.pool_size,
            connect_timeout: settings.connect_timeout,
            last_connect_failure,
        })
    }

    /// Present paths whose content has this SHA-256, in byte order: the same
    /// file kept in several places. The query is in the module docs.
    pub fn same_content(&self, sha256: &str) -> Result<Vec<String>, RegistryError> {
        self.read(|client| {
            let records = client
                .query(
                    "SELECT file_path FROM files WHERE sha256 = $1 AND state = 'present' \
                     ORDER BY file_path",
                    &[&sha256],
                )
                .map_err(fault("find files with the same content"))?;
            Ok(records.iter().map(|record| record.get(0)).collect())
        })
    }
}

impl Registry for PostgresRegistry {
    fn lookup(&self, path: &str) -> Result<Option<Row>, RegistryError> {
        self.read(|client| {
            let record = client
                .query_opt(
                    "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128, device, inode \
                     FROM files WHERE file_path = $1 AND state = 'present'",
                    &[&path],
                )
                .map_err(fault("look up the file row"))?;
            Ok(record.as_ref().map(row_from_record))
        })
    }

    fn apply(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError> {
        self.apply_one(change, correlation_id)
    }

    fn lookup_all(&self, paths: &[&str]) -> Result<Vec<Row>, RegistryError> {
        self.read(|client| {
            let records = client
                .query(LOOK_UP_ROWS, &[&paths])
                .map_err(fault("look up the file rows"))?;
            Ok(present_rows(&records))
        })
    }

    fn apply_all(&self, changes: &[(Change, Uuid)]) -> Vec<Result<Applied, RegistryError>> {
        self.apply_changes(changes)
    }

    fn present_under(
        &self,
        dir: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, RegistryError> {
        let (prefix, upper) = tree_bounds(dir);
        // Strings compare byte-wise in Rust as they do under COLLATE "C".
        let lower = match after {
            Some(after) if after > prefix.as_str() => after.to_owned(),
            _ => prefix,
        };
        self.read(|client| {
            // A walk of the primary key (no bitmap scans in pooled
            // sessions, see `pool.rs`): the sweep after a catch-up reads
            // every page of a tree that may have just been imported.
            let records = client
                .query(PRESENT_UNDER, &[&lower, &upper, &to_bigint(limit as u64)])
                .map_err(fault("list present files under a directory"))?;
            Ok(records.iter().map(|record| record.get(0)).collect())
        })
    }

    /// Messages under this instance's tree: its own at once, and those of
    /// other instances (overlapping trees, or a crashed predecessor with
    /// another id) once they have waited `ORPHAN_GRACE`, so two instances on
    /// one tree do not both deliver every message. A row whose body cannot be
    /// published as it stands (see [`read_body`]) is set aside on the way.
    fn outgoing_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Queued>, RegistryError> {
        let (lower, upper) = tree_bounds(&self.origin.watched_directory);
        let grace = ORPHAN_GRACE.as_secs_f64();
        let mut after = after.map_or(0, |position| i64::try_from(position).unwrap_or(i64::MAX));
        loop {
            // Only a walk of the primary key, in order, reads a page in
            // time proportional to the page (pooled sessions plan no bitmap
            // or sequential scans, see `pool.rs`).
            let records = self.read(|client| {
                client
                    .query(
                        OUTBOX_PAGE,
                        &[
                            &lower,
                            &upper,
                            &to_bigint(limit as u64),
                            &self.origin.instance_id,
                            &grace,
                            &after,
                        ],
                    )
                    .map_err(fault("read the outbox"))
            })?;
            let mut page = Vec::with_capacity(records.len());
            for record in &records {
                let id: i64 = record.get(0);
                after = id;
                let message_id: Uuid = record
                    .get::<_, &str>(1)
                    .parse()
                    .expect("PostgreSQL prints a uuid as a UUID");
                match read_body(message_id, record.get(2)) {
                    Ok(message) => page.push(Queued {
                        position: id.unsigned_abs(),
                        message,
                    }),
                    Err(reason) => self.set_aside(message_id, &reason)?,
                }
            }
            // A full page that was all set aside says nothing about the rows
            // behind it: read on, or the publisher would take the outbox for empty.
            if !page.is_empty() || records.len() < limit {
                return Ok(page);
            }
        }
    }

    fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError> {
        if message_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = message_ids.iter().map(Uuid::to_string).collect();
        self.autocommit("mark messages published", |session| {
            session
                .execute(MARK_PUBLISHED, &[&ids])
                .map_err(fault("mark messages published"))?;
            Ok(())
        })
    }

    /// Marks the row, keeping it in the table; the file row keeps
    /// `published_at` NULL, as the message was not published. Logged by the
    /// one instance whose update set the mark, so once however many
    /// instances come across the row.
    fn set_aside(&self, message_id: Uuid, reason: &str) -> Result<(), RegistryError> {
        let marked = self.read(|client| {
            client
                .query_opt(
                    "UPDATE outbox SET set_aside_at = now(), set_aside_reason = $2 \
                     WHERE message_id = $1::text::uuid AND set_aside_at IS NULL \
                     RETURNING id, file_path",
                    &[&message_id.to_string(), &reason],
                )
                .map_err(fault("set an outbox message aside"))
        })?;
        if let Some(record) = marked {
            log::error!(
                "outbox message {message_id} (outbox id {}, {}) set aside, not published: {reason}; \
                 it stays in the outbox table until requeued (see OPERATIONS.md)",
                record.get::<_, i64>(0),
                record.get::<_, &str>(1),
            );
        }
        Ok(())
    }
}

/// The message an outbox row holds, with its body as stored (which is what
/// goes out), or why it can never be published as it stands: its body does
/// not read as a [`Message`] (a layout this build does not know, a damaged
/// row), or it names another message than its row, so that confirming it
/// would never clear the row. Fields this build does not know are no reason:
/// they stay in the body.
fn read_body(message_id: Uuid, body: &str) -> Result<Encoded, String> {
    let message = Encoded::read(body).map_err(|error| format!("cannot read the body: {error}"))?;
    if message.message_id != message_id {
        return Err(format!(
            "the body is message {}, not the row's message {message_id}",
            message.message_id
        ));
    }
    Ok(message)
}

/// A page of the present paths between `$1` and `$2`, for the sweep: a walk
/// of the primary key in a pooled session.
const PRESENT_UNDER: &str = "SELECT file_path FROM files \
     WHERE state = 'present' AND file_path > $1 AND file_path < $2 \
     ORDER BY file_path LIMIT $3";

/// A page of the outbox under the tree `$1`..`$2` past position `$6`, of
/// this instance's messages (`$4`) and those older than `$5` seconds: a walk
/// of the primary key in a pooled session.
const OUTBOX_PAGE: &str = "SELECT id, message_id::text, body FROM outbox \
     WHERE file_path > $1 AND file_path < $2 AND set_aside_at IS NULL \
       AND (instance_id = $4 OR created_at < now() - make_interval(secs => $5)) \
       AND id > $6 \
     ORDER BY id LIMIT $3";

/// The rows at a batch of paths, for [`present_rows`].
const LOOK_UP_ROWS: &str = concat!("SELECT ", row_columns!(), " FROM files WHERE file_path = ANY($1)");

/// Deletes the messages `$1` from the outbox and marks the file rows whose
/// latest message is among them published: one statement, so one round
/// trip in a transaction of its own.
///
/// Lock order: the outbox rows first, then the file rows, found through
/// `files_message_id` and locked in path order. That is the order of
/// earlier builds, which did the same in two statements, so publishers of
/// two builds confirming one message (an orphan, overlapping trees) cannot
/// wait on each other in a cycle. PostgreSQL runs a `WITH` part that nothing
/// reads once the main statement is done, so the main statement is the
/// DELETE; the docs leave that order open, and
/// `tests/e2e/registry.rs::marking_published_locks_the_outbox_rows_before_the_file_rows`
/// fails if it changes. Workers never wait for outbox rows a publisher
/// deletes (they only insert new ones). The mark is a HOT update, as no
/// index holds `published_at` (migration 6).
const MARK_PUBLISHED: &str = "WITH marked AS ( \
         UPDATE files SET published_at = now() WHERE file_path IN ( \
             SELECT file_path FROM files \
             WHERE published_at IS NULL AND message_id = ANY($1::text[]::uuid[]) \
             ORDER BY file_path FOR UPDATE)) \
     DELETE FROM outbox WHERE message_id = ANY($1::text[]::uuid[])";

/// The rows of a batch lookup by path that describe present files.
///
/// Such lookups select every row at the paths and a ninth column, `state =
/// 'present'`, instead of filtering on `state` in SQL: a table that filled
/// in seconds has no statistics yet, and the planner, taking `state =
/// 'present'` to match a handful of rows, answered it through the partial
/// index `files_present_sha256`, reading every present row of the table
/// for each batch of a few hundred paths (BENCHMARKS.md, "Lookups that read
/// the whole table"). Without that condition only the primary key serves.
pub(super) fn present_rows(records: &[postgres::Row]) -> Vec<Row> {
    records
        .iter()
        .filter(|record| record.get::<_, bool>(8))
        .map(row_from_record)
        .collect()
}

fn row_from_record(record: &postgres::Row) -> Row {
    Row {
        path: record.get(0),
        stat: Stat {
            // The column has CHECK (size_bytes >= 0).
            size: u64::try_from(record.get::<_, i64>(1)).unwrap_or_default(),
            mtime_ns: record.get(2),
            ctime_ns: record.get(3),
            identity: match (record.get::<_, Option<i64>>(6), record.get::<_, Option<i64>>(7)) {
                (Some(device), Some(inode)) => Some(FileId {
                    device: from_bigint_bits(device),
                    inode: from_bigint_bits(inode),
                }),
                _ => None,
            },
        },
        sha256: record.get(4),
        xxh128: record.get(5),
    }
}

/// Device and inode numbers are full 64-bit values (some filesystems use the
/// top bit); they are stored bit for bit in `bigint`, so they may read as
/// negative in SQL. Only equality matters.
fn to_bigint_bits(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

fn from_bigint_bits(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

/// No file or limit comes near 2^63; saturate rather than wrap if one ever did.
fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Exclusive bounds of the `"C"`-ordered keys strictly below directory `dir`:
/// every such key starts with `dir/`, and `dir0` is the first key after them
/// (`'0'` is the byte after `'/'`).
fn tree_bounds(dir: &str) -> (String, String) {
    let dir = dir.trim_end_matches('/');
    (format!("{dir}/"), format!("{dir}0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_debug_hides_the_password() {
        let settings = PostgresSettings {
            url: SecretUrl::new("postgres://postgres:secret@h/db"),
            schema: None,
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        assert!(!format!("{settings:?}").contains("secret"));
    }

    /// The batch statements, planned by a pooled session on `files` and
    /// `outbox` tables of 20,000 rows written in one go and never analyzed
    /// (as after an import, for the minute or so before autovacuum gets to
    /// it): each reads the index made for its keys, not the whole table and
    /// not `files_present_sha256`, and the pages that stop at a `LIMIT`
    /// walk their index in order. Anything else would make every batch or
    /// page cost more as the table grows. Then that a lookup leaves a
    /// deleted file's row out.
    /// Against the PostgreSQL the tests use (`DATABASE_TEST_URL`), in a
    /// schema of its own, kept when the test fails, as the e2e tests do.
    #[test]
    fn batch_statements_find_their_rows_by_key_in_a_table_without_statistics() {
        let url = std::env::var("DATABASE_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("t_plans_{}", Uuid::new_v4().simple());
        let settings = PostgresSettings {
            url: SecretUrl::new(&url),
            schema: Some(schema.clone()),
            pool_size: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let origin = Origin {
            instance_id: "plans".into(),
            watched_directory: "/m".into(),
        };
        let registry = PostgresRegistry::connect(&settings, origin).expect("connect to the test database");
        let explain = |sql: &str| -> String {
            registry
                .read(|session| {
                    let plan = session
                        .simple_query(&format!("EXPLAIN {sql}"))
                        .map_err(fault("explain"))?;
                    Ok(plan
                        .iter()
                        .filter_map(|message| match message {
                            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join("\n"))
                })
                .expect("explain a statement")
        };
        registry
            .read(|session| {
                session
                    .batch_execute(
                        // Autovacuum off, so that it cannot analyze the table mid-test.
                        "ALTER TABLE files SET (autovacuum_enabled = false); \
                         INSERT INTO files (file_path, state, sha256, xxh128, size_bytes, mtime_ns, \
                             ctime_ns, last_event, instance_id, watched_directory, message_id, \
                             published_at, device, inode) \
                         SELECT '/m/album' || i / 100 || '/track' || i || '.flac', 'present', \
                             md5(i::text) || md5(i::text), md5(i::text), 4096, i, i, 'created', \
                             'plans', '/m', md5(i::text)::uuid, \
                             CASE WHEN i <= 19000 THEN now() END, 1, i \
                         FROM generate_series(1, 20000) AS i; \
                         ALTER TABLE outbox SET (autovacuum_enabled = false); \
                         INSERT INTO outbox (message_id, file_path, body, instance_id) \
                         SELECT md5(i::text)::uuid, '/m/album' || i / 100 || '/track' || i || '.flac', \
                             '{}', 'plans' \
                         FROM generate_series(1, 20000) AS i",
                    )
                    .map_err(fault("fill the files and outbox tables"))
            })
            .expect("fill the files and outbox tables");

        let paths: Vec<String> = (1..=256)
            .map(|i| format!("/m/album{}/track{}.flac", i * 70 / 100, i * 70))
            .collect();
        let paths = format!("'{{{}}}'", paths.join(","));
        let range = |sql: &str| {
            sql.replace("$1", "'/m/album1/'")
                .replace("$2", "'/m/album10'")
                .replace("$3", "500")
        };
        for (name, sql) in [
            ("LOOK_UP_ROWS", LOOK_UP_ROWS.replace("$1", &paths)),
            ("LOCK_ROWS", apply::LOCK_ROWS.replace("$1", &paths)),
            ("LOCK_NEW_PATHS", apply::LOCK_NEW_PATHS.replace("$1", &paths)),
            ("LOCK_UNDER", range(apply::LOCK_UNDER)),
            ("PRESENT_UNDER", range(PRESENT_UNDER)),
        ] {
            let plan = explain(&sql);
            assert!(
                plan.contains("files_pkey")
                    && !plan.contains("Seq Scan")
                    && !plan.contains("files_present_sha256"),
                "{name} does not look its rows up by primary key:\n{plan}"
            );
        }
        // Pages that stop at a LIMIT walk the primary key in order: no
        // bitmap of every row past the start, no sort.
        let outbox_page = range(OUTBOX_PAGE)
            .replace("$4", "'plans'")
            .replace("$5", "10")
            .replace("$6", "10000");
        for (name, sql, index) in [
            ("PRESENT_UNDER", range(PRESENT_UNDER), "files_pkey"),
            ("OUTBOX_PAGE", outbox_page, "outbox_pkey"),
        ] {
            let plan = explain(&sql);
            assert!(
                plan.contains(&format!("Index Scan using {index}"))
                    && !plan.contains("Bitmap")
                    && !plan.contains("Sort"),
                "{name} does not walk {index} in order:\n{plan}"
            );
        }
        let ids: String = registry
            .read(|session| {
                session
                    .query_one(
                        "SELECT array_agg(message_id)::text FROM files WHERE published_at IS NULL",
                        &[],
                    )
                    .map_err(fault("read the unpublished rows' message ids"))
            })
            .expect("read the message ids")
            .get(0);
        let plan = explain(&MARK_PUBLISHED.replace("$1", &format!("'{ids}'")));
        assert!(
            plan.contains("files_message_id")
                && plan.contains("outbox_message_id_key")
                && !plan.contains("Seq Scan"),
            "MARK_PUBLISHED does not find its rows through files_message_id and outbox_message_id_key:\n{plan}"
        );

        // Rows of deleted files at the paths are read, and left out.
        registry
            .read(|session| {
                session
                    .batch_execute(
                        "UPDATE files SET state = 'deleted' WHERE file_path = '/m/album0/track70.flac'",
                    )
                    .map_err(fault("delete a file row"))
            })
            .expect("delete a file row");
        let found = registry
            .lookup_all(&["/m/album0/track70.flac", "/m/album1/track140.flac"])
            .expect("look up two rows");
        let found: Vec<&str> = found.iter().map(|row| row.path.as_str()).collect();
        assert_eq!(found, ["/m/album1/track140.flac"]);

        let mut client =
            connect_one(&settings.url, "file-watcher test", DEFAULT_CONNECT_TIMEOUT).expect("connect");
        client
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .expect("drop the test schema");
    }

    /// A `deleted` message for `/m/a.flac`, as an outbox row would hold it.
    fn deleted_message() -> crate::message::Message {
        let origin = Origin {
            instance_id: "test".into(),
            watched_directory: "/m".into(),
        };
        origin.message(
            crate::message::EventType::Deleted,
            "/m/a.flac",
            None,
            Uuid::new_v4(),
            None,
        )
    }

    #[test]
    fn bodies_that_cannot_be_published_say_why() {
        let message = deleted_message();
        let body = message.to_json();
        assert_eq!(
            read_body(message.message_id, &body),
            Ok(Encoded::new(message.clone()))
        );

        let other = Uuid::new_v4();
        let reason = read_body(other, &body).unwrap_err();
        assert!(reason.contains(&other.to_string()), "{reason}");
        assert!(reason.contains(&message.message_id.to_string()), "{reason}");

        for unreadable in ["", "{", r#"{"event":"created","path":"/m/a.flac"}"#, "[1]"] {
            let reason = read_body(message.message_id, unreadable).unwrap_err();
            assert!(reason.starts_with("cannot read the body: "), "{reason}");
        }
    }

    /// A newer release may add fields; this one publishes such a body as
    /// stored, not as it would write it.
    #[test]
    fn a_body_is_kept_as_stored_with_fields_this_build_does_not_know() {
        let message = deleted_message();
        let json = message.to_json();
        let newer = format!("{{\"added_later\": {{\"bpm\": 128}}, {}", &json[1..]);
        let read = read_body(message.message_id, &newer).unwrap();
        assert_eq!(read.json(), newer);
        assert_eq!(read.message(), &message);
    }

    #[test]
    fn tree_bounds_cover_exactly_the_subtree() {
        let (lower, upper) = tree_bounds("/m/a");
        let inside = |path: &str| path > lower.as_str() && path < upper.as_str();
        assert!(inside("/m/a/x"));
        assert!(inside("/m/a/deep/y"));
        assert!(inside("/m/a/\u{10FFFF}"));
        assert!(!inside("/m/a"));
        assert!(!inside("/m/ab/x"));
        assert!(!inside("/m/a-b/x"));
        assert!(!inside("/m/a0"));
        assert_eq!(tree_bounds("/m/a/"), tree_bounds("/m/a"));
        assert_eq!(tree_bounds("/"), ("/".to_owned(), "0".to_owned()));
    }
}
