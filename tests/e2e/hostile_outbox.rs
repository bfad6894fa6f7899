//! Issue 8, item 8 and two small things: an outbox row that can never go out
//! does not hold up the rows behind it; the publisher says "publishing
//! again" only after a real failure; no password is ever printed.
//!
//! The outbox tests prepare the schema as the last release left it
//! (migrations 1 and 2), put rows into it as that release could have left
//! them, and only then start the daemon, which migrates the schema and
//! publishes. A row that cannot be published is set aside: it stays in
//! `outbox` with `set_aside_at` and `set_aside_reason`, one ERROR line names
//! it, and everything else flows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use file_watcher::message::{Content, EventType, Message, Origin};
use file_watcher::registry::postgres::MIGRATIONS;
use tempfile::TempDir;
use uuid::Uuid;

use crate::support::daemon::log_level;
use crate::support::{broker, write_file, Daemon, FaultProxy, TestBroker, TestDatabase, DEADLINE};

/// A unique, valid `INSTANCE_ID` that says which test it belongs to.
fn instance_id(label: &str) -> String {
    format!("{label}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// A tree of the test's own, known before the daemon starts (the outbox
/// rows name paths in it). Canonical, as the daemon prints paths.
fn tree() -> (TempDir, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("file-watcher-outbox-")
        .tempdir()
        .expect("create temp dir");
    let path = root.path().canonicalize().expect("canonicalize temp dir");
    (root, path)
}

fn text(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// The schema as the release before this one left it: only the migrations
/// it knew (1 and 2), recorded the way `migrate` records them.
fn migrate_as_the_last_release(database: &TestDatabase) {
    let mut client = database.client();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; \
             CREATE TABLE schema_migrations (version integer PRIMARY KEY, \
                 description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
            schema = database.schema()
        ))
        .expect("create the old schema");
    for migration in MIGRATIONS.iter().filter(|migration| migration.version <= 2) {
        client
            .batch_execute(migration.sql)
            .expect("apply an old migration");
        client
            .execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                &[&migration.version, &migration.description],
            )
            .expect("record an old migration");
    }
}

/// Puts one row into the outbox as a past version would have; returns its id.
fn insert_outbox_row(
    database: &TestDatabase,
    message_id: Uuid,
    file_path: &str,
    body: &str,
    instance_id: &str,
) -> i64 {
    database.query(
        "INSERT INTO outbox (message_id, file_path, body, instance_id) \
         VALUES ($1::text::uuid, $2, $3, $4) RETURNING id",
        &[&message_id.to_string(), &file_path, &body, &instance_id],
    )[0]
    .get(0)
}

/// An outbox row holding `message` as its body, under `message_id` (which a
/// test may make differ from the body's own).
fn insert_message(database: &TestDatabase, message_id: Uuid, message: &Message, instance_id: &str) -> i64 {
    insert_outbox_row(
        database,
        message_id,
        &message.file_path,
        &message.to_json(),
        instance_id,
    )
}

/// A message as this release writes it, for `path` in `origin`'s tree.
fn good_message(origin: &Origin, path: &str) -> Message {
    let content = Content {
        sha256_hash: "0".repeat(64),
        xxh128_hash: "0".repeat(32),
        size_bytes: 1,
        modified_time: "2026-01-01T00:00:00.000Z".into(),
        file_type: "flac".into(),
    };
    origin.message(EventType::Created, path, None, Uuid::new_v4(), Some(content))
}

/// `(set_aside_at is set, set_aside_reason)` of outbox row `id`; `None` once
/// the row is gone.
fn set_aside(database: &TestDatabase, id: i64) -> Option<(bool, Option<String>)> {
    database
        .query(
            "SELECT set_aside_at IS NOT NULL, set_aside_reason FROM outbox WHERE id = $1",
            &[&id],
        )
        .first()
        .map(|record| (record.get(0), record.get(1)))
}

/// Waits until outbox row `id` is set aside; returns its reason.
#[track_caller]
fn wait_set_aside(database: &TestDatabase, id: i64, timeout: Duration) -> String {
    database.wait_until(
        &format!("outbox row {id} is set aside"),
        timeout,
        |database| match database.try_query(
            "SELECT set_aside_reason FROM outbox WHERE id = $1 AND set_aside_at IS NOT NULL",
            &[&id],
        ) {
            Some(records) => records.first().map(|record| record.get(0)),
            None => None,
        },
    )
}

/// The one ERROR line that names `message_id` and its outbox `id`.
#[track_caller]
fn assert_named_once(daemon: &Daemon, message_id: Uuid, id: i64) {
    let lines = daemon.stderr_lines_with(&[&message_id.to_string()]);
    assert_eq!(
        lines.len(),
        1,
        "one line names {message_id}:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(log_level(&lines[0]), Some("ERROR"), "{}", lines[0]);
    assert!(lines[0].contains(&format!("outbox id {id}")), "{}", lines[0]);
    assert!(lines[0].contains("set aside"), "{}", lines[0]);
}

/// A body an older layout left behind, which this release cannot read, and
/// a body that reads but names another message than its row, lie in the
/// outbox ahead of good rows. Both are set aside, each named in one ERROR
/// line, and every good message arrives.
#[test]
fn a_bad_outbox_row_is_set_aside_and_the_rest_flow() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let (_root, dir) = tree();
    let instance = instance_id("outbox");
    let origin = Origin {
        instance_id: instance.clone(),
        watched_directory: text(&dir),
    };
    migrate_as_the_last_release(&database);

    let unreadable_id = Uuid::new_v4();
    let unreadable_path = text(&dir.join("old-layout.flac"));
    let unreadable = insert_outbox_row(
        &database,
        unreadable_id,
        &unreadable_path,
        &format!(r#"{{"version":0,"event":"created","path":"{unreadable_path}"}}"#),
        &instance,
    );
    let kept = good_message(&origin, &text(&dir.join("kept.flac")));
    insert_message(&database, kept.message_id, &kept, &instance);
    let misnamed_id = Uuid::new_v4();
    let misnamed_body = good_message(&origin, &text(&dir.join("misnamed.flac")));
    let misnamed = insert_message(&database, misnamed_id, &misnamed_body, &instance);

    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .watching(&dir)
        .start();
    for name in ["a.flac", "b.flac", "c.flac"] {
        write_file(&dir.join(name), name);
    }
    broker.wait_for_event("created", &kept.file_path);
    for name in ["a.flac", "b.flac", "c.flac"] {
        let path = text(&dir.join(name));
        let created = broker.wait_for_event("created", &path);
        database.wait_published(&path, created.message_id());
    }

    let reason = wait_set_aside(&database, unreadable, DEADLINE);
    assert!(reason.contains("cannot read the body"), "{reason}");
    let reason = wait_set_aside(&database, misnamed, DEADLINE);
    assert!(reason.contains(&misnamed_body.message_id.to_string()), "{reason}");
    assert!(reason.contains(&misnamed_id.to_string()), "{reason}");
    database.wait_until("only the rows set aside are left", DEADLINE, |database| {
        let ids: Vec<i64> = database
            .query("SELECT id FROM outbox ORDER BY id", &[])
            .iter()
            .map(|record| record.get(0))
            .collect();
        (ids == [unreadable, misnamed]).then_some(())
    });

    // More rounds of the publisher: still one line each, and neither row
    // went out.
    let deliveries = broker.barrier(&dir);
    assert!(
        deliveries
            .iter()
            .all(|delivered| delivered.message_id() != misnamed_body.message_id.to_string()),
        "{}",
        broker.summary()
    );
    assert_eq!(deliveries.len(), 4, "{}", broker.summary());
    assert_named_once(&daemon, unreadable_id, unreadable);
    assert_named_once(&daemon, misnamed_id, misnamed);
    assert_eq!(set_aside(&database, unreadable).map(|row| row.0), Some(true));
}

/// A newer release may add fields to the body. This one, publishing such a
/// row (a rolling upgrade, or another instance's orphan), sends the body
/// exactly as stored: the fields it does not know, their order and spacing.
#[test]
fn a_body_a_newer_release_wrote_goes_out_byte_for_byte() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let (_root, dir) = tree();
    let instance = instance_id("newer");
    let origin = Origin {
        instance_id: instance.clone(),
        watched_directory: text(&dir),
    };
    migrate_as_the_last_release(&database);
    let message = good_message(&origin, &text(&dir.join("newer.flac")));
    let json = message.to_json();
    let body = format!("{{\"added_later\": {{\"bpm\": 128}}, {}", &json[1..]);
    insert_outbox_row(
        &database,
        message.message_id,
        &message.file_path,
        &body,
        &instance,
    );

    let _daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .watching(&dir)
        .start();
    let delivered = broker.wait_for_event("created", &message.file_path);
    assert_eq!(
        String::from_utf8_lossy(&delivered.data),
        body,
        "{}",
        broker.summary()
    );
    database.wait_until("the row is published", DEADLINE, |database| {
        database
            .query("SELECT 1 FROM outbox", &[])
            .is_empty()
            .then_some(())
    });
}

/// RabbitMQ refuses a message over its `max_message_size` (128 MiB by
/// default) by closing the channel. A row whose body is that large is set
/// aside once the broker has refused it alone; the rows behind it go out.
#[test]
fn a_message_the_broker_refuses_is_set_aside() {
    const OVER_THE_LIMIT: usize = 128 * 1024 * 1024 + 4096;
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let (_root, dir) = tree();
    let instance = instance_id("outbox-huge");
    let origin = Origin {
        instance_id: instance.clone(),
        watched_directory: text(&dir),
    };
    migrate_as_the_last_release(&database);

    let mut huge = good_message(&origin, &text(&dir.join("huge.flac")));
    huge.old_path = Some(format!("{}/{}", text(&dir), "x".repeat(OVER_THE_LIMIT)));
    let huge_row = insert_message(&database, huge.message_id, &huge, &instance);
    drop(huge.old_path.take());
    let kept = good_message(&origin, &text(&dir.join("kept.flac")));
    insert_message(&database, kept.message_id, &kept, &instance);

    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .watching(&dir)
        .start();
    // Debug builds take about half a minute to serialize and send 128 MiB twice.
    let patient = Duration::from_secs(180);
    broker.wait_for(|delivered| delivered.file_path() == kept.file_path, patient);
    let reason = wait_set_aside(&database, huge_row, patient);
    assert!(reason.contains("RabbitMQ refused it"), "{reason}");
    write_file(&dir.join("after.flac"), "after");
    broker.wait_for_event("created", &text(&dir.join("after.flac")));
    let deliveries = broker.barrier(&dir);
    assert!(
        deliveries
            .iter()
            .all(|delivered| delivered.message_id() != huge.message_id.to_string()),
        "{}",
        broker.summary()
    );
    assert_named_once(&daemon, huge.message_id, huge_row);
}

/// A clean start with the broker up: nothing failed, so nothing says it
/// publishes "again".
#[test]
fn a_clean_start_reports_no_failed_attempts() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let daemon = Daemon::builder().with_sinks(&broker, &database).start();
    write_file(&daemon.path("first.flac"), "first");
    broker.wait_for_event("created", &daemon.path_str("first.flac"));
    broker.barrier(daemon.dir());
    let claims = daemon.stderr_lines_with(&["failed attempt"]);
    assert!(claims.is_empty(), "{}", daemon.stderr_text());
    assert!(
        daemon.warnings_and_errors().is_empty(),
        "{}",
        daemon.stderr_text()
    );
}

/// The broker refuses connections from the start and the tree is quiet.
/// While the broker refuses, nothing claims that publishing works again (an
/// empty outbox is no success); the publisher keeps trying to reach the
/// broker, and says "publishing again" once, after a message went out.
#[test]
fn publishing_again_is_said_only_after_publishing() {
    let proxy = FaultProxy::start(broker::address());
    proxy.refuse(true);
    let broker = TestBroker::new();
    let daemon = Daemon::builder()
        .with_broker(&broker)
        .env("RABBITMQ_URL", broker::url_through(&proxy))
        .env("LOG_LEVEL", "debug")
        .start();
    daemon.wait_for_stderr("cannot publish now", DEADLINE);

    // The publisher's next round with an empty outbox: it tries the broker
    // again and says so at debug level (without the fix it claimed instead
    // that publishing worked again).
    let claims = || daemon.stderr_lines_with(&["publishing again"]);
    crate::support::wait_until("the publisher's next round", DEADLINE, || {
        !claims().is_empty() || !daemon.stderr_lines_with(&["publish attempt 2 failed"]).is_empty()
    });
    assert!(
        claims().is_empty(),
        "nothing was published:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(
        daemon.stderr_lines_with(&["cannot publish now"]).len(),
        1,
        "one warning for the outage:\n{}",
        daemon.stderr_text()
    );

    proxy.refuse(false);
    let path = daemon.path_str("after.flac");
    write_file(&daemon.path("after.flac"), "after");
    broker.wait_for_event("created", &path);
    let claim = daemon.wait_for_stderr("publishing again after", DEADLINE);
    assert_eq!(log_level(&claim), Some("INFO"), "{claim}");
    broker.barrier(daemon.dir());
    assert_eq!(claims().len(), 1, "{}", daemon.stderr_text());
}

/// With passwords in both URLs, both servers unreachable and debug logging,
/// neither password reaches stdout or stderr.
#[test]
fn passwords_are_printed_nowhere_even_at_debug_level() {
    const BROKER_SECRET: &str = "Br0ker-s3cret";
    const DATABASE_SECRET: &str = "Db-s3cret-pw";
    // Ports nothing listens on: a proxy that refuses every connection.
    let proxy = FaultProxy::start(broker::address());
    proxy.refuse(true);
    let port = proxy.port();
    let mut daemon = Daemon::builder()
        .env(
            "RABBITMQ_URL",
            format!("amqp://watcher:{BROKER_SECRET}@127.0.0.1:{port}/%2f"),
        )
        .env(
            "DATABASE_URL",
            format!("postgres://watcher:{DATABASE_SECRET}@127.0.0.1:{port}/registry"),
        )
        .env("LOG_LEVEL", "debug")
        .start();
    daemon.wait_for_stderr("cannot publish now", DEADLINE);
    daemon.wait_for_stderr("database unavailable", DEADLINE);
    assert!(daemon.terminate().success(), "{}", daemon.stderr_text());

    let output = format!("{}\n{}", daemon.stdout_text(), daemon.stderr_text());
    for secret in [BROKER_SECRET, DATABASE_SECRET] {
        let leaks: Vec<&str> = output.lines().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret:?} printed:\n{}", leaks.join("\n"));
    }
    assert!(output.contains("watcher:***@127.0.0.1"), "{output}");
}
