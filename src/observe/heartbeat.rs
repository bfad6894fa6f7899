//! This instance's row in the `instances` table (migration 5), kept fresh by
//! the `heartbeat` thread.
//!
//! At start the row is upserted (a restart with the same `INSTANCE_ID`
//! takes its row over: the instance lock guarantees one live process per
//! id); every [`INTERVAL`] it gets `heartbeat_at = now()` and the counts;
//! on a clean exit `stopped_at`. A process killed with `kill -9` leaves a
//! row whose heartbeat only ages: `file-watcher instances` shows it stale.
//!
//! Each turn also measures this instance's outbox (depth, oldest message)
//! for the metrics. The thread has a connection of its own, not one of the
//! registry pool, and treats every database error as "try again next turn"
//! (logged at debug: the registry already reports outages once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use postgres::Client;

use super::Sources;
use crate::redact::SecretUrl;

/// How often the row is refreshed. `instances` calls a row stale after 30 s
/// by default: several missed heartbeats, not one slow one.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Bounds opening the heartbeat's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox as the last heartbeat measured it, for the metrics.
#[derive(Debug, Default)]
pub struct OutboxGauges {
    pub depth: AtomicU64,
    /// Seconds, as `f64::to_bits`.
    pub oldest_age_bits: AtomicU64,
}

/// What the heartbeat needs besides the counters.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: SecretUrl,
    pub schema: String,
    pub watched_directory: String,
}

pub struct Heartbeat {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Heartbeat {
    pub fn spawn(settings: Settings, sources: Sources) -> std::io::Result<Heartbeat> {
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let mut beat = Beat {
                    settings,
                    sources,
                    client: None,
                    registered: false,
                };
                loop {
                    beat.turn();
                    match stopped.recv_timeout(INTERVAL) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                beat.stopped();
            })?;
        Ok(Heartbeat { stop, thread })
    }

    /// Marks the row stopped (one bounded attempt) and joins the thread.
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("thread heartbeat panicked");
        }
    }
}

struct Beat {
    settings: Settings,
    sources: Sources,
    client: Option<Client>,
    /// The start-up upsert went through.
    registered: bool,
}

impl Beat {
    fn turn(&mut self) {
        // The registry creates the table (migration 5) once it connects.
        if !self.sources.deferred.is_set() {
            return;
        }
        if let Err(error) = self.beat() {
            log::debug!("heartbeat: {error}");
            self.client = None;
        }
    }

    fn stopped(&mut self) {
        if !self.registered {
            return;
        }
        // The final counts first, then the mark.
        let _ = self.beat();
        let instance_id = self.sources.instance_id.clone();
        let result = self.connected().and_then(|client| {
            client
                .execute(
                    "UPDATE instances SET stopped_at = now(), heartbeat_at = now() WHERE instance_id = $1",
                    &[&instance_id],
                )
                .map_err(BeatError::from)
        });
        match result {
            Ok(_) => {}
            Err(error) => log::warn!(
                "cannot mark instance {} stopped: {error}",
                self.sources.instance_id
            ),
        }
    }

    fn connected(&mut self) -> Result<&mut Client, BeatError> {
        if self.client.is_none() {
            let mut client = crate::registry::postgres::connect_one(
                &self.settings.url,
                "file-watcher heartbeat",
                CONNECT_TIMEOUT,
            )?;
            let schema = self.settings.schema.replace('"', "\"\"");
            client.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn beat(&mut self) -> Result<(), BeatError> {
        let counts = Counts::read(&self.sources);
        let instance_id = self.sources.instance_id.clone();
        let registered = self.registered;
        let Settings {
            watched_directory, ..
        } = self.settings.clone();
        let client = self.connected()?;
        if !registered {
            client.execute(
                "INSERT INTO instances (instance_id, hostname, pid, watched_directory, version, \
                     started_at, heartbeat_at, stopped_at) \
                 VALUES ($1, $2, $3, $4, $5, now(), now(), NULL) \
                 ON CONFLICT (instance_id) DO UPDATE SET hostname = $2, pid = $3, \
                     watched_directory = $4, version = $5, started_at = now(), \
                     heartbeat_at = now(), stopped_at = NULL, messages_recorded = 0, \
                     messages_confirmed = 0, files_hashed = 0, bytes_hashed = 0, \
                     events_dropped = 0, errors = 0",
                &[
                    &instance_id,
                    &hostname(),
                    &i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                    &watched_directory,
                    &env!("CARGO_PKG_VERSION"),
                ],
            )?;
            self.registered = true;
        }
        let client = self.connected()?;
        client.execute(
            "UPDATE instances SET heartbeat_at = now(), messages_recorded = $2, \
                 messages_confirmed = $3, files_hashed = $4, bytes_hashed = $5, \
                 events_dropped = $6, errors = $7 \
             WHERE instance_id = $1",
            &[
                &instance_id,
                &counts.recorded,
                &counts.confirmed,
                &counts.hashed,
                &counts.bytes,
                &counts.dropped,
                &counts.errors,
            ],
        )?;
        let outbox = client.query_one(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) \
             FROM outbox WHERE instance_id = $1 AND set_aside_at IS NULL",
            &[&instance_id],
        )?;
        let gauges = &self.sources.outbox;
        gauges.depth.store(
            u64::try_from(outbox.get::<_, i64>(0)).unwrap_or(0),
            Ordering::Relaxed,
        );
        gauges
            .oldest_age_bits
            .store(outbox.get::<_, f64>(1).max(0.0).to_bits(), Ordering::Relaxed);
        Ok(())
    }
}

/// Why a heartbeat did not land: no connection (TLS and URL problems
/// included), or a statement that failed.
#[derive(Debug, thiserror::Error)]
enum BeatError {
    #[error(transparent)]
    Connect(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Query(#[from] postgres::Error),
}

/// The counts the row carries, as `bigint`s.
struct Counts {
    recorded: i64,
    confirmed: i64,
    hashed: i64,
    bytes: i64,
    dropped: i64,
    errors: i64,
}

impl Counts {
    fn read(sources: &Sources) -> Counts {
        let load = |counter: &AtomicU64| i64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let worker = &sources.worker;
        Counts {
            recorded: worker.recorded_by_type.iter().map(load).sum(),
            confirmed: load(&sources.publish.confirmed),
            hashed: load(&worker.files_hashed),
            bytes: load(&worker.bytes_hashed),
            dropped: load(&sources.watch.dropped_events),
            errors: load(&worker.file_errors)
                + load(&worker.registry_errors)
                + load(&sources.publish.failures)
                + load(&sources.publish.set_aside),
        }
    }
}

/// This machine's name (the container's, in a container); `unknown` if the
/// kernel will not say.
pub fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname
    // writes at most that many bytes.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "unknown".into();
    }
    let end = buffer.iter().position(|byte| *byte == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}
