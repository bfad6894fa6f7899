//! The inotify watch limit, reached at start or later: the daemon falls back
//! to polling, says so at ERROR with the value to raise the limit to, and
//! keeps announcing changes. Each test runs the binary in a user namespace
//! of its own (`unshare`), whose limit it sets without touching the host's.

use std::fs;
use std::time::Duration;

use super::SETTLE_MS;
use crate::support::{event_type, file_path, Daemon, DaemonBuilder, DEADLINE};

/// The binary in stdout mode, in a user namespace of its own whose inotify
/// watch limit is `limit`.
fn with_watch_limit(limit: u32) -> DaemonBuilder {
    Daemon::builder()
        .wrapped_in([
            "unshare".to_owned(),
            "--user".to_owned(),
            "--map-root-user".to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo {limit} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""),
        ])
        .env("SETTLE_MS", SETTLE_MS)
}

/// The value an error line tells the operator to set the limit to.
#[track_caller]
fn advised_watch_limit(line: &str) -> u64 {
    let (_, rest) = line
        .split_once("fs.inotify.max_user_watches=")
        .unwrap_or_else(|| panic!("no value to set in {line}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no value to set in {line}"))
}

/// `d0/d1/…`, `depth` directories deep.
fn nested(depth: usize) -> String {
    (0..depth)
        .map(|level| format!("d{level}"))
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn watch_limit_at_start_falls_back_to_polling() {
    let deepest = nested(30);
    let mut daemon = with_watch_limit(20).directory(&deepest).start();
    let error = daemon.wait_for_stderr_with(&["ERROR", "fs.inotify.max_user_watches="], DEADLINE);
    assert!(error.contains("polling"), "{error}");
    assert!(advised_watch_limit(&error) > 20, "{error}");
    assert!(
        daemon.stderr_text().contains("polling every 5000 ms"),
        "{}",
        daemon.stderr_text()
    );

    let deep = format!("{deepest}/deep.flac");
    fs::write(daemon.path(&deep), "deep").unwrap();
    let deep = daemon.path_str(&deep);
    daemon.wait_for(
        |message| event_type(message) == "created" && file_path(message) == deep,
        Duration::from_secs(30),
    );
    assert!(daemon.wait_exit(Duration::ZERO).is_none());
}

#[test]
fn watch_limit_reached_later_falls_back_to_polling() {
    let mut daemon = with_watch_limit(20).start();
    assert!(
        daemon.stderr_text().contains("(inotify,"),
        "{}",
        daemon.stderr_text()
    );

    let deepest = nested(30);
    fs::create_dir_all(daemon.path(&deepest)).expect("create nested directories");
    let error = daemon.wait_for_stderr_with(&["ERROR", "fs.inotify.max_user_watches="], DEADLINE);
    assert!(error.contains("polling"), "{error}");
    assert!(advised_watch_limit(&error) > 20, "{error}");
    let deep = format!("{deepest}/deep.flac");
    fs::write(daemon.path(&deep), "deep").unwrap();
    let deep = daemon.path_str(&deep);
    daemon.wait_for(
        |message| event_type(message) == "created" && file_path(message) == deep,
        Duration::from_secs(30),
    );
    assert!(daemon.wait_exit(Duration::ZERO).is_none());
}
