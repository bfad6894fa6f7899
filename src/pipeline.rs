//! Wiring: builds the registry and sink, starts every thread, stops them in order.
//!
//! Threads and channels (→ is a channel, bounded unless noted):
//!
//! ```text
//! notify thread ──raw events (try_send)──▶ settle ──jobs (try_send)──▶ worker × N
//!                                           ▲  │                         │
//!                            discoveries ───┘  └─scan requests─▶ scanner │
//!                                           ◀──────── done ──────────────┘
//!          worker ──record──▶ registry (rows + outbox) ◀── publisher ──▶ stdout / RabbitMQ
//! ```
//!
//! Shutdown goes in pipeline order: the settle stage is told to stop and
//! drops the notify watcher (it owns it, to restart it when the root comes
//! back), workers finish the job in hand (new ones are handed
//! back) and are joined, then the publisher drains the outbox for a bounded
//! time. Whatever was not published stays in the outbox (with a database) and
//! goes out at the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, unbounded, Receiver};

use crate::config::{Config, DatabaseConfig, WatchMode};
use crate::message::Origin;
use crate::publish::broker::BrokerSettings;
use crate::publish::rabbitmq::BrokerSink;
use crate::publish::stdout::StdoutSink;
use crate::publish::{Publisher, PublisherExit, Sink};
use crate::redact::redact_url;
use crate::registry::memory::MemoryRegistry;
use crate::registry::postgres::{InstanceLock, LockError, PostgresRegistry, PostgresSettings};
use crate::registry::{Deferred, Health, Registry, RegistryError, Stat};
use crate::settle::{Settle, SettleChannels, SettleOptions};
use crate::watch::guard::RootGuard;
use crate::watch::scan;
use crate::watch::{start_with_fallback, Callback, WatchCounters, WatchError, CHANNEL_CAPACITY};
use crate::work::{Worker, WorkerCounters};

/// Pending changes the settle stage holds before falling back to a rescan.
const MAX_PENDING: usize = 200_000;
/// How long the publisher may keep draining the outbox after a stop request.
const FINAL_DRAIN: Duration = Duration::from_secs(5);
/// How often the database link retries a connection and checks the instance lock.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DATABASE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds one connect attempt (TCP, AMQP handshake, declarations).
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds waiting for the confirms of one batch; a healthy broker takes milliseconds.
const BROKER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// A frozen broker is noticed after about two heartbeats.
const BROKER_HEARTBEAT: Duration = Duration::from_secs(10);

/// Problems that stop the process (as opposed to problems with one file,
/// which are logged and counted where they happen).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot watch {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    InstanceLock(LockError),
    #[error("cannot start thread {name}: {source}")]
    Thread { name: String, source: std::io::Error },
}

/// Runs the daemon until `stop` receives a message or disconnects, or the
/// sink closes for good (stdout's reader went away).
pub fn run(config: Config, stop: Receiver<()>) -> Result<(), RunError> {
    check_data_dir(&config.data_dir)?;
    let origin = Origin {
        instance_id: config.instance_id.clone(),
        watched_directory: config.watched_directory(),
    };

    // With a database the registry is installed once the instance lock is
    // held; until then workers hold their changes and nothing is published.
    let deferred = Arc::new(Deferred::default());
    let memory = config
        .database
        .is_none()
        .then(|| Arc::new(MemoryRegistry::new(origin.clone())));
    let registry: Arc<dyn Registry> = match &memory {
        Some(memory) => memory.clone(),
        None => deferred.clone(),
    };
    let health = Arc::new(Health::default());
    let mut database = config
        .database
        .as_ref()
        .map(|database| DatabaseLink::new(database, &origin, health.clone()));
    if let Some(link) = &mut database {
        link.attempt(&deferred)?;
    }
    let sink: Box<dyn Sink> = match &config.broker {
        Some(broker) => Box::new(BrokerSink::new(BrokerSettings {
            url: broker.url.clone(),
            exchange: broker.exchange.clone(),
            dead_letter_exchange: broker.dead_letter_exchange.clone(),
            connection_name: format!("file_watcher_{}", config.instance_id),
            connect_timeout: BROKER_CONNECT_TIMEOUT,
            confirm_timeout: BROKER_CONFIRM_TIMEOUT,
            heartbeat: BROKER_HEARTBEAT,
        })),
        None => Box::new(StdoutSink::new()),
    };
    log::info!(
        "instance {} watching {}; broker: {}; database: {}",
        config.instance_id,
        config.watched_directory(),
        config
            .broker
            .as_ref()
            .map_or("none (messages go to stdout)".to_owned(), |broker| format!(
                "{} exchange {}",
                redact_url(&broker.url),
                broker.exchange
            )),
        config
            .database
            .as_ref()
            .map_or("none (registry in memory)".to_owned(), |database| format!(
                "{}{}",
                redact_url(&database.url),
                database
                    .schema
                    .as_ref()
                    .map(|schema| format!(" schema {schema}"))
                    .unwrap_or_default()
            )),
    );

    // Watch first, then look: anything that changes from here on raises an event.
    let counters = Arc::new(WatchCounters::with_test_stall_file(
        config.test_stall_file.clone(),
    ));
    let (raw_sender, raw_receiver) = bounded(CHANNEL_CAPACITY);
    let (watcher, watch_mode) =
        start_with_fallback(&config.data_dir, config.watch_mode, &config.filter, |poll| {
            Callback::new(raw_sender.clone(), counters.clone(), poll)
        })?;

    if let Some(memory) = memory.as_ref().filter(|_| !config.scan_existing) {
        // Without a database: learn what exists, so changes to it read as
        // `modified`/`deleted`, without announcing or hashing it.
        let mut files = 0u64;
        scan::for_each_file(&config.data_dir, &config.filter, |path| {
            if let (Some(text), Ok(Some(stat))) = (path.to_str(), Stat::of(path)) {
                memory.seed(text.to_owned(), stat);
                files += 1;
            }
        });
        log::info!("{files} existing files noted (not announced; --scan-existing announces them)");
    }

    let mut threads = Threads::default();
    let (scan_sender, scan_receiver) = unbounded();
    let (discovered_sender, discovered_receiver) = bounded(1024);
    {
        let root = config.data_dir.clone();
        let filter = config.filter.clone();
        threads.spawn("scanner", move || {
            scan::run(root, filter, scan_receiver, discovered_sender)
        })?;
    }

    let (job_sender, job_receiver) = bounded(config.workers * 2);
    let (done_sender, done_receiver) = unbounded();
    let (wake_sender, wake_receiver) = bounded(1);
    let stopping = Arc::new(AtomicBool::new(false));
    let worker_counters = Arc::new(WorkerCounters::default());

    let guard = RootGuard::new(config.data_dir.clone(), config.sentinel.clone());
    let mut workers = Threads::default();
    for index in 0..config.workers {
        let worker = Worker {
            registry: registry.clone(),
            counters: worker_counters.clone(),
            wake_publisher: wake_sender.clone(),
            stopping: stopping.clone(),
            health: health.clone(),
            guard: guard.clone(),
        };
        let jobs = job_receiver.clone();
        let done = done_sender.clone();
        workers.spawn(&format!("worker-{index}"), move || worker.run(jobs, done))?;
    }
    drop((job_receiver, done_sender));

    let (settle_stop_sender, settle_stop_receiver) = bounded::<()>(0);
    {
        let options = SettleOptions {
            root: config.data_dir.clone(),
            filter: config.filter.clone(),
            settle: config.settle,
            mode: watch_mode,
            max_pending: MAX_PENDING,
            // With a database this is the catch-up after downtime: new files are
            // created, changed ones modified, and the sweep finds deleted ones.
            initial_scan: config.scan_existing || config.database.is_some(),
            sentinel: config.sentinel.clone(),
        };
        let channels = SettleChannels {
            raw: raw_receiver,
            discovered: discovered_receiver,
            done: done_receiver,
            stop: settle_stop_receiver,
            jobs: job_sender,
            scan_requests: scan_sender,
        };
        let settle = Settle::new(options, channels, counters.clone(), watcher, raw_sender, guard);
        threads.spawn("settle", move || settle.run())?;
    }

    let (publisher_exit_sender, publisher_exit_receiver) = bounded(1);
    let publisher = Publisher {
        registry: registry.clone(),
        sink,
        health: health.clone(),
    };
    let publisher_thread = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let exit = publisher.run(wake_receiver, FINAL_DRAIN);
            let _ = publisher_exit_sender.send(exit);
        })
        .map_err(|source| RunError::Thread {
            name: "publisher".into(),
            source,
        })?;

    let mode = match watch_mode {
        WatchMode::Inotify => "inotify".to_owned(),
        WatchMode::Poll(interval) => format!("polling every {} ms", interval.as_millis()),
    };
    log::info!(
        "ready: watching {} ({mode}, {} workers, settle {} ms)",
        config.data_dir.display(),
        config.workers,
        config.settle.as_millis()
    );

    let mut fatal = None;
    loop {
        select! {
            recv(stop) -> _ => break,
            recv(publisher_exit_receiver) -> exit => {
                if exit == Ok(PublisherExit::SinkClosed) {
                    log::info!("stdout was closed: stopping");
                }
                break;
            }
            default(DATABASE_CHECK_INTERVAL) => {
                if let Some(link) = &mut database {
                    if let Err(error) = link.attempt(&deferred) {
                        fatal = Some(error);
                        break;
                    }
                }
            }
        }
    }

    // Orderly shutdown, in pipeline order (the settle stage drops the watcher first).
    stopping.store(true, Ordering::Release);
    drop(settle_stop_sender);
    threads.join();
    workers.join();
    drop(wake_sender);
    let _ = publisher_thread.join();
    log::info!(
        "stopped: {} messages recorded, {} files hashed, {} unreadable, {} events dropped",
        worker_counters.messages_recorded.load(Ordering::Relaxed),
        worker_counters.files_hashed.load(Ordering::Relaxed),
        worker_counters.file_errors.load(Ordering::Relaxed),
        counters.dropped_events.load(Ordering::Relaxed),
    );
    drop(database); // releases the instance lock last
    fatal.map_or(Ok(()), Err)
}

/// The connection to the shared database: the instance lock and the registry.
struct DatabaseLink {
    settings: PostgresSettings,
    origin: Origin,
    lock: Option<InstanceLock>,
    health: Arc<Health>,
}

impl DatabaseLink {
    fn new(config: &DatabaseConfig, origin: &Origin, health: Arc<Health>) -> DatabaseLink {
        DatabaseLink {
            settings: PostgresSettings {
                url: config.url.clone(),
                schema: config.schema.clone(),
                pool_size: config.pool_size,
                connect_timeout: DATABASE_CONNECT_TIMEOUT,
            },
            origin: origin.clone(),
            lock: None,
            health,
        }
    }

    /// Takes the instance lock, then installs the registry; afterwards checks
    /// that the lock is still ours (a database restart drops it). Fails only
    /// when another live process holds our instance id, or the database
    /// refuses us for a reason waiting will not fix.
    fn attempt(&mut self, deferred: &Deferred) -> Result<(), RunError> {
        let instance_id = &self.origin.instance_id;
        let result = match &mut self.lock {
            None => InstanceLock::acquire(&self.settings, instance_id).map(|lock| self.lock = Some(lock)),
            Some(lock) => lock.verify(),
        };
        match result {
            Ok(()) => {}
            Err(LockError::Unavailable { detail, .. }) => {
                self.health.down(&detail);
                return Ok(());
            }
            Err(error) => return Err(RunError::InstanceLock(error)),
        }
        if !deferred.is_set() {
            match PostgresRegistry::connect(&self.settings, self.origin.clone()) {
                Ok(registry) => deferred.set(Box::new(registry)),
                Err(RegistryError::Unavailable(detail)) => {
                    self.health.down(&detail);
                    return Ok(());
                }
                Err(error) => return Err(RunError::Registry(error)),
            }
        }
        self.health.up();
        Ok(())
    }
}

fn check_data_dir(path: &Path) -> Result<(), RunError> {
    let error = |reason: String| RunError::DataDir {
        path: path.to_owned(),
        reason,
    };
    let metadata = std::fs::metadata(path).map_err(|source| error(source.to_string()))?;
    if !metadata.is_dir() {
        return Err(error("not a directory".into()));
    }
    std::fs::read_dir(path).map_err(|source| error(format!("cannot list it: {source}")))?;
    Ok(())
}

/// Named threads that are joined, in the order they were started.
#[derive(Default)]
struct Threads {
    handles: Vec<JoinHandle<()>>,
}

impl Threads {
    fn spawn(&mut self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(body)
            .map_err(|source| RunError::Thread {
                name: name.to_owned(),
                source,
            })?;
        self.handles.push(handle);
        Ok(())
    }

    fn join(self) {
        for handle in self.handles {
            let name = handle.thread().name().unwrap_or("unnamed").to_owned();
            if handle.join().is_err() {
                log::error!("thread {name} panicked");
            }
        }
    }
}
