//! The RabbitMQ sink against a real broker (`RABBITMQ_TEST_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Every test has its own exchange (`test_<uuid>`), deleted when done, and
//! reads through its own exclusive auto-delete queue ([`TestBroker`]), so
//! tests run in parallel and rerun without cleanup. The test side talks to
//! RabbitMQ with lapin directly, the way a consumer would.
//!
//! Last, the daemon under a broker that blocks publishers (memory alarm,
//! `connection.blocked`): publishing pauses with one warning, changes keep
//! being recorded, and everything goes out once the broker unblocks. The
//! alarm is broker-wide, so that test is `serial_` (scripts/test.sh runs
//! those alone, after the rest), and a guard always lowers it again.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use file_watcher::message::{Content, Encoded, EventType, Message, Origin, SCHEMA_VERSION};
use file_watcher::publish::broker::{exchange_declarations, Broker, BrokerError, BrokerSettings, FRAME_MAX};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::broker::{rabbitmq_url, url_through, wait_until_listed};
use crate::support::{
    broker, run, within, write_file, Daemon, Delivered, FaultProxy, TestBroker, TestDatabase, DEADLINE,
};

fn settings(exchange: &str) -> BrokerSettings {
    BrokerSettings {
        url: rabbitmq_url().into(),
        exchange: exchange.to_owned(),
        dead_letter_exchange: format!("{exchange}.dlx"),
        connection_name: format!("file_watcher_{}", Uuid::new_v4().simple()),
        connect_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(10),
        heartbeat: Duration::from_secs(10),
        tls: None,
    }
}

/// An exchange name for a `Broker` that never gets to declare it.
fn unique_exchange() -> String {
    format!("test_{}", Uuid::new_v4().simple())
}

fn sample_message(event_type: EventType) -> Encoded {
    Encoded::new(sample_content_message(event_type))
}

/// [`sample_message`] before it is encoded, for a test to change.
fn sample_content_message(event_type: EventType) -> Message {
    let origin = Origin {
        instance_id: "inst42".into(),
        watched_directory: "/data/music".into(),
    };
    let content = Content {
        sha256_hash: "a".repeat(64),
        xxh128_hash: "b".repeat(32),
        size_bytes: 1234,
        modified_time: "2026-01-02T03:04:05.678Z".into(),
        file_type: "flac".into(),
    };
    origin.message(
        event_type,
        "/data/music/artist/song.flac",
        None,
        Uuid::new_v4(),
        Some(content),
    )
}

/// Log records as `(target, text)`, captured for the whole test binary.
fn captured_logs() -> &'static Mutex<Vec<(String, String)>> {
    static RECORDS: OnceLock<Mutex<Vec<(String, String)>>> = OnceLock::new();
    static LOGGER: Capture = Capture;
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                let entry = (record.target().to_owned(), record.args().to_string());
                captured_logs().lock().unwrap().push(entry);
            }
        }
        fn flush(&self) {}
    }
    let records = RECORDS.get_or_init(|| Mutex::new(Vec::new()));
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    records
}

#[test]
fn body_properties_and_headers_follow_the_contract() {
    let consumer = TestBroker::new();
    let mut broker = Broker::connect(&settings(consumer.exchange())).expect("connects");

    let message = sample_message(EventType::Created);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let published = broker.publish(std::slice::from_ref(&message)).expect("publishes");
    assert_eq!(published.acked, [message.message_id]);
    assert!(published.nacked.is_empty());
    assert_eq!(published.unroutable, 0);

    let delivery = consumer.wait_for_deliveries(1, DEADLINE).remove(0);
    assert_eq!(delivery.data, message.json().as_bytes());
    assert_eq!(delivery.routing_key, "file.created");
    assert_eq!(delivery.exchange, consumer.exchange());
    let properties = &delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert_eq!(
        Delivered::text(properties.content_type()),
        Some("application/json")
    );
    assert_eq!(
        Delivered::text(properties.message_id()),
        Some(message.message_id.to_string().as_str())
    );
    assert_eq!(
        Delivered::text(properties.correlation_id()),
        Some(message.correlation_id.to_string().as_str())
    );
    let timestamp = properties.timestamp().expect("timestamp is set");
    assert!(
        (before..=before + 60).contains(&timestamp),
        "timestamp {timestamp} is unix seconds now"
    );
    assert_eq!(Delivered::text(properties.app_id()), Some("file-watcher"));
    assert_eq!(Delivered::text(properties.kind()), Some("created"));
    let headers = properties.headers().as_ref().expect("headers are set").inner();
    assert_eq!(headers["x-instance-id"], AMQPValue::LongString("inst42".into()));
    assert_eq!(
        headers["x-watched-directory"],
        AMQPValue::LongString("/data/music".into())
    );
    assert_eq!(headers["x-event-type"], AMQPValue::LongString("created".into()));
    let schema_version = match &headers["x-schema-version"] {
        AMQPValue::LongLongInt(value) => *value,
        AMQPValue::LongInt(value) => i64::from(*value),
        other => panic!("x-schema-version must be an integer, not {other:?}"),
    };
    assert_eq!(schema_version, i64::from(SCHEMA_VERSION));
    broker.close();
}

#[test]
fn batches_are_confirmed_and_delivered_in_order() {
    let consumer = TestBroker::bound_with("file.*");
    let mut broker = Broker::connect(&settings(consumer.exchange())).expect("connects");

    let messages: Vec<Encoded> = (0..300)
        .map(|index| sample_message(EventType::ALL[index % EventType::ALL.len()]))
        .collect();
    let published = broker.publish(&messages).expect("publishes");
    let ids: Vec<Uuid> = messages.iter().map(|message| message.message_id).collect();
    assert_eq!(published.acked, ids);
    assert!(published.nacked.is_empty() && published.unroutable == 0);
    let deliveries = consumer.wait_for_deliveries(messages.len(), DEADLINE);
    for (message, delivery) in messages.iter().zip(&deliveries) {
        assert_eq!(
            Delivered::text(delivery.properties.message_id()),
            Some(message.message_id.to_string().as_str())
        );
        assert_eq!(delivery.routing_key, message.routing_key());
    }
    assert!(broker.is_usable() && !broker.is_blocked());
    assert_eq!(
        broker.publish(&[]).expect("an empty batch is fine"),
        Default::default()
    );
}

#[test]
fn connection_name_is_visible_while_connected() {
    let consumer = TestBroker::without_queue();
    let settings = settings(consumer.exchange());
    let broker = Broker::connect(&settings).expect("connects");
    let name = &settings.connection_name;
    wait_until_listed(name, true, "rabbitmqctl never listed the connection");
    broker.close();
    wait_until_listed(name, false, "the connection is still listed after close");
}

#[test]
fn unroutable_message_is_acked_counted_and_logged() {
    let logs = captured_logs();
    let consumer = TestBroker::without_queue();
    let exchange = consumer.exchange();
    let mut broker = Broker::connect(&settings(exchange)).expect("connects");
    let message = sample_message(EventType::Deleted);
    let published = broker.publish(std::slice::from_ref(&message)).expect("publishes");
    assert_eq!(published.unroutable, 1);
    assert_eq!(published.acked, [message.message_id]);
    assert!(published.nacked.is_empty());
    assert!(
        broker.is_usable(),
        "a returned message does not break the channel"
    );

    let records = logs.lock().unwrap().clone();
    let ours = records.iter().find(|(target, text)| {
        target == "file_watcher::broker" && text.contains(exchange) && text.contains("file.deleted")
    });
    assert!(
        ours.is_some(),
        "no warning naming exchange and routing key in {records:#?}"
    );
    // lapin logs through `tracing`; its `log` feature must carry the event to `log`.
    let lapin = records
        .iter()
        .find(|(target, text)| target.starts_with("lapin") && text.contains(exchange));
    assert!(
        lapin.is_some(),
        "lapin's own warning did not reach `log`: {records:#?}"
    );
}

#[test]
fn definitions_match_the_declarations_and_the_consumers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/rabbitmq/definitions.json");
    let definitions: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("definitions.json exists"))
            .expect("definitions.json is JSON");
    assert_eq!(definitions["vhosts"], json!([{"name": "/"}]));

    let exchanges = definitions["exchanges"].as_array().expect("exchanges is a list");
    let declarations = exchange_declarations("file_events", "file_events.dlx");
    assert_eq!(
        exchanges.len(),
        declarations.len(),
        "exactly the daemon's exchanges"
    );
    for declaration in &declarations {
        let exchange = exchanges
            .iter()
            .find(|exchange| exchange["name"] == declaration.name.as_str())
            .unwrap_or_else(|| panic!("exchange {} is missing", declaration.name));
        assert_eq!(exchange["vhost"], "/", "{}", declaration.name);
        assert_eq!(exchange["type"], declaration.kind, "{}", declaration.name);
        assert_eq!(exchange["durable"], declaration.durable, "{}", declaration.name);
        assert_eq!(
            exchange["auto_delete"], declaration.auto_delete,
            "{}",
            declaration.name
        );
        assert_eq!(exchange["internal"], declaration.internal, "{}", declaration.name);
        let arguments: serde_json::Map<String, Value> = declaration.arguments.clone().into_iter().collect();
        assert_eq!(
            exchange["arguments"],
            Value::Object(arguments),
            "{}",
            declaration.name
        );
    }

    let queue_arguments = json!({"x-dead-letter-exchange": "file_events.dlx", "x-message-ttl": 86_400_000});
    let queues = definitions["queues"].as_array().expect("queues is a list");
    let names: BTreeSet<&str> = queues
        .iter()
        .map(|queue| queue["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "cataloging.file.events",
            "tracklist.file.lifecycle",
            "analysis.lifecycle.events"
        ])
    );
    for queue in queues {
        assert_eq!(queue["vhost"], "/", "{queue}");
        assert_eq!(queue["durable"], true, "{queue}");
        assert_eq!(queue["auto_delete"], false, "{queue}");
        assert_eq!(queue["arguments"], queue_arguments, "{queue}");
    }

    let bindings: BTreeSet<(String, String)> = definitions["bindings"]
        .as_array()
        .expect("bindings is a list")
        .iter()
        .map(|binding| {
            assert_eq!(binding["source"], "file_events", "{binding}");
            assert_eq!(binding["vhost"], "/", "{binding}");
            assert_eq!(binding["destination_type"], "queue", "{binding}");
            assert_eq!(binding["arguments"], json!({}), "{binding}");
            let destination = binding["destination"].as_str().unwrap().to_owned();
            (destination, binding["routing_key"].as_str().unwrap().to_owned())
        })
        .collect();
    let mut expected = BTreeSet::new();
    for queue in ["cataloging.file.events", "tracklist.file.lifecycle"] {
        for event_type in EventType::ALL {
            expected.insert((queue.to_owned(), event_type.routing_key()));
        }
    }
    expected.insert(("analysis.lifecycle.events".to_owned(), "file.#".to_owned()));
    assert_eq!(bindings, expected);
}

#[test]
fn closed_port_fails_within_connect_timeout_without_the_password() {
    let mut settings = settings(&unique_exchange());
    settings.url = "amqp://watcher:s3cret-Pa55@127.0.0.1:1/%2f".to_owned().into();
    settings.connect_timeout = Duration::from_secs(3);
    let started = Instant::now();
    let error = Broker::connect(&settings)
        .err()
        .expect("nothing listens on port 1");
    assert!(started.elapsed() < settings.connect_timeout + Duration::from_millis(500));
    let mut chain = format!("{error:?}");
    let mut source: Option<&dyn std::error::Error> = Some(&error);
    while let Some(current) = source {
        chain.push_str(&format!("\n{current}"));
        source = current.source();
    }
    assert!(!chain.contains("s3cret-Pa55"), "{chain}");
    assert!(chain.contains("watcher:***@127.0.0.1:1"), "{chain}");
}

#[test]
fn silent_broker_times_out_and_its_socket_is_released() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds a port");
    let port = listener.local_addr().unwrap().port();
    // Accepts, then says nothing, like a frozen broker whose kernel still answers.
    let silent = thread::Builder::new()
        .name("silent-broker".into())
        .spawn(move || {
            let (mut socket, _) = listener.accept().expect("the daemon connects");
            socket.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut received = Vec::new();
            let mut buffer = [0; 64];
            loop {
                match socket.read(&mut buffer) {
                    Ok(0) => return Ok(received),
                    Ok(count) => received.extend_from_slice(&buffer[..count]),
                    Err(error) => return Err(error),
                }
            }
        })
        .unwrap();

    let mut settings = settings(&unique_exchange());
    settings.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f").into();
    settings.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = Broker::connect(&settings)
        .err()
        .expect("a silent broker cannot be connected to");
    assert!(matches!(error, BrokerError::ConnectTimeout { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );

    let received = silent
        .join()
        .unwrap()
        .expect("the daemon closes its socket instead of leaving it open");
    assert_eq!(
        received, b"AMQP\x00\x00\x09\x01",
        "only the protocol header was sent"
    );
}

#[test]
fn consumers_redeclare_the_same_exchanges() {
    let consumer = TestBroker::without_queue();
    let exchange = consumer.exchange();
    let _broker = Broker::connect(&settings(exchange)).expect("connects");
    let as_consumers_do = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for name in [exchange.to_owned(), format!("{exchange}.dlx")] {
        within(
            "exchange.declare",
            consumer.channel().exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                as_consumers_do,
                FieldTable::default(),
            ),
        )
        .unwrap_or_else(|error| panic!("redeclaring {name} as a consumer does: {error}"));
    }
    // The check above means something: a different declaration is refused.
    let other = within(
        "second test connection",
        Connection::connect(&rabbitmq_url(), ConnectionProperties::default()),
    )
    .expect("connects");
    let channel = within("channel", other.create_channel()).expect("channel opens");
    let transient = ExchangeDeclareOptions::default();
    let refused = within(
        "exchange.declare",
        channel.exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            transient,
            FieldTable::default(),
        ),
    );
    assert!(
        refused.is_err(),
        "a non-durable redeclare must fail with PRECONDITION_FAILED"
    );
}

#[test]
fn heartbeat_comes_from_settings_or_from_the_url() {
    let consumer = TestBroker::without_queue();
    let mut settings = settings(consumer.exchange());
    settings.heartbeat = Duration::from_secs(7);
    let broker = Broker::connect(&settings).expect("connects");
    assert_eq!(broker.heartbeat(), Duration::from_secs(7));
    broker.close();

    let separator = if settings.url.expose().contains('?') {
        '&'
    } else {
        '?'
    };
    settings.url = format!("{}{separator}heartbeat=5", settings.url.expose()).into();
    let broker = Broker::connect(&settings).expect("connects");
    assert_eq!(broker.heartbeat(), Duration::from_secs(5));
}

/// Frames are kept small (lapin holds 32 of them each way for the life of
/// the connection); a message larger than several frames, with the longest
/// watched directory there can be in its content header (which is one frame),
/// still goes through whole.
#[test]
fn messages_larger_than_a_frame_go_through_whole() {
    let consumer = TestBroker::new();
    let mut broker = Broker::connect(&settings(consumer.exchange())).expect("connects");
    assert_eq!(broker.frame_max(), FRAME_MAX);

    let mut message = sample_content_message(EventType::Renamed);
    // 4,095 bytes that are not UTF-8, as path text: four characters each.
    let directory = format!("/{}", "\\xff".repeat(4094));
    message.watched_directory = directory.clone();
    let long_name = "n".repeat(3 * FRAME_MAX as usize);
    message.file_path = format!("{directory}/{long_name}.flac");
    message.old_path = Some(format!("{directory}/{long_name}.wav"));
    let message = Encoded::new(message);
    let published = broker.publish(std::slice::from_ref(&message)).expect("publishes");
    assert_eq!(published.acked, [message.message_id]);

    let delivery = consumer.wait_for_deliveries(1, DEADLINE).remove(0);
    assert!(delivery.data.len() > 6 * FRAME_MAX as usize);
    assert_eq!(delivery.data, message.json().as_bytes());
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .expect("headers are set")
        .inner();
    assert_eq!(
        headers["x-watched-directory"],
        AMQPValue::LongString(directory.as_str().into())
    );
    broker.close();
}

#[test]
fn a_failed_channel_makes_the_broker_unusable() {
    let consumer = TestBroker::without_queue();
    let mut broker = Broker::connect(&settings(consumer.exchange())).expect("connects");
    within(
        "exchange.delete",
        consumer
            .channel()
            .exchange_delete(consumer.exchange().into(), ExchangeDeleteOptions::default()),
    )
    .expect("the exchange is deleted behind the daemon's back");

    let error = broker
        .publish(&[sample_message(EventType::Modified)])
        .expect_err("publishing to a missing exchange fails");
    assert!(
        matches!(error, BrokerError::Confirm { .. } | BrokerError::Publish { .. }),
        "{error:?}"
    );
    assert!(!broker.is_usable());
    let again = broker.publish(&[sample_message(EventType::Modified)]);
    assert!(matches!(again, Err(BrokerError::Unusable { .. })), "{again:?}");
}

/// A proxy in front of RabbitMQ, and the URL that goes through it.
fn proxied_broker() -> (FaultProxy, String) {
    let proxy = FaultProxy::start(broker::address());
    let url = url_through(&proxy);
    (proxy, url)
}

#[test]
fn frozen_broker_is_caught_by_the_heartbeat() {
    let logs = captured_logs();
    let consumer = TestBroker::without_queue();
    let (proxy, url) = proxied_broker();
    let mut settings = settings(consumer.exchange());
    settings.url = url.into();
    // Two seconds, not one: a loaded CI machine must not miss its own heartbeats.
    settings.heartbeat = Duration::from_secs(2);
    let broker = Broker::connect(&settings).expect("connects through the proxy");
    assert_eq!(broker.heartbeat(), Duration::from_secs(2));

    proxy.freeze(true);
    let frozen_at = Instant::now();
    let deadline = frozen_at + Duration::from_secs(15);
    while broker.is_usable() {
        assert!(
            Instant::now() < deadline,
            "a frozen broker went unnoticed for 15 s"
        );
        // The polling interval only; the deadline above is what bounds the wait.
        thread::sleep(Duration::from_millis(20));
    }
    // lapin gives up after two heartbeat intervals without a byte from the broker.
    assert!(
        frozen_at.elapsed() >= Duration::from_secs(2),
        "{:?}",
        frozen_at.elapsed()
    );
    let records = logs.lock().unwrap().clone();
    let noticed = records.iter().any(|(target, text)| {
        target == "file_watcher::broker"
            && text.contains(&settings.connection_name)
            && text.contains("heartbeat")
    });
    assert!(
        noticed,
        "the failure was not put down to the heartbeat: {records:#?}"
    );
    drop(broker);
}

#[test]
fn frozen_broker_fails_a_batch_within_the_confirm_timeout() {
    let consumer = TestBroker::without_queue();
    let (proxy, url) = proxied_broker();
    let mut settings = settings(consumer.exchange());
    settings.url = url.into();
    settings.confirm_timeout = Duration::from_secs(1);
    let mut broker = Broker::connect(&settings).expect("connects through the proxy");
    let first = sample_message(EventType::Created);
    assert_eq!(
        broker
            .publish(std::slice::from_ref(&first))
            .expect("publishes")
            .acked,
        [first.message_id]
    );

    proxy.freeze(true);
    let started = Instant::now();
    let error = broker
        .publish(&[
            sample_message(EventType::Modified),
            sample_message(EventType::Deleted),
        ])
        .expect_err("nothing is confirmed by a frozen broker");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    match error {
        BrokerError::ConfirmTimeout {
            unconfirmed, total, ..
        } => assert_eq!((unconfirmed, total), (2, 2)),
        other => panic!("expected a confirm timeout, got {other:?}"),
    }
    assert!(!broker.is_usable(), "a timed-out batch retires the connection");
    let started = Instant::now();
    drop(broker);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "dropping took {:?}",
        started.elapsed()
    );
}

/// Raises RabbitMQ's memory alarm (a watermark no node can stay under) and
/// restores the watermark it found when dropped, whatever the test did.
struct MemoryAlarm {
    restore: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let status = run("rabbitmqctl", &["status"]);
        // "Memory high watermark setting: 0.4 of available memory, …"
        let restore = status
            .lines()
            .find_map(|line| line.split("Memory high watermark setting: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|value| value.parse::<f64>().is_ok())
            .unwrap_or("0.4")
            .to_owned();
        run("rabbitmqctl", &["set_vm_memory_high_watermark", "0.00001"]);
        MemoryAlarm { restore }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        run("rabbitmqctl", &["set_vm_memory_high_watermark", &self.restore]);
    }
}

#[test]
fn serial_memory_alarm_pauses_publishing_until_the_broker_unblocks() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let mut daemon = Daemon::builder().with_sinks(&broker, &database).start();
    daemon.wait_for_full_scan(daemon.dir());
    let before = daemon.path_str("before.flac");
    write_file(&daemon.path("before.flac"), "published normally");
    broker.wait_for_event("created", &before);

    let alarm = MemoryAlarm::raise();
    let during = daemon.path_str("during.flac");
    write_file(&daemon.path("during.flac"), "recorded while blocked");
    // Recorded, not published: the row is pending.
    database.wait_until("the change is recorded", Duration::from_secs(15), |database| {
        database.row(&during).filter(|row| row.published_at.is_none())
    });
    daemon.wait_for_stderr("blocked connection", Duration::from_secs(30));
    assert!(
        broker
            .deliveries()
            .iter()
            .all(|delivery| delivery.file_path() != during),
        "nothing may be published while the broker blocks us"
    );

    drop(alarm);
    broker.wait_for_event("created", &during);
    database.wait_until(
        "the change is marked published",
        Duration::from_secs(15),
        |database| database.row(&during).filter(|row| row.published_at.is_some()),
    );
    let problems = daemon.warnings_and_errors();
    let blocked: Vec<&String> = problems.iter().filter(|line| line.contains("blocked")).collect();
    assert_eq!(blocked.len(), 1, "one warning for the block: {problems:#?}");
    assert!(
        problems.iter().all(|line| !line.contains(" ERROR ")),
        "a block is not an error: {problems:#?}"
    );
    assert!(daemon.terminate().success());
}
