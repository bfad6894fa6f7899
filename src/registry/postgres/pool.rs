//! The connection pool every statement but the migrations and the instance
//! lock goes through.
//!
//! It tells a database that cannot be reached (an `Unavailable` error that
//! names the last failure to connect in full) from a pool whose connections
//! are merely busy (wait for one, however long that takes).

use std::sync::{Arc, Mutex};

use r2d2::{CustomizeConnection, HandleError, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use super::faults::{describe, name_database, Fault};
use super::schema::quote_identifier;
use super::statements::{Caching, Session};
use super::{PostgresRegistry, PostgresSettings};
use crate::registry::RegistryError;

/// Every connection is opened through rustls; whether TLS is used at all is
/// the driver's `sslmode`, set from the URL (see `tls`).
pub(super) type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// Each connection keeps the statements prepared on it (`statements`).
pub(super) type Manager = Caching<PostgresConnectionManager<Connector>>;

/// The pool for `schema`, and where it keeps the last failure to open a
/// connection. Its connections are opened in the background.
pub(super) fn build(
    settings: &PostgresSettings,
    config: postgres::Config,
    connector: Connector,
    schema: &str,
    database: &str,
) -> (Pool<Manager>, Arc<Mutex<Option<String>>>) {
    let last_connect_failure = Arc::new(Mutex::new(None));
    let pool = Pool::builder()
        .max_size(settings.pool_size)
        // One warm connection; more are opened under load and closed again
        // after r2d2's idle timeout, so idle instances do not crowd the server.
        .min_idle(Some(1))
        .connection_timeout(settings.connect_timeout)
        // r2d2 tests each connection it hands out (an empty query). Kept:
        // without it, after an outage every idle connection the server cut
        // fails once more, each a new "unavailable" and a hold. Skipped for
        // a connection that came back unbroken within the last second
        // (`statements::KNOWN_GOOD_FOR`).
        .connection_customizer(Box::new(SessionSettings {
            statement: format!(
                "SET search_path TO {}; SET plan_cache_mode = force_custom_plan; \
                 SET enable_seqscan = off; SET enable_bitmapscan = off",
                quote_identifier(schema)
            ),
        }))
        .error_handler(Box::new(ConnectFailures {
            database: database.to_owned(),
            last: Arc::clone(&last_connect_failure),
        }))
        // The migration connection just proved the server reachable;
        // connections are opened in the background from here on.
        .build_unchecked(Caching(PostgresConnectionManager::new(config, connector)));
    (pool, last_connect_failure)
}

impl PostgresRegistry {
    /// A pooled connection, waiting as long as every connection is busy.
    pub(super) fn connection(&self) -> Result<PooledConnection<Manager>, RegistryError> {
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
    pub(super) fn read<T>(
        &self,
        work: impl FnOnce(&mut Session) -> Result<T, Fault>,
    ) -> Result<T, RegistryError> {
        let mut connection = self.connection()?;
        work(&mut connection).map_err(|fault| name_database(&self.database, fault.into()))
    }
}

/// Points every pooled connection at the registry schema, and has it plan
/// each execution of a prepared statement afresh.
///
/// Why custom plans: statements are prepared once per connection, and after
/// five executions PostgreSQL may settle on a generic plan made while the
/// tables were small (a new schema, the first files of an import) and keep
/// it while they grow faster than autovacuum analyzes them: a sequential
/// scan per batch. A 100,000-file import took 115 s with generic plans
/// forced and 14 s with custom ones (BENCHMARKS.md). Planning these
/// statements costs a few microseconds per file, as each serves a batch.
/// `plan_cache_mode` needs PostgreSQL 12 or later.
///
/// Why no sequential scans: every statement of the daemon's finds its rows
/// by key (a batch of paths or message ids, a page in key order), and for
/// the minute or so before autovacuum first analyzes a table that is filling
/// (an import, a new schema) the planner has no statistics and reckons that
/// a few hundred keys cost as much as reading the whole table. It then read
/// `files` whole for each batch, a cost that grows with the table. The
/// setting only makes a sequential scan the last resort: a statement with
/// no index to use still scans.
///
/// Why no bitmap scans: the pages read in key order (the outbox from a
/// position, the present files under a directory for the sweep) stop at a
/// `LIMIT`. On a table that filled faster than it was analyzed, the planner
/// answered them with a bitmap scan of every row past the page's start and
/// a sort, 20–50 ms a page at 100,000 rows; a walk of the index in order
/// reads about the page. Every other statement looks rows up by key, where
/// an index scan serves as well. Set for the session rather than around each
/// page (`SET LOCAL` in a transaction of its own), which took four round
/// trips per read of the outbox instead of one (BENCHMARKS.md, "Round trips
/// at a trickle").
#[derive(Debug)]
struct SessionSettings {
    statement: String,
}

impl CustomizeConnection<Session, postgres::Error> for SessionSettings {
    fn on_acquire(&self, client: &mut Session) -> Result<(), postgres::Error> {
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
