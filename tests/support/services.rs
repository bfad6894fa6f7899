//! The real RabbitMQ and PostgreSQL, one exchange and one schema per test.
//!
//! - [`TestBroker`] owns an exchange `test_<uuid>` and, unless made with
//!   [`TestBroker::without_queue`], an exclusive auto-delete queue bound to it
//!   with `file.#`. The exchange is declared here first, exactly as the daemon
//!   declares it (topic, durable, no arguments; see
//!   `file_watcher::broker::exchange_declarations`), so the queue is bound
//!   before the daemon starts and nothing it publishes can be missed; the
//!   daemon's own declaration then agrees with ours.
//! - [`TestDatabase`] names a schema `t_<uuid>` in the test database; the
//!   daemon creates and migrates it at start-up. The test looks into it with a
//!   plain `postgres::Client` whose `search_path` is that schema.
//! - `DaemonBuilder::with_sinks` (and `with_broker`, `with_database`,
//!   `watching`) point a daemon at them.
//!
//! Both clean up on drop, best effort: the exchange and its `.dlx` are
//! deleted, the schema is dropped (kept, and named on stderr, when the test
//! is failing, so it can be inspected). Declare them *before* the daemons: a
//! test's locals drop in reverse order, so the daemons are killed before their
//! schema goes.
//!
//! With a broker the daemon prints nothing on stdout, so the `Daemon` waits on
//! stdout do not apply; [`TestBroker::wait_for`] and [`TestBroker::barrier`]
//! are their counterparts on the queue, with the same reasoning (see the
//! module docs of `common`). The server URLs come from `RABBITMQ_TEST_URL` and
//! `DATABASE_TEST_URL`, as in `tests/broker.rs` and `tests/registry_postgres.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_io::Timer;
use futures_lite::{future, StreamExt};
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use postgres::types::ToSql;
use postgres::{Client, NoTls};
use serde_json::Value;
use uuid::Uuid;

use super::{Daemon, DaemonBuilder, DEADLINE};

/// How long cleanup may take per step; it is best effort, so shorter than a test step.
const CLEANUP: Duration = Duration::from_secs(5);

/// How often the database is asked again while a test waits on it: it has no
/// event to wait on, so waits poll (each up to a deadline).
const DATABASE_POLL: Duration = Duration::from_millis(25);

pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_TEST_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn database_url() -> String {
    std::env::var("DATABASE_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs `work` to completion, or gives up with `None` at `deadline`.
fn until<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    future::block_on(future::or(async { Some(work.await) }, async {
        Timer::at(deadline).await;
        None
    }))
}

/// Runs `work` to completion, failing the test after [`DEADLINE`].
#[track_caller]
fn within<T>(what: &str, work: impl Future<Output = T>) -> T {
    until(Instant::now() + DEADLINE, work)
        .unwrap_or_else(|| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// One message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The body, parsed (a delivery whose body is not a JSON object fails the test).
    pub body: Value,
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    /// `properties.headers`, keyed by plain strings (empty when unset).
    pub headers: BTreeMap<String, AMQPValue>,
}

impl Delivered {
    pub fn event_type(&self) -> &str {
        self.body["event_type"].as_str().unwrap_or("")
    }

    pub fn file_path(&self) -> &str {
        self.body["file_path"].as_str().unwrap_or("")
    }

    pub fn instance_id(&self) -> &str {
        self.body["instance_id"].as_str().unwrap_or("")
    }

    /// The body's `message_id` (empty if missing).
    pub fn message_id(&self) -> &str {
        self.body["message_id"].as_str().unwrap_or("")
    }

    /// A string property (`message_id`, `app_id`, ...) as `&str`.
    pub fn text(property: &Option<ShortString>) -> Option<&str> {
        property.as_ref().map(ShortString::as_str)
    }

    fn is_marker(&self) -> bool {
        self.file_path()
            .rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with("zz-marker-"))
    }
}

/// What has arrived so far, and the stream the rest arrives on.
struct Inbox {
    /// `None` for a broker made without a queue.
    consumer: Option<Consumer>,
    received: Vec<Delivered>,
}

/// An exchange of the test's own and, usually, a queue on it; see the module docs.
pub struct TestBroker {
    exchange: String,
    url: String,
    connection: Connection,
    channel: Channel,
    inbox: Mutex<Inbox>,
    /// Numbers the barrier's marker files.
    markers: AtomicUsize,
}

impl TestBroker {
    /// An exchange with an exclusive queue bound with `file.#`.
    pub fn new() -> TestBroker {
        TestBroker::open(true)
    }

    /// An exchange nothing is bound to: every message is unroutable.
    pub fn without_queue() -> TestBroker {
        TestBroker::open(false)
    }

    fn open(with_queue: bool) -> TestBroker {
        let url = rabbitmq_url();
        let exchange = format!("test_{}", Uuid::new_v4().simple());
        let connection = within(
            "test connection",
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .expect("the test side connects to RabbitMQ");
        let channel = within("test channel", connection.create_channel()).expect("test channel opens");
        // As the daemon declares it; a different declaration would make the
        // daemon's own fail with PRECONDITION_FAILED.
        let as_the_daemon_does = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        within(
            "exchange.declare",
            channel.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                as_the_daemon_does,
                FieldTable::default(),
            ),
        )
        .expect("the test exchange is declared");
        let consumer = with_queue.then(|| {
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            let queue = within(
                "queue.declare",
                channel.queue_declare("".into(), options, FieldTable::default()),
            )
            .expect("the test queue is declared");
            within(
                "queue.bind",
                channel.queue_bind(
                    queue.name().clone(),
                    exchange.as_str().into(),
                    "file.#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .expect("the test queue is bound");
            let options = BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            };
            within(
                "basic.consume",
                channel.basic_consume(queue.name().clone(), "".into(), options, FieldTable::default()),
            )
            .expect("the test consumer starts")
        });
        TestBroker {
            exchange,
            url,
            connection,
            channel,
            inbox: Mutex::new(Inbox {
                consumer,
                received: Vec::new(),
            }),
            markers: AtomicUsize::new(0),
        }
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The AMQP URL the daemon is given (with the password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Calls `check` on everything received so far, and again after every
    /// delivery, until it returns `Some` or `deadline` passes (then `None`).
    pub fn wait_until<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&[Delivered]) -> Option<T>,
    ) -> Option<T> {
        let mut inbox = self.inbox();
        loop {
            if let Some(found) = check(&inbox.received) {
                return Some(found);
            }
            if Instant::now() >= deadline || !self.receive(&mut inbox, deadline) {
                return None;
            }
        }
    }

    /// Everything received so far, including what is already waiting in the
    /// client's buffer; does not wait for more.
    pub fn deliveries(&self) -> Vec<Delivered> {
        let mut inbox = self.inbox();
        while self.receive(&mut inbox, Instant::now()) {}
        inbox.received.clone()
    }

    /// Waits until at least `count` messages have arrived; returns all so far.
    #[track_caller]
    pub fn wait_for_deliveries(&self, count: usize, timeout: Duration) -> Vec<Delivered> {
        let found = self.wait_until(Instant::now() + timeout, |received| {
            (received.len() >= count).then(|| received.to_vec())
        });
        found.unwrap_or_else(|| {
            panic!(
                "expected at least {count} deliveries within {timeout:?}; got:\n{}",
                self.summary()
            )
        })
    }

    /// Waits for the first delivery that satisfies `predicate`.
    #[track_caller]
    pub fn wait_for(&self, mut predicate: impl FnMut(&Delivered) -> bool, timeout: Duration) -> Delivered {
        let found = self.wait_until(Instant::now() + timeout, |received| {
            received.iter().find(|delivered| predicate(delivered)).cloned()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no matching delivery within {timeout:?}; got:\n{}",
                self.summary()
            )
        })
    }

    /// Waits for a delivery with this `event_type` and `file_path`.
    #[track_caller]
    pub fn wait_for_event(&self, event_type: &str, path: &str) -> Delivered {
        self.wait_for(
            |delivered| delivered.event_type() == event_type && delivered.file_path() == path,
            DEADLINE,
        )
    }

    /// Writes a fresh marker file into `dir` (a watched tree) and waits for
    /// its `created`; returns every delivery so far except markers. As with
    /// `Daemon::barrier`, wait for every expected message first: this only
    /// shows that there are no others.
    #[track_caller]
    pub fn barrier(&self, dir: &Path) -> Vec<Delivered> {
        let number = self.markers.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("zz-marker-{number}.flac"));
        // Unique content, so markers never share a hash with anything.
        fs::write(&path, format!("marker {number} {}", path.display())).expect("write marker");
        let path = path.to_str().expect("temp paths are UTF-8").to_owned();
        self.wait_for_event("created", &path);
        self.deliveries()
            .into_iter()
            .filter(|delivered| !delivered.is_marker())
            .collect()
    }

    /// `event_type file_path (instance)` per delivery so far, for failure messages.
    pub fn summary(&self) -> String {
        let received = self.inbox().received.clone();
        let lines: Vec<String> = received
            .iter()
            .map(|delivered| {
                format!(
                    "{} {} ({})",
                    delivered.event_type(),
                    delivered.file_path(),
                    delivered.instance_id()
                )
            })
            .collect();
        format!("{} deliveries:\n{}", lines.len(), lines.join("\n"))
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        // A test that panicked while holding it has failed already.
        self.inbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the next delivery, waiting until `deadline` at most; false if none came.
    fn receive(&self, inbox: &mut Inbox, deadline: Instant) -> bool {
        let Some(consumer) = inbox.consumer.as_mut() else {
            return false;
        };
        let next = if deadline <= Instant::now() {
            future::block_on(future::poll_once(consumer.next()))
        } else {
            until(deadline, consumer.next())
        };
        let delivery = match next {
            None => return false,
            Some(Some(Ok(delivery))) => delivery,
            Some(Some(Err(error))) => panic!("the test consumer failed: {error}"),
            Some(None) => panic!("the test consumer's stream ended"),
        };
        let body = match serde_json::from_slice::<Value>(&delivery.data) {
            Ok(body @ Value::Object(_)) => body,
            _ => panic!(
                "a delivery's body is not a JSON object: {:?}",
                String::from_utf8_lossy(&delivery.data)
            ),
        };
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(name, value)| (name.as_str().to_owned(), value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        inbox.received.push(Delivered {
            body,
            exchange: delivery.exchange.as_str().to_owned(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties: delivery.properties,
            headers,
        });
        true
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let deadline = Instant::now() + CLEANUP;
        // The queue is exclusive: it goes with the connection.
        for name in [self.exchange.clone(), format!("{}.dlx", self.exchange)] {
            let deleting = self
                .channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default());
            let _ = until(deadline, deleting);
        }
        let _ = until(deadline, self.connection.close(200, "test done".into()));
    }
}

/// One row of `files`, as the test reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub file_path: String,
    pub state: String,
    pub sha256: String,
    pub xxh128: String,
    pub size_bytes: i64,
    pub mtime_ns: i64,
    pub last_event: String,
    pub old_path: Option<String>,
    pub instance_id: String,
    pub watched_directory: String,
    pub message_id: Uuid,
    pub published_at: Option<SystemTime>,
}

/// A schema of the test's own; see the module docs.
pub struct TestDatabase {
    schema: String,
    url: String,
    /// Looks at the tables; `search_path` is the test's schema.
    client: Mutex<Client>,
}

impl TestDatabase {
    pub fn new() -> TestDatabase {
        let url = database_url();
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let mut client = Client::connect(&url, NoTls).expect("the test side connects to PostgreSQL");
        // Allowed before the schema exists; the daemon creates it.
        client
            .batch_execute(&format!("SET search_path TO {schema}"))
            .expect("set search_path");
        TestDatabase {
            schema,
            url,
            client: Mutex::new(client),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The URL the daemon is given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one query in the test's schema.
    #[track_caller]
    pub fn query(&self, sql: &str, parameters: &[&(dyn ToSql + Sync)]) -> Vec<postgres::Row> {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .query(sql, parameters)
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"))
    }

    /// Every row of `files`, by path.
    #[track_caller]
    pub fn rows(&self) -> Vec<FileRow> {
        self.query(&format!("{FILE_ROW_SELECT} ORDER BY file_path"), &[])
            .iter()
            .map(file_row)
            .collect()
    }

    /// The row of `path`, if there is one.
    #[track_caller]
    pub fn row(&self, path: &str) -> Option<FileRow> {
        self.query(&format!("{FILE_ROW_SELECT} WHERE file_path = $1"), &[&path])
            .first()
            .map(file_row)
    }

    /// Messages recorded and not yet confirmed by the sink.
    #[track_caller]
    pub fn outbox_len(&self) -> i64 {
        self.query("SELECT count(*) FROM outbox", &[])[0].get(0)
    }

    /// Asks `check` again every few milliseconds until it returns `Some`;
    /// fails the test, saying `what` was awaited, after `timeout`.
    #[track_caller]
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&TestDatabase) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; files:\n{:#?}\noutbox: {}",
                self.rows(),
                self.outbox_len()
            );
            std::thread::sleep(DATABASE_POLL);
        }
    }

    /// Waits until the row of `path` carries `message_id` and has been
    /// marked published; returns it.
    #[track_caller]
    pub fn wait_published(&self, path: &str, message_id: &str) -> FileRow {
        let wanted: Uuid = message_id.parse().expect("message ids are UUIDs");
        self.wait_until(
            &format!("the row of {path} published with message {message_id}"),
            DEADLINE,
            |database| {
                database
                    .row(path)
                    .filter(|row| row.message_id == wanted && row.published_at.is_some())
            },
        )
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping schema {} for inspection", self.schema);
            return;
        }
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// Selects every column `file_row` reads, in its order.
pub const FILE_ROW_SELECT: &str =
    "SELECT file_path, state, sha256, xxh128, size_bytes, mtime_ns, last_event, \
     old_path, instance_id, watched_directory, message_id::text, published_at FROM files";

pub fn file_row(record: &postgres::Row) -> FileRow {
    FileRow {
        file_path: record.get(0),
        state: record.get(1),
        sha256: record.get(2),
        xxh128: record.get(3),
        size_bytes: record.get(4),
        mtime_ns: record.get(5),
        last_event: record.get(6),
        old_path: record.get(7),
        instance_id: record.get(8),
        watched_directory: record.get(9),
        message_id: record.get::<_, &str>(10).parse().expect("message_id is a UUID"),
        published_at: record.get(11),
    }
}

impl DaemonBuilder {
    /// Publishes to `broker` and records in `database`.
    pub fn with_sinks(self, broker: &TestBroker, database: &TestDatabase) -> Self {
        self.with_broker(broker).with_database(database)
    }

    pub fn with_broker(self, broker: &TestBroker) -> Self {
        self.env("RABBITMQ_URL", broker.url())
            .env("EXCHANGE", broker.exchange())
    }

    pub fn with_database(self, database: &TestDatabase) -> Self {
        self.env("DATABASE_URL", database.url())
            .env("DB_SCHEMA", database.schema())
    }

    /// Watches `dir` (another daemon's tree) instead of a directory of its own.
    pub fn watching(self, dir: &Path) -> Self {
        self.env("DATA_DIR", dir.to_str().expect("temp paths are UTF-8"))
    }
}

/// The log level of a text-format stderr line (`<ts> <LEVEL> [...] ...`).
pub fn log_level(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

/// Stderr lines logged at WARN or ERROR.
pub fn warnings_and_errors(daemon: &Daemon) -> Vec<String> {
    daemon
        .stderr_lines()
        .into_iter()
        .filter(|line| matches!(log_level(line), Some("WARN" | "ERROR")))
        .collect()
}

/// Waits until the start-up reconciliation's full scan of `dir` has been
/// counted: every file it found is then pending in the settle stage, so a
/// file written afterwards is handled after them.
#[track_caller]
pub fn wait_for_full_scan(daemon: &Daemon, dir: &Path) -> String {
    daemon.wait_for_stderr(&format!("full scan of {} found", dir.display()), DEADLINE)
}
