//! `file-watcher replay`: publish `created` again for every present file in
//! the registry (or those under `--prefix`), for a consumer whose queue did
//! not exist when they were recorded.
//!
//! - Each message is built from the file's row exactly as the daemon builds
//!   a `created` (the body keeps the message contract), with a fresh
//!   `message_id`; they all share one `correlation_id`, the replay's id, and
//!   carry the header `x-replay: true`. `--routing-key-prefix replay.` sends
//!   them as `replay.file.created`, so consumers bound to `file.#` are not
//!   fed them again while a new one binds `replay.file.#` (or `#.file.#`).
//! - It publishes through the daemon's own broker code (`publish::broker`),
//!   in batches, each under publisher confirms; at most `--rate` messages a
//!   second.
//! - Resumable: rows are read in key order (keyset pagination on the `"C"`
//!   primary key), and after each confirmed batch its last path is saved as
//!   the replay's cursor in the `replays` table. `--resume ID` goes on after
//!   the cursor, so an interrupted replay sends at most its last unconfirmed
//!   batch again, never everything.
//! - A bar on stderr while stderr is a terminal; the counts at the end, always.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::OpsError;
use crate::config::Config;
use crate::message::{Encoded, EventType, Message, Origin};
use crate::publish::broker::Broker;
use crate::registry::{Observed, Stat};

/// Rows read and published per batch (fewer when `--rate` is lower).
const BATCH: i64 = 256;
/// Attempts per batch (reconnecting in between) before the replay stops.
const ATTEMPTS: u32 = 5;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only this file, or the files below this directory (absolute path).
    #[arg(long, value_name = "PATH")]
    pub prefix: Option<PathBuf>,
    /// Put before every routing key: `replay.` publishes `replay.file.created`.
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub routing_key_prefix: String,
    /// Count what would be replayed; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many messages per second.
    #[arg(long, default_value = "1000", value_name = "N")]
    pub rate: u32,
    /// Go on with an interrupted replay (its id is printed when it starts);
    /// its prefix, routing key prefix and exchange are the ones it started with.
    #[arg(long, value_name = "ID")]
    pub resume: Option<Uuid>,
}

/// A replay's state, as kept in the `replays` table.
struct Replay {
    id: Uuid,
    /// Path text of `--prefix`, without a trailing `/`.
    prefix: Option<String>,
    routing_key_prefix: String,
    exchange: String,
    /// The last path confirmed.
    cursor: Option<String>,
    sent: i64,
}

/// Which rows a replay covers: present, under the prefix, after the cursor.
const SELECTION: &str = "state = 'present' \
     AND ($1::text IS NULL OR file_path = $1 OR (file_path > $1 || '/' AND file_path < $1 || '0')) \
     AND ($2::text IS NULL OR file_path > $2)";

pub fn run(config: &Config, args: &ReplayArgs) -> Result<ExitCode, OpsError> {
    if args.rate == 0 {
        return Err(OpsError::Other(
            "invalid value 0 for --rate: at least 1 message a second".into(),
        ));
    }
    if args.resume.is_some() && (args.prefix.is_some() || !args.routing_key_prefix.is_empty()) {
        return Err(OpsError::Other(
            "--resume goes on with the replay's own --prefix and --routing-key-prefix; give neither".into(),
        ));
    }
    let (mut client, database) = super::database(config)?;
    let db_error = |error: postgres::Error| OpsError::Database {
        database: database.clone(),
        detail: error.to_string(),
    };
    let exchange = config.broker.as_ref().map(|broker| broker.exchange.clone());
    let mut replay = match args.resume {
        Some(id) => load(&mut client, id).map_err(db_error)?.ok_or_else(|| {
            OpsError::Other(format!("no replay {id} in the replays table (nothing to resume)"))
        })?,
        None => Replay {
            id: Uuid::new_v4(),
            prefix: args.prefix.as_deref().map(prefix_text).transpose()?,
            routing_key_prefix: args.routing_key_prefix.clone(),
            exchange: exchange.clone().unwrap_or_else(|| "file_events".into()),
            cursor: None,
            sent: 0,
        },
    };
    let remaining: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM files WHERE {SELECTION}"),
            &[&replay.prefix, &replay.cursor],
        )
        .map_err(db_error)?
        .get(0);
    let under = replay.prefix.as_deref().unwrap_or("the whole registry");
    if args.dry_run {
        println!(
            "dry run: would replay {remaining} files ({under}) to exchange {} with routing key {}file.created",
            replay.exchange, replay.routing_key_prefix
        );
        return Ok(ExitCode::SUCCESS);
    }
    let broker_config = config
        .broker
        .as_ref()
        .ok_or(OpsError::Unset("RABBITMQ_URL (or RABBITMQ_HOST)"))?;
    let mut broker_config = broker_config.clone();
    broker_config.exchange = replay.exchange.clone();
    let mut settings = crate::pipeline::broker_settings(config, &broker_config);
    settings.connection_name = format!("file_watcher_replay_{}", &replay.id.simple().to_string()[..8]);
    let connect = || -> Result<Broker, OpsError> {
        let mut broker = Broker::connect(&settings)
            .map_err(|error| OpsError::Broker(crate::logging::error_chain(&error)))?;
        broker.for_replay(&replay.routing_key_prefix);
        Ok(broker)
    };
    let mut broker = connect()?;
    if args.resume.is_none() {
        client
            .execute(
                "INSERT INTO replays (replay_id, prefix, routing_key_prefix, exchange) \
                 VALUES ($1::text::uuid, $2, $3, $4)",
                &[
                    &replay.id.to_string(),
                    &replay.prefix,
                    &replay.routing_key_prefix,
                    &replay.exchange,
                ],
            )
            .map_err(db_error)?;
    }
    eprintln!(
        "replay {}: {remaining} files ({under}) to exchange {}; if interrupted, go on with \
         `file-watcher replay --resume {}`",
        replay.id, replay.exchange, replay.id
    );
    let mut progress = Progress::new(remaining);
    let batch_size = BATCH.min(i64::from(args.rate));
    let started = Instant::now();
    let (mut sent_now, mut unroutable) = (0u64, 0u64);
    loop {
        let records = client
            .query(
                &format!(
                    "SELECT file_path, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, instance_id, \
                     watched_directory FROM files WHERE {SELECTION} ORDER BY file_path LIMIT $3"
                ),
                &[&replay.prefix, &replay.cursor, &batch_size],
            )
            .map_err(db_error)?;
        if records.is_empty() {
            break;
        }
        let messages: Vec<Encoded> = records
            .iter()
            .map(|record| Encoded::new(message(record, replay.id)))
            .collect();
        let mut attempt = 0;
        let published = loop {
            attempt += 1;
            let outcome = broker.publish(&messages);
            match outcome {
                Ok(published) if published.acked.len() == messages.len() => break published,
                Ok(published) if attempt >= ATTEMPTS => {
                    return Err(OpsError::Broker(format!(
                        "RabbitMQ nacked {} messages {ATTEMPTS} times; resume with --resume {}",
                        published.nacked.len(),
                        replay.id
                    )));
                }
                Err(error) if attempt >= ATTEMPTS => {
                    return Err(OpsError::Broker(format!(
                        "{}; resume with --resume {}",
                        crate::logging::error_chain(&error),
                        replay.id
                    )));
                }
                _ => {
                    std::thread::sleep(crate::backoff::RETRY.delay(attempt - 1));
                    if !broker.is_usable() {
                        broker = connect()?;
                    }
                }
            }
        };
        unroutable += published.unroutable as u64;
        let last: String = records.last().expect("not empty").get(0);
        client
            .execute(
                "UPDATE replays SET cursor = $2, sent = sent + $3, updated_at = now() \
                 WHERE replay_id = $1::text::uuid",
                &[&replay.id.to_string(), &last, &(messages.len() as i64)],
            )
            .map_err(db_error)?;
        replay.cursor = Some(last);
        replay.sent += messages.len() as i64;
        sent_now += messages.len() as u64;
        progress.advance(messages.len() as u64);
        // The rate limit: never ahead of `rate` messages a second.
        let due = started + Duration::from_secs_f64(sent_now as f64 / f64::from(args.rate));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    broker.close();
    client
        .execute(
            "UPDATE replays SET finished_at = now(), updated_at = now() WHERE replay_id = $1::text::uuid",
            &[&replay.id.to_string()],
        )
        .map_err(db_error)?;
    progress.finish();
    println!(
        "replay {}: published {sent_now} files now ({} in all), {unroutable} unroutable, to exchange {} \
         with routing key {}file.created, correlation_id {}",
        replay.id, replay.sent, replay.exchange, replay.routing_key_prefix, replay.id
    );
    Ok(ExitCode::SUCCESS)
}

fn load(client: &mut postgres::Client, id: Uuid) -> Result<Option<Replay>, postgres::Error> {
    let record = client.query_opt(
        "SELECT prefix, routing_key_prefix, exchange, cursor, sent FROM replays \
         WHERE replay_id = $1::text::uuid",
        &[&id.to_string()],
    )?;
    Ok(record.map(|record| Replay {
        id,
        prefix: record.get(0),
        routing_key_prefix: record.get(1),
        exchange: record.get(2),
        cursor: record.get(3),
        sent: record.get(4),
    }))
}

/// `--prefix` as the registry spells paths: absolute path text, no
/// trailing `/` (the root is the empty text, which covers everything).
fn prefix_text(path: &std::path::Path) -> Result<String, OpsError> {
    let absolute = std::path::absolute(path)
        .map_err(|error| OpsError::Other(format!("invalid --prefix {}: {error}", path.display())))?;
    Ok(crate::path_text::encode(absolute.as_os_str())
        .trim_end_matches('/')
        .to_owned())
}

/// The `created` message for one `files` row, as its recorder would build it.
fn message(record: &postgres::Row, replay_id: Uuid) -> Message {
    let path: String = record.get(0);
    let observed = Observed {
        path: path.clone(),
        stat: Stat {
            size: u64::try_from(record.get::<_, i64>(3)).unwrap_or_default(),
            mtime_ns: record.get(4),
            ctime_ns: record.get(5),
            identity: None,
        },
        sha256: record.get(1),
        xxh128: record.get(2),
    };
    let origin = Origin {
        instance_id: record.get(6),
        watched_directory: record.get(7),
    };
    origin.message(
        EventType::Created,
        &path,
        None,
        replay_id,
        Some(observed.content()),
    )
}

/// The bar on stderr, drawn only when stderr is a terminal.
struct Progress {
    total: u64,
    done: u64,
    terminal: bool,
}

impl Progress {
    fn new(total: i64) -> Progress {
        Progress {
            total: u64::try_from(total).unwrap_or(0),
            done: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, count: u64) {
        self.done += count;
        if !self.terminal {
            return;
        }
        const WIDTH: u64 = 40;
        let filled = (self.done * WIDTH)
            .checked_div(self.total)
            .unwrap_or(WIDTH)
            .min(WIDTH) as usize;
        let bar = format!("{}{}", "#".repeat(filled), " ".repeat(WIDTH as usize - filled));
        let mut stderr = std::io::stderr();
        let _ = write!(stderr, "\r[{bar}] {}/{}", self.done, self.total);
        let _ = stderr.flush();
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
