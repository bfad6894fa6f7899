//! Full rescans as the safety net (issue 8, items 1, 6 and 7, and
//! `RESCAN_INTERVAL`): what a rescan must rebuild, find and retry.
//!
//! - After an overflow, the rescan rebuilds the watches: a directory created
//!   and one renamed while events were lost are watched under their names,
//!   one watch per directory.
//! - The periodic rescan (`RESCAN_INTERVAL`) over unchanged files hashes
//!   nothing and publishes nothing.
//! - A change the registry refuses (read-only, SQLSTATE 25006) is kept, warned
//!   about once, and recorded once the registry takes writes again, without a
//!   restart.
//! - A file a scan finds while it is still being written waits until its
//!   mtime stops moving: one `created`, with the whole file's hash.

use std::fs;
use std::io::Write;
use std::time::Duration;

use crate::support::{
    assert_content, event_type, file_path, inotify_watches, sha256_hex, wait_until, write_file, Daemon,
    TestDatabase, DEADLINE,
};

/// The kernel's inotify queue length: what it takes to overflow it.
fn max_queued_events() -> usize {
    fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .expect("read max_queued_events")
        .trim()
        .parse()
        .expect("a number")
}

/// Directories in the tree at `root`, itself included (none is excluded here).
fn directories(root: &std::path::Path) -> usize {
    1 + walk_directories(root)
}

fn walk_directories(dir: &std::path::Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_type().unwrap().is_dir())
        .map(|entry| 1 + walk_directories(&entry.path()))
        .sum()
}

#[test]
fn overflow_rescan_watches_directories_created_and_renamed_meanwhile() {
    let stall = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let stall_path = stall.to_path_buf();
    stall.close().unwrap();
    let daemon = Daemon::builder()
        .file("existing/a.flac", "a")
        .directory("churn")
        .env("FILE_WATCHER_TEST_STALL_FILE", stall_path.to_str().unwrap())
        .start();
    wait_until("one watch per directory at start", DEADLINE, || {
        inotify_watches(daemon.pid()) == directories(daemon.dir())
    });

    fs::write(&stall_path, "").unwrap();
    // Excluded names make events and nothing else: each file is created,
    // opened, written, closed and removed (5 events).
    let churn = daemon.path("churn");
    for number in 0..max_queued_events() / 5 + 1000 {
        let path = churn.join(format!("{number}.tmp"));
        fs::write(&path, "x").unwrap();
        fs::remove_file(&path).unwrap();
    }
    // Past the kernel's limit: these events are lost.
    fs::create_dir(daemon.path("newdir")).unwrap();
    write_file(&daemon.path("newdir/during.flac"), "during");
    fs::rename(daemon.path("existing"), daemon.path("renamed")).unwrap();
    fs::remove_file(&stall_path).unwrap();

    daemon.wait_for_stderr("rescanning the tree", DEADLINE);
    daemon.wait_for_event("created", &daemon.path_str("newdir/during.flac"));
    daemon.wait_for_event("created", &daemon.path_str("renamed/a.flac"));

    write_file(&daemon.path("newdir/after.flac"), "after in a new directory");
    write_file(&daemon.path("renamed/after.flac"), "after in a renamed directory");
    let new = daemon.wait_for_event("created", &daemon.path_str("newdir/after.flac"));
    assert_content(&new, b"after in a new directory");
    let renamed = daemon.wait_for_event("created", &daemon.path_str("renamed/after.flac"));
    assert_content(&renamed, b"after in a renamed directory");
    wait_until(
        "one watch per directory after the rescan (root, churn, newdir, renamed)",
        DEADLINE,
        || inotify_watches(daemon.pid()) == directories(daemon.dir()),
    );
    assert_eq!(directories(daemon.dir()), 4);
    let messages = daemon.barrier();
    assert!(
        messages
            .iter()
            .all(|message| !file_path(message).contains("/existing/after.flac")),
        "a file in the renamed directory was reported under its old name: {messages:?}"
    );
}

#[test]
fn periodic_rescan_over_unchanged_files_hashes_and_publishes_nothing() {
    let gate = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let gate_path = gate.to_path_buf();
    gate.close().unwrap();
    let daemon = Daemon::builder()
        .file("before/old.flac", "there before the start")
        .env("RESCAN_INTERVAL", "1s")
        .env("LOG_LEVEL", "debug")
        .env("FILE_WATCHER_TEST_OPEN_GATE", gate_path.to_str().unwrap())
        .directory("album")
        .start();
    for number in 0..20 {
        write_file(
            &daemon.path(&format!("album/{number:02}.flac")),
            format!("track {number}"),
        );
    }
    let before = daemon.wait_for_messages(20, DEADLINE).len();
    assert_eq!(before, 20);

    // From now on, any file about to be hashed says so and waits.
    fs::write(&gate_path, "").unwrap();
    let periodic = ["full scan of", "periodic rescan"];
    let counted = daemon.stderr_lines_with(&periodic).len();
    wait_until("two periodic rescans, each swept", DEADLINE, || {
        daemon.stderr_lines_with(&periodic).len() >= counted + 2
            && daemon.stderr_lines_with(&["catch-up complete"]).len() >= 2
    });
    assert!(
        daemon.stderr_lines_with(&["test hook: holding"]).is_empty(),
        "a rescan of unchanged files hashed one:\n{}",
        daemon.stderr_text()
    );
    fs::remove_file(&gate_path).unwrap();
    assert_eq!(
        daemon.barrier().len(),
        20,
        "a rescan of unchanged files published"
    );
}

/// Makes the test's registry refuse every write of a path containing
/// `refused`, as a read-only server does (SQLSTATE 25006).
fn refuse_writes(database: &TestDatabase) {
    database.query(
        "CREATE FUNCTION refuse_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction' USING ERRCODE = '25006'; END $$",
        &[],
    );
    database.query(
        "CREATE TRIGGER refuse_for_the_test BEFORE INSERT OR UPDATE ON files FOR EACH ROW \
         WHEN (NEW.file_path LIKE '%refused%') EXECUTE FUNCTION refuse_for_the_test()",
        &[],
    );
}

#[test]
fn a_change_the_registry_refuses_is_kept_and_recorded_once_it_is_taken() {
    let database = TestDatabase::new();
    let daemon = Daemon::builder()
        .with_database(&database)
        .env("RESCAN_INTERVAL", "2s")
        .start();
    daemon.wait_for_full_scan(daemon.dir());
    refuse_writes(&database);

    let refused = daemon.path_str("refused.flac");
    write_file(&daemon.path("refused.flac"), "refused for a while");
    let warning = daemon.wait_for_stderr_with(
        &[
            "the registry refused the change to",
            "refused.flac",
            "SQLSTATE 25006",
        ],
        Duration::from_secs(30),
    );
    assert!(warning.contains("WARN"), "{warning}");
    // The rest keeps flowing meanwhile.
    write_file(&daemon.path("other.flac"), "other");
    daemon.wait_for_event("created", &daemon.path_str("other.flac"));
    // Still refused at the next periodic rescan: kept, not warned about again.
    let rescans = daemon.stderr_lines_with(&["periodic rescan"]).len();
    wait_until("a periodic rescan while refused", DEADLINE, || {
        daemon.stderr_lines_with(&["periodic rescan"]).len() > rescans + 1
    });
    assert!(database.row(&refused).is_none());

    database.query("DROP TRIGGER refuse_for_the_test ON files", &[]);
    let created = daemon.wait_for(
        |message| event_type(message) == "created" && file_path(message) == refused,
        Duration::from_secs(30),
    );
    assert_content(&created, b"refused for a while");
    assert_eq!(
        database.row(&refused).map(|row| row.state),
        Some("present".to_owned())
    );
    let warnings = daemon.stderr_lines_with(&["refused.flac", "SQLSTATE 25006"]);
    assert_eq!(
        warnings.iter().filter(|line| line.contains("WARN")).count(),
        1,
        "one warning per refused path: {warnings:#?}"
    );
    daemon.wait_for_stderr_with(&["the registry took the change to", "refused.flac"], DEADLINE);
}

#[test]
fn a_file_found_by_a_scan_while_still_written_is_created_once_whole() {
    // Long enough for a restart to fit inside it.
    const SETTLE: Duration = Duration::from_millis(1500);
    let settle_ms = SETTLE.as_millis().to_string();
    let database = TestDatabase::new();
    let mut first = Daemon::builder()
        .with_database(&database)
        .env("SETTLE_MS", &settle_ms)
        .start();
    let path = first.path("album/track.flac");
    fs::create_dir(first.path("album")).unwrap();
    let (part_one, part_two, part_three) = (vec![1u8; 64 * 1024], vec![2u8; 64 * 1024], vec![3u8; 64 * 1024]);
    let mut writer = fs::File::create(&path).unwrap();
    writer.write_all(&part_one).unwrap();
    writer.flush().unwrap();
    // Stopped while the file is half written and was modified moments ago.
    first.terminate();

    // The next process finds the file in its start-up scan; the events of
    // the writes that follow are held back (as a queue overflow loses them),
    // so only the file's mtime can tell that it is still being written.
    let stall = first.outside().join("stall");
    let second = Daemon::builder()
        .with_database(&database)
        .watching(first.dir())
        .env("SETTLE_MS", &settle_ms)
        .env("FILE_WATCHER_TEST_STALL_FILE", stall.to_str().unwrap())
        .start();
    second.wait_for_full_scan(first.dir());
    fs::write(&stall, "").unwrap();
    writer.write_all(&part_two).unwrap();
    writer.flush().unwrap();
    // The writer pauses past the settle time of the scan's find.
    std::thread::sleep(SETTLE + Duration::from_millis(500));
    writer.write_all(&part_three).unwrap();
    drop(writer);
    fs::remove_file(&stall).unwrap();

    let whole = [part_one.clone(), part_two.clone(), part_three].concat();
    let path = path.to_str().unwrap().to_owned();
    let created = second.wait_for(
        |message| event_type(message) == "created" && file_path(message) == path,
        DEADLINE,
    );
    assert_content(&created, &whole);
    // The barrier, by hand: `second` watches the first one's directory.
    let marker = first.path_str("zz-marker.flac");
    write_file(first.path("zz-marker.flac").as_path(), "marker");
    second.wait_for(
        |message| event_type(message) == "created" && file_path(message) == marker,
        DEADLINE,
    );
    let for_path: Vec<_> = second
        .messages()
        .iter()
        .filter(|message| file_path(message) == path)
        .map(|message| {
            (
                event_type(message).to_owned(),
                message["sha256_hash"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        for_path,
        [("created".to_owned(), sha256_hex(&whole))],
        "partial hashes: {} and {}",
        sha256_hex(&part_one),
        sha256_hex(&[part_one.clone(), part_two].concat())
    );
}
