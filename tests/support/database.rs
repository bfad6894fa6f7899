//! The real PostgreSQL, one schema per test: [`TestDatabase`] names a schema
//! `t_<uuid>` in the test database, which the daemon (or a registry the test
//! makes) creates and migrates, and looks into it with a plain
//! `postgres::Client` whose `search_path` is that schema.
//!
//! The client is made again when the server has dropped it, so the fault
//! tests that restart the server keep reading; [`TestDatabase::try_rows`]
//! and [`TestDatabase::try_query`] say "not now" instead of failing while
//! the server is away or the tables do not exist yet.
//!
//! The schema is dropped on drop, best effort; it is kept, and named on
//! stderr, when the test is failing, so it can be inspected. Declare the
//! fixture *before* the daemons: a test's locals drop in reverse order, so
//! the daemons are killed before their schema goes. The server is
//! `DATABASE_TEST_URL`, by default `postgres://postgres@127.0.0.1:5432/test`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use file_watcher::registry::postgres::PostgresSettings;
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, NoTls};
use uuid::Uuid;

use super::{FaultProxy, DEADLINE, POLL};

pub fn database_url() -> String {
    std::env::var("DATABASE_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Where the test database listens, for a [`FaultProxy`] in front of it.
pub fn address() -> SocketAddr {
    let config: postgres::Config = database_url().parse().expect("DATABASE_TEST_URL parses");
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => panic!("the fault tests need a TCP database URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port)
        .to_socket_addrs()
        .expect("resolve the database host")
        .next()
        .expect("the database has an address")
}

/// The test database's URL, going through `proxy` instead.
pub fn url_through(proxy: &FaultProxy) -> String {
    url_at(&proxy.address().to_string())
}

/// The test database's URL with `authority` (`host:port`) instead of its own.
pub fn url_at(authority: &str) -> String {
    let config: postgres::Config = database_url().parse().expect("DATABASE_TEST_URL parses");
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or(user);
    let password = config
        .get_password()
        .map(|password| {
            let encoded: String = password
                .iter()
                .map(|byte| match byte {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(*byte).to_string()
                    }
                    _ => format!("%{byte:02X}"),
                })
                .collect();
            format!(":{encoded}")
        })
        .unwrap_or_default();
    format!("postgres://{user}{password}@{authority}/{dbname}")
}

/// One row of `files`, as the test reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub file_path: String,
    pub state: String,
    pub sha256: String,
    pub xxh128: String,
    pub size_bytes: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub last_event: String,
    pub old_path: Option<String>,
    pub instance_id: String,
    pub watched_directory: String,
    pub message_id: Uuid,
    pub published_at: Option<SystemTime>,
}

/// Selects every column `file_row` reads, in its order.
const FILE_ROW_SELECT: &str = "SELECT file_path, state, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, \
     last_event, old_path, instance_id, watched_directory, message_id::text, published_at FROM files";

fn file_row(record: &postgres::Row) -> FileRow {
    FileRow {
        file_path: record.get(0),
        state: record.get(1),
        sha256: record.get(2),
        xxh128: record.get(3),
        size_bytes: record.get(4),
        mtime_ns: record.get(5),
        ctime_ns: record.get(6),
        last_event: record.get(7),
        old_path: record.get(8),
        instance_id: record.get(9),
        watched_directory: record.get(10),
        message_id: record.get::<_, &str>(11).parse().expect("message_id is a UUID"),
        published_at: record.get(12),
    }
}

/// A schema of the test's own; see the module docs.
pub struct TestDatabase {
    schema: String,
    url: String,
    /// Looks at the tables; `search_path` is the test's schema. `None` once
    /// the server has dropped it, until the next query makes a new one.
    client: Mutex<Option<Client>>,
}

impl TestDatabase {
    pub fn new() -> TestDatabase {
        let database = TestDatabase {
            schema: format!("t_{}", Uuid::new_v4().simple()),
            url: database_url(),
            client: Mutex::new(None),
        };
        *database.client.lock().unwrap() = Some(database.client());
        database
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The URL the daemon is given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What a `PostgresRegistry` or `InstanceLock` on this schema is made with.
    pub fn settings(&self, pool_size: u32) -> PostgresSettings {
        PostgresSettings {
            url: self.url.clone().into(),
            schema: Some(self.schema.clone()),
            pool_size,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A connection of its own whose `search_path` is the test's schema, for
    /// a test that needs a session (a transaction, a lock) besides the fixture's.
    #[track_caller]
    pub fn client(&self) -> Client {
        let mut client = Client::connect(&self.url, NoTls).expect("the test side connects to PostgreSQL");
        // Allowed before the schema exists; the daemon creates it.
        client
            .batch_execute(&format!("SET search_path TO {}", self.schema))
            .expect("set search_path");
        client
    }

    /// Runs one statement in the test's schema, on a connection made again
    /// if the server dropped the last one.
    fn execute(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if client.as_ref().is_none_or(Client::is_closed) {
            let mut fresh = Client::connect(&self.url, NoTls)?;
            fresh.batch_execute(&format!("SET search_path TO {}", self.schema))?;
            *client = Some(fresh);
        }
        let result = client.as_mut().expect("connected above").query(sql, parameters);
        if result.as_ref().is_err_and(is_connection_lost) {
            *client = None;
        }
        result
    }

    /// Runs one query in the test's schema; fails the test on any error.
    #[track_caller]
    pub fn query(&self, sql: &str, parameters: &[&(dyn ToSql + Sync)]) -> Vec<postgres::Row> {
        self.execute(sql, parameters)
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"))
    }

    /// Runs one query in the test's schema; `None` while the database cannot
    /// be reached or the daemon has not created the tables yet.
    #[track_caller]
    pub fn try_query(&self, sql: &str, parameters: &[&(dyn ToSql + Sync)]) -> Option<Vec<postgres::Row>> {
        match self.execute(sql, parameters) {
            Ok(rows) => Some(rows),
            Err(error) if error.code() == Some(&SqlState::UNDEFINED_TABLE) || is_connection_lost(&error) => {
                None
            }
            Err(error) => panic!("{sql}: {error}"),
        }
    }

    /// Every row of `files`, by path.
    #[track_caller]
    pub fn rows(&self) -> Vec<FileRow> {
        self.query(&format!("{FILE_ROW_SELECT} ORDER BY file_path"), &[])
            .iter()
            .map(file_row)
            .collect()
    }

    /// Every row of `files`, by path; `None` as with [`try_query`](Self::try_query).
    #[track_caller]
    pub fn try_rows(&self) -> Option<Vec<FileRow>> {
        let records = self.try_query(&format!("{FILE_ROW_SELECT} ORDER BY file_path"), &[])?;
        Some(records.iter().map(file_row).collect())
    }

    /// The row of `path`, if there is one.
    #[track_caller]
    pub fn row(&self, path: &str) -> Option<FileRow> {
        self.query(&format!("{FILE_ROW_SELECT} WHERE file_path = $1"), &[&path])
            .first()
            .map(file_row)
    }

    /// Messages recorded and not yet confirmed by the sink.
    #[track_caller]
    pub fn outbox_len(&self) -> i64 {
        self.query("SELECT count(*) FROM outbox", &[])[0].get(0)
    }

    /// Asks `check` again every [`POLL`] until it returns `Some`; fails the
    /// test, saying `what` was awaited, after `timeout`.
    #[track_caller]
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&TestDatabase) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; files:\n{}\noutbox: {:?}",
                self.try_rows()
                    .unwrap_or_default()
                    .iter()
                    .map(|row| format!(
                        "{} {} {} {} published {}",
                        row.file_path,
                        row.state,
                        row.last_event,
                        row.message_id,
                        row.published_at.is_some()
                    ))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.try_query("SELECT count(*) FROM outbox", &[])
                    .map(|records| records[0].get::<_, i64>(0)),
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the row of `path` carries `message_id` and has been
    /// marked published; returns it.
    #[track_caller]
    pub fn wait_published(&self, path: &str, message_id: &str) -> FileRow {
        let wanted: Uuid = message_id.parse().expect("message ids are UUIDs");
        self.wait_until(
            &format!("the row of {path} published with message {message_id}"),
            DEADLINE,
            |database| {
                database
                    .row(path)
                    .filter(|row| row.message_id == wanted && row.published_at.is_some())
            },
        )
    }
}

/// The server went away (a restart, a shutdown under way): ask again later.
fn is_connection_lost(error: &postgres::Error) -> bool {
    error.is_closed()
        || error.as_db_error().is_none()
        || error
            .code()
            .is_some_and(|code| code.code().starts_with("57") || code.code().starts_with("08"))
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping schema {} for inspection", self.schema);
            return;
        }
        let _ = self.execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema), &[]);
    }
}
