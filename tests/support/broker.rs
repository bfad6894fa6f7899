//! The real RabbitMQ, one exchange per test: [`TestBroker`] owns an exchange
//! `test_<uuid>` and the queue the test reads it through.
//!
//! The exchange is declared here first, exactly as the daemon declares it
//! (topic, durable, no arguments; see
//! `file_watcher::publish::broker::exchange_declarations`), so the queue is bound
//! before the daemon starts and nothing it publishes can be missed; the
//! daemon's own declaration then agrees with ours. The queue is one of:
//!
//! - consumed ([`TestBroker::new`], [`TestBroker::bound_with`]): exclusive,
//!   auto-delete, consumed without acks on the test's own connection, which
//!   stays open for the whole test. With a broker the daemon prints nothing
//!   on stdout, so the `Daemon` waits on stdout do not apply;
//!   [`TestBroker::wait_for`] and [`TestBroker::barrier`] are their
//!   counterparts on the queue, with the same reasoning (see the docs of
//!   `support::daemon`).
//! - none ([`TestBroker::without_queue`]): every message is unroutable.
//! - durable ([`TestBroker::durable`]): for the fault tests, which close
//!   every connection (the test's own included) or restart the broker. The
//!   queue is named and durable, the test keeps no connection, and
//!   [`TestBroker::deliveries`] reads it with `basic.get` over a fresh one.
//!   The waits do not poll it: it is read once the registry says everything
//!   was published, so nothing published can still be on its way.
//!
//! On drop, best effort, the exchange, its `.dlx` and a durable queue are
//! deleted (an exclusive queue goes with the connection). The server is
//! `RABBITMQ_TEST_URL`, by default the local one with guest/guest.

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::Value;
use uuid::Uuid;

use super::{run, until, within, FaultProxy, DEADLINE};

/// How long cleanup may take; it is best effort, so shorter than a test step.
const CLEANUP: Duration = Duration::from_secs(10);

/// How long a durable queue's reader waits for the broker to take a
/// connection: generous, as a fault test may have just restarted it.
const RECONNECT: Duration = Duration::from_secs(60);

pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_TEST_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Where the test broker listens, for a [`FaultProxy`] in front of it.
pub fn address() -> SocketAddr {
    let uri: AMQPUri = rabbitmq_url().parse().expect("RABBITMQ_TEST_URL parses");
    (uri.authority.host.as_str(), uri.authority.port)
        .to_socket_addrs()
        .expect("resolve the broker")
        .next()
        .expect("the broker has an address")
}

/// The test broker's URL, going through `proxy` instead.
pub fn url_through(proxy: &FaultProxy) -> String {
    let mut uri: AMQPUri = rabbitmq_url().parse().expect("RABBITMQ_TEST_URL parses");
    uri.authority.host = "127.0.0.1".to_owned();
    uri.authority.port = proxy.port();
    uri.to_string()
}

/// Waits until `rabbitmqctl list_connections` does (`listed`) or does not
/// name a connection `connection_name`; fails the test with `what` after 30 s.
/// rabbitmqctl takes about a second per call: that is the polling interval.
#[track_caller]
pub fn wait_until_listed(connection_name: &str, listed: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let lists =
        || run("rabbitmqctl", &["-q", "list_connections", "client_properties"]).contains(connection_name);
    while lists() != listed {
        assert!(Instant::now() < deadline, "{what}: {connection_name}");
    }
}

/// One message as the test's queue received it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The body, parsed (a delivery whose body is not a JSON object fails the test).
    pub body: Value,
    /// The body as it was sent, byte for byte.
    pub data: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    /// `properties.headers`, keyed by plain strings (empty when unset).
    pub headers: BTreeMap<String, AMQPValue>,
}

impl Delivered {
    fn new(delivery: Delivery) -> Delivered {
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
        Delivered {
            body,
            data: delivery.data,
            exchange: delivery.exchange.as_str().to_owned(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties: delivery.properties,
            headers,
        }
    }

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

/// The queue a [`TestBroker`] reads; see the module docs.
enum Queue {
    Unbound,
    Consumed(Consumer),
    /// The queue's name.
    Durable(String),
}

/// What has arrived so far, and where the rest arrives.
struct Inbox {
    queue: Queue,
    received: Vec<Delivered>,
}

/// An exchange of the test's own and, usually, a queue on it; see the module docs.
pub struct TestBroker {
    exchange: String,
    url: String,
    /// The test side's connection, open for the whole test; `None` with a
    /// durable queue, which is read over a fresh connection each time.
    link: Option<(Connection, Channel)>,
    inbox: Mutex<Inbox>,
    /// Numbers the barrier's marker files.
    markers: AtomicUsize,
}

/// How [`TestBroker::open`] sets up the queue.
enum Binding<'a> {
    None,
    Consumed(&'a str),
    Durable,
}

impl TestBroker {
    /// An exchange with an exclusive queue bound with `file.#`.
    pub fn new() -> TestBroker {
        TestBroker::bound_with("file.#")
    }

    /// An exchange with an exclusive queue bound with `key`.
    pub fn bound_with(key: &str) -> TestBroker {
        TestBroker::open(Binding::Consumed(key))
    }

    /// An exchange nothing is bound to: every message is unroutable.
    pub fn without_queue() -> TestBroker {
        TestBroker::open(Binding::None)
    }

    /// An exchange with a durable queue bound with `file.#`, which outlives
    /// closed connections and broker restarts. It also expires by itself
    /// half an hour after its last use, should a run die before dropping it.
    pub fn durable() -> TestBroker {
        TestBroker::open(Binding::Durable)
    }

    fn open(binding: Binding<'_>) -> TestBroker {
        let url = rabbitmq_url();
        let exchange = format!("test_{}", Uuid::new_v4().simple());
        let (connection, channel) = connect(&url, Instant::now() + DEADLINE);
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
        let queue = match binding {
            Binding::None => Queue::Unbound,
            Binding::Consumed(key) => {
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
                bind(&channel, queue.name().as_str(), &exchange, key);
                let options = BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                };
                let consumer = within(
                    "basic.consume",
                    channel.basic_consume(queue.name().clone(), "".into(), options, FieldTable::default()),
                )
                .expect("the test consumer starts");
                Queue::Consumed(consumer)
            }
            Binding::Durable => {
                let name = format!("test_{}", Uuid::new_v4().simple());
                let mut arguments = FieldTable::default();
                arguments.insert("x-expires".into(), AMQPValue::LongUInt(30 * 60 * 1000));
                let durable = QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                };
                within(
                    "queue.declare",
                    channel.queue_declare(name.as_str().into(), durable, arguments),
                )
                .expect("the test queue is declared");
                bind(&channel, &name, &exchange, "file.#");
                Queue::Durable(name)
            }
        };
        let link = if matches!(queue, Queue::Durable(_)) {
            let _ = within("close", connection.close(200, "declared".into()));
            None
        } else {
            Some((connection, channel))
        };
        TestBroker {
            exchange,
            url,
            link,
            inbox: Mutex::new(Inbox {
                queue,
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

    /// The test side's channel, for declaring or deleting behind the
    /// daemon's back. Not kept with a durable queue.
    pub fn channel(&self) -> &Channel {
        &self
            .link
            .as_ref()
            .expect("a durable test broker keeps no channel")
            .1
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
    /// client's buffer (or, for a durable queue, in the queue); does not wait
    /// for more.
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

    /// Takes what arrives by `deadline` at most; false if nothing came.
    fn receive(&self, inbox: &mut Inbox, deadline: Instant) -> bool {
        match &mut inbox.queue {
            Queue::Unbound => false,
            Queue::Consumed(consumer) => match until(deadline, consumer.next()) {
                None => false,
                Some(Some(Ok(delivery))) => {
                    inbox.received.push(Delivered::new(delivery));
                    true
                }
                Some(Some(Err(error))) => panic!("the test consumer failed: {error}"),
                Some(None) => panic!("the test consumer's stream ended"),
            },
            Queue::Durable(queue) => {
                let before = inbox.received.len();
                inbox.received.extend(drain(&self.url, queue));
                inbox.received.len() > before
            }
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let deadline = Instant::now() + CLEANUP;
        let durable = match &self.inbox().queue {
            Queue::Durable(name) => Some(name.clone()),
            _ => None,
        };
        // Without a connection of its own (a fault test may have closed
        // any), the cleanup goes over a fresh one.
        let link = self
            .link
            .take()
            .or_else(|| until(deadline, open_channel(&self.url)).and_then(Result::ok));
        let Some((connection, channel)) = link else {
            return;
        };
        if let Some(queue) = durable {
            let deleting = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default());
            let _ = until(deadline, deleting);
        }
        for name in [self.exchange.clone(), format!("{}.dlx", self.exchange)] {
            let deleting = channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default());
            let _ = until(deadline, deleting);
        }
        let _ = until(deadline, connection.close(200, "test done".into()));
    }
}

async fn open_channel(url: &str) -> Result<(Connection, Channel), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// A channel on a fresh connection, retried until `deadline` (the broker
/// may be on its way back from a fault).
#[track_caller]
fn connect(url: &str, deadline: Instant) -> (Connection, Channel) {
    loop {
        let attempt = deadline.min(Instant::now() + Duration::from_secs(5));
        match until(attempt, open_channel(url)) {
            Some(Ok(link)) => return link,
            failed => {
                assert!(
                    Instant::now() < deadline,
                    "the test cannot reach RabbitMQ: {failed:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[track_caller]
fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) {
    within(
        "queue.bind",
        channel.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .expect("the test queue is bound");
}

/// Takes everything waiting in the durable `queue`, over a fresh connection.
#[track_caller]
fn drain(url: &str, queue: &str) -> Vec<Delivered> {
    let (connection, channel) = connect(url, Instant::now() + RECONNECT);
    let no_ack = BasicGetOptions { no_ack: true };
    let mut drained = Vec::new();
    while let Some(message) =
        within("basic.get", channel.basic_get(queue.into(), no_ack)).expect("read the test queue")
    {
        drained.push(Delivered::new(message.delivery));
    }
    let _ = within("close", connection.close(200, "drained".into()));
    drained
}
