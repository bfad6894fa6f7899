//! Operator commands, run instead of the daemon: `file-watcher healthcheck`,
//! `instances`, `status` and `replay`. They read the same environment and
//! flags as the daemon (`METRICS_ADDR`, `DATABASE_URL`, `DB_SCHEMA`,
//! `RABBITMQ_URL`, `EXCHANGE`), need no daemon running (except
//! `healthcheck`, which asks one), and print nothing that holds a password.

pub mod healthcheck;
pub mod instances;
pub mod replay;
pub mod status;

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, DatabaseConfig};

/// The subcommands; with none, the daemon runs.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Ask the running instance's /healthz at METRICS_ADDR; exit 0 (alive)
    /// or 1, with one line saying why. Needs no shell, files or DNS.
    Healthcheck,
    /// Every instance recorded in the database: state, last heartbeat,
    /// files recorded, outbox depth and the age of its oldest pending message.
    Instances(instances::InstancesArgs),
    /// Exit non-zero, with one line per problem, when an instance is stale
    /// or has messages pending too long (for cron and alerting).
    Status(status::StatusArgs),
    /// Publish `created` again for every present file (or those under a
    /// path), for a consumer added after they were recorded.
    Replay(replay::ReplayArgs),
}

/// Runs `command`; the exit code is the command's answer.
pub fn run(command: Command, config: &Config) -> ExitCode {
    let result = match command {
        Command::Healthcheck => healthcheck::run(config),
        Command::Instances(args) => instances::run(config, &args),
        Command::Status(args) => status::run(config, &args),
        Command::Replay(args) => replay::run(config, &args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("file-watcher: {error}");
            ExitCode::from(2)
        }
    }
}

/// Why an operator command could not do its work at all (as opposed to
/// finding problems, which is its answer).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0} is not set")]
    Unset(&'static str),
    #[error("database {database}: {detail}")]
    Database { database: String, detail: String },
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Other(String),
}

/// A connection to the registry database whose `search_path` is the
/// registry schema, migrated first (so the `instances` table exists even
/// before any daemon of this version ran).
pub(crate) fn database(config: &Config) -> Result<(postgres::Client, String), OpsError> {
    let database = config.database.as_ref().ok_or(OpsError::Unset("DATABASE_URL"))?;
    let name = database.url.to_string();
    let failed = |detail: String| OpsError::Database {
        database: name.clone(),
        detail,
    };
    migrate(config, database).map_err(|error| failed(error.to_string()))?;
    let mut client =
        crate::registry::postgres::connect_one(&database.url, "file-watcher ops", Duration::from_secs(5))
            .map_err(|error| failed(error.to_string()))?;
    let schema = schema_name(database).replace('"', "\"\"");
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .map_err(|error| failed(error.to_string()))?;
    Ok((client, name))
}

pub(crate) fn schema_name(database: &DatabaseConfig) -> &str {
    database
        .schema
        .as_deref()
        .unwrap_or(crate::registry::postgres::DEFAULT_SCHEMA)
}

fn migrate(config: &Config, database: &DatabaseConfig) -> Result<(), crate::registry::RegistryError> {
    let settings = crate::registry::postgres::PostgresSettings {
        url: database.url.clone(),
        schema: database.schema.clone(),
        pool_size: 1,
        connect_timeout: Duration::from_secs(5),
    };
    let origin = crate::message::Origin {
        instance_id: config.instance_id.clone(),
        watched_directory: config.watched_directory(),
    };
    crate::registry::postgres::PostgresRegistry::connect(&settings, origin).map(drop)
}
