//! Faults end to end: the real binary, the real PostgreSQL and RabbitMQ, and
//! something going wrong in between. Each test makes files before, during
//! and after its fault, then checks that nothing is missing:
//!
//! - every file's final state is in the registry (`files` of the test's
//!   schema: present rows = the tree on disk, by path and SHA-256), every
//!   row's message is published and the outbox is empty;
//! - a durable queue bound to the test's exchange with `file.#` received, for
//!   every path, a last event that matches the disk (deleted or renamed away
//!   for paths that are gone), carrying the `message_id` the row holds;
//! - a message delivered more than once is the same message (same body), and
//!   no change went out twice under two ids.
//!
//! Most outages are private to a test: the daemon talks to PostgreSQL and
//! RabbitMQ through a [`FaultProxy`], which cuts, refuses or freezes its
//! connections while every other test goes on using the real servers, so
//! those tests run in parallel. Tests that stop, kill or restart the shared
//! servers themselves are named `serial_…` and run one at a time
//! (`scripts/test.sh`); a [`ServicesGuard`] brings both servers back however
//! such a test ends.
//!
//! The queue is durable ([`TestBroker::durable`], not the exclusive queue the
//! other tests consume) because several faults close every connection, the
//! test's own included, or restart the broker; it is read only once the
//! registry says everything was published, so nothing published can still be
//! on its way.
//!
//! Processes are `Daemon`s pointed at the scenario's tree
//! (`DaemonBuilder::watching`), so one tree outlives the processes that are
//! killed and restarted on it.
//!
//! This module holds the [`Scenario`] and its checks; the tests are in one
//! module per thing that goes wrong: [`broker`], [`database`], [`restart`]
//! (the process itself), [`overflow`] (the kernel's event queue),
//! [`watch_limit`] (inotify's), [`share`] (the mount under the tree) and
//! [`chaos`] (all of it at once).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use file_watcher::config::{DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS};
use file_watcher::filter::Filter;
use lapin::uri::AMQPUri;
use serde_json::Value;
use uuid::Uuid;

use crate::support::broker::rabbitmq_url;
use crate::support::database::database_url;
use crate::support::{
    self, sha256_hex, Daemon, DaemonBuilder, Delivered, FaultProxy, FileRow, TestBroker, TestDatabase,
    DEADLINE, POLL,
};

mod broker;
mod database;
mod restart;
mod overflow;
mod watch_limit;
mod share;
mod chaos;

/// How long a scenario may take to converge after its fault cleared:
/// generous, as a reconnect backoff can reach several seconds; a typical run
/// converges within one or two.
const CONVERGE: Duration = Duration::from_secs(60);

/// Short, so tests are quick, yet long enough that a file written in one go
/// settles once.
const SETTLE_MS: &str = "150";

/// Everything one test's daemons share; the daemons themselves are the
/// test's locals, declared after it, so they are killed before it goes.
struct Scenario {
    /// Holds `tree` and `outside`; removed last.
    _root: tempfile::TempDir,
    /// The watched directory (canonical), shared by every daemon of the test.
    tree: PathBuf,
    /// Beside the tree, on the same filesystem: stall files, staging mounts.
    outside: PathBuf,
    /// Every daemon of the scenario runs as this instance.
    instance_id: String,
    /// The registry schema the daemons create; read by the checks.
    database: TestDatabase,
    /// The exchange the daemons publish to, and the durable queue the checks read.
    broker: TestBroker,
    /// Between the daemons and RabbitMQ, when the test breaks that link.
    broker_proxy: Option<FaultProxy>,
    /// Between the daemons and PostgreSQL, when the test breaks that link.
    database_proxy: Option<FaultProxy>,
    /// `?heartbeat=N` on the daemon's broker URL.
    heartbeat: Option<u16>,
    /// The daemon's default filter: which files on disk count.
    filter: Filter,
}

/// What a scenario is built with (`Scenario::with()…build()`).
#[derive(Default)]
struct ScenarioOptions {
    broker_proxy: bool,
    database_proxy: bool,
    heartbeat: Option<u16>,
}

impl ScenarioOptions {
    fn broker_proxy(mut self) -> Self {
        self.broker_proxy = true;
        self
    }

    fn database_proxy(mut self) -> Self {
        self.database_proxy = true;
        self
    }

    fn heartbeat(mut self, seconds: u16) -> Self {
        self.heartbeat = Some(seconds);
        self
    }

    fn build(self) -> Scenario {
        let root = tempfile::Builder::new()
            .prefix("file-watcher-faults-")
            .tempdir()
            .expect("create the scenario's directory");
        let canonical = root.path().canonicalize().expect("canonical temp dir");
        let tree = canonical.join("watched");
        let outside = canonical.join("outside");
        fs::create_dir(&tree).expect("create the tree");
        fs::create_dir(&outside).expect("create the outside directory");
        Scenario {
            _root: root,
            tree,
            outside,
            instance_id: format!("faults-{}", &Uuid::new_v4().simple().to_string()[..8]),
            database: TestDatabase::new(),
            broker: TestBroker::durable(),
            broker_proxy: self
                .broker_proxy
                .then(|| FaultProxy::start(support::broker::address())),
            database_proxy: self
                .database_proxy
                .then(|| FaultProxy::start(support::database::address())),
            heartbeat: self.heartbeat,
            filter: Filter::new(DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE).expect("the default filter"),
        }
    }
}

impl Scenario {
    fn new() -> Scenario {
        ScenarioOptions::default().build()
    }

    fn with() -> ScenarioOptions {
        ScenarioOptions::default()
    }

    fn broker_proxy(&self) -> &FaultProxy {
        self.broker_proxy.as_ref().expect("made with a broker proxy")
    }

    fn database_proxy(&self) -> &FaultProxy {
        self.database_proxy.as_ref().expect("made with a database proxy")
    }

    /// The daemon's broker URL: through the proxy if there is one.
    fn broker_url(&self) -> String {
        let url = self
            .broker_proxy
            .as_ref()
            .map_or_else(rabbitmq_url, support::broker::url_through);
        let mut uri: AMQPUri = url.parse().expect("the broker URL parses");
        if let Some(heartbeat) = self.heartbeat {
            uri.query.heartbeat = Some(heartbeat);
        }
        uri.to_string()
    }

    /// The daemon's database URL: through the proxy if there is one.
    fn database_url(&self) -> String {
        match &self.database_proxy {
            Some(proxy) => support::database::url_through(proxy),
            None => database_url(),
        }
    }

    /// A daemon for this scenario's tree, schema, exchange and instance id.
    fn daemon(&self) -> DaemonBuilder {
        Daemon::builder()
            .watching(&self.tree)
            .env("SETTLE_MS", SETTLE_MS)
            .env("INSTANCE_ID", &self.instance_id)
            .env("DATABASE_URL", self.database_url())
            .env("DB_SCHEMA", self.database.schema())
            .env("RABBITMQ_URL", self.broker_url())
            .env("EXCHANGE", self.broker.exchange())
    }

    /// Starts a daemon on this scenario, waiting out a lock that a killed
    /// predecessor's session may still hold for a moment: the server ends
    /// that session only once it notices the client is gone.
    #[track_caller]
    fn restart(&self, builder: impl Fn() -> DaemonBuilder) -> Daemon {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut daemon = builder().spawn();
            match wait_ready_or_exit(&mut daemon, deadline) {
                Ok(()) => return daemon,
                Err(stderr) if stderr.contains("is in use") && Instant::now() < deadline => {
                    std::thread::sleep(POLL);
                }
                Err(stderr) => panic!("the restarted daemon did not become ready:\n{stderr}"),
            }
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.tree.join(relative)
    }

    fn path_str(&self, relative: &str) -> String {
        self.path(relative).to_str().expect("UTF-8 paths").to_owned()
    }

    /// Writes `relative` (parents included) with content unique to it.
    fn write(&self, relative: &str, version: &str) {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parents");
        }
        fs::write(&path, format!("{relative} {version} {}", self.instance_id)).expect("write a file");
    }

    /// Writes `count` files `<phase>/<n>.flac`; returns their relative names.
    fn create(&self, phase: &str, count: usize) -> Vec<String> {
        (0..count)
            .map(|number| {
                let relative = format!("{phase}/{number:03}.flac");
                self.write(&relative, "v1");
                relative
            })
            .collect()
    }

    fn remove(&self, relative: &str) {
        fs::remove_file(self.path(relative)).expect("remove a file");
    }

    /// The tree as consumers should know it: announced files and their SHA-256.
    fn disk(&self) -> BTreeMap<String, String> {
        let mut files = BTreeMap::new();
        for entry in walkdir::WalkDir::new(&self.tree)
            .into_iter()
            .filter_map(Result::ok)
        {
            if !entry.file_type().is_file() {
                continue;
            }
            let relative = entry.path().strip_prefix(&self.tree).expect("below the tree");
            if !self.filter.announces(relative) {
                continue;
            }
            let Ok(content) = fs::read(entry.path()) else {
                continue; // removed while we walked: not there
            };
            let path = entry.path().to_str().expect("UTF-8 paths").to_owned();
            files.insert(path, sha256_hex(&content));
        }
        files
    }

    /// Rows of this scenario's tree (none while the database is away).
    fn rows(&self) -> Vec<FileRow> {
        let prefix = format!("{}/", self.tree.display());
        self.database
            .try_rows()
            .unwrap_or_default()
            .into_iter()
            .filter(|row| row.file_path.starts_with(&prefix))
            .collect()
    }

    /// Messages of this scenario's tree recorded and not yet confirmed
    /// (none while the database is away).
    fn outbox_len(&self) -> i64 {
        let pattern = format!("{}/%", self.tree.display());
        self.database
            .try_query("SELECT count(*) FROM outbox WHERE file_path LIKE $1", &[&pattern])
            .map_or(0, |records| records[0].get(0))
    }

    /// Waits until the registry holds the current disk state of `relatives`
    /// (a row with the file's content, or a tombstone for a missing file)
    /// with nothing of it published yet: what a broker outage looks like.
    #[track_caller]
    fn wait_held(&self, relatives: &[String]) {
        let disk = self.disk();
        self.database.wait_until(
            "changes made during the outage are recorded and held in the outbox",
            CONVERGE,
            |_| {
                let rows: HashMap<String, FileRow> = self
                    .rows()
                    .into_iter()
                    .map(|row| (row.file_path.clone(), row))
                    .collect();
                let all_held = relatives.iter().all(|relative| {
                    let path = self.path_str(relative);
                    let Some(row) = rows.get(&path) else {
                        return false;
                    };
                    let recorded = match disk.get(&path) {
                        Some(sha256) => row.state == "present" && row.sha256 == *sha256,
                        None => row.state == "deleted",
                    };
                    recorded && row.published_at.is_none()
                });
                (all_held && self.outbox_len() >= relatives.len() as i64).then_some(())
            },
        );
    }

    /// The end-of-test check described in the module docs; returns every
    /// delivery so far, in order.
    #[track_caller]
    fn assert_converged(&self) -> Vec<Delivered> {
        let disk = self.disk();
        let rows = self.database.wait_until(
            "the registry matches the tree and everything is published",
            CONVERGE,
            |_| {
                let rows = self.rows();
                let present: BTreeMap<String, String> = rows
                    .iter()
                    .filter(|row| row.state == "present")
                    .map(|row| (row.file_path.clone(), row.sha256.clone()))
                    .collect();
                let published = rows.iter().all(|row| row.published_at.is_some());
                (present == disk && published && self.outbox_len() == 0).then_some(rows)
            },
        );
        let deliveries = self.broker.deliveries();
        let problems = compare(&disk, &rows, &deliveries);
        assert!(
            problems.is_empty(),
            "{} problems:\n{}\n{} deliveries:\n{}",
            problems.len(),
            problems.join("\n"),
            deliveries.len(),
            describe(&deliveries)
        );
        deliveries
    }
}

/// Everything that disagrees between the disk, the registry and the queue.
fn compare(disk: &BTreeMap<String, String>, rows: &[FileRow], deliveries: &[Delivered]) -> Vec<String> {
    let mut problems = Vec::new();
    // Per path, the last message that concerns it, and what it says.
    let mut last: BTreeMap<String, (&Delivered, Option<String>)> = BTreeMap::new();
    let mut bodies: HashMap<&str, &Value> = HashMap::new();
    let mut changes: HashMap<(String, String, String, String), &str> = HashMap::new();
    for received in deliveries {
        let body = &received.body;
        let id = received.message_id();
        let property_id = Delivered::text(received.properties.message_id()).unwrap_or_default();
        if property_id != id {
            problems.push(format!(
                "message {id}: the message_id property says {property_id}"
            ));
        }
        match bodies.insert(id, body) {
            Some(earlier) if earlier != body => {
                problems.push(format!("message {id} was redelivered with another body"))
            }
            Some(_) => {}
            None => {
                let key = (
                    text(body, "correlation_id"),
                    text(body, "event_type"),
                    text(body, "file_path"),
                    text(body, "old_path"),
                );
                if let Some(other) = changes.insert(key.clone(), id) {
                    problems.push(format!(
                        "one change went out under two message ids, {other} and {id}: {key:?}"
                    ));
                }
            }
        }
        let path = text(body, "file_path");
        match text(body, "event_type").as_str() {
            "deleted" => {
                last.insert(path, (received, None));
            }
            "renamed" | "moved" => {
                last.insert(text(body, "old_path"), (received, None));
                last.insert(path, (received, Some(text(body, "sha256_hash"))));
            }
            _ => {
                last.insert(path, (received, Some(text(body, "sha256_hash"))));
            }
        }
    }
    for (path, sha256) in disk {
        match last.get(path) {
            Some((_, Some(announced))) if announced == sha256 => {}
            Some((received, _)) => problems.push(format!(
                "{path}: the last message ({} {}) does not describe the file on disk",
                received.event_type(),
                received.message_id()
            )),
            None => problems.push(format!("{path}: never announced")),
        }
    }
    for (path, (received, fate)) in &last {
        if fate.is_some() && !disk.contains_key(path) {
            problems.push(format!(
                "{path}: gone from disk, but the last message is {} {}",
                received.event_type(),
                received.message_id()
            ));
        }
    }
    for row in rows {
        let id = row.message_id.to_string();
        match last.get(&row.file_path) {
            Some((received, _)) if received.message_id() == id => {}
            Some((received, _)) => problems.push(format!(
                "{}: the row holds message {id}, the last one delivered is {}",
                row.file_path,
                received.message_id()
            )),
            None => problems.push(format!("{}: row message {id} was never delivered", row.file_path)),
        }
    }
    problems
}

fn text(body: &Value, field: &str) -> String {
    body[field].as_str().unwrap_or_default().to_owned()
}

fn describe(deliveries: &[Delivered]) -> String {
    deliveries
        .iter()
        .map(|received| {
            format!(
                "{} {} {} {}",
                received.message_id(),
                received.event_type(),
                text(&received.body, "file_path"),
                text(&received.body, "old_path")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Messages whose `file_path` is `path`.
fn events_for<'a>(deliveries: &'a [Delivered], path: &str) -> Vec<&'a str> {
    deliveries
        .iter()
        .filter(|received| text(&received.body, "file_path") == path)
        .map(Delivered::event_type)
        .collect()
}

/// Waits for `ready:`; `Err(stderr)` if the daemon exits first.
fn wait_ready_or_exit(daemon: &mut Daemon, deadline: Instant) -> Result<(), String> {
    loop {
        if daemon.stderr_lines().iter().any(|line| line.contains(": ready:")) {
            return Ok(());
        }
        if let Some(status) = daemon.wait_exit(POLL) {
            return Err(format!("exited with {status}:\n{}", daemon.stderr_text()));
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready in time:\n{}", daemon.stderr_text()));
        }
    }
}

/// Runs `scripts/services.sh` when dropped, so a serial test leaves both
/// servers running whether it passes or fails.
struct ServicesGuard;

impl Drop for ServicesGuard {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let _ = Command::new(script).status();
    }
}
