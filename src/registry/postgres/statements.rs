//! Statements prepared once per pooled connection.
//!
//! The driver prepares (Parse, Describe) every statement it is handed as
//! text, and closes it again when the statement is dropped: before batching,
//! parsing, analysing and planning were 36 % of PostgreSQL's CPU for the
//! daemon's sessions (BENCHMARKS.md). A [`Session`] is a pooled connection
//! with its own cache of prepared statements, keyed by their SQL text (always
//! a literal, so the cache holds a few dozen entries at most and never grows
//! with the work); [`Session`] and [`Transaction`] answer the driver's
//! `query`, `query_opt` and `execute` through it, so callers write the SQL
//! where it is used and it is prepared once per connection.
//!
//! A prepared statement lives in the server session, not in a transaction:
//! one prepared inside a transaction that rolls back stays usable. A
//! connection that breaks takes its statements with it; r2d2 drops it, and the
//! next one prepares its own.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, Row, Statement};
use r2d2::ManageConnection;

type Parameters<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A connection and the statements prepared on it.
pub(super) struct Session {
    client: Client,
    statements: Statements,
    /// When the connection last came back to the pool unbroken, or passed
    /// the pool's test.
    known_good: Instant,
}

/// A connection that came back to the pool unbroken this recently is handed
/// out again without r2d2's test (an empty query, one round trip). The test
/// is there for connections the server cut while they sat idle (an outage,
/// a restart): after one, each would otherwise fail once more. A connection
/// in steady use has just proved itself; at a trickle, where every batch
/// is one file, the test was a fifth of the round trips per message
/// (BENCHMARKS.md, "Round trips at a trickle").
const KNOWN_GOOD_FOR: Duration = Duration::from_secs(1);

/// Prepared statements of one connection, by SQL text.
#[derive(Default)]
struct Statements(HashMap<&'static str, Statement>);

impl Statements {
    /// The statement for `sql`, prepared with `prepare` the first time.
    fn get(
        &mut self,
        sql: &'static str,
        prepare: impl FnOnce(&str) -> Result<Statement, postgres::Error>,
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = prepare(sql)?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl Session {
    pub(super) fn query(
        &mut self,
        sql: &'static str,
        parameters: Parameters<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statements.get(sql, |sql| self.client.prepare(sql))?;
        self.client.query(&statement, parameters)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        parameters: Parameters<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statements.get(sql, |sql| self.client.prepare(sql))?;
        self.client.query_opt(&statement, parameters)
    }

    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        parameters: Parameters<'_>,
    ) -> Result<u64, postgres::Error> {
        let statement = self.statements.get(sql, |sql| self.client.prepare(sql))?;
        self.client.execute(&statement, parameters)
    }

    /// Starts a transaction whose statements go through this session's cache.
    pub(super) fn transaction(&mut self) -> Result<Transaction<'_>, postgres::Error> {
        Ok(Transaction {
            inner: self.client.transaction()?,
            statements: &mut self.statements,
        })
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A transaction on a [`Session`]: rolled back when dropped uncommitted.
pub(super) struct Transaction<'a> {
    inner: postgres::Transaction<'a>,
    statements: &'a mut Statements,
}

impl Transaction<'_> {
    pub(super) fn query(
        &mut self,
        sql: &'static str,
        parameters: Parameters<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statements.get(sql, |sql| self.inner.prepare(sql))?;
        self.inner.query(&statement, parameters)
    }

    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        parameters: Parameters<'_>,
    ) -> Result<u64, postgres::Error> {
        let statement = self.statements.get(sql, |sql| self.inner.prepare(sql))?;
        self.inner.execute(&statement, parameters)
    }

    pub(super) fn commit(self) -> Result<(), postgres::Error> {
        self.inner.commit()
    }
}

/// Wraps a connection manager so that its connections become [`Session`]s.
#[derive(Debug)]
pub(super) struct Caching<M>(pub M);

impl<M: ManageConnection<Connection = Client, Error = postgres::Error>> ManageConnection for Caching<M> {
    type Connection = Session;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Session, postgres::Error> {
        Ok(Session {
            client: self.0.connect()?,
            statements: Statements::default(),
            known_good: Instant::now(),
        })
    }

    fn is_valid(&self, session: &mut Session) -> Result<(), postgres::Error> {
        if session.known_good.elapsed() < KNOWN_GOOD_FOR {
            return Ok(());
        }
        self.0.is_valid(&mut session.client)?;
        session.known_good = Instant::now();
        Ok(())
    }

    /// Called by r2d2 when a connection comes back to the pool.
    fn has_broken(&self, session: &mut Session) -> bool {
        let broken = self.0.has_broken(&mut session.client);
        if !broken {
            session.known_good = Instant::now();
        }
        broken
    }
}
