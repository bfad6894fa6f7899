//! The operator commands against real daemons and the real servers (issue
//! 10): `instances` and `status` over three instances, one killed with
//! `kill -9`; `replay` of a tree into a queue bound after the files were
//! recorded, resumed after an interruption; and no password in any output.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::observe::{url_with_secret, SECRET};
use crate::support::daemon::Finished;
use crate::support::{wait_until, write_file, Daemon, DaemonBuilder, TestBroker, TestDatabase, DEADLINE};

/// The stale threshold the tests pass: a few missed heartbeats (every 2 s).
const STALE_AFTER: &str = "6";

/// `file-watcher <arguments>` against `database` (with the password).
fn command(database: &TestDatabase, arguments: &[&str]) -> DaemonBuilder {
    arguments
        .iter()
        .fold(Daemon::builder(), |builder, argument| builder.arg(*argument))
        .with_database(database)
        .env("DATABASE_URL", url_with_secret(database))
}

#[track_caller]
fn assert_no_secret(finished: &Finished) {
    assert!(
        !finished.stdout_text().contains(SECRET) && !finished.stderr_text().contains(SECRET),
        "the password leaked:\n{}\n{}",
        finished.stdout_text(),
        finished.stderr_text()
    );
}

/// `instances --json`, keyed by instance id.
fn instances(database: &TestDatabase) -> BTreeMap<String, Value> {
    let finished = command(database, &["instances", "--json", "--stale-after", STALE_AFTER]).run();
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stderr_text());
    assert_no_secret(&finished);
    let list: Vec<Value> = serde_json::from_str(&finished.stdout_text()).expect("instances --json is JSON");
    list.into_iter()
        .map(|instance| {
            (
                instance["instance_id"].as_str().unwrap_or("").to_owned(),
                instance,
            )
        })
        .collect()
}

fn states(database: &TestDatabase) -> BTreeMap<String, String> {
    instances(database)
        .into_iter()
        .map(|(id, instance)| (id, instance["state"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[test]
fn instances_shows_three_running_then_one_stale_after_kill_9_and_status_fails() {
    let database = TestDatabase::new();
    let start = |id: &str| {
        Daemon::builder()
            .with_database(&database)
            .env("DATABASE_URL", url_with_secret(&database))
            .env("INSTANCE_ID", id)
            .start()
    };
    let mut daemons: Vec<Daemon> = ["inst-a", "inst-b", "inst-c"]
        .iter()
        .map(|id| start(id))
        .collect();
    write_file(&daemons[0].path("one.flac"), "one");
    daemons[0].wait_for_event("created", &daemons[0].path_str("one.flac"));

    let running = |states: &BTreeMap<String, String>| {
        states
            .values()
            .filter(|state| state.as_str() == "running")
            .count()
    };
    wait_until("three running instances", DEADLINE, || {
        running(&states(&database)) == 3
    });
    let listed = instances(&database);
    let a = &listed["inst-a"];
    assert_eq!(a["watched_directory"], daemons[0].dir_str());
    assert_eq!(a["pid"], daemons[0].pid());
    wait_until("inst-a's heartbeat counts its file", DEADLINE, || {
        instances(&database)["inst-a"]["messages_recorded"] == 1
    });
    let healthy = command(&database, &["status", "--stale-after", STALE_AFTER]).run();
    assert_eq!(healthy.status.code(), Some(0), "{}", healthy.stdout_text());
    assert!(
        healthy.stdout_text().starts_with("ok: 3 running"),
        "{}",
        healthy.stdout_text()
    );

    // One dies without a word; one stops cleanly.
    daemons[1].signal("KILL");
    daemons[1].wait_exit(DEADLINE).expect("killed");
    daemons[2].terminate();
    wait_until("inst-b stale, inst-c stopped", Duration::from_secs(30), || {
        let states = states(&database);
        states["inst-b"] == "stale" && states["inst-c"] == "stopped"
    });
    assert_eq!(states(&database)["inst-a"], "running");

    let table = command(&database, &["instances", "--stale-after", STALE_AFTER]).run();
    assert_no_secret(&table);
    let text = table.stdout_text();
    assert!(text.starts_with("INSTANCE"), "{text}");
    let line = |id: &str| {
        text.lines()
            .find(|line| line.starts_with(id))
            .unwrap_or("")
            .to_owned()
    };
    assert!(line("inst-b").contains("stale"), "{text}");
    assert!(line("inst-c").contains("stopped"), "{text}");
    assert!(line("inst-a").contains("running"), "{text}");

    let status = command(&database, &["status", "--stale-after", STALE_AFTER]).run();
    assert_no_secret(&status);
    assert_eq!(status.status.code(), Some(1), "{}", status.stdout_text());
    assert_eq!(
        status.stdout.len(),
        1,
        "one line per problem: {:?}",
        status.stdout
    );
    assert!(
        status.stdout[0].starts_with("instance inst-b on "),
        "{:?}",
        status.stdout
    );
    assert!(status.stdout[0].contains("stale"), "{:?}", status.stdout);

    // Nothing in the table holds the password either.
    let rows = database.query("SELECT row_to_json(i)::text FROM instances i", &[]);
    for row in &rows {
        assert!(!row.get::<_, String>(0).contains(SECRET));
    }
    assert_eq!(rows.len(), 3);
    for daemon in &daemons {
        assert!(!daemon.stderr_text().contains(SECRET));
    }
}

/// Records a tree (`a/` with five files, `b/` with two) with no broker, and
/// stops; returns the stopped daemon (its directory lives as long as it).
fn recorded_tree(database: &TestDatabase) -> Daemon {
    let mut daemon = Daemon::builder()
        .with_database(database)
        .env("DATABASE_URL", url_with_secret(database))
        .directory("a")
        .directory("b")
        .start();
    for name in [
        "a/1.flac", "a/2.flac", "a/3.flac", "a/4.flac", "a/5.flac", "b/6.flac", "b/7.flac",
    ] {
        write_file(&daemon.path(name), name);
    }
    daemon.wait_for_messages(7, DEADLINE);
    daemon.terminate();
    daemon
}

#[test]
fn replay_of_a_tree_is_received_in_full_by_a_queue_bound_after_the_fact() {
    let database = TestDatabase::new();
    let daemon = recorded_tree(&database);
    let recorded: BTreeMap<String, Value> = daemon
        .messages()
        .into_iter()
        .map(|message| (message["file_path"].as_str().unwrap_or("").to_owned(), message))
        .collect();
    // The consumer's queue exists only from now on.
    let broker = TestBroker::new();
    let replay = |arguments: &[&str]| {
        command(&database, &[&["replay"], arguments].concat())
            .env("RABBITMQ_URL", broker.url())
            .env("EXCHANGE", broker.exchange())
            .run()
    };

    let dry = replay(&["--dry-run"]);
    assert_no_secret(&dry);
    assert_eq!(dry.status.code(), Some(0), "{}", dry.stderr_text());
    assert!(
        dry.stdout_text().starts_with("dry run: would replay 7 files"),
        "{}",
        dry.stdout_text()
    );

    let prefix = daemon.path_str("a");
    let under_a = replay(&["--prefix", &prefix]);
    assert_no_secret(&under_a);
    assert_eq!(under_a.status.code(), Some(0), "{}", under_a.stderr_text());
    assert!(
        under_a.stdout_text().contains("published 5 files now"),
        "{}",
        under_a.stdout_text()
    );
    let received = broker.wait_for_deliveries(5, DEADLINE);
    let paths: BTreeSet<&str> = received.iter().map(|delivered| delivered.file_path()).collect();
    let expected: BTreeSet<String> = (1..=5).map(|n| daemon.path_str(&format!("a/{n}.flac"))).collect();
    assert_eq!(paths, expected.iter().map(String::as_str).collect());
    let correlation = received[0].body["correlation_id"].clone();
    let mut ids = BTreeSet::new();
    for delivered in &received {
        assert_eq!(delivered.event_type(), "created");
        assert_eq!(delivered.routing_key, "file.created");
        assert_eq!(
            delivered.headers.get("x-replay"),
            Some(&lapin::types::AMQPValue::Boolean(true)),
            "{:?}",
            delivered.headers
        );
        assert_eq!(
            delivered.body["correlation_id"], correlation,
            "one correlation_id"
        );
        // The contract: the recorded body, but for a fresh id and timestamp.
        let original = &recorded[delivered.file_path()];
        assert_ne!(delivered.body["message_id"], original["message_id"]);
        ids.insert(delivered.message_id().to_owned());
        let mut same = delivered.body.clone();
        for field in ["message_id", "correlation_id", "timestamp"] {
            same[field] = original[field].clone();
        }
        assert_eq!(&same, original, "the replayed body keeps the message contract");
    }
    assert_eq!(ids.len(), 5, "fresh message ids");

    // The whole registry, under a routing key prefix of its own, for a
    // consumer bound to `replay.file.#` (one bound to `file.#` gets none).
    let new_consumer = TestBroker::bound_with("replay.file.#");
    let everything = command(&database, &["replay", "--routing-key-prefix", "replay."])
        .env("RABBITMQ_URL", new_consumer.url())
        .env("EXCHANGE", new_consumer.exchange())
        .run();
    assert_eq!(everything.status.code(), Some(0), "{}", everything.stderr_text());
    assert!(
        everything.stdout_text().contains("published 7 files now"),
        "{}",
        everything.stdout_text()
    );
    let all = new_consumer.wait_for_deliveries(7, DEADLINE);
    assert!(all
        .iter()
        .all(|delivered| delivered.routing_key == "replay.file.created"));
    assert_eq!(
        all.iter()
            .map(|delivered| delivered.file_path())
            .collect::<BTreeSet<_>>(),
        recorded.keys().map(String::as_str).collect()
    );
}

#[test]
fn an_interrupted_replay_resumes_without_sending_everything_again() {
    let database = TestDatabase::new();
    let daemon = recorded_tree(&database);
    let broker = TestBroker::new();
    // Two messages a second: the first batches go out, then it is killed.
    let mut first = command(&database, &["replay", "--rate", "2"])
        .env("RABBITMQ_URL", broker.url())
        .env("EXCHANGE", broker.exchange())
        .spawn();
    let sent = || {
        database
            .try_query("SELECT replay_id::text, sent FROM replays", &[])
            .and_then(|rows| {
                rows.first()
                    .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
            })
    };
    wait_until("a first batch confirmed", DEADLINE, || {
        sent().is_some_and(|(_, sent)| sent >= 2)
    });
    first.signal("KILL");
    first.wait_exit(DEADLINE).expect("killed");
    let (replay_id, sent_before) = sent().expect("the replay is recorded");
    assert!(sent_before < 7, "killed before the end ({sent_before} sent)");

    let resumed = command(&database, &["replay", "--resume", &replay_id])
        .env("RABBITMQ_URL", broker.url())
        .env("EXCHANGE", broker.exchange())
        .run();
    assert_no_secret(&resumed);
    assert_eq!(resumed.status.code(), Some(0), "{}", resumed.stderr_text());
    let rest = 7 - sent_before;
    assert!(
        resumed
            .stdout_text()
            .contains(&format!("published {rest} files now (7 in all)")),
        "{}",
        resumed.stdout_text()
    );
    // Every file arrived; at most the batch in flight at the kill twice.
    let deliveries = broker.wait_for_deliveries(7, DEADLINE);
    let paths: BTreeSet<&str> = deliveries.iter().map(|delivered| delivered.file_path()).collect();
    assert_eq!(paths.len(), 7, "every file, once at least");
    assert!(
        deliveries.len() <= 9,
        "{} deliveries for 7 files",
        deliveries.len()
    );
    assert!(
        deliveries
            .iter()
            .all(|delivered| delivered.body["correlation_id"].as_str() == Some(replay_id.as_str())),
        "one correlation_id, the replay's id, across the resume"
    );
    drop(daemon);
}
