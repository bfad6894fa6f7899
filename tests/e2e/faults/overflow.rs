//! The kernel's event queue overflows while notify's thread is stalled
//! (`FILE_WATCHER_TEST_STALL_FILE`): the daemon rescans the tree; and the
//! burst of queued events after a stall (a rename over a file, then its
//! removal) still ends in the right state.

use std::fs;

use super::{events_for, Scenario, CONVERGE};

#[test]
fn kernel_queue_overflow_rescans() {
    let queued = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .expect("read max_queued_events")
        .trim()
        .parse::<usize>()
        .expect("a number");
    let scenario = Scenario::new();
    let existing = scenario.create("before", 20);
    // Made before the start, so it is watched from the start: notify adds
    // the watch of a new directory only once it has handled a whole batch of
    // events, which a stall in the middle of that batch would hold back (and
    // the churn below would then raise no events at all).
    let churn = scenario.path("churn");
    fs::create_dir(&churn).unwrap();
    let stall = scenario.outside.join("stall");
    let daemon = scenario
        .daemon()
        .env("FILE_WATCHER_TEST_STALL_FILE", stall.to_str().unwrap())
        .start();
    scenario.assert_converged();

    fs::write(&stall, "").unwrap();
    // Excluded names make kernel events but no registry rows: each file is
    // created, opened, written, closed and removed (5 events).
    for number in 0..queued / 5 + 1000 {
        let path = churn.join(format!("{number}.tmp"));
        fs::write(&path, "x").unwrap();
        fs::remove_file(&path).unwrap();
    }
    // Past the kernel's limit: only a rescan can find these.
    let mut lost = Vec::new();
    for number in 0..50 {
        let relative = format!("before/lost-{number:03}.flac");
        scenario.write(&relative, "v1");
        lost.push(relative);
    }
    for relative in &existing[..5] {
        scenario.write(relative, "v2");
    }
    for relative in &existing[5..10] {
        scenario.remove(relative);
    }
    fs::remove_file(&stall).unwrap();

    daemon.wait_for_stderr("rescanning the tree", CONVERGE);
    let all = scenario.assert_converged();
    for relative in &lost {
        assert_eq!(events_for(&all, &scenario.path_str(relative)), ["created"]);
    }
}

#[test]
fn a_burst_after_a_stall_with_a_rename_over_a_file_then_its_removal() {
    // What the chaos script found: after a stall, the queued events arrive in
    // one burst, so `mv a b; rm b` land in one settle period. `b` was
    // recorded before: it is gone as much as `a` is.
    let scenario = Scenario::new();
    let files = scenario.create("album", 3);
    let stall = scenario.outside.join("stall");
    let _daemon = scenario
        .daemon()
        .env("FILE_WATCHER_TEST_STALL_FILE", stall.to_str().unwrap())
        .start();
    scenario.assert_converged();

    fs::write(&stall, "").unwrap();
    fs::rename(scenario.path(&files[0]), scenario.path(&files[1])).unwrap();
    scenario.remove(&files[1]);
    fs::remove_file(&stall).unwrap();
    let all = scenario.assert_converged();
    for relative in &files[..2] {
        let path = scenario.path_str(relative);
        assert_eq!(
            scenario.database.row(&path).map(|row| row.state),
            Some("deleted".to_owned()),
            "{path}"
        );
        assert_eq!(events_for(&all, &path).last(), Some(&"deleted"), "{path}");
    }
}
