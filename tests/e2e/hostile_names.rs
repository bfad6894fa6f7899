//! Strange names (issue 8): names that are not valid UTF-8, names with
//! newlines, quotes, backslashes, emoji and both Unicode normal forms, and
//! paths near and over `PATH_MAX`.
//!
//! How a name travels is the "path text" rule of `src/path_text.rs`: every
//! valid UTF-8 name is itself, except that a backslash before `x` or before
//! another backslash is doubled; each byte of an invalid UTF-8 sequence is
//! written `\xNN`. These tests hold the daemon to it end to end: in stdout
//! mode, and through the PostgreSQL registry and a restart.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::daemon::log_level;
use crate::support::{file_path, old_path, sha256_hex, summary, write_file, Daemon, TestDatabase, DEADLINE};

/// `name` (raw bytes) inside the watched directory.
fn raw_path(daemon: &Daemon, name: &[u8]) -> PathBuf {
    daemon.dir().join(OsStr::from_bytes(name))
}

/// Appends `content` to `path`: one more finished write.
fn append(path: &Path, content: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(content))
        .unwrap_or_else(|error| panic!("append to {}: {error}", path.display()));
}

fn assert_hash(message: &Value, content: &[u8]) {
    assert_eq!(message["sha256_hash"], sha256_hex(content), "sha256 of {message}");
}

/// Warning lines of the daemon that contain `text`.
fn warnings_with(daemon: &Daemon, text: &str) -> Vec<String> {
    daemon
        .warnings_and_errors()
        .into_iter()
        .filter(|line| line.contains(text))
        .collect()
}

/// Two names that differ only in an invalid byte are two files, each
/// created, modified, renamed and deleted under its own escaped name; a
/// valid name that spells `\xff` is a third. One warning per name.
#[test]
fn names_that_are_not_utf8_travel_escaped_and_stay_apart() {
    let daemon = Daemon::start();
    let dir = daemon.dir_str();
    let ff = raw_path(&daemon, b"track\xff.flac");
    let fe = raw_path(&daemon, b"track\xfe.flac");
    let spelled = daemon.path("track\\xff.flac");
    let ff_text = format!("{dir}/track\\xff.flac");
    let fe_text = format!("{dir}/track\\xfe.flac");
    let spelled_text = format!("{dir}/track\\\\xff.flac");

    write_file(&ff, b"byte ff");
    write_file(&fe, b"byte fe");
    write_file(&spelled, b"spelled out");
    assert_hash(&daemon.wait_for_event("created", &ff_text), b"byte ff");
    assert_hash(&daemon.wait_for_event("created", &fe_text), b"byte fe");
    assert_hash(&daemon.wait_for_event("created", &spelled_text), b"spelled out");

    append(&ff, b" and more");
    let modified = daemon.wait_for_event("modified", &ff_text);
    assert_hash(&modified, b"byte ff and more");
    assert_eq!(modified["file_type"], "flac");

    let renamed = raw_path(&daemon, b"renamed\xfe.flac");
    fs::rename(&fe, &renamed).unwrap();
    let renamed_text = format!("{dir}/renamed\\xfe.flac");
    let message = daemon.wait_for_event("renamed", &renamed_text);
    assert_eq!(old_path(&message), Some(fe_text.as_str()));
    assert_hash(&message, b"byte fe");

    fs::remove_file(&ff).unwrap();
    daemon.wait_for_event("deleted", &ff_text);

    let mut messages = summary(&daemon.barrier());
    messages.sort();
    let mut expected: Vec<(String, String)> = [
        ("created", &ff_text),
        ("created", &fe_text),
        ("created", &spelled_text),
        ("modified", &ff_text),
        ("renamed", &renamed_text),
        ("deleted", &ff_text),
    ]
    .into_iter()
    .map(|(kind, path)| (kind.to_owned(), path.clone()))
    .collect();
    expected.sort();
    assert_eq!(
        messages, expected,
        "one message per change, each under its own name"
    );
    // Warned once per name, however many events it had.
    for name in ["track\\xff.flac", "track\\xfe.flac", "renamed\\xfe.flac"] {
        let lines = warnings_with(&daemon, name);
        assert_eq!(lines.len(), 1, "warnings naming {name}: {lines:#?}");
        assert!(lines[0].contains("not valid UTF-8"), "{}", lines[0]);
    }
    assert_eq!(
        daemon.warnings_and_errors().len(),
        3,
        "only the three names are warned about:\n{}",
        daemon.stderr_text()
    );
}

/// The escaped name is the registry key: it survives the database, a move
/// into and the rename of a directory whose name is not UTF-8, and a
/// restart. The restart's catch-up finds the files under their keys (so it
/// announces nothing for them), and a deletion while the daemon was down is
/// a `deleted` for the right key.
#[test]
fn names_that_are_not_utf8_survive_the_database_and_a_restart() {
    let database = TestDatabase::new();
    // The album exists before the start, so its watch is in place for the move.
    let mut first = Daemon::builder()
        .with_database(&database)
        .env("INSTANCE_ID", "utf8keys")
        .directory(OsStr::from_bytes(b"album\xe9"))
        .start();
    let dir = first.dir_str();
    let ff = raw_path(&first, b"song\xff.flac");
    let fe = raw_path(&first, b"song\xfe.flac");
    let ff_text = format!("{dir}/song\\xff.flac");
    let fe_text = format!("{dir}/song\\xfe.flac");
    write_file(&ff, b"ff");
    write_file(&fe, b"fe");
    for path in [&ff_text, &fe_text] {
        let created = first.wait_for_event("created", path);
        database.wait_published(path, created["message_id"].as_str().unwrap());
    }
    let moved = raw_path(&first, b"album\xe9").join(OsStr::from_bytes(b"song\xfe.flac"));
    fs::rename(&fe, &moved).unwrap();
    let moved_text = format!("{dir}/album\\xe9/song\\xfe.flac");
    let message = first.wait_for_event("moved", &moved_text);
    assert_eq!(old_path(&message), Some(fe_text.as_str()));
    database.wait_published(&moved_text, message["message_id"].as_str().unwrap());
    // The registry moves the rows below a renamed directory by their text.
    fs::rename(raw_path(&first, b"album\xe9"), raw_path(&first, b"album\xc9")).unwrap();
    let renamed_text = format!("{dir}/album\\xc9/song\\xfe.flac");
    let message = first.wait_for_event("moved", &renamed_text);
    assert_eq!(old_path(&message), Some(moved_text.as_str()));
    database.wait_published(&renamed_text, message["message_id"].as_str().unwrap());
    let present: Vec<String> = database
        .rows()
        .into_iter()
        .filter(|row| row.state == "present")
        .map(|row| row.file_path)
        .collect();
    assert_eq!(
        present,
        [renamed_text.clone(), ff_text.clone()],
        "the keys in the registry"
    );
    assert!(first.terminate().success(), "{}", first.stderr_text());

    // While it is down: one file goes, the other stays as it was.
    fs::remove_file(&ff).unwrap();
    let second = Daemon::builder()
        .with_database(&database)
        .env("INSTANCE_ID", "utf8keys")
        .watching(first.dir())
        .start();
    second.wait_for_stderr("catch-up complete", DEADLINE);
    second.wait_for_event("deleted", &ff_text);
    // `Daemon::barrier` writes into the daemon's own directory; this one
    // watches the first one's.
    let marker = first.path("zz-marker.flac");
    write_file(&marker, b"marker");
    second.wait_for_event("created", marker.to_str().unwrap());
    let messages: Vec<Value> = second
        .messages()
        .into_iter()
        .filter(|message| file_path(message) != marker.to_str().unwrap())
        .collect();
    assert_eq!(
        summary(&messages),
        [("deleted".to_owned(), ff_text.clone())],
        "the restart found the other file under its key"
    );
    assert_eq!(database.row(&ff_text).unwrap().state, "deleted");
    assert_eq!(database.row(&renamed_text).unwrap().state, "present");
}

/// Newlines, quotes, backslashes, control characters, emoji, and the NFC and
/// NFD spellings of one name (two files): each is announced under exactly
/// its own name.
#[test]
fn unusual_names_are_announced_exactly() {
    let daemon = Daemon::start();
    let names = [
        "line\nbreak.flac",
        "carriage\rreturn.flac",
        "tab\there.flac",
        "say \"hi\" it's.flac",
        "back\\slash.flac",
        "C:\\Music\\track.flac",
        "\u{1b}[31mred.flac",
        "🎵 Ünïcødé 音楽.flac",
        "caf\u{e9}.flac",
        "cafe\u{301}.flac",
    ];
    for (number, name) in names.iter().enumerate() {
        write_file(&daemon.path(name), format!("content {number}"));
    }
    for (number, name) in names.iter().enumerate() {
        let path = daemon.path_str(name);
        let created = daemon.wait_for_event("created", &path);
        assert_hash(&created, format!("content {number}").as_bytes());
    }
    let messages = daemon.barrier();
    assert_eq!(messages.len(), names.len(), "one created per name: {messages:#?}");
    let nfc = daemon.path_str("caf\u{e9}.flac");
    let nfd = daemon.path_str("cafe\u{301}.flac");
    assert_ne!(nfc, nfd);
    assert!(messages.iter().any(|message| file_path(message) == nfc));
    assert!(messages.iter().any(|message| file_path(message) == nfd));
    assert!(
        daemon.warnings_and_errors().is_empty(),
        "valid names are not warned about:\n{}",
        daemon.stderr_text()
    );
}

/// A file name cannot forge a log line: control characters in what is
/// logged are escaped, so every line the daemon writes starts a log entry.
#[test]
fn a_file_name_cannot_forge_a_log_line() {
    let daemon = Daemon::builder()
        .env("LOG_LEVEL", "debug")
        .env("INSTANCE_ID", "forge01")
        .start();
    let prefix = format!("[forge01:{}]", daemon.dir_str());
    let forged = "a\n2026-01-01T00:00:00.000Z ERROR [x:y] FAKE ERROR line.flac";
    let colored = "b\r\u{1b}[2K\u{1b}[31mred\u{9b}c.flac";
    for name in [forged, colored] {
        write_file(&daemon.path(name), name);
        daemon.wait_for_event("created", &daemon.path_str(name));
    }
    daemon.barrier();
    let lines = daemon.stderr_lines();
    for line in &lines {
        let timestamp = line.split(' ').next().unwrap_or("");
        assert!(
            humantime::parse_rfc3339(timestamp).is_ok()
                && matches!(log_level(line), Some("WARN" | "INFO" | "DEBUG" | "TRACE"))
                && line.split(' ').nth(2) == Some(prefix.as_str()),
            "a line that is not one of the daemon's entries: {line:?}"
        );
        assert!(
            !line.contains(['\u{1b}', '\r', '\u{9b}']),
            "a raw control character in {line:?}"
        );
    }
    // The names are still there to read, escaped.
    assert!(
        lines
            .iter()
            .any(|line| line.contains("a\\n2026-01-01T00:00:00.000Z ERROR [x:y] FAKE ERROR line.flac")),
        "the forged name is logged escaped:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("b\\r\\x1b[2K\\x1b[31mred\\u{9b}c.flac")),
        "the colored name is logged escaped:\n{}",
        lines.join("\n")
    );
}

/// Runs `script` with `sh` in `dir`: relative names from there reach paths
/// longer than `PATH_MAX`, which no call with an absolute path can.
fn shell_in(dir: &Path, script: &str) {
    let status = Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(script)
        .status()
        .expect("run sh");
    assert!(status.success(), "sh -c {script:?} in {} failed", dir.display());
}

/// A file whose path is one byte short of `PATH_MAX` is announced as usual;
/// one whose path reaches it, and a directory (with a file) beyond it, are
/// warned about once each, however often they are touched, and the daemon
/// keeps working for everything else. Today (inotify) the file was a
/// "cannot read … File name too long" warning at every change.
#[test]
fn paths_over_path_max_are_warned_about_once() {
    paths_over_path_max(Daemon::start());
}

/// The same when polling, where every poll meets the long paths again
/// (notify's poller reports them as errors).
#[test]
fn paths_over_path_max_are_warned_about_once_when_polling() {
    paths_over_path_max(Daemon::builder().env("POLL_INTERVAL_MS", "100").start());
}

fn paths_over_path_max(daemon: Daemon) {
    const PATH_MAX: usize = 4096;
    // A chain of directories ending between 3850 and 3890 bytes from `/`,
    // so the names below fit in NAME_MAX (255).
    let mut deep = daemon.dir().to_owned();
    while deep.as_os_str().len() < 3850 {
        let room = 3850 + 40 - deep.as_os_str().len() - 1;
        deep.push("d".repeat(room.min(200)));
    }
    fs::create_dir_all(&deep).unwrap();
    let depth = deep.as_os_str().len();
    // Once this is announced, the deep directory is watched.
    let ready = deep.join("ready.flac");
    write_file(&ready, b"ready");
    daemon.wait_for_event("created", ready.to_str().unwrap());

    let near_name = format!("{}.flac", "n".repeat(PATH_MAX - 1 - depth - 1 - ".flac".len()));
    let near = deep.join(&near_name);
    assert_eq!(near.as_os_str().len(), PATH_MAX - 1);
    let over_name = format!("{}.flac", "o".repeat(PATH_MAX - depth - 1 - ".flac".len()));
    assert_eq!(depth + 1 + over_name.len(), PATH_MAX);
    let long_dir = "g".repeat(250);

    write_file(&near, b"near");
    daemon.wait_for_event("created", near.to_str().unwrap());
    shell_in(&deep, &format!("printf 'over 0' > {over_name}"));
    shell_in(
        &deep,
        &format!("mkdir {long_dir} && printf 'inside' > {long_dir}/inside.flac"),
    );
    for round in 1..=3 {
        shell_in(&deep, &format!("printf ' {round}' >> {over_name}"));
        shell_in(&deep, &format!("printf ' {round}' >> {long_dir}/inside.flac"));
        // New files rather than changes: the poller sees mtimes in whole seconds.
        let other = deep.join(format!("other {round}.flac"));
        write_file(&other, format!("other {round}"));
        daemon.wait_for_event("created", other.to_str().unwrap());
    }
    let messages = daemon.barrier();
    assert!(
        !messages
            .iter()
            .any(|message| file_path(message).contains(&over_name) || file_path(message).contains(&long_dir)),
        "nothing is announced for what cannot be read: {messages:#?}"
    );
    let over = warnings_with(&daemon, &over_name);
    assert_eq!(
        over.len(),
        1,
        "warnings naming the over-long file: {:#?}",
        shortened(&over)
    );
    assert!(over[0].contains("PATH_MAX"), "{}", over[0]);
    let beyond = warnings_with(&daemon, &long_dir);
    assert_eq!(
        beyond.len(),
        1,
        "warnings naming the over-long directory: {:#?}",
        shortened(&beyond)
    );
    let all = daemon.warnings_and_errors();
    assert_eq!(
        all.len(),
        2,
        "nothing else is warned about: {:#?}",
        shortened(&all)
    );
}

/// Log lines with the long runs of one letter of the deep tree cut short,
/// for readable failures.
fn shortened(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            let mut short = String::new();
            let mut run = 0;
            let mut last = None;
            for character in line.chars() {
                run = if Some(character) == last { run + 1 } else { 1 };
                last = Some(character);
                if run <= 3 {
                    short.push(character);
                } else if run == 4 {
                    short.push('…');
                }
            }
            short
        })
        .collect()
}
