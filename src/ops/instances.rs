//! `file-watcher instances`: every instance in the `instances` table, as a
//! table or (`--json`) as JSON. Reads only the database.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::OpsError;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct InstancesArgs {
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A running instance whose last heartbeat is older than this many
    /// seconds is shown as stale (it heartbeats every 2 s).
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    pub stale_after: u64,
}

/// One instance as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub instance_id: String,
    pub hostname: String,
    pub pid: i32,
    pub watched_directory: String,
    pub version: String,
    /// `running`, `stopped`, or `stale` (not stopped, heartbeat too old).
    pub state: &'static str,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub last_heartbeat: String,
    pub heartbeat_age_seconds: f64,
    pub stopped_at: Option<String>,
    pub messages_recorded: i64,
    pub messages_confirmed: i64,
    /// Messages of this instance in the outbox, not set aside.
    pub outbox_depth: i64,
    /// Age of its oldest such message, if any.
    pub oldest_pending_seconds: Option<f64>,
}

/// Every instance, ordered by id; `stale_after` decides `state`.
pub fn read(client: &mut postgres::Client, stale_after: Duration) -> Result<Vec<Instance>, postgres::Error> {
    let records = client.query(
        "SELECT i.instance_id, i.hostname, i.pid, i.watched_directory, i.version, \
                i.started_at, i.heartbeat_at, i.stopped_at, \
                EXTRACT(EPOCH FROM now() - i.heartbeat_at)::float8, \
                i.messages_recorded, i.messages_confirmed, \
                COALESCE(o.depth, 0), o.oldest \
         FROM instances i LEFT JOIN ( \
             SELECT instance_id, count(*) AS depth, \
                    EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest \
             FROM outbox WHERE set_aside_at IS NULL GROUP BY instance_id \
         ) o ON o.instance_id = i.instance_id \
         ORDER BY i.instance_id",
        &[],
    )?;
    let time = |value: SystemTime| humantime::format_rfc3339_seconds(value).to_string();
    Ok(records
        .iter()
        .map(|record| {
            let stopped_at: Option<SystemTime> = record.get(7);
            let age: f64 = record.get(8);
            let state = match stopped_at {
                Some(_) => "stopped",
                None if age > stale_after.as_secs_f64() => "stale",
                None => "running",
            };
            Instance {
                instance_id: record.get(0),
                hostname: record.get(1),
                pid: record.get(2),
                watched_directory: record.get(3),
                version: record.get(4),
                state,
                started_at: time(record.get(5)),
                last_heartbeat: time(record.get(6)),
                heartbeat_age_seconds: age.max(0.0),
                stopped_at: stopped_at.map(time),
                messages_recorded: record.get(9),
                messages_confirmed: record.get(10),
                outbox_depth: record.get(11),
                oldest_pending_seconds: record.get(12),
            }
        })
        .collect())
}

/// Every instance in the database `config` names, read with [`read`].
pub(super) fn read_all(config: &Config, stale_after: u64) -> Result<Vec<Instance>, OpsError> {
    let (mut client, database) = super::database(config)?;
    read(&mut client, Duration::from_secs(stale_after)).map_err(|error| OpsError::Database {
        database,
        detail: error.to_string(),
    })
}

pub fn run(config: &Config, args: &InstancesArgs) -> Result<ExitCode, OpsError> {
    let instances = read_all(config, args.stale_after)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&instances).expect("instances serialize")
        );
    } else {
        print!("{}", table(&instances));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whole seconds, "-" for none.
fn seconds(value: Option<f64>) -> String {
    value.map_or("-".into(), |seconds| format!("{:.0}s", seconds.max(0.0)))
}

/// Aligned columns, one instance per line, under a header.
pub fn table(instances: &[Instance]) -> String {
    let header = [
        "INSTANCE",
        "HOST",
        "DIRECTORY",
        "STATE",
        "LAST HEARTBEAT",
        "AGE",
        "RECORDED",
        "OUTBOX",
        "OLDEST PENDING",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|title| (*title).to_owned()).collect()];
    for instance in instances {
        rows.push(vec![
            instance.instance_id.clone(),
            instance.hostname.clone(),
            instance.watched_directory.clone(),
            instance.state.to_owned(),
            instance.last_heartbeat.clone(),
            seconds(Some(instance.heartbeat_age_seconds)),
            instance.messages_recorded.to_string(),
            instance.outbox_depth.to_string(),
            seconds(instance.oldest_pending_seconds),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    if instances.is_empty() {
        text.push_str("(no instance has registered in this schema yet)\n");
    }
    text
}
