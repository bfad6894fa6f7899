//! TLS to the broker (`amqps://`) and to the database (`sslmode`), against
//! TLS listeners each test starts for itself in front of the shared servers
//! (see `support::tls`), with certificates made in the test.
//!
//! - the daemon over verified TLS to both records and publishes end to end,
//!   also with client certificates where the listener asks for them;
//! - a broker certificate from another CA, for another host, or expired is
//!   refused, and nothing is published;
//! - the registry follows libpq's `sslmode` table, case by case;
//! - TLS settings that cannot work stop the start with exit 2 and one line
//!   naming the variable.

use std::path::Path;
use std::time::Duration;

use file_watcher::message::Origin;
use file_watcher::redact::SecretUrl;
use file_watcher::registry::postgres::{PostgresRegistry, PostgresSettings};
use file_watcher::registry::RegistryError;
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::support::broker::rabbitmq_url;
use crate::support::tls::Protocol;
use crate::support::{
    broker, database, write_file, Daemon, Pki, TestBroker, TestDatabase, TlsProxy, DEADLINE,
};

/// The shared broker's URL, as `amqps://localhost:<port>` of a test's listener.
fn amqps_url(proxy: &TlsProxy) -> String {
    let mut uri: AMQPUri = rabbitmq_url().parse().expect("RABBITMQ_TEST_URL parses");
    uri.scheme = AMQPScheme::AMQPS;
    uri.authority.host = "localhost".to_owned();
    uri.authority.port = proxy.port();
    uri.to_string()
}

/// The shared database's URL at `localhost:<port>` of a test's listener,
/// with `query` (`sslmode=…&sslrootcert=…`).
fn postgres_url(proxy: &TlsProxy, query: &str) -> String {
    format!(
        "{}?{query}",
        database::url_at(&format!("localhost:{}", proxy.port()))
    )
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

#[test]
fn tls_verified_broker_and_database_record_and_publish_end_to_end() {
    let pki = Pki::new();
    let server = pki.files("server");
    let broker_tls = TlsProxy::start(broker::address(), Protocol::Amqps, &server, None);
    let database_tls = TlsProxy::start(database::address(), Protocol::Postgres, &server, None);
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let ca = path_text(&pki.ca_file());
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("RABBITMQ_URL", amqps_url(&broker_tls))
        .env("RABBITMQ_CA_FILE", &ca)
        .env(
            "DATABASE_URL",
            postgres_url(&database_tls, &format!("sslmode=verify-full&sslrootcert={ca}")),
        )
        .start();
    let path = daemon.path_str("verified.flac");
    write_file(Path::new(&path), b"over TLS");
    let delivered = broker.wait_for_event("created", &path);
    database.wait_published(&path, delivered.message_id());
    assert!(broker_tls.handshakes() >= 1 && database_tls.handshakes() >= 1);
    assert_eq!(database_tls.plaintext_sessions(), 0);
    assert!(
        daemon.warnings_and_errors().is_empty(),
        "{}",
        daemon.stderr_text()
    );
}

#[test]
fn tls_client_certificates_are_sent_where_the_listener_asks_for_one() {
    let pki = Pki::new();
    let server = pki.files("server");
    let client = pki.files("client");
    let ca = pki.ca_file();
    let broker_tls = TlsProxy::start(broker::address(), Protocol::Amqps, &server, Some(&ca));
    let database_tls = TlsProxy::start(database::address(), Protocol::Postgres, &server, Some(&ca));
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("RABBITMQ_URL", amqps_url(&broker_tls))
        .env("RABBITMQ_CA_FILE", path_text(&ca))
        .env("RABBITMQ_CERT_FILE", path_text(&client.certificate))
        .env("RABBITMQ_KEY_FILE", path_text(&client.key))
        .env(
            "DATABASE_URL",
            postgres_url(
                &database_tls,
                &format!(
                    "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
                    path_text(&ca),
                    path_text(&client.certificate),
                    path_text(&client.key)
                ),
            ),
        )
        .start();
    let path = daemon.path_str("mutual.flac");
    write_file(Path::new(&path), b"mutual TLS");
    let delivered = broker.wait_for_event("created", &path);
    database.wait_published(&path, delivered.message_id());

    // Without a client certificate the same broker listener refuses us.
    let refused = TestBroker::new();
    let without = Daemon::builder()
        .with_broker(&refused)
        .env("RABBITMQ_URL", amqps_url(&broker_tls))
        .env("RABBITMQ_CA_FILE", path_text(&ca))
        .start();
    write_file(&without.path("refused.flac"), b"no client certificate");
    without.wait_for_stderr_with(&["RabbitMQ", "alert"], DEADLINE);
    assert!(refused.deliveries().is_empty(), "{}", refused.summary());
}

#[test]
fn tls_broker_refuses_another_ca_another_host_and_an_expired_certificate() {
    let pki = Pki::new();
    let cases = [
        // (the listener's certificate, the CA the daemon trusts, what the refusal says)
        ("rogue", pki.ca_file(), "UnknownIssuer"),
        ("server", pki.other_ca_file(), "UnknownIssuer"),
        ("wrong-host", pki.ca_file(), "not valid for name"),
        ("expired", pki.ca_file(), "expired"),
    ];
    let runs: Vec<_> = cases
        .iter()
        .map(|(certificate, ca, reason)| {
            let proxy = TlsProxy::start(broker::address(), Protocol::Amqps, &pki.files(certificate), None);
            let broker = TestBroker::new();
            let daemon = Daemon::builder()
                .with_broker(&broker)
                .env("RABBITMQ_URL", amqps_url(&proxy))
                .env("RABBITMQ_CA_FILE", path_text(ca))
                .start();
            write_file(&daemon.path("refused.flac"), b"must not go out");
            (proxy, broker, daemon, *certificate, *reason)
        })
        .collect();
    for (proxy, broker, daemon, certificate, reason) in &runs {
        let line = daemon.wait_for_stderr_with(&["invalid peer certificate", reason], DEADLINE);
        assert!(!line.contains("guest:guest"), "{line}");
        assert_eq!(proxy.handshakes(), 0, "{certificate}");
        assert!(
            broker.deliveries().is_empty(),
            "{certificate}: {}",
            broker.summary()
        );
    }
}

/// What `PostgresRegistry::connect` makes of `url`: `Ok` or the error text.
fn connect(database: &TestDatabase, url: String) -> Result<(), String> {
    let settings = PostgresSettings {
        url: SecretUrl::new(url),
        connect_timeout: Duration::from_secs(5),
        ..database.settings(1)
    };
    let origin = Origin {
        instance_id: "tls-test".to_owned(),
        watched_directory: "/tls-test".to_owned(),
    };
    match PostgresRegistry::connect(&settings, origin) {
        Ok(_) => Ok(()),
        Err(error @ (RegistryError::Unavailable(_) | RegistryError::Query { .. })) => Err(error.to_string()),
        Err(error) => Err(format!("{error:?}")),
    }
}

#[test]
fn tls_database_follows_libpq_sslmode() {
    let pki = Pki::new();
    let database = TestDatabase::new();
    let ca = path_text(&pki.ca_file());
    let listener = |certificate: &str| {
        TlsProxy::start(
            database::address(),
            Protocol::Postgres,
            &pki.files(certificate),
            None,
        )
    };
    let refused = |proxy: &TlsProxy, query: &str, reason: &str| {
        let error = connect(&database, postgres_url(proxy, query)).expect_err(query);
        assert!(error.contains(reason), "{query}: {error}");
    };
    let accepted = |proxy: &TlsProxy, query: &str| {
        let before = proxy.handshakes();
        connect(&database, postgres_url(proxy, query)).unwrap_or_else(|error| panic!("{query}: {error}"));
        assert!(proxy.handshakes() > before, "{query} did not use TLS");
    };

    let good = listener("server");
    accepted(&good, &format!("sslmode=verify-full&sslrootcert={ca}"));
    accepted(&good, "sslmode=prefer");
    accepted(&good, "sslmode=require");
    let before = good.plaintext_sessions();
    connect(&database, postgres_url(&good, "sslmode=disable")).expect("sslmode=disable");
    assert!(good.plaintext_sessions() > before, "sslmode=disable used TLS");

    let wrong_host = listener("wrong-host");
    refused(
        &wrong_host,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        "not valid for name",
    );
    accepted(&wrong_host, &format!("sslmode=verify-ca&sslrootcert={ca}"));

    let expired = listener("expired");
    refused(
        &expired,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
        "expired",
    );

    let rogue = listener("rogue");
    refused(
        &rogue,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
        "UnknownIssuer",
    );
    // libpq: require with a root certificate checks the chain like verify-ca;
    // without one it only encrypts.
    refused(
        &rogue,
        &format!("sslmode=require&sslrootcert={ca}"),
        "UnknownIssuer",
    );
    accepted(&rogue, "sslmode=require");

    let plain = TlsProxy::start(
        database::address(),
        Protocol::PostgresWithoutTls,
        &pki.files("server"),
        None,
    );
    refused(&plain, "sslmode=require", "server does not support TLS");
    refused(
        &plain,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        "server does not support TLS",
    );
    connect(&database, postgres_url(&plain, "sslmode=prefer")).expect("prefer falls back to plaintext");
    assert!(plain.plaintext_sessions() >= 1);
}

#[test]
fn tls_settings_that_cannot_work_stop_the_start_naming_the_variable() {
    let pki = Pki::new();
    let client = pki.files("client");
    let server = pki.files("server");
    let garbage = pki.path("garbage.pem");
    write_file(&garbage, b"not a certificate\n");
    let amqps = "amqps://guest:s3cret-tls@localhost:5671/%2f";
    let path = |file: &Path| path_text(file);
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("RABBITMQ_URL", amqps.into()), ("RABBITMQ_CA_FILE", "/nonexistent/ca.pem".into())],
            "RABBITMQ_CA_FILE",
        ),
        (
            vec![("RABBITMQ_URL", amqps.into()), ("RABBITMQ_CA_FILE", path(&garbage))],
            "RABBITMQ_CA_FILE",
        ),
        (
            vec![("RABBITMQ_URL", amqps.into()), ("RABBITMQ_CERT_FILE", path(&client.certificate))],
            "RABBITMQ_CERT_FILE",
        ),
        (
            // A client certificate with another certificate's key.
            vec![
                ("RABBITMQ_URL", amqps.into()),
                ("RABBITMQ_CERT_FILE", path(&client.certificate)),
                ("RABBITMQ_KEY_FILE", path(&server.key)),
            ],
            "RABBITMQ_CERT_FILE",
        ),
        (
            vec![
                ("RABBITMQ_URL", amqps.into()),
                ("RABBITMQ_CERT_FILE", path(&client.certificate)),
                ("RABBITMQ_KEY_FILE", path(&garbage)),
            ],
            "RABBITMQ_CERT_FILE",
        ),
        (
            // TLS files with a plaintext URL: the operator meant TLS.
            vec![
                ("RABBITMQ_URL", "amqp://guest:s3cret-tls@localhost/%2f".into()),
                ("RABBITMQ_CA_FILE", path(&pki.ca_file())),
            ],
            "RABBITMQ_CA_FILE",
        ),
        (
            vec![(
                "DATABASE_URL",
                "postgres://postgres:s3cret-tls@localhost/test?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".into(),
            )],
            "DATABASE_URL",
        ),
        (
            vec![("DATABASE_URL", "postgres://postgres:s3cret-tls@localhost/test?sslmode=allow".into())],
            "DATABASE_URL",
        ),
    ];
    for (environment, variable) in cases {
        let mut builder = Daemon::builder();
        for (name, value) in &environment {
            builder = builder.env(name, value.clone());
        }
        let finished = builder.run();
        let lines = finished.stderr_nonblank();
        assert_eq!(finished.status.code(), Some(2), "{environment:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{environment:?}: {lines:?}");
        assert!(lines[0].contains(variable), "{environment:?}: {lines:?}");
        assert!(!lines[0].contains("s3cret-tls"), "{lines:?}");
    }
}

/// The heartbeat and the operator commands open connections of their own,
/// outside the pool: they follow `sslmode` too (a `verify-full` URL is not
/// even something the driver alone can parse).
#[test]
fn tls_heartbeat_and_operator_commands_follow_sslmode() {
    let pki = Pki::new();
    let database_tls = TlsProxy::start(
        database::address(),
        Protocol::Postgres,
        &pki.files("server"),
        None,
    );
    let database = TestDatabase::new();
    let ca = path_text(&pki.ca_file());
    let url = postgres_url(&database_tls, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let mut daemon = Daemon::builder()
        .with_database(&database)
        .env("DATABASE_URL", &url)
        .env("INSTANCE_ID", "tls-heartbeat")
        .start();
    let instances = || {
        Daemon::builder()
            .arg("instances")
            .arg("--json")
            .with_database(&database)
            .env("DATABASE_URL", &url)
            .run()
    };
    crate::support::wait_until("the heartbeat's row, read over TLS", DEADLINE, || {
        let finished = instances();
        finished.status.success() && finished.stdout_text().contains("\"tls-heartbeat\"")
    });
    let finished = instances();
    assert!(
        finished.stdout_text().contains("\"running\""),
        "{}",
        finished.stdout_text()
    );
    assert!(daemon.terminate().success());
    assert_eq!(database_tls.plaintext_sessions(), 0);
    // The pool, the instance lock, the heartbeat, and one per command run.
    assert!(
        database_tls.handshakes() >= 4,
        "{} handshakes",
        database_tls.handshakes()
    );
    assert!(
        daemon.warnings_and_errors().is_empty(),
        "{}",
        daemon.stderr_text()
    );
}
