//! How a database failure is classified, and the retry loop that acts on it.
//!
//! Every failed statement becomes a [`Fault`]: a lost race, which
//! [`PostgresRegistry::transact`] answers by running the transaction again,
//! or a [`RegistryError`] for the caller.
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

use std::error::Error as _;
use std::io;
use std::thread;
use std::time::Duration;

use super::statements::{Session, Transaction};
use super::PostgresRegistry;
use crate::backoff::Backoff;
use crate::registry::RegistryError;

/// Attempts of one transaction that keeps losing races before `apply` gives up.
const ATTEMPTS: u32 = 5;

/// The pause after a lost race: random in the upper half of a window that
/// starts at 20 ms and doubles with every attempt, so racing instances spread out.
const CONFLICT: Backoff = Backoff {
    first: Duration::from_millis(20),
    doublings: 8,
    cap: Duration::MAX,
    jitter: 0.5..1.0,
};

impl PostgresRegistry {
    /// Runs `work` in a transaction and commits it, running it again (after a
    /// jittered, growing pause) when it lost a race with another transaction.
    /// `work` must leave nothing behind but its writes: it may run several times.
    pub(super) fn transact<T>(
        &self,
        subject: &str,
        mut work: impl FnMut(&mut Transaction<'_>) -> Result<T, Fault>,
    ) -> Result<T, RegistryError> {
        self.retrying(subject, |session| {
            let mut transaction = session.transaction().map_err(fault("begin a transaction"))?;
            let value = work(&mut transaction)?;
            transaction.commit().map_err(fault("commit"))?;
            Ok(value)
        })
    }

    /// Runs `work`, a single statement, as a transaction of its own
    /// (autocommit): one round trip, where [`PostgresRegistry::transact`]
    /// adds a BEGIN and a COMMIT. Run again, as there, when it lost a race.
    pub(super) fn autocommit<T>(
        &self,
        subject: &str,
        work: impl FnMut(&mut Session) -> Result<T, Fault>,
    ) -> Result<T, RegistryError> {
        self.retrying(subject, work)
    }

    /// Runs `work` on one pooled connection until it succeeds, fails for
    /// another reason than a lost race, or has lost [`ATTEMPTS`] races.
    fn retrying<T>(
        &self,
        subject: &str,
        mut work: impl FnMut(&mut Session) -> Result<T, Fault>,
    ) -> Result<T, RegistryError> {
        let mut connection = self.connection()?;
        let mut attempt = 1;
        loop {
            match work(&mut connection) {
                Ok(value) => return Ok(value),
                Err(Fault::Conflict { what, detail }) if attempt < ATTEMPTS => {
                    let pause = CONFLICT.delay(attempt - 1);
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
}

/// How one statement failed, as far as retrying is concerned.
pub(super) enum Fault {
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

pub(super) fn fault(what: &'static str) -> impl FnOnce(postgres::Error) -> Fault {
    move |error| database_fault(what, error)
}

pub(super) fn query_error(what: &'static str) -> impl FnOnce(postgres::Error) -> RegistryError {
    move |error| database_fault(what, error).into()
}

/// Sorts a database error into a lost race, an unreachable database, or a
/// failed statement; see Errors in the module docs.
pub(super) fn database_fault(what: &'static str, error: postgres::Error) -> Fault {
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
pub(super) fn is_connection_loss(code: &str) -> bool {
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
pub(super) fn describe(error: &postgres::Error) -> String {
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
pub(super) fn name_database(database: &str, error: RegistryError) -> RegistryError {
    match error {
        RegistryError::Unavailable(detail) if detail.starts_with(database) => {
            RegistryError::Unavailable(detail)
        }
        RegistryError::Unavailable(detail) => RegistryError::Unavailable(format!("{database}: {detail}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let first = Duration::from_millis(20);
        for attempt in 1..=ATTEMPTS {
            let window = first * 2u32.pow(attempt - 1);
            let pause = CONFLICT.delay(attempt - 1);
            assert!(pause >= window / 2 && pause <= window, "{attempt}: {pause:?}");
        }
        assert!(CONFLICT.delay(u32::MAX) <= first * 256);
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
