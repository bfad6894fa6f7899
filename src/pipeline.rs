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
//! A worker that meets a file over `HUGE_FILE_BYTES` to hash hands its job to
//! one more worker, `worker-huge`, over an unbounded channel (it holds the
//! few huge files in flight); that worker answers it on `done`.
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

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use crate::config::{BrokerConfig, Config, DatabaseConfig, WatchMode};
use crate::job::{Dispatch, Done};
use crate::message::Origin;
use crate::observe::server::Listener;
use crate::observe::{heartbeat, Observer, Sources};
use crate::path_text;
use crate::publish::broker::BrokerSettings;
use crate::publish::rabbitmq::BrokerSink;
use crate::publish::stdout::StdoutSink;
use crate::publish::{PublishCounters, Publisher, PublisherExit, Sink};
use crate::registry::memory::MemoryRegistry;
use crate::registry::postgres::{
    InstanceLock, LockError, PostgresRegistry, PostgresSettings, DEFAULT_SCHEMA,
};
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
    run_observed(config, stop, None)
}

/// [`run`], serving the metrics and probes on `metrics` (bound by the
/// caller, so a bad `METRICS_ADDR` stops the process before anything starts).
pub fn run_observed(config: Config, stop: Receiver<()>, metrics: Option<Listener>) -> Result<(), RunError> {
    check_data_dir(&config.data_dir)?;
    let origin = Origin {
        instance_id: config.instance_id.clone(),
        watched_directory: config.watched_directory(),
    };
    let mut store = Store::open(&config, &origin)?;
    let sources = store.sources(&config);
    let sink = build_sink(&config, &sources.publish);
    log_start(&config);
    let heartbeat = config.database.as_ref().map(|database| heartbeat::Settings {
        url: database.url.clone(),
        schema: database
            .schema
            .clone()
            .unwrap_or_else(|| DEFAULT_SCHEMA.to_owned()),
        watched_directory: origin.watched_directory.clone(),
    });
    let observer =
        Observer::start(sources.clone(), metrics, heartbeat).map_err(|source| RunError::Thread {
            name: "metrics or heartbeat".into(),
            source,
        })?;
    let running = match Running::start(&config, &store, sink, &sources) {
        Ok(running) => running,
        Err(error) => {
            observer.stop();
            return Err(error);
        }
    };
    let fatal = running.wait(&stop, &mut store).err();
    running.stop();
    observer.stop(); // after the stages: the last heartbeat has the final counts
    drop(store); // releases the instance lock last
    fatal.map_or(Ok(()), Err)
}

/// Where observations are recorded: in memory, or in the shared database.
struct Store {
    /// What the workers and the publisher talk to.
    registry: Arc<dyn Registry>,
    /// With a database the registry is installed here once the instance lock
    /// is held; until then workers hold their changes and nothing is published.
    deferred: Arc<Deferred>,
    /// Without a database: the registry, kept to seed it with what exists.
    memory: Option<Arc<MemoryRegistry>>,
    database: Option<DatabaseLink>,
    /// Whether the registry answered last time (outages are logged once).
    health: Arc<Health>,
}

impl Store {
    fn open(config: &Config, origin: &Origin) -> Result<Store, RunError> {
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
        let database = config
            .database
            .as_ref()
            .map(|database| DatabaseLink::new(database, origin, health.clone()));
        let mut store = Store {
            registry,
            deferred,
            memory,
            database,
            health,
        };
        store.check()?;
        Ok(store)
    }

    /// The counters every stage bumps, made once per process (so they stay
    /// monotonic across reconnects and watcher restarts), and what the
    /// metrics and probes read besides.
    fn sources(&self, config: &Config) -> Sources {
        Sources {
            instance_id: config.instance_id.clone(),
            watch: Arc::new(WatchCounters::with_test_stall_file(
                config.test_stall_file.clone(),
            )),
            worker: Arc::default(),
            publish: Arc::default(),
            health: self.health.clone(),
            deferred: self.deferred.clone(),
            database: config.database.is_some(),
            broker: config.broker.is_some(),
            outbox: Arc::default(),
        }
    }

    /// Connects the database if it is not yet, and checks that the instance
    /// lock is still ours. Fails only for what waiting will not fix.
    fn check(&mut self) -> Result<(), RunError> {
        match &mut self.database {
            Some(link) => link.attempt(&self.deferred),
            None => Ok(()),
        }
    }

    /// Without a database: learn what exists, so changes to it read as
    /// `modified`/`deleted`, without announcing or hashing it.
    fn seed_memory(&self, config: &Config) {
        let Some(memory) = self.memory.as_ref().filter(|_| !config.scan_existing) else {
            return;
        };
        let mut files = 0u64;
        scan::for_each_file(&config.data_dir, &config.filter, |path| {
            if let (Some(text), Ok(Some(stat))) = (path_text::admit(path), Stat::of(path)) {
                memory.seed(text, stat);
                files += 1;
            }
        });
        log::info!("{files} existing files noted (not announced; --scan-existing announces them)");
    }
}

fn build_sink(config: &Config, counters: &Arc<PublishCounters>) -> Box<dyn Sink> {
    match &config.broker {
        Some(broker) => Box::new(BrokerSink::new(broker_settings(config, broker)).counting(counters.clone())),
        None => Box::new(StdoutSink::new()),
    }
}

/// How the daemon (and `file-watcher replay`) reach RabbitMQ.
pub fn broker_settings(config: &Config, broker: &BrokerConfig) -> BrokerSettings {
    BrokerSettings {
        url: broker.url.clone(),
        exchange: broker.exchange.clone(),
        dead_letter_exchange: broker.dead_letter_exchange.clone(),
        connection_name: format!("file_watcher_{}", config.instance_id),
        connect_timeout: BROKER_CONNECT_TIMEOUT,
        confirm_timeout: BROKER_CONFIRM_TIMEOUT,
        heartbeat: BROKER_HEARTBEAT,
        tls: broker.tls.clone(),
    }
}

fn log_start(config: &Config) {
    let broker = config
        .broker
        .as_ref()
        .map_or("none (messages go to stdout)".to_owned(), |broker| {
            format!("{} exchange {}", broker.url, broker.exchange)
        });
    let database = config
        .database
        .as_ref()
        .map_or("none (registry in memory)".to_owned(), |database| {
            let schema = database.schema.as_ref();
            let schema = schema
                .map(|schema| format!(" schema {schema}"))
                .unwrap_or_default();
            format!("{}{schema}", database.url)
        });
    log::info!(
        "instance {} watching {}; broker: {broker}; database: {database}",
        config.instance_id,
        config.watched_directory(),
    );
}

/// The running stages: what `stop` needs to wind them down in pipeline order.
struct Running {
    /// The scanner and the settle stage.
    threads: Threads,
    workers: Threads,
    publisher: JoinHandle<()>,
    publisher_exit: Receiver<PublisherExit>,
    /// Dropped to stop the settle stage.
    settle_stop: Sender<()>,
    /// Dropped once the workers are joined: the publisher drains and ends.
    wake_publisher: Sender<()>,
    /// Raised at shutdown: workers hand new jobs back.
    stopping: Arc<AtomicBool>,
    watch_counters: Arc<WatchCounters>,
    worker_counters: Arc<WorkerCounters>,
}

impl Running {
    /// Starts every stage, upstream last but watching first: anything that
    /// changes from the moment the watch exists raises an event.
    fn start(
        config: &Config,
        store: &Store,
        sink: Box<dyn Sink>,
        sources: &Sources,
    ) -> Result<Running, RunError> {
        let watch_counters = sources.watch.clone();
        let (raw_sender, raw_receiver) = bounded(CHANNEL_CAPACITY);
        let (watcher, watch_mode) =
            start_with_fallback(&config.data_dir, config.watch_mode, &config.filter, |poll| {
                Callback::new(raw_sender.clone(), watch_counters.clone(), poll)
            })?;
        watch_counters
            .polling
            .store(matches!(watch_mode, WatchMode::Poll(_)), Ordering::Relaxed);
        store.seed_memory(config);

        let mut threads = Threads::default();
        let (scan_sender, scan_receiver) = unbounded();
        let (discovered_sender, discovered_receiver) = bounded(1024);
        let (root, filter) = (config.data_dir.clone(), config.filter.clone());
        threads.spawn("scanner", move || {
            scan::run(root, filter, scan_receiver, discovered_sender)
        })?;

        let (job_sender, job_receiver) = bounded(config.workers * 2);
        let (done_sender, done_receiver) = unbounded();
        let (wake_sender, wake_receiver) = bounded(1);
        let guard = RootGuard::new(config.data_dir.clone(), config.sentinel.clone());
        // Unbounded: it holds at most the huge files in flight, a few.
        let (huge_lane, huge_jobs) = unbounded();
        let template = Worker {
            registry: store.registry.clone(),
            counters: sources.worker.clone(),
            wake_publisher: wake_sender.clone(),
            stopping: Arc::new(AtomicBool::new(false)),
            health: store.health.clone(),
            guard: guard.clone(),
            watch_counters: watch_counters.clone(),
            huge_file_bytes: config.huge_file_bytes,
            huge_lane: Some(huge_lane),
            test_open_gate: config.test_open_gate.clone(),
        };
        let workers = spawn_workers(config.workers, &template, &job_receiver, &huge_jobs, &done_sender)?;
        drop((job_receiver, huge_jobs, done_sender));

        let (settle_stop, settle_stop_receiver) = bounded::<()>(0);
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
            rescan_interval: config.rescan_interval,
        };
        let channels = SettleChannels {
            raw: raw_receiver,
            discovered: discovered_receiver,
            done: done_receiver,
            stop: settle_stop_receiver,
            jobs: job_sender,
            scan_requests: scan_sender,
        };
        let settle = Settle::new(
            options,
            channels,
            watch_counters.clone(),
            watcher,
            raw_sender,
            guard,
        );
        threads.spawn("settle", move || settle.run())?;

        let (publisher, publisher_exit) = spawn_publisher(store, sink, wake_receiver, &sources.publish)?;
        log_ready(config, watch_mode);
        Ok(Running {
            threads,
            workers,
            publisher,
            publisher_exit,
            settle_stop,
            wake_publisher: wake_sender,
            stopping: template.stopping,
            watch_counters,
            worker_counters: template.counters,
        })
    }

    /// Until a stop request, the end of the publisher (stdout closed), or a
    /// database problem that waiting will not fix.
    fn wait(&self, stop: &Receiver<()>, store: &mut Store) -> Result<(), RunError> {
        loop {
            select! {
                recv(stop) -> _ => return Ok(()),
                recv(self.publisher_exit) -> exit => {
                    if exit == Ok(PublisherExit::SinkClosed) {
                        log::info!("stdout was closed: stopping");
                    }
                    return Ok(());
                }
                default(DATABASE_CHECK_INTERVAL) => store.check()?,
            }
        }
    }

    /// Orderly shutdown, in pipeline order (the settle stage drops the watcher first).
    fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.settle_stop);
        self.threads.join();
        self.workers.join();
        drop(self.wake_publisher);
        let _ = self.publisher.join();
        log::info!(
            "stopped: {} messages recorded, {} files hashed, {} unreadable, {} events dropped",
            self.worker_counters.messages_recorded.load(Ordering::Relaxed),
            self.worker_counters.files_hashed.load(Ordering::Relaxed),
            self.worker_counters.file_errors.load(Ordering::Relaxed),
            self.watch_counters.dropped_events.load(Ordering::Relaxed),
        );
    }
}

/// `count` ordinary workers, then the huge-file lane's own worker, which
/// hashes the files the others hand it, one at a time. It is started last
/// and so joined last: it ends once every ordinary worker (its senders) has.
fn spawn_workers(
    count: usize,
    template: &Worker,
    jobs: &Receiver<Dispatch>,
    huge_jobs: &Receiver<Dispatch>,
    done: &Sender<Done>,
) -> Result<Threads, RunError> {
    let mut workers = Threads::default();
    let worker = |huge_lane: Option<Sender<Dispatch>>| Worker {
        registry: template.registry.clone(),
        counters: template.counters.clone(),
        wake_publisher: template.wake_publisher.clone(),
        stopping: template.stopping.clone(),
        health: template.health.clone(),
        guard: template.guard.clone(),
        watch_counters: template.watch_counters.clone(),
        huge_file_bytes: template.huge_file_bytes,
        huge_lane,
        test_open_gate: template.test_open_gate.clone(),
    };
    for index in 0..count {
        let worker = worker(template.huge_lane.clone());
        let (jobs, done) = (jobs.clone(), done.clone());
        workers.spawn(&format!("worker-{index}"), move || worker.run(jobs, done))?;
    }
    let lane = worker(None);
    let (jobs, done) = (huge_jobs.clone(), done.clone());
    workers.spawn("worker-huge", move || lane.run(jobs, done))?;
    Ok(workers)
}

/// The publisher thread; its exit is sent on the returned channel, so the
/// main loop notices a sink that closed for good.
fn spawn_publisher(
    store: &Store,
    sink: Box<dyn Sink>,
    wake: Receiver<()>,
    counters: &Arc<PublishCounters>,
) -> Result<(JoinHandle<()>, Receiver<PublisherExit>), RunError> {
    let (exit_sender, exit_receiver) = bounded(1);
    let publisher = Publisher {
        registry: store.registry.clone(),
        sink,
        health: store.health.clone(),
        counters: counters.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let exit = publisher.run(wake, FINAL_DRAIN);
            let _ = exit_sender.send(exit);
        })
        .map_err(|source| RunError::Thread {
            name: "publisher".into(),
            source,
        })?;
    Ok((handle, exit_receiver))
}

fn log_ready(config: &Config, watch_mode: WatchMode) {
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
