//! The PostgreSQL registry shared by every instance, and the lock that keeps
//! one instance id to one live process.
//!
//! This file owns the registry schema and its migrations, the connection pool,
//! the transaction that records a change together with its outbox messages,
//! the classification of database errors, and [`InstanceLock`].
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
//!   Tombstones are never pruned by the daemon; an operator may delete old ones
//!   (`DELETE FROM files WHERE state = 'deleted' AND published_at < now() - interval '30 days'`).
//! - `outbox`: messages recorded but not yet confirmed, in the order they were
//!   recorded (`id`). `body` is exactly `Message::to_json()`, so every
//!   redelivery sends the same bytes.
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
//! Changes whose message has not been confirmed yet (index `files_unpublished`):
//!
//! ```sql
//! SELECT file_path, last_event, message_id, updated_at FROM files WHERE published_at IS NULL;
//! ```
//!
//! Rows under a directory use an exact byte-range test on the `"C"` key,
//! never `LIKE` (whose `_` and `%` would match too much):
//! `file_path > '/dir/' AND file_path < '/dir0'` (`'0'` is the byte after `'/'`).
//!
//! # Concurrency
//!
//! Several processes (one per watched tree, trees may overlap) write the same
//! rows. `apply` runs one READ COMMITTED transaction per change:
//! - a file change takes `pg_advisory_xact_lock` on a 64-bit hash of each path
//!   it touches, in byte order of the paths (so two changes never wait on each
//!   other in a cycle), then locks the present rows `FOR UPDATE`, and only then
//!   takes the fresh `stat` the decision rests on. Whoever comes second sees
//!   the first one's row, so one change observed by two instances produces one
//!   message;
//! - a directory rename locks the rows it carries, and the present rows at
//!   their new paths, with `SELECT … ORDER BY file_path FOR UPDATE` (row locks:
//!   a tree of ten thousand files would not fit in the advisory lock table).
//!   A file *created* at a new path by another instance while the rename runs
//!   has no row to lock yet; the rename then overwrites it without a `deleted`
//!   first. Consumers see `created` then `moved` for the same path, which
//!   describes the same file.
//!
//! A directory rename and a file rename across it can still lock the same two
//! rows in opposite orders; PostgreSQL then aborts one of them (40P01). Such
//! lost races (SQLSTATE 40001 serialization failure, 40P01 deadlock, 23505
//! unique violation) are retried with jittered exponential backoff, a few
//! times, and logged at debug level only.
//!
//! # Errors
//!
//! - [`RegistryError::Unavailable`]: the database cannot be reached: connection
//!   refused, reset or closed, SQLSTATE class 08, 57P01/57P02/57P03 (shutdown,
//!   crash, starting up), 53300 (too many connections), or a pool that could
//!   not open a connection within `connect_timeout`. The caller keeps the
//!   change and retries later.
//! - A pool whose connections are all busy is not an error: the caller waits
//!   for a free connection, however long that takes.
//! - [`RegistryError::Query`] for everything else, with `what` naming the
//!   statement.
//!
//! No error text or log line holds the password: URLs are shown through
//! [`redact_url`], and PostgreSQL's own messages never include it.

use std::collections::HashSet;
use std::error::Error as _;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use postgres::{Client, NoTls, Transaction};
use r2d2::{CustomizeConnection, HandleError, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use rand::Rng;
use uuid::Uuid;

use super::{
    fresh_stat, message_for_carried_row, messages_for, plan_present, rebase, Applied, Change, Observed, Plan,
    Registry, RegistryError, Row, Stat,
};
use crate::message::{EventType, Message, Origin};
use crate::redact::redact_url;

/// Connections per process when the configuration does not say otherwise:
/// enough for a few workers and the publisher without crowding a server
/// shared by many instances.
pub const DEFAULT_POOL_SIZE: u32 = 4;

/// How long opening one connection may take when the configuration does not say.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema used when `PostgresSettings::schema` is `None`.
pub const DEFAULT_SCHEMA: &str = "public";

/// Attempts of one transaction that keeps losing races before `apply` gives up.
const ATTEMPTS: u32 = 5;

/// Upper bound of the pause after the first lost race; doubles with every attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// `application_name` of pooled connections, so operators can find them in
/// `pg_stat_activity` (kept when the URL sets its own).
const APPLICATION_NAME: &str = "file-watcher";

/// How long a message recorded by another instance waits before this one
/// publishes it too (its recorder is presumably gone, or stuck).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// `application_name` of the dedicated connection that holds an instance lock.
const LOCK_APPLICATION_NAME: &str = "file-watcher instance lock";

/// One schema change. Versions only grow; an applied migration is never edited.
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
];

/// How to reach the registry database.
#[derive(Clone)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` or a `key=value`
    /// connection string. May hold a password: show it only through [`redact_url`].
    pub url: String,
    /// Schema holding the registry tables; `None` means [`DEFAULT_SCHEMA`].
    /// Must be a plain lower-case identifier (`[a-z_][a-z0-9_]*`).
    pub schema: Option<String>,
    /// Most connections this process opens; threads beyond that wait for one.
    pub pool_size: u32,
    /// Limit for opening one connection. Also how long a thread waits for a
    /// pooled connection before checking whether the pool is merely busy.
    pub connect_timeout: Duration,
}

impl fmt::Debug for PostgresSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PostgresSettings")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl PostgresSettings {
    fn schema_name(&self) -> Result<&str, RegistryError> {
        let schema = self.schema.as_deref().unwrap_or(DEFAULT_SCHEMA);
        if is_plain_identifier(schema) {
            Ok(schema)
        } else {
            Err(RegistryError::Query {
                what: "check the schema name",
                detail: format!(
                    "schema {schema:?} is not a plain lower-case identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
                ),
            })
        }
    }

    fn client_config(&self, application_name: &str) -> Result<postgres::Config, RegistryError> {
        let mut config = postgres::Config::from_str(&self.url).map_err(|error| RegistryError::Query {
            what: "parse the database URL",
            detail: format!("{}: {}", redact_url(&self.url), describe(&error)),
        })?;
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        // The driver logs server notices at info level; "schema already exists,
        // skipping" at every start is not news.
        config
            .notice_callback(|notice| log::debug!("PostgreSQL {}: {}", notice.severity(), notice.message()));
        Ok(config)
    }
}

type Manager = PostgresConnectionManager<NoTls>;

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
        let schema = settings.schema_name()?.to_owned();
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
        let database = redact_url(&settings.url);
        let config = settings.client_config(APPLICATION_NAME)?;

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
            .connect(NoTls)
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

        let last_connect_failure = Arc::new(Mutex::new(None));
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            // One warm connection; more are opened under load and closed again
            // after r2d2's idle timeout, so idle instances do not crowd the server.
            .min_idle(Some(1))
            .connection_timeout(settings.connect_timeout)
            .connection_customizer(Box::new(SearchPath {
                statement: format!("SET search_path TO {}", quote_identifier(&schema)),
            }))
            .error_handler(Box::new(ConnectFailures {
                database: database.clone(),
                last: Arc::clone(&last_connect_failure),
            }))
            // The migration connection just proved the server reachable;
            // connections are opened in the background from here on.
            .build_unchecked(PostgresConnectionManager::new(config, NoTls));
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

    /// A pooled connection, waiting as long as every connection is busy.
    fn connection(&self) -> Result<PooledConnection<Manager>, RegistryError> {
        loop {
            let error = match self.pool.get() {
                Ok(connection) => return Ok(connection),
                Err(error) => error,
            };
            // r2d2 times out with the last connection error when it tried to
            // open connections and failed, and without one when it simply had
            // none free.
            let text = error.to_string();
            if let Some((_, reason)) = text.split_once(": ") {
                let described = self
                    .last_connect_failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                return Err(RegistryError::Unavailable(format!(
                    "{}: {}",
                    self.database,
                    described.as_deref().unwrap_or(reason)
                )));
            }
            let state = self.pool.state();
            if state.connections < self.pool_size {
                return Err(RegistryError::Unavailable(format!(
                    "{}: no connection could be opened within {:?}",
                    self.database, self.connect_timeout
                )));
            }
            log::debug!(
                "all {} registry connections stayed busy for {:?}; still waiting",
                self.pool_size,
                self.connect_timeout
            );
        }
    }

    /// Runs `work` with a pooled connection, outside any explicit transaction.
    fn read<T>(&self, work: impl FnOnce(&mut Client) -> Result<T, Fault>) -> Result<T, RegistryError> {
        let mut connection = self.connection()?;
        work(&mut connection).map_err(|fault| name_database(&self.database, fault.into()))
    }

    /// Runs `work` in a transaction and commits it, running it again (after a
    /// jittered, growing pause) when it lost a race with another transaction.
    /// `work` must leave nothing behind but its writes: it may run several times.
    fn transact<T>(
        &self,
        subject: &str,
        mut work: impl FnMut(&mut Transaction<'_>) -> Result<T, Fault>,
    ) -> Result<T, RegistryError> {
        let mut connection = self.connection()?;
        let mut attempt = 1;
        loop {
            let result = connection
                .transaction()
                .map_err(fault("begin a transaction"))
                .and_then(|mut transaction| {
                    let value = work(&mut transaction)?;
                    transaction.commit().map_err(fault("commit"))?;
                    Ok(value)
                });
            match result {
                Ok(value) => return Ok(value),
                Err(Fault::Conflict { what, detail }) if attempt < ATTEMPTS => {
                    let pause = backoff(attempt);
                    log::debug!(
                        "{subject}: {what} lost a race with another transaction ({detail}); \
                         attempt {attempt} of {ATTEMPTS}, retrying in {pause:?}"
                    );
                    thread::sleep(pause);
                    attempt += 1;
                }
                Err(Fault::Conflict { what, detail }) => {
                    return Err(RegistryError::Query {
                        what,
                        detail: format!("{subject}: still conflicting after {ATTEMPTS} attempts: {detail}"),
                    })
                }
                Err(Fault::Failed(error)) => return Err(name_database(&self.database, error)),
            }
        }
    }

    fn apply_present(
        &self,
        transaction: &mut Transaction<'_>,
        observed: &Observed,
        renamed_from: Option<&str>,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        let mut paths = vec![observed.path.as_str()];
        paths.extend(renamed_from);
        paths.sort_unstable();
        paths.dedup();
        self.lock_paths(transaction, &paths)?;
        let rows = load_present(transaction, &paths)?;
        // Only now, with the paths held, does the disk have the last word.
        if fresh_stat(&observed.path)? != Some(observed.stat) {
            return Ok(Applied::Changed);
        }
        let source = renamed_from.and_then(|from| rows.iter().find(|row| row.path == from));
        let target = rows.iter().find(|row| row.path == observed.path);
        let plan = plan_present(source, target, observed, renamed_from);
        match plan {
            Plan::Stale => return Ok(Applied::Recorded(Vec::new())),
            Plan::Refresh => {
                refresh_stat(transaction, observed)?;
                return Ok(Applied::Recorded(Vec::new()));
            }
            Plan::Create | Plan::Modify | Plan::Rename { .. } => {}
        }
        let messages = messages_for(&plan, observed, &self.origin, correlation_id);
        let Some(last) = messages.last() else {
            return Ok(Applied::Recorded(messages));
        };
        if let Plan::Rename { from, .. } = &plan {
            self.leave(
                transaction,
                &[Departure {
                    path: from,
                    message: last,
                }],
            )?;
        }
        self.arrive(
            transaction,
            &[Arrival {
                row: Row::from_observed(observed),
                message: last,
            }],
        )?;
        queue(transaction, &messages)?;
        Ok(Applied::Recorded(messages))
    }

    fn apply_gone(
        &self,
        transaction: &mut Transaction<'_>,
        path: &str,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        self.lock_paths(transaction, &[path])?;
        let rows = load_present(transaction, &[path])?;
        if fresh_stat(path)?.is_some() {
            return Ok(Applied::Changed);
        }
        if rows.is_empty() {
            return Ok(Applied::Recorded(Vec::new()));
        }
        let message = self
            .origin
            .message(EventType::Deleted, path, None, correlation_id, None);
        self.leave(
            transaction,
            &[Departure {
                path,
                message: &message,
            }],
        )?;
        queue(transaction, std::slice::from_ref(&message))?;
        Ok(Applied::Recorded(vec![message]))
    }

    fn apply_directory_rename(
        &self,
        transaction: &mut Transaction<'_>,
        from: &str,
        to: &str,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        let (lower, upper) = tree_bounds(from);
        let sources: Vec<Row> = transaction
            .query(
                "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128 FROM files \
                 WHERE state = 'present' AND file_path > $1 AND file_path < $2 \
                 ORDER BY file_path FOR UPDATE",
                &[&lower, &upper],
            )
            .map_err(fault("lock the rows under the renamed directory"))?
            .iter()
            .map(row_from_record)
            .collect();
        let carried: Vec<(Row, String)> = sources
            .into_iter()
            .filter_map(|row| rebase(&row.path, from, to).map(|new_path| (row, new_path)))
            .collect();
        if carried.is_empty() {
            return Ok(Applied::Recorded(Vec::new()));
        }
        let new_paths: Vec<&str> = carried.iter().map(|(_, path)| path.as_str()).collect();
        let occupied: Vec<String> = transaction
            .query(
                "SELECT file_path FROM files WHERE file_path = ANY($1) AND state = 'present' \
                 ORDER BY file_path FOR UPDATE",
                &[&new_paths],
            )
            .map_err(fault("lock the rows at the new paths"))?
            .iter()
            .map(|record| record.get(0))
            .collect();

        // Replay the moves one row at a time, as the memory registry does, to
        // learn which messages go out and where each row ends up; then write
        // the outcome in three statements.
        let mut present: HashSet<String> = occupied.into_iter().collect();
        present.extend(carried.iter().map(|(row, _)| row.path.clone()));
        let mut messages = Vec::with_capacity(carried.len());
        let mut arrivals = Vec::with_capacity(carried.len());
        for (row, new_path) in &carried {
            present.remove(&row.path);
            if present.contains(new_path) {
                messages.push(
                    self.origin
                        .message(EventType::Deleted, new_path, None, correlation_id, None),
                );
            }
            messages.push(message_for_carried_row(
                row,
                new_path,
                &self.origin,
                correlation_id,
            ));
            let moved = Row {
                path: new_path.clone(),
                ..row.clone()
            };
            arrivals.push((moved, messages.len() - 1));
            present.insert(new_path.clone());
        }
        let arrived: HashSet<&str> = arrivals.iter().map(|(row, _)| row.path.as_str()).collect();
        let departures: Vec<Departure<'_>> = carried
            .iter()
            .zip(&arrivals)
            .filter(|((row, _), _)| !arrived.contains(row.path.as_str()))
            .map(|((row, _), (_, index))| Departure {
                path: &row.path,
                message: &messages[*index],
            })
            .collect();
        let arrivals: Vec<Arrival<'_>> = arrivals
            .into_iter()
            .map(|(row, index)| Arrival {
                row,
                message: &messages[index],
            })
            .collect();
        self.leave(transaction, &departures)?;
        self.arrive(transaction, &arrivals)?;
        queue(transaction, &messages)?;
        Ok(Applied::Recorded(messages))
    }

    /// Holds each path until the transaction ends. `paths` must be sorted:
    /// every transaction taking the locks in one order is what rules out deadlocks.
    fn lock_paths(&self, transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<(), Fault> {
        debug_assert!(paths.is_sorted());
        for path in paths {
            transaction
                .execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
                    &[path, &self.path_lock_seed],
                )
                .map_err(fault("lock the path"))?;
        }
        Ok(())
    }

    /// Writes rows that end up present, replacing whatever row held the path.
    fn arrive(&self, transaction: &mut Transaction<'_>, arrivals: &[Arrival<'_>]) -> Result<(), Fault> {
        if arrivals.is_empty() {
            return Ok(());
        }
        let paths: Vec<&str> = arrivals.iter().map(|a| a.row.path.as_str()).collect();
        let sha256: Vec<&str> = arrivals.iter().map(|a| a.row.sha256.as_str()).collect();
        let xxh128: Vec<&str> = arrivals.iter().map(|a| a.row.xxh128.as_str()).collect();
        let sizes: Vec<i64> = arrivals.iter().map(|a| to_bigint(a.row.stat.size)).collect();
        let mtimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.mtime_ns).collect();
        let ctimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.ctime_ns).collect();
        let events: Vec<&str> = arrivals.iter().map(|a| a.message.event_type.as_str()).collect();
        let old_paths: Vec<Option<&str>> = arrivals.iter().map(|a| a.message.old_path.as_deref()).collect();
        let message_ids: Vec<String> = arrivals
            .iter()
            .map(|a| a.message.message_id.to_string())
            .collect();
        transaction
            .execute(
                "INSERT INTO files (file_path, state, sha256, xxh128, size_bytes, mtime_ns, \
                     ctime_ns, last_event, old_path, instance_id, watched_directory, message_id, \
                     published_at, updated_at) \
                 SELECT arrival.file_path, 'present', arrival.sha256, arrival.xxh128, \
                     arrival.size_bytes, arrival.mtime_ns, arrival.ctime_ns, arrival.last_event, \
                     arrival.old_path, $10, $11, arrival.message_id::uuid, NULL, now() \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
                     $6::int8[], $7::text[], $8::text[], $9::text[]) \
                     AS arrival(file_path, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, \
                         last_event, old_path, message_id) \
                 ON CONFLICT (file_path) DO UPDATE SET state = 'present', \
                     sha256 = EXCLUDED.sha256, xxh128 = EXCLUDED.xxh128, \
                     size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns, \
                     ctime_ns = EXCLUDED.ctime_ns, last_event = EXCLUDED.last_event, \
                     old_path = EXCLUDED.old_path, instance_id = EXCLUDED.instance_id, \
                     watched_directory = EXCLUDED.watched_directory, \
                     message_id = EXCLUDED.message_id, published_at = NULL, updated_at = now()",
                &[
                    &paths,
                    &sha256,
                    &xxh128,
                    &sizes,
                    &mtimes,
                    &ctimes,
                    &events,
                    &old_paths,
                    &message_ids,
                    &self.origin.instance_id,
                    &self.origin.watched_directory,
                ],
            )
            .map_err(fault("upsert file rows"))?;
        Ok(())
    }

    /// Turns present rows into tombstones that remember how the path was left.
    fn leave(&self, transaction: &mut Transaction<'_>, departures: &[Departure<'_>]) -> Result<(), Fault> {
        if departures.is_empty() {
            return Ok(());
        }
        let paths: Vec<&str> = departures.iter().map(|d| d.path).collect();
        let events: Vec<&str> = departures.iter().map(|d| d.message.event_type.as_str()).collect();
        let message_ids: Vec<String> = departures
            .iter()
            .map(|d| d.message.message_id.to_string())
            .collect();
        transaction
            .execute(
                "UPDATE files SET state = 'deleted', last_event = departure.last_event, \
                     old_path = NULL, instance_id = $4, watched_directory = $5, \
                     message_id = departure.message_id::uuid, published_at = NULL, \
                     updated_at = now() \
                 FROM unnest($1::text[], $2::text[], $3::text[]) \
                     AS departure(file_path, last_event, message_id) \
                 WHERE files.file_path = departure.file_path",
                &[
                    &paths,
                    &events,
                    &message_ids,
                    &self.origin.instance_id,
                    &self.origin.watched_directory,
                ],
            )
            .map_err(fault("mark file rows deleted"))?;
        Ok(())
    }
}

/// A row that ends up present, and the last message its change produced.
struct Arrival<'a> {
    row: Row,
    message: &'a Message,
}

/// A path whose present row is left (deleted, or renamed away), and the
/// message that says so.
struct Departure<'a> {
    path: &'a str,
    message: &'a Message,
}

impl Registry for PostgresRegistry {
    fn lookup(&self, path: &str) -> Result<Option<Row>, RegistryError> {
        self.read(|client| {
            let record = client
                .query_opt(
                    "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128 FROM files \
                     WHERE file_path = $1 AND state = 'present'",
                    &[&path],
                )
                .map_err(fault("look up the file row"))?;
            Ok(record.as_ref().map(row_from_record))
        })
    }

    fn apply(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError> {
        self.transact(change.path(), |transaction| match change {
            Change::Present {
                observed,
                renamed_from,
            } => self.apply_present(transaction, observed, renamed_from.as_deref(), correlation_id),
            Change::Gone { path } => self.apply_gone(transaction, path, correlation_id),
            Change::DirectoryRenamed { from, to } => {
                self.apply_directory_rename(transaction, from, to, correlation_id)
            }
        })
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
            let records = client
                .query(
                    "SELECT file_path FROM files \
                     WHERE state = 'present' AND file_path > $1 AND file_path < $2 \
                     ORDER BY file_path LIMIT $3",
                    &[&lower, &upper, &to_bigint(limit as u64)],
                )
                .map_err(fault("list present files under a directory"))?;
            Ok(records.iter().map(|record| record.get(0)).collect())
        })
    }

    /// Messages under this instance's tree: its own at once, and those of
    /// other instances (overlapping trees, or a crashed predecessor with
    /// another id) once they have waited `ORPHAN_GRACE`, so two instances on
    /// one tree do not both deliver every message.
    fn outgoing(&self, limit: usize) -> Result<Vec<Message>, RegistryError> {
        let (lower, upper) = tree_bounds(&self.origin.watched_directory);
        let grace = ORPHAN_GRACE.as_secs_f64();
        self.read(|client| {
            let records = client
                .query(
                    "SELECT id, message_id::text, body FROM outbox \
                     WHERE file_path > $1 AND file_path < $2 \
                       AND (instance_id = $4 OR created_at < now() - make_interval(secs => $5)) \
                     ORDER BY id LIMIT $3",
                    &[
                        &lower,
                        &upper,
                        &to_bigint(limit as u64),
                        &self.origin.instance_id,
                        &grace,
                    ],
                )
                .map_err(fault("read the outbox"))?;
            records
                .iter()
                .map(|record| {
                    let body: &str = record.get(2);
                    serde_json::from_str(body).map_err(|error| {
                        Fault::Failed(RegistryError::Query {
                            what: "parse an outbox message",
                            detail: format!(
                                "outbox id {}, message {}: {error}",
                                record.get::<_, i64>(0),
                                record.get::<_, &str>(1)
                            ),
                        })
                    })
                })
                .collect()
        })
    }

    fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError> {
        if message_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = message_ids.iter().map(Uuid::to_string).collect();
        self.transact("mark messages published", |transaction| {
            transaction
                .execute(
                    "DELETE FROM outbox WHERE message_id = ANY($1::text[]::uuid[])",
                    &[&ids],
                )
                .map_err(fault("delete published messages from the outbox"))?;
            // Rows are locked in path order, like everywhere else, so two
            // publishers and the workers cannot wait on each other in a cycle.
            transaction
                .execute(
                    "UPDATE files SET published_at = now() WHERE file_path IN ( \
                         SELECT file_path FROM files \
                         WHERE published_at IS NULL AND message_id = ANY($1::text[]::uuid[]) \
                         ORDER BY file_path FOR UPDATE)",
                    &[&ids],
                )
                .map_err(fault("mark file rows published"))?;
            Ok(())
        })
    }
}

/// Creates the schema if needed and applies the migrations it lacks.
fn migrate(client: &mut Client, schema: &str) -> Result<(), RegistryError> {
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
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
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
    let known = MIGRATIONS.last().map_or(0, |migration| migration.version);
    if let Some(newest) = applied.iter().copied().filter(|version| *version > known).max() {
        log::warn!(
            "schema {schema} has registry migration {newest}, newer than this build knows ({known}); \
             carrying on, as migrations only add"
        );
    }
    transaction.commit().map_err(query_error("commit the migrations"))
}

fn load_present(transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<Vec<Row>, Fault> {
    Ok(transaction
        .query(
            "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128 FROM files \
             WHERE file_path = ANY($1) AND state = 'present' ORDER BY file_path FOR UPDATE",
            &[&paths],
        )
        .map_err(fault("lock the file rows"))?
        .iter()
        .map(row_from_record)
        .collect())
}

/// Same content, fresher `stat`: the stat columns only. No message went out,
/// so `message_id` and `published_at` keep describing the last one that did.
fn refresh_stat(transaction: &mut Transaction<'_>, observed: &Observed) -> Result<(), Fault> {
    transaction
        .execute(
            "UPDATE files SET size_bytes = $2, mtime_ns = $3, ctime_ns = $4, updated_at = now() \
             WHERE file_path = $1",
            &[
                &observed.path,
                &to_bigint(observed.stat.size),
                &observed.stat.mtime_ns,
                &observed.stat.ctime_ns,
            ],
        )
        .map_err(fault("refresh the file stat"))?;
    Ok(())
}

/// Appends `messages` to the outbox; their ids follow the slice order.
fn queue(transaction: &mut Transaction<'_>, messages: &[Message]) -> Result<(), Fault> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = messages.iter().map(|m| m.message_id.to_string()).collect();
    let paths: Vec<&str> = messages.iter().map(|m| m.file_path.as_str()).collect();
    let instances: Vec<&str> = messages.iter().map(|m| m.instance_id.as_str()).collect();
    let bodies: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(m.to_json()).expect("serde_json writes UTF-8"))
        .collect();
    transaction
        .execute(
            "INSERT INTO outbox (message_id, file_path, body, instance_id) \
             SELECT queued.message_id::uuid, queued.file_path, queued.body, queued.instance_id \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
                 AS queued(message_id, file_path, body, instance_id, position) \
             ORDER BY queued.position",
            &[&ids, &paths, &bodies, &instances],
        )
        .map_err(fault("queue messages in the outbox"))?;
    Ok(())
}

fn row_from_record(record: &postgres::Row) -> Row {
    Row {
        path: record.get(0),
        stat: Stat {
            // The column has CHECK (size_bytes >= 0).
            size: u64::try_from(record.get::<_, i64>(1)).unwrap_or_default(),
            mtime_ns: record.get(2),
            ctime_ns: record.get(3),
        },
        sha256: record.get(4),
        xxh128: record.get(5),
    }
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

fn is_plain_identifier(name: &str) -> bool {
    let mut characters = name.chars();
    let starts_well = matches!(characters.next(), Some(c) if c.is_ascii_lowercase() || c == '_');
    starts_well
        && name.len() <= 63
        && characters.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Quoted although names are checked to be plain: quoting costs nothing and
/// keeps the statement correct if the check is ever relaxed.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A pause before retrying after `attempt` lost races: random in the upper
/// half of an exponentially growing window, so racing instances spread out.
fn backoff(attempt: u32) -> Duration {
    let window = FIRST_BACKOFF * 2u32.pow(attempt.saturating_sub(1).min(8));
    let window_micros = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::rng().random_range(window_micros / 2..=window_micros))
}

/// How one statement failed, as far as retrying is concerned.
enum Fault {
    /// Lost a race with another transaction (SQLSTATE 40001, 40P01, 23505):
    /// running the transaction again will see the winner's rows.
    Conflict {
        what: &'static str,
        detail: String,
    },
    Failed(RegistryError),
}

impl From<RegistryError> for Fault {
    fn from(error: RegistryError) -> Fault {
        Fault::Failed(error)
    }
}

impl From<Fault> for RegistryError {
    fn from(fault: Fault) -> RegistryError {
        match fault {
            Fault::Conflict { what, detail } => RegistryError::Query { what, detail },
            Fault::Failed(error) => error,
        }
    }
}

fn fault(what: &'static str) -> impl FnOnce(postgres::Error) -> Fault {
    move |error| database_fault(what, error)
}

fn query_error(what: &'static str) -> impl FnOnce(postgres::Error) -> RegistryError {
    move |error| database_fault(what, error).into()
}

/// Sorts a database error into a lost race, an unreachable database, or a
/// failed statement; see the module docs.
fn database_fault(what: &'static str, error: postgres::Error) -> Fault {
    let detail = describe(&error);
    match error.code().map(|code| code.code()) {
        Some("40001" | "40P01" | "23505") => Fault::Conflict { what, detail },
        Some(code) if is_connection_loss(code) => {
            Fault::Failed(RegistryError::Unavailable(format!("{what}: {detail}")))
        }
        Some(_) => Fault::Failed(RegistryError::Query { what, detail }),
        None if is_connection_failure(&error) => {
            Fault::Failed(RegistryError::Unavailable(format!("{what}: {detail}")))
        }
        None => Fault::Failed(RegistryError::Query { what, detail }),
    }
}

/// SQLSTATEs that mean "the server is not there for us right now".
fn is_connection_loss(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Driver errors without a SQLSTATE that mean the connection is gone or never
/// came up: closed, an I/O error (refused, reset, timed out), a timeout.
fn is_connection_failure(error: &postgres::Error) -> bool {
    error.is_closed()
        || error.source().is_some_and(|source| source.is::<io::Error>())
        // The driver's timeout has neither a public kind nor a source.
        || error.to_string() == "timeout waiting for server"
}

/// The whole error on one line: the driver's own `Display` stops at "db error".
fn describe(error: &postgres::Error) -> String {
    if let Some(database) = error.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            database.severity(),
            database.message(),
            database.code().code()
        );
        if let Some(detail) = database.detail() {
            text.push_str("; ");
            text.push_str(detail);
        }
        return text;
    }
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// Prefixes an `Unavailable` error with the (redacted) database it is about.
fn name_database(database: &str, error: RegistryError) -> RegistryError {
    match error {
        RegistryError::Unavailable(detail) if detail.starts_with(database) => {
            RegistryError::Unavailable(detail)
        }
        RegistryError::Unavailable(detail) => RegistryError::Unavailable(format!("{database}: {detail}")),
        other => other,
    }
}

/// Points every pooled connection at the registry schema.
#[derive(Debug)]
struct SearchPath {
    statement: String,
}

impl CustomizeConnection<Client, postgres::Error> for SearchPath {
    fn on_acquire(&self, client: &mut Client) -> Result<(), postgres::Error> {
        client.batch_execute(&self.statement)
    }
}

/// Receives r2d2's failures to open a connection (it retries them itself).
/// Logged at debug only: the threads waiting for a connection get the same
/// failure as an `Unavailable` error and report it where it matters.
#[derive(Debug)]
struct ConnectFailures {
    database: String,
    last: Arc<Mutex<Option<String>>>,
}

impl HandleError<postgres::Error> for ConnectFailures {
    fn handle_error(&self, error: postgres::Error) {
        let described = describe(&error);
        log::debug!("cannot open a connection to {}: {described}", self.database);
        *self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(described);
    }
}

/// Proof that this process is the only live one using its instance id.
///
/// A session-level advisory lock keyed on (schema, instance id), held by a
/// dedicated connection outside the pool: the lock lives exactly as long as
/// that session, so a process that dies releases it, and a second process
/// with the same id is refused while the first is alive.
pub struct InstanceLock {
    client: Client,
    config: postgres::Config,
    /// Text whose `hashtextextended` is the lock key.
    key: String,
    instance_id: String,
    /// The URL without its password, for error texts.
    database: String,
    /// How long `verify` waits for the server to answer.
    timeout: Duration,
}

impl fmt::Debug for InstanceLock {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("InstanceLock")
            .field("instance_id", &self.instance_id)
            .field("database", &self.database)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "instance id {instance_id:?} is in use: another live session holds its lock \
         (after a network drop this can briefly be this process's own previous session); \
         two processes must not share an instance id: stop the other one or choose another id"
    )]
    HeldElsewhere { instance_id: String },
    #[error("cannot hold the lock for instance id {instance_id:?}: database unavailable: {detail}")]
    Unavailable { instance_id: String, detail: String },
    #[error("cannot take the lock for instance id {instance_id:?} ({what}): {detail}")]
    Query {
        instance_id: String,
        what: &'static str,
        detail: String,
    },
}

impl LockError {
    fn from_registry(instance_id: &str, error: RegistryError) -> LockError {
        let instance_id = instance_id.to_owned();
        match error {
            RegistryError::Unavailable(detail) => LockError::Unavailable { instance_id, detail },
            RegistryError::Query { what, detail } => LockError::Query {
                instance_id,
                what,
                detail,
            },
            RegistryError::Stat { path, source } => LockError::Query {
                instance_id,
                what: "stat",
                detail: format!("{path}: {source}"),
            },
        }
    }
}

impl InstanceLock {
    /// Takes the lock for `instance_id`, or fails with `HeldElsewhere` at once.
    pub fn acquire(settings: &PostgresSettings, instance_id: &str) -> Result<InstanceLock, LockError> {
        let prepare = || -> Result<_, RegistryError> {
            let schema = settings.schema_name()?;
            let config = settings.client_config(LOCK_APPLICATION_NAME)?;
            Ok((format!("file-watcher instance {schema} {instance_id}"), config))
        };
        let (key, config) = prepare().map_err(|error| LockError::from_registry(instance_id, error))?;
        let database = redact_url(&settings.url);
        let client = take_lock(&config, &key, instance_id, &database)?;
        log::info!("holding the lock for instance id {instance_id} on {database}");
        Ok(InstanceLock {
            client,
            config,
            key,
            instance_id: instance_id.to_owned(),
            database,
            timeout: settings.connect_timeout,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Checks that the session holding the lock is alive. When the connection
    /// was lost (the database restarted, a network reset), the lock went with
    /// it: reconnect and take it again, failing with `HeldElsewhere` if
    /// another process took it meanwhile, or `Unavailable` if the database is
    /// still down (call again later). A server that is merely slow to answer
    /// is `Unavailable` too: the session, and the lock, may well be intact.
    pub fn verify(&mut self) -> Result<(), LockError> {
        let error = match self.client.is_valid(self.timeout) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let connection_lost = self.client.is_closed()
            || error.is_closed()
            || error.source().is_some_and(|source| source.is::<io::Error>())
            || error.code().is_some_and(|code| is_connection_loss(code.code()));
        if !connection_lost {
            return Err(self.unavailable(&error));
        }
        log::warn!(
            "lost the connection holding the lock for instance id {} ({}); reconnecting",
            self.instance_id,
            describe(&error)
        );
        self.client = take_lock(&self.config, &self.key, &self.instance_id, &self.database)?;
        log::info!("holding the lock for instance id {} again", self.instance_id);
        Ok(())
    }

    fn unavailable(&self, error: &postgres::Error) -> LockError {
        LockError::Unavailable {
            instance_id: self.instance_id.clone(),
            detail: format!(
                "{}: no answer within {:?}: {}",
                self.database,
                self.timeout,
                describe(error)
            ),
        }
    }
}

impl Drop for InstanceLock {
    /// Unlocks explicitly before the connection closes: the server ends a
    /// session a moment after the client goes, and a successor starting right
    /// away should not be refused in that moment.
    fn drop(&mut self) {
        if self.client.is_closed() {
            return;
        }
        if let Err(error) = self
            .client
            .execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&self.key])
        {
            log::debug!(
                "could not unlock instance id {} before closing its connection: {}",
                self.instance_id,
                describe(&error)
            );
        }
    }
}

/// Opens a dedicated session and takes the lock in it, without waiting.
fn take_lock(
    config: &postgres::Config,
    key: &str,
    instance_id: &str,
    database: &str,
) -> Result<Client, LockError> {
    let failure = |what: &'static str, error: postgres::Error| {
        LockError::from_registry(
            instance_id,
            name_database(database, database_fault(what, error).into()),
        )
    };
    let mut client = config.connect(NoTls).map_err(|error| failure("connect", error))?;
    let taken: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key])
        .map_err(|error| failure("try the advisory lock", error))?
        .get(0);
    if taken {
        return Ok(client);
    }
    if let Some(holder) = describe_holder(&mut client, key) {
        log::warn!("instance id {instance_id} is locked by {holder}");
    }
    Err(LockError::HeldElsewhere {
        instance_id: instance_id.to_owned(),
    })
}

/// Who holds the lock keyed on `key`, for the operator (best effort).
/// A bigint advisory key appears in `pg_locks` split into `classid` (high
/// 32 bits) and `objid` (low 32 bits), with `objsubid = 1`.
fn describe_holder(client: &mut Client, key: &str) -> Option<String> {
    let record = client
        .query_opt(
            "SELECT activity.pid, coalesce(host(activity.client_addr), 'a local socket'), \
                 activity.application_name, activity.backend_start::text \
             FROM pg_locks AS held JOIN pg_stat_activity AS activity ON activity.pid = held.pid \
             WHERE held.locktype = 'advisory' AND held.granted AND held.objsubid = 1 \
               AND held.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND held.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid \
               AND held.objid = (hashtextextended($1, 0) & 4294967295)::oid",
            &[&key],
        )
        .ok()??;
    let pid: i32 = record.get(0);
    let address: Option<String> = record.get(1);
    let application: Option<String> = record.get(2);
    let started: Option<String> = record.get(3);
    Some(format!(
        "PostgreSQL backend {pid} (client {}, application {:?}, connected since {})",
        address.as_deref().unwrap_or("unknown"),
        application.unwrap_or_default(),
        started.as_deref().unwrap_or("unknown")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_debug_hides_the_password() {
        let settings = PostgresSettings {
            url: "postgres://postgres:secret@h/db".into(),
            schema: None,
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        assert!(!format!("{settings:?}").contains("secret"));
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

    #[test]
    fn schema_names_must_be_plain() {
        assert!(is_plain_identifier("file_watcher"));
        assert!(is_plain_identifier("t_0123abcd"));
        for bad in ["", "0abc", "Upper", "with-dash", "a\"b", "a b", &"x".repeat(64)] {
            assert!(!is_plain_identifier(bad), "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for attempt in 1..=ATTEMPTS {
            let window = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            let pause = backoff(attempt);
            assert!(pause >= window / 2 && pause <= window, "{attempt}: {pause:?}");
        }
        assert!(backoff(u32::MAX) <= FIRST_BACKOFF * 256);
    }

    #[test]
    fn connection_loss_codes() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "53300"] {
            assert!(is_connection_loss(code), "{code}");
        }
        for code in ["40001", "23505", "42P01", "28P01", "3D000"] {
            assert!(!is_connection_loss(code), "{code}");
        }
    }
}
