//! The lock that keeps one instance id to one live process.
//!
//! It is not part of the pool: it is a session of its own, because a
//! session-level advisory lock lives exactly as long as its connection.

use std::error::Error as _;
use std::fmt;
use std::io;
use std::time::Duration;

use postgres::Client;

use super::faults::{database_fault, describe, is_connection_loss, name_database};
use super::pool::Connector;
use super::PostgresSettings;
use crate::registry::RegistryError;

/// `application_name` of the dedicated connection that holds an instance lock.
const LOCK_APPLICATION_NAME: &str = "file-watcher instance lock";

/// Proof that this process is the only live one using its instance id.
///
/// A session-level advisory lock keyed on (schema, instance id), held by a
/// dedicated connection outside the pool: the lock lives exactly as long as
/// that session, so a process that dies releases it, and a second process
/// with the same id is refused while the first is alive.
pub struct InstanceLock {
    client: Client,
    config: postgres::Config,
    /// The TLS connector `config` is opened with (`sslmode` is in `config`).
    connector: Connector,
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
            let schema = settings.schema_name();
            let config = settings.client_config(LOCK_APPLICATION_NAME)?;
            Ok((format!("file-watcher instance {schema} {instance_id}"), config))
        };
        let (key, (config, connector)) =
            prepare().map_err(|error| LockError::from_registry(instance_id, error))?;
        let database = settings.url.to_string();
        let client = take_lock(&config, &connector, &key, instance_id, &database)?;
        log::info!("holding the lock for instance id {instance_id} on {database}");
        Ok(InstanceLock {
            client,
            config,
            connector,
            key,
            instance_id: instance_id.to_owned(),
            database,
            timeout: settings.connect_timeout,
        })
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
        self.client = take_lock(
            &self.config,
            &self.connector,
            &self.key,
            &self.instance_id,
            &self.database,
        )?;
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
    connector: &Connector,
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
    let mut client = config
        .connect(connector.clone())
        .map_err(|error| failure("connect", error))?;
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
