//! Metrics and probes of a running daemon (issue 10): `/metrics` against the
//! files a test wrote, `/readyz` through a broker outage of the test's own
//! (a [`FaultProxy`] cut, never the shared broker), `METRICS_ADDR` errors,
//! and `file-watcher healthcheck`. Also home of the helpers `ops.rs` shares:
//! a free port, a password-bearing database URL, metric lookup.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use file_watcher::ops::healthcheck::ask;

use crate::support::{
    broker, wait_until, write_file, Daemon, FaultProxy, TestBroker, TestDatabase, DEADLINE,
};

/// The password every URL of these tests carries (PostgreSQL trusts the
/// test user, so any password connects): it must appear in no output.
pub const SECRET: &str = "observe-Secret-8841";

/// A port nobody listens on right now, on 127.0.0.1.
pub fn free_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address")
}

/// The test database's URL with [`SECRET`] as its password.
pub fn url_with_secret(database: &TestDatabase) -> String {
    let config: postgres::Config = database.url().parse().expect("the test URL parses");
    let user = config.get_user().unwrap_or("postgres");
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => panic!("the observability tests need a TCP database URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}:{SECRET}@{host}:{port}/{dbname}")
}

/// GET `path` at `address`: status and body (the daemon's own client code).
pub fn get(address: SocketAddr, path: &str) -> (u16, String) {
    ask(address, path).unwrap_or_else(|error| panic!("GET {path} at {address}: {error}"))
}

/// The value of the series `name` whose labels include every one of
/// `labels` (`kind="create"`), in the text of `/metrics`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
            let series_name = series.split('{').next().unwrap_or("");
            series_name == name && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

#[test]
fn metrics_count_the_files_written() {
    let database = TestDatabase::new();
    let broker = TestBroker::new();
    let address = free_address();
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("DATABASE_URL", url_with_secret(&database))
        .env("INSTANCE_ID", "metrics-1")
        .env("METRICS_ADDR", address.to_string())
        .start();
    let contents: Vec<Vec<u8>> = (1..=5).map(|n| vec![b'x'; n * 1000]).collect();
    for (n, content) in contents.iter().enumerate() {
        write_file(&daemon.path(&format!("{n}.flac")), content);
    }
    broker.wait_for_deliveries(5, DEADLINE);
    let scrape = || get(address, "/metrics").1;
    let value = |text: &str, name: &str, labels: &[&str]| metric(text, name, labels).unwrap_or(-1.0);
    // Confirms are counted after the outbox let them go: wait for the count.
    wait_until("five confirms counted", DEADLINE, || {
        value(&scrape(), "file_watcher_messages_confirmed_total", &[]) == 5.0
    });
    let text = scrape();
    let instance = "instance_id=\"metrics-1\"";
    let created = ["event_type=\"created\"", instance];
    assert_eq!(
        value(&text, "file_watcher_messages_recorded_total", &created),
        5.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "file_watcher_messages_recorded_total",
            &["event_type=\"deleted\""]
        ),
        0.0
    );
    assert_eq!(
        value(&text, "file_watcher_messages_published_total", &[instance]),
        5.0
    );
    assert_eq!(value(&text, "file_watcher_messages_returned_total", &[]), 0.0);
    assert_eq!(value(&text, "file_watcher_registry_writes_total", &[]), 5.0);
    assert_eq!(value(&text, "file_watcher_files_hashed_total", &[]), 5.0);
    let bytes: usize = contents.iter().map(Vec::len).sum();
    assert_eq!(value(&text, "file_watcher_bytes_hashed_total", &[]), bytes as f64);
    assert!(
        value(&text, "file_watcher_events_seen_total", &["kind=\"create\""]) >= 5.0,
        "{text}"
    );
    assert!(
        value(&text, "file_watcher_events_seen_total", &["kind=\"close_write\""]) >= 5.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "file_watcher_end_to_end_latency_seconds_count", &[]),
        5.0
    );
    assert_eq!(value(&text, "file_watcher_errors_total", &["kind=\"file\""]), 0.0);
    assert_eq!(value(&text, "file_watcher_watched_directories", &[]), 1.0);
    assert_eq!(value(&text, "file_watcher_polling", &[]), 0.0);
    assert_eq!(value(&text, "file_watcher_build_info", &["version=\""]), 1.0);
    assert_eq!(value(&text, "file_watcher_ready", &[]), 1.0);
    // Every series names the instance.
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        assert!(line.contains(instance), "a series without instance_id: {line}");
    }
    // A deletion, then the outbox as the heartbeat measures it: empty.
    std::fs::remove_file(daemon.path("0.flac")).expect("delete a file");
    broker.wait_for_event("deleted", &daemon.path_str("0.flac"));
    wait_until(
        "the deletion counted and the outbox measured empty",
        DEADLINE,
        || {
            let text = scrape();
            value(
                &text,
                "file_watcher_messages_recorded_total",
                &["event_type=\"deleted\""],
            ) == 1.0
                && value(&text, "file_watcher_outbox_depth", &[]) == 0.0
        },
    );
    let (status, health) = get(address, "/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(
        !text.contains(SECRET) && !scrape().contains(SECRET),
        "the password leaked into /metrics"
    );
    assert!(!daemon.stderr_text().contains(SECRET));
}

#[test]
fn readyz_fails_while_the_broker_is_away_and_passes_when_it_is_back() {
    let database = TestDatabase::new();
    let broker = TestBroker::new();
    let proxy = FaultProxy::start(broker::address());
    let address = free_address();
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("RABBITMQ_URL", broker::url_through(&proxy))
        .env("METRICS_ADDR", address.to_string())
        .start();
    let ready = || get(address, "/readyz");
    wait_until("ready at start", DEADLINE, || ready().0 == 200);

    // The broker goes away: live connections cut, new ones refused.
    proxy.refuse(true);
    proxy.cut();
    wait_until("not ready while the broker is away", DEADLINE, || {
        ready().0 == 503
    });
    let (_, body) = ready();
    assert!(body.starts_with("not ready: not connected to RabbitMQ"), "{body}");
    assert_eq!(get(address, "/healthz").0, 200, "alive, though not ready");
    let text = get(address, "/metrics").1;
    assert_eq!(metric(&text, "file_watcher_ready", &[]), Some(0.0), "{text}");

    proxy.refuse(false);
    // Reconnecting waits out the publisher's backoff (at most ~36 s).
    wait_until(
        "ready again once the broker is back",
        Duration::from_secs(60),
        || ready().0 == 200,
    );
    let text = get(address, "/metrics").1;
    assert!(
        metric(&text, "file_watcher_reconnects_total", &["service=\"broker\""]) >= Some(1.0),
        "{text}"
    );
    // And it publishes again.
    write_file(&daemon.path("after.flac"), "after");
    broker.wait_for_event("created", &daemon.path_str("after.flac"));
}

#[test]
fn a_bad_metrics_addr_or_a_port_in_use_exits_2_naming_it() {
    let finished = Daemon::builder().env("METRICS_ADDR", "localhost:9464").run();
    assert_eq!(finished.status.code(), Some(2), "{}", finished.stderr_text());
    let lines = finished.stderr_nonblank();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("METRICS_ADDR") && lines[0].contains("localhost:9464"),
        "{lines:?}"
    );

    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let address = taken.local_addr().expect("its address");
    let finished = Daemon::builder().env("METRICS_ADDR", address.to_string()).run();
    assert_eq!(finished.status.code(), Some(2), "{}", finished.stderr_text());
    let lines = finished.stderr_nonblank();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("METRICS_ADDR") && lines[0].contains(&address.to_string()),
        "{lines:?}"
    );
}

#[test]
fn healthcheck_asks_the_running_instance() {
    let address = free_address();
    let mut daemon = Daemon::builder().env("METRICS_ADDR", address.to_string()).start();
    let healthcheck = |metrics_addr: Option<SocketAddr>| {
        let builder = Daemon::builder().arg("healthcheck");
        let builder = match metrics_addr {
            Some(address) => builder.env("METRICS_ADDR", address.to_string()),
            None => builder,
        };
        builder.run()
    };
    let healthy = healthcheck(Some(address));
    assert_eq!(healthy.status.code(), Some(0), "{}", healthy.stdout_text());
    assert_eq!(healthy.stdout.len(), 1, "{:?}", healthy.stdout);
    assert!(
        healthy.stdout[0].starts_with("healthy: alive"),
        "{:?}",
        healthy.stdout
    );

    daemon.terminate();
    let gone = healthcheck(Some(address));
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(gone.stdout.len(), 1, "{:?}", gone.stdout);
    assert!(
        gone.stdout[0].starts_with("unhealthy: cannot ask /healthz at METRICS_ADDR"),
        "{:?}",
        gone.stdout
    );

    let unset = healthcheck(None);
    assert_ne!(unset.status.code(), Some(0));
    assert!(
        unset.stdout_text().contains("METRICS_ADDR is not set"),
        "{}",
        unset.stdout_text()
    );
}
