//! The daemon against the real RabbitMQ and PostgreSQL: confirmed publishing
//! and a conflict-free file registry shared by many instances.
//!
//! Every test gets its own exchange and queue ([`TestBroker`]), its own schema
//! ([`TestDatabase`]) and its own directories (`Daemon`), so tests run in
//! parallel and rerun without cleanup. Sinks are declared before daemons, so
//! daemons are killed before their schema is dropped.
//!
//! With a broker the daemon prints nothing on stdout: what it published is
//! read from the test's queue, and "nothing else was published" is shown with
//! [`TestBroker::barrier`] (a marker file written after the action, whose
//! message comes after anything the action produced). The registry has no
//! event to wait on, so database conditions are polled up to a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use file_watcher::registry::postgres::MIGRATIONS;
use lapin::types::AMQPValue;
use lapin::uri::AMQPUri;
use serde_json::json;
use uuid::Uuid;

use crate::support::broker::wait_until_listed;
use crate::support::daemon::log_level;
use crate::support::database::database_url;
use crate::support::{
    sha256_hex, write_file, xxh128_hex, Daemon, Delivered, FileRow, TestBroker, TestDatabase, DEADLINE,
};

/// A unique, valid `INSTANCE_ID` that says which test it belongs to.
fn instance_id(label: &str) -> String {
    format!("{label}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

fn nanos(time: SystemTime) -> i64 {
    i64::try_from(time.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()).expect("fits")
}

/// `(event_type, file_path)` → how many deliveries said so.
fn counts(deliveries: &[Delivered]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for delivered in deliveries {
        *counts
            .entry((
                delivered.event_type().to_owned(),
                delivered.file_path().to_owned(),
            ))
            .or_insert(0) += 1;
    }
    counts
}

fn change(event_type: &str, path: &str) -> (String, String) {
    (event_type.to_owned(), path.to_owned())
}

#[track_caller]
fn assert_no_warnings_or_errors(daemon: &Daemon) {
    let problems = daemon.warnings_and_errors();
    assert!(problems.is_empty(), "WARN/ERROR lines:\n{}", problems.join("\n"));
}

#[track_caller]
fn header(delivered: &Delivered, name: &str) -> AMQPValue {
    delivered
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} is missing: {:?}", delivered.headers))
        .clone()
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

/// Checks what every delivery of `event_type` carries outside its body.
#[track_caller]
fn assert_envelope(delivered: &Delivered, event_type: &str) {
    assert_eq!(delivered.routing_key, format!("file.{event_type}"));
    assert_eq!(Delivered::text(delivered.properties.kind()), Some(event_type));
    assert_eq!(header(delivered, "x-event-type"), long_string(event_type));
    assert_eq!(
        Delivered::text(delivered.properties.message_id()),
        Some(delivered.message_id())
    );
}

/// A present or departed row, as a change left it.
#[track_caller]
fn assert_row(
    row: &FileRow,
    (state, last_event, old_path): (&str, &str, Option<&str>),
    content: &[u8],
    daemon: &Daemon,
    instance: &str,
) {
    assert_eq!(
        (
            row.state.as_str(),
            row.last_event.as_str(),
            row.old_path.as_deref()
        ),
        (state, last_event, old_path),
        "{row:#?}"
    );
    assert_eq!(row.sha256, sha256_hex(content), "{row:#?}");
    assert_eq!(row.xxh128, xxh128_hex(content), "{row:#?}");
    assert_eq!(row.size_bytes, content.len() as i64, "{row:#?}");
    assert_eq!(row.instance_id, instance, "{row:#?}");
    assert_eq!(row.watched_directory, daemon.dir_str(), "{row:#?}");
    assert!(row.published_at.is_some(), "{row:#?}");
}

/// Issue 1: one real delivery, field by field, property by property.
#[test]
fn a_delivery_carries_the_contract_in_body_properties_and_headers() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let instance = instance_id("contract");
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .start();
    let content = b"the contract, byte for byte";
    let path = daemon.path_str("Song.FLAC");
    let before = unix_seconds(SystemTime::now());
    write_file(&daemon.path("Song.FLAC"), content);
    let delivered = broker.wait_for_event("created", &path);
    let after = unix_seconds(SystemTime::now());

    let body = delivered.body.as_object().expect("an object");
    let keys: BTreeSet<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "schema_version",
            "message_id",
            "correlation_id",
            "timestamp",
            "event_type",
            "file_path",
            "instance_id",
            "watched_directory",
            "sha256_hash",
            "xxh128_hash",
            "size_bytes",
            "modified_time",
            "file_type",
        ]),
        "a created message has exactly these fields (no old_path)"
    );
    assert_eq!(body["schema_version"], json!(1));
    assert!(body["schema_version"].is_u64());
    let message_id: Uuid = delivered.message_id().parse().expect("message_id is a UUID");
    let correlation_id: Uuid = body["correlation_id"]
        .as_str()
        .expect("correlation_id is a string")
        .parse()
        .expect("correlation_id is a UUID");
    let timestamp = body["timestamp"].as_str().expect("timestamp is a string");
    assert!(timestamp.ends_with('Z'), "UTC: {timestamp}");
    let recorded = humantime::parse_rfc3339(timestamp).expect("timestamp is RFC 3339");
    assert!(
        (before..=after).contains(&unix_seconds(recorded)),
        "timestamp {timestamp} is now"
    );
    assert_eq!(body["event_type"], "created");
    assert_eq!(body["file_path"], path.as_str());
    assert_eq!(body["instance_id"], instance.as_str());
    assert_eq!(body["watched_directory"], daemon.dir_str().as_str());
    assert_eq!(body["sha256_hash"], sha256_hex(content).as_str());
    assert_eq!(body["xxh128_hash"], xxh128_hex(content).as_str());
    assert!(body["size_bytes"].is_u64(), "size_bytes is an integer");
    assert_eq!(body["size_bytes"].as_u64(), Some(content.len() as u64));
    let modified = fs::metadata(daemon.path("Song.FLAC"))
        .and_then(|metadata| metadata.modified())
        .expect("mtime");
    assert_eq!(
        body["modified_time"],
        humantime::format_rfc3339_millis(modified).to_string().as_str()
    );
    assert_eq!(body["file_type"], "flac", "lower-case extension");

    assert_eq!(delivered.exchange, broker.exchange());
    assert_envelope(&delivered, "created");
    let properties = &delivered.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        Delivered::text(properties.content_type()),
        Some("application/json")
    );
    assert_eq!(
        Delivered::text(properties.message_id()),
        Some(message_id.to_string().as_str())
    );
    assert_eq!(
        Delivered::text(properties.correlation_id()),
        Some(correlation_id.to_string().as_str())
    );
    let stamped = properties.timestamp().expect("the timestamp property is set");
    assert!(
        (before..=after).contains(&stamped),
        "timestamp property {stamped} is unix seconds now"
    );
    assert_eq!(Delivered::text(properties.app_id()), Some("file-watcher"));
    assert_eq!(Delivered::text(properties.kind()), Some("created"));

    let names: BTreeSet<&str> = delivered.headers.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "x-instance-id",
            "x-watched-directory",
            "x-event-type",
            "x-schema-version"
        ])
    );
    assert_eq!(header(&delivered, "x-instance-id"), long_string(&instance));
    assert_eq!(
        header(&delivered, "x-watched-directory"),
        long_string(&daemon.dir_str())
    );
    let schema_version = match header(&delivered, "x-schema-version") {
        AMQPValue::LongLongInt(value) => value,
        AMQPValue::LongInt(value) => i64::from(value),
        AMQPValue::ShortInt(value) => i64::from(value),
        other => panic!("x-schema-version must be an integer, not {other:?}"),
    };
    assert_eq!(schema_version, 1);
    assert_no_warnings_or_errors(&daemon);
}

/// Issue 2: operators can tell which instance holds a connection.
#[test]
fn the_connection_is_named_after_the_instance() {
    let broker = TestBroker::new();
    let instance = instance_id("named");
    let mut daemon = Daemon::builder()
        .with_broker(&broker)
        .env("INSTANCE_ID", &instance)
        .start();
    let name = format!("file_watcher_{instance}");
    wait_until_listed(&name, true, "rabbitmqctl never listed the connection");
    assert!(daemon.terminate().success(), "{}", daemon.stderr_text());
    wait_until_listed(&name, false, "the connection is still listed after SIGTERM");
}

/// Issue 3: `RABBITMQ_HOST`/`PORT`/`USER`/`PASS` still work without `RABBITMQ_URL`.
#[test]
fn the_legacy_broker_variables_still_work() {
    let broker = TestBroker::new();
    let uri: AMQPUri = broker.url().parse().expect("the test URL parses");
    let daemon = Daemon::builder()
        .env("RABBITMQ_HOST", &uri.authority.host)
        .env("RABBITMQ_PORT", uri.authority.port.to_string())
        .env("RABBITMQ_USER", &uri.authority.userinfo.username)
        .env("RABBITMQ_PASS", &uri.authority.userinfo.password)
        .env("EXCHANGE", broker.exchange())
        .start();
    let path = daemon.path_str("legacy.flac");
    write_file(&daemon.path("legacy.flac"), "legacy");
    let delivered = broker.wait_for_event("created", &path);
    assert_envelope(&delivered, "created");
    let started = daemon.wait_for_stderr("; broker: ", DEADLINE);
    assert!(
        started.contains(&format!(
            "broker: amqp://{}:***@{}:{}/%2f exchange {}",
            uri.authority.userinfo.username,
            uri.authority.host,
            uri.authority.port,
            broker.exchange()
        )),
        "{started}"
    );
    assert!(daemon.stdout_text().is_empty(), "messages go to the broker only");
    assert_no_warnings_or_errors(&daemon);
}

/// Issue 4: the registry row after each kind of change, and its
/// `message_id`/`published_at` tied to the message that went out.
#[test]
fn registry_rows_follow_every_kind_of_change() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let instance = instance_id("rows");
    // `sub/` exists from the start (a .txt is never announced), so the move
    // into it below is a plain move.
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .file("sub/keep.txt", "not announced")
        .start();
    let a = daemon.path_str("a.flac");
    let b = daemon.path_str("b.flac");
    let moved = daemon.path_str("sub/b.flac");
    let first = b"first version".as_slice();
    let second = b"second, longer version".as_slice();

    write_file(&daemon.path("a.flac"), first);
    let created = broker.wait_for_event("created", &a);
    assert_envelope(&created, "created");
    let row = database.wait_published(&a, created.message_id());
    assert_row(&row, ("present", "created", None), first, &daemon, &instance);

    write_file(&daemon.path("a.flac"), second);
    let modified = broker.wait_for_event("modified", &a);
    assert_envelope(&modified, "modified");
    let row = database.wait_published(&a, modified.message_id());
    assert_row(&row, ("present", "modified", None), second, &daemon, &instance);
    assert_eq!(
        row.mtime_ns,
        nanos(fs::metadata(daemon.path("a.flac")).unwrap().modified().unwrap())
    );

    fs::rename(daemon.path("a.flac"), daemon.path("b.flac")).unwrap();
    let renamed = broker.wait_for_event("renamed", &b);
    assert_envelope(&renamed, "renamed");
    assert_eq!(renamed.body["old_path"], a.as_str());
    let row = database.wait_published(&b, renamed.message_id());
    assert_row(&row, ("present", "renamed", Some(&a)), second, &daemon, &instance);
    let left = database.wait_published(&a, renamed.message_id());
    assert_row(&left, ("deleted", "renamed", None), second, &daemon, &instance);

    fs::rename(daemon.path("b.flac"), daemon.path("sub/b.flac")).unwrap();
    let moved_message = broker.wait_for_event("moved", &moved);
    assert_envelope(&moved_message, "moved");
    assert_eq!(moved_message.body["old_path"], b.as_str());
    let row = database.wait_published(&moved, moved_message.message_id());
    assert_row(&row, ("present", "moved", Some(&b)), second, &daemon, &instance);
    let left = database.wait_published(&b, moved_message.message_id());
    assert_row(&left, ("deleted", "moved", None), second, &daemon, &instance);

    fs::remove_file(daemon.path("sub/b.flac")).unwrap();
    let deleted = broker.wait_for_event("deleted", &moved);
    assert_envelope(&deleted, "deleted");
    let row = database.wait_published(&moved, deleted.message_id());
    assert_row(&row, ("deleted", "deleted", None), second, &daemon, &instance);

    let all = broker.barrier(daemon.dir());
    assert_eq!(
        counts(&all),
        BTreeMap::from([
            (change("created", &a), 1),
            (change("modified", &a), 1),
            (change("renamed", &b), 1),
            (change("moved", &moved), 1),
            (change("deleted", &moved), 1),
        ]),
        "{}",
        broker.summary()
    );
    let paths: Vec<String> = database
        .rows()
        .into_iter()
        .map(|row| row.file_path)
        .filter(|path| !path.contains("zz-marker-"))
        .collect();
    assert_eq!(paths, [a, b, moved], "one row per path, tombstones kept");
    // The marker's delivery can arrive before its confirm has been recorded.
    database.wait_until("the outbox is empty", DEADLINE, |database| {
        (database.outbox_len() == 0).then_some(())
    });
    assert_no_warnings_or_errors(&daemon);
}

/// Issue 5: a restart does not announce files the registry already knows,
/// and neither does a `touch`.
#[test]
fn unchanged_files_are_not_announced_again() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let instance = instance_id("restart");
    let mut first = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .file("album/one.flac", "one")
        .file("two.mp3", "two")
        .start();
    let one = first.path_str("album/one.flac");
    let two = first.path_str("two.mp3");
    // With a database, the start-up reconciliation announces what it did not know.
    for path in [&one, &two] {
        let created = broker.wait_for_event("created", path);
        database.wait_published(path, created.message_id());
    }
    // Checked before SIGTERM: lapin sometimes logs ERROR lines while the
    // connection closes at shutdown, which is not what this test is about.
    assert_no_warnings_or_errors(&first);
    assert!(first.terminate().success(), "{}", first.stderr_text());
    let recorded = database.rows();

    let second = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", &instance)
        .watching(first.dir())
        .start();
    second.wait_for_full_scan(first.dir());
    let expected = BTreeMap::from([(change("created", &one), 1), (change("created", &two), 1)]);
    assert_eq!(
        counts(&broker.barrier(first.dir())),
        expected,
        "the restart announced known files"
    );

    // Same bytes, new mtime: the stat is refreshed, nothing is published.
    File::options()
        .write(true)
        .open(first.path("album/one.flac"))
        .and_then(|file| file.set_modified(SystemTime::now() - Duration::from_secs(3600)))
        .expect("touch");
    let touched = nanos(
        fs::metadata(first.path("album/one.flac"))
            .unwrap()
            .modified()
            .unwrap(),
    );
    // Proof that the touch was seen, so the barrier below is not vacuous.
    database.wait_until("the touched file's stat is refreshed", DEADLINE, |database| {
        database.row(&one).filter(|row| row.mtime_ns == touched)
    });
    assert_eq!(
        counts(&broker.barrier(first.dir())),
        expected,
        "a touch was announced"
    );
    for before in &recorded {
        let after = database.row(&before.file_path).expect("still recorded");
        assert_eq!(
            (after.message_id, after.published_at, after.state.as_str()),
            (before.message_id, before.published_at, "present"),
            "{} keeps its last message",
            before.file_path
        );
    }
    assert_no_warnings_or_errors(&second);
}

/// Issue 6: two instances watching the same tree, sharing the registry and
/// the exchange, publish each change once. Changes come in bursts, so both
/// instances record some of each burst and both publishers are busy at once.
#[test]
fn two_instances_on_one_tree_publish_each_change_once() {
    const FILES: usize = 8;
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let first = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", instance_id("twin-a"))
        .start();
    let second = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("INSTANCE_ID", instance_id("twin-b"))
        .watching(first.dir())
        .start();
    first.wait_for_full_scan(first.dir());
    second.wait_for_full_scan(first.dir());
    let name = |index: usize| format!("track-{index}.flac");
    let renamed = |index: usize| format!("renamed-{index}.flac");
    let mut expected = BTreeMap::new();
    let mut burst = |changes: Vec<(&str, String)>| {
        for (event_type, relative) in &changes {
            expected.insert(change(event_type, &first.path_str(relative)), 1);
        }
        for (event_type, relative) in &changes {
            broker.wait_for_event(event_type, &first.path_str(relative));
        }
    };

    // Renamed files are left alone for a whole burst first, so every rename
    // follows a change both instances have already recorded.
    let half = FILES / 2;
    for index in 0..FILES {
        write_file(&first.path(&name(index)), format!("{index}, first"));
    }
    burst((0..FILES).map(|index| ("created", name(index))).collect());
    for index in half..FILES {
        write_file(&first.path(&name(index)), format!("{index}, second"));
    }
    burst((half..FILES).map(|index| ("modified", name(index))).collect());
    for index in 0..half {
        fs::rename(first.path(&name(index)), first.path(&renamed(index))).unwrap();
    }
    burst((0..half).map(|index| ("renamed", renamed(index))).collect());
    for index in half..FILES {
        fs::remove_file(first.path(&name(index))).unwrap();
    }
    burst((half..FILES).map(|index| ("deleted", name(index))).collect());

    let all = broker.barrier(first.dir());
    let message_ids: BTreeSet<&str> = all.iter().map(Delivered::message_id).collect();
    assert_eq!(
        counts(&all),
        expected,
        "{} deliveries of {} distinct message ids; {}",
        all.len(),
        message_ids.len(),
        broker.summary()
    );
    let markers = broker
        .deliveries()
        .iter()
        .filter(|delivered| delivered.file_path().contains("zz-marker-"))
        .count();
    assert_eq!(markers, 1, "{}", broker.summary());
    database.wait_until("the outbox is empty", DEADLINE, |database| {
        (database.outbox_len() == 0).then_some(())
    });
    assert_no_warnings_or_errors(&first);
    assert_no_warnings_or_errors(&second);
}

/// Issue 7: two instances on different trees, writing at the same time into
/// one schema and one exchange: every file once, from the right instance.
#[test]
fn two_trees_written_at_once_give_every_file_once() {
    const FILES: usize = 50;
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let daemons: Vec<(Daemon, String)> = ["left", "right"]
        .into_iter()
        .map(|label| {
            let instance = instance_id(label);
            let daemon = Daemon::builder()
                .with_sinks(&broker, &database)
                .env("INSTANCE_ID", &instance)
                .start();
            (daemon, instance)
        })
        .collect();
    for (daemon, _) in &daemons {
        daemon.wait_for_full_scan(daemon.dir());
    }
    thread::scope(|scope| {
        for (daemon, instance) in &daemons {
            scope.spawn(move || {
                for index in 0..FILES {
                    write_file(
                        &daemon.path(&format!("track-{index:02}.flac")),
                        format!("{instance} {index}"),
                    );
                }
            });
        }
    });

    broker.wait_for_deliveries(2 * FILES, Duration::from_secs(30));
    // One barrier per tree: each instance's publisher is behind its own marker.
    broker.barrier(daemons[0].0.dir());
    let all = broker.barrier(daemons[1].0.dir());
    let mut expected = BTreeMap::new();
    for (daemon, _) in &daemons {
        for index in 0..FILES {
            expected.insert(
                change("created", &daemon.path_str(&format!("track-{index:02}.flac"))),
                1,
            );
        }
    }
    assert_eq!(counts(&all), expected, "{}", broker.summary());
    for delivered in &all {
        let (daemon, instance) = daemons
            .iter()
            .find(|(daemon, _)| {
                delivered
                    .file_path()
                    .starts_with(&format!("{}/", daemon.dir_str()))
            })
            .expect("every path is in one of the trees");
        assert_eq!(delivered.instance_id(), instance);
        assert_eq!(delivered.body["watched_directory"], daemon.dir_str().as_str());
        assert_eq!(header(delivered, "x-instance-id"), long_string(instance));
    }

    let published = database.wait_until("every row published", DEADLINE, |database| {
        let rows = database.rows();
        rows.iter().all(|row| row.published_at.is_some()).then_some(rows)
    });
    let tracks: Vec<&FileRow> = published
        .iter()
        .filter(|row| !row.file_path.contains("zz-marker-"))
        .collect();
    assert_eq!(tracks.len(), 2 * FILES);
    for row in tracks {
        let (daemon, instance) = daemons
            .iter()
            .find(|(daemon, _)| row.watched_directory == daemon.dir_str())
            .expect("every row names one of the trees");
        assert!(
            row.file_path.starts_with(&format!("{}/", daemon.dir_str())),
            "{row:#?}"
        );
        assert_eq!(&row.instance_id, instance, "{row:#?}");
        assert_eq!(row.state, "present");
    }
    for (daemon, _) in &daemons {
        assert_no_warnings_or_errors(daemon);
    }
}

/// Issue 8: the same content in three trees is three rows with one hash, and
/// the documented query finds all three.
#[test]
fn one_content_in_three_trees_is_found_by_its_hash() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let daemons: Vec<Daemon> = (0..3)
        .map(|index| {
            Daemon::builder()
                .with_sinks(&broker, &database)
                .env("INSTANCE_ID", instance_id(&format!("copy{index}")))
                .start()
        })
        .collect();
    let content = b"one recording, kept in three libraries";
    for daemon in &daemons {
        write_file(&daemon.path("copy.flac"), content);
    }
    let mut paths = Vec::new();
    for daemon in &daemons {
        let path = daemon.path_str("copy.flac");
        let created = broker.wait_for_event("created", &path);
        database.wait_published(&path, created.message_id());
        paths.push(path);
    }
    paths.sort();

    let sha256 = sha256_hex(content);
    let rows: Vec<FileRow> = database
        .rows()
        .into_iter()
        .filter(|row| row.sha256 == sha256)
        .collect();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for row in &rows {
        let daemon = daemons
            .iter()
            .find(|daemon| row.watched_directory == daemon.dir_str())
            .expect("every row names one of the trees");
        assert_eq!(row.state, "present");
        assert_eq!(row.file_path, daemon.path_str("copy.flac"));
    }
    let found: Vec<String> = database
        .query(
            &format!(
                "SELECT file_path FROM {}.files WHERE sha256 = $1 AND state = 'present' ORDER BY file_path",
                database.schema()
            ),
            &[&sha256],
        )
        .iter()
        .map(|record| record.get(0))
        .collect();
    assert_eq!(found, paths);
}

/// Issue 9: five daemons migrating one fresh schema at the same instant.
#[test]
fn migrations_racing_from_five_processes_apply_once() {
    const DAEMONS: usize = 5;
    let database = TestDatabase::new();
    let start = Barrier::new(DAEMONS);
    let mut daemons: Vec<Daemon> = thread::scope(|scope| {
        let spawning: Vec<_> = (0..DAEMONS)
            .map(|index| {
                let builder = Daemon::builder()
                    .with_database(&database)
                    .env("INSTANCE_ID", instance_id(&format!("migrate{index}")));
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    builder.spawn()
                })
            })
            .collect();
        spawning
            .into_iter()
            .map(|spawned| spawned.join().expect("spawned"))
            .collect()
    });
    for daemon in &daemons {
        daemon.wait_for_stderr(": ready:", DEADLINE);
    }
    for daemon in &mut daemons {
        assert_eq!(
            daemon.wait_exit(Duration::ZERO),
            None,
            "a daemon exited:\n{}",
            daemon.stderr_text()
        );
        assert_no_warnings_or_errors(daemon);
    }
    let applied: Vec<(i32, i64)> = database
        .query(
            "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version",
            &[],
        )
        .iter()
        .map(|record| (record.get(0), record.get(1)))
        .collect();
    let expected: Vec<(i32, i64)> = MIGRATIONS
        .iter()
        .map(|migration| (migration.version, 1))
        .collect();
    assert_eq!(applied, expected);
    let appliers = |text: &str| {
        daemons
            .iter()
            .filter(|daemon| daemon.stderr_lines().iter().any(|line| line.contains(text)))
            .count()
    };
    assert_eq!(appliers("creating registry schema"), 1);
    for migration in MIGRATIONS {
        assert_eq!(
            appliers(&format!("applying registry migration {} ", migration.version)),
            1
        );
    }
}

/// Issue 10: one pooled connection shared by four workers and the publisher
/// keeps up with a burst of a thousand files.
#[test]
fn a_pool_of_one_connection_records_a_burst_of_a_thousand_files() {
    const FILES: usize = 1000;
    let generous = Duration::from_secs(60);
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("DB_POOL_SIZE", "1")
        .env("WORKERS", "4")
        .start();
    daemon.wait_for_full_scan(daemon.dir());
    for index in 0..FILES {
        write_file(&daemon.path(&format!("{index:04}.flac")), index.to_string());
    }

    let deliveries = broker.wait_for_deliveries(FILES, generous);
    let paths: BTreeSet<&str> = deliveries.iter().map(Delivered::file_path).collect();
    assert_eq!(paths.len(), FILES, "{}", broker.summary());
    assert!(deliveries
        .iter()
        .all(|delivered| delivered.event_type() == "created"));
    database.wait_until("a thousand rows published", generous, |database| {
        let record = &database.query(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL AND state = 'present'), count(*) \
             FROM files",
            &[],
        )[0];
        let (published, total): (i64, i64) = (record.get(0), record.get(1));
        (published == FILES as i64 && total == FILES as i64).then_some(())
    });
    assert_eq!(database.outbox_len(), 0);
    assert_eq!(broker.barrier(daemon.dir()).len(), FILES, "no duplicates");
    assert_no_warnings_or_errors(&daemon);
}

/// `url` with `password` added to its user (which must have none).
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme://...");
    let (user, host) = rest.split_once('@').expect("the test URL names a user");
    assert!(!user.contains(':'), "the test URL already has a password");
    format!("{scheme}://{user}:{password}@{host}")
}

/// Issue 11: no password reaches the logs, even at debug level, and the
/// start-up line still says where everything goes.
#[test]
fn passwords_never_appear_in_the_logs() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let uri: AMQPUri = broker.url().parse().expect("the test URL parses");
    let broker_password = format!(":{}@", uri.authority.userinfo.password);
    assert!(broker.url().contains(&broker_password));
    // Trust authentication ignores the password: the daemon still gets in.
    let database_secret = "s3cretpw";
    let database_url = with_password(&database_url(), database_secret);
    let mut daemon = Daemon::builder()
        .with_sinks(&broker, &database)
        .env("DATABASE_URL", &database_url)
        .env("LOG_LEVEL", "debug")
        .start();
    let path = daemon.path_str("secret.flac");
    write_file(&daemon.path("secret.flac"), "hush");
    let created = broker.wait_for_event("created", &path);
    database.wait_published(&path, created.message_id());
    assert!(daemon.terminate().success());

    let stderr = daemon.stderr_text();
    for secret in [database_secret, broker_password.as_str()] {
        let leaks: Vec<&str> = stderr.lines().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret:?} in the logs:\n{}", leaks.join("\n"));
    }
    let started = daemon.wait_for_stderr("; broker: ", Duration::ZERO);
    assert_eq!(log_level(&started), Some("INFO"), "{started}");
    let redacted_broker = broker.url().replacen(&broker_password, ":***@", 1);
    let redacted_database = database_url.replacen(&format!(":{database_secret}@"), ":***@", 1);
    for expected in [
        format!("watching {};", daemon.dir_str()),
        format!("broker: {redacted_broker} exchange {};", broker.exchange()),
        format!("database: {redacted_database} schema {}", database.schema()),
    ] {
        assert!(started.contains(&expected), "{expected:?} not in {started:?}");
    }
}

/// Issue 12: a message no queue takes is accepted by the broker: it is
/// logged as a warning and counts as published.
#[test]
fn an_unroutable_message_is_warned_about_and_counts_as_published() {
    let broker = TestBroker::without_queue();
    let database = TestDatabase::new();
    let daemon = Daemon::builder().with_sinks(&broker, &database).start();
    let path = daemon.path_str("nobody-listens.flac");
    write_file(&daemon.path("nobody-listens.flac"), "into the void");

    let row = database.wait_until("the row is published", DEADLINE, |database| {
        database.row(&path).filter(|row| row.published_at.is_some())
    });
    assert_eq!(database.outbox_len(), 0);
    let warning = daemon.wait_for_stderr(&format!("unroutable message {}", row.message_id), DEADLINE);
    assert_eq!(log_level(&warning), Some("WARN"), "{warning}");
    assert!(warning.contains(broker.exchange()), "{warning}");
    assert!(warning.contains("file.created"), "{warning}");
}
