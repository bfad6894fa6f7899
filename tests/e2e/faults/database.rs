//! The database goes away: refused from the start, cut mid-stream; and, one
//! at a time, the real server restarted, after which the instance lock is
//! held again and a second process is refused.

use std::fs;
use std::time::Duration;

use super::{Scenario, ServicesGuard};
use crate::support::{run, Daemon, DEADLINE};

/// The outage and recovery lines of the pipeline's database link.
fn database_outage_lines(daemon: &Daemon) -> (Vec<String>, Vec<String>) {
    (
        daemon.stderr_lines_with(&["ERROR", "database", "unavailable"]),
        daemon.stderr_lines_with(&["database", "reachable again"]),
    )
}

#[test]
fn database_down_at_start() {
    let scenario = Scenario::with().database_proxy().build();
    let proxy = scenario.database_proxy();
    proxy.refuse(true);
    scenario.create("before", 3);
    let daemon = scenario.daemon().start();
    daemon.wait_for_stderr("unavailable", DEADLINE);
    scenario.create("during", 10);

    proxy.refuse(false);
    scenario.create("after", 3);
    scenario.assert_converged();
    let (down, back) = database_outage_lines(&daemon);
    assert_eq!((down.len(), back.len()), (1, 1), "{}", daemon.stderr_text());
}

#[test]
fn database_lost_mid_stream() {
    let scenario = Scenario::with().database_proxy().build();
    let proxy = scenario.database_proxy();
    let existing = scenario.create("before", 5);
    let mut daemon = scenario.daemon().start();
    scenario.assert_converged();

    proxy.refuse(true);
    proxy.cut();
    scenario.create("during", 10);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    daemon.wait_for_stderr("unavailable", DEADLINE);

    proxy.refuse(false);
    scenario.create("after", 3);
    scenario.assert_converged();
    assert!(daemon.wait_exit(Duration::ZERO).is_none(), "still running");
    let (down, back) = database_outage_lines(&daemon);
    assert_eq!((down.len(), back.len()), (1, 1), "{}", daemon.stderr_text());
}

#[test]
fn serial_database_restart() {
    let _services = ServicesGuard;
    let scenario = Scenario::new();
    let existing = scenario.create("before", 5);
    let mut daemon = scenario.daemon().start();
    scenario.assert_converged();

    restart_postgres();
    scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    scenario.create("after", 3);
    scenario.assert_converged();
    assert!(daemon.wait_exit(Duration::ZERO).is_none(), "still running");
    daemon.wait_for_stderr("holding the lock for instance id", DEADLINE);
    // A restart can be quick enough that only the lock's connection notices;
    // if the outage was seen, it was logged once, and its end once.
    let (down, back) = database_outage_lines(&daemon);
    assert!(
        down.len() <= 1 && down.len() == back.len(),
        "{}",
        daemon.stderr_text()
    );

    // The lock is ours again, so a second process is refused (as in
    // `restart::second_process_with_the_same_instance_id_is_refused`).
    let second = scenario.daemon().run();
    assert!(!second.status.success());
    assert!(
        second
            .stderr_text()
            .contains(&format!("\"{}\" is in use", scenario.instance_id)),
        "{}",
        second.stderr_text()
    );
    scenario.create("last", 2);
    scenario.assert_converged();
}

fn restart_postgres() {
    let versions = fs::read_dir("/etc/postgresql").expect("a PostgreSQL installation");
    let version = versions
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .min()
        .expect("a PostgreSQL version");
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    );
}
