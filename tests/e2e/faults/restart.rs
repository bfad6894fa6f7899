//! The process goes away and another takes its place: killed during a
//! burst, stopped while files change (the start-up reconciliation catches
//! up), and a second process with the same instance id refused until the
//! first is gone.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{describe, text, Scenario, CONVERGE};
use crate::support::{Daemon, DEADLINE};

/// SIGKILL, and the exit reaped.
#[track_caller]
fn kill_9(daemon: &mut Daemon) {
    daemon.signal("KILL");
    daemon.wait_exit(DEADLINE).expect("a SIGKILLed daemon exits");
}

#[test]
fn sigkill_during_a_burst_then_restart() {
    let scenario = Scenario::new();
    let mut daemon = scenario.daemon().start();
    let burst = scenario.create("burst", 200);
    scenario
        .database
        .wait_until("the burst is being recorded", CONVERGE, |_| {
            (!scenario.rows().is_empty()).then_some(())
        });
    kill_9(&mut daemon);
    let recorded_at_kill = scenario.rows().len();

    scenario.create("downtime", 20);
    for relative in &burst[..10] {
        scenario.write(relative, "v2");
    }
    for relative in &burst[10..20] {
        scenario.remove(relative);
    }
    let _daemon = scenario.restart(|| scenario.daemon());
    scenario.create("after", 5);
    scenario.assert_converged();
    eprintln!("killed with {recorded_at_kill} of 200 rows recorded");
}

#[test]
fn catch_up_after_downtime() {
    let scenario = Scenario::new();
    let files = scenario.create("catalog", 6);
    // One worker: jobs run in the order they became ready, so the barrier
    // below comes after the catch-up's own messages.
    let mut daemon = scenario.daemon().env("WORKERS", "1").start();
    let first = scenario.assert_converged();
    assert_eq!(first.len(), 6);
    daemon.terminate();

    scenario.write(&files[0], "v2"); // content changed
    scenario.remove(&files[1]);
    fs::write(
        scenario.path(&files[2]),
        fs::read(scenario.path(&files[2])).unwrap(),
    )
    .unwrap(); // touched only
    scenario.create("new", 2);
    let rows_before: HashMap<String, Uuid> = scenario
        .rows()
        .into_iter()
        .map(|row| (row.file_path, row.message_id))
        .collect();

    let daemon = scenario.daemon().env("WORKERS", "1").start();
    daemon.wait_for_full_scan(&scenario.tree);
    scenario.write("zz-barrier.flac", "barrier");
    let all = scenario.assert_converged();
    let caught_up: BTreeSet<(String, String)> = all[first.len()..]
        .iter()
        .map(|received| {
            (
                received.event_type().to_owned(),
                text(&received.body, "file_path"),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("modified", scenario.path_str(&files[0])),
        ("deleted", scenario.path_str(&files[1])),
        ("created", scenario.path_str("new/000.flac")),
        ("created", scenario.path_str("new/001.flac")),
        ("created", scenario.path_str("zz-barrier.flac")),
    ]
    .into_iter()
    .map(|(kind, path)| (kind.to_owned(), path))
    .collect();
    assert_eq!(caught_up, expected);
    assert_eq!(all.len() - first.len(), expected.len(), "{}", describe(&all));
    for relative in &files[2..] {
        let path = scenario.path_str(relative);
        let row = scenario.database.row(&path).expect("a row");
        assert_eq!(
            Some(&row.message_id),
            rows_before.get(&path),
            "{path}: no new message"
        );
    }
}

#[test]
fn second_process_with_the_same_instance_id_is_refused() {
    let scenario = Scenario::new();
    scenario.create("first", 3);
    let mut first = scenario.daemon().start();
    scenario.assert_converged();

    let other = scenario.outside.join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("never.flac"), "never").unwrap();
    let second = scenario.daemon().watching(&other).run();
    assert!(!second.status.success(), "{}", second.stderr_text());
    let message = format!("instance id \"{}\" is in use", scenario.instance_id);
    assert!(
        second.stderr_text().contains(&message),
        "{}",
        second.stderr_text()
    );

    kill_9(&mut first);
    let started = Instant::now();
    let _successor = scenario.restart(|| scenario.daemon());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    scenario.create("successor", 2);
    let all = scenario.assert_converged();
    assert!(
        all.iter()
            .all(|received| !text(&received.body, "file_path").starts_with(other.to_str().unwrap())),
        "the refused process published: {}",
        describe(&all)
    );
}
