//! The command line as an operator meets it: `--help`, `--version`, bad
//! configuration, log formats, signals and a closed stdout.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{event_type, summary, write_file, Daemon, DaemonBuilder, DEADLINE};

/// Environment variables the daemon reads. The child's environment is cleared
/// anyway (see `support::daemon`); `--help` must document every one.
const CONFIG_VARIABLES: [&str; 11] = [
    "DATA_DIR",
    "INSTANCE_ID",
    "EXTENSIONS",
    "SETTLE_MS",
    "WORKERS",
    "HUGE_FILE_BYTES",
    "POLL_INTERVAL_MS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "EXCLUDE",
    "SCAN_EXISTING",
];

/// Flags that mirror `CONFIG_VARIABLES` (the directory is positional).
const FLAGS: [&str; 10] = [
    "--instance-id",
    "--extensions",
    "--settle-ms",
    "--workers",
    "--huge-file-bytes",
    "--poll-interval-ms",
    "--log-level",
    "--log-format",
    "--exclude",
    "--scan-existing",
];

const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

#[test]
fn help_documents_every_option() {
    let finished = Daemon::builder().arg("--help").run();
    assert!(finished.status.success(), "--help failed: {finished:?}");
    let help = finished.stdout_text();
    let missing: Vec<&str> = CONFIG_VARIABLES
        .iter()
        .chain(FLAGS.iter())
        .copied()
        .filter(|name| !help.contains(name))
        .collect();
    assert!(missing.is_empty(), "--help does not mention {missing:?}:\n{help}");
}

#[test]
fn version_prints_the_crate_version() {
    let finished = Daemon::builder().arg("--version").run();
    assert!(finished.status.success(), "--version failed: {finished:?}");
    assert!(
        finished.stdout_text().contains(env!("CARGO_PKG_VERSION")),
        "--version printed {:?}",
        finished.stdout_text()
    );
}

/// Runs with one bad setting; returns a description of what is wrong with
/// the outcome, if anything.
fn check_rejected(builder: DaemonBuilder, name: &str, value: &str) -> Option<String> {
    let finished = builder.run();
    let lines = finished.stderr_nonblank();
    let problem = if finished.status.code() != Some(2) {
        Some(format!("exit status {:?}, expected 2", finished.status))
    } else if lines.len() != 1 {
        Some(format!("{} stderr lines, expected one", lines.len()))
    } else if !lines[0].contains(name) || !lines[0].contains(value) {
        Some("the line does not name both the setting and the value".to_owned())
    } else {
        None
    };
    problem.map(|problem| format!("{name}={value}: {problem}; stderr:\n{}", finished.stderr_text()))
}

#[test]
fn bad_environment_values_exit_2_naming_variable_and_value() {
    let cases = [
        ("SETTLE_MS", "abc"),
        ("LOG_FORMAT", "xml"),
        ("WORKERS", "0"),
        ("POLL_INTERVAL_MS", "-5"),
        ("LOG_LEVEL", "loud"),
        ("SCAN_EXISTING", "maybe"),
        ("EXCLUDE", "[unclosed"),
    ];
    let problems: Vec<String> = cases
        .iter()
        .filter_map(|(name, value)| check_rejected(Daemon::builder().env(name, *value), name, value))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn bad_flag_values_exit_2_naming_flag_and_value() {
    let cases = [
        ("--settle-ms", "abc"),
        ("--log-format", "xml"),
        ("--workers", "0"),
        ("--poll-interval-ms", "-5"),
        ("--log-level", "loud"),
    ];
    let problems: Vec<String> = cases
        .iter()
        .filter_map(|(flag, value)| {
            // `--flag=value`, so that `-5` is not taken for a flag of its own.
            check_rejected(Daemon::builder().arg(format!("{flag}={value}")), flag, value)
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// Every variable `--help` names (`[env: NAME=…]`, or `[env: NAME]` for
/// those whose values it hides).
fn documented_variables() -> Vec<String> {
    let help = Daemon::builder().arg("--help").run().stdout_text();
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn empty_environment_values_count_as_unset() {
    let variables = documented_variables();
    assert!(
        variables.len() >= CONFIG_VARIABLES.len(),
        "--help names only {variables:?}"
    );
    let mut builder = Daemon::builder().directory_as_argument();
    for name in &variables {
        builder = builder.env(name, "");
    }
    let daemon = builder.start();
    // The defaults hold (the audio extensions, the settle time), except
    // that an empty EXCLUDE excludes nothing, hidden files included.
    write_file(&daemon.path("song.flac"), b"announced");
    write_file(
        &daemon.path(".hidden.flac"),
        b"excluded by default, not by EXCLUDE=",
    );
    write_file(&daemon.path("notes.txt"), b"not an audio extension");
    daemon.wait_for_event("created", &daemon.path_str("song.flac"));
    let mut announced = summary(&daemon.barrier());
    announced.sort();
    assert_eq!(
        announced,
        vec![
            ("created".to_owned(), daemon.path_str(".hidden.flac")),
            ("created".to_owned(), daemon.path_str("song.flac")),
        ]
    );
    let ready = daemon.wait_for_stderr(": ready:", DEADLINE);
    assert!(
        ready.contains("settle 500 ms"),
        "not the default settle time: {ready}"
    );
}

#[test]
fn an_empty_flag_value_is_still_checked() {
    let problem = check_rejected(Daemon::builder().arg("--settle-ms="), "--settle-ms", "\"\"");
    assert!(problem.is_none(), "{}", problem.unwrap_or_default());
}

fn missing_directory() -> String {
    std::env::temp_dir()
        .join(format!("file-watcher-missing-{}", uuid::Uuid::new_v4()))
        .join("music")
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn missing_data_dir_exits_nonzero_naming_the_path() {
    let missing = missing_directory();
    let finished = Daemon::builder().env("DATA_DIR", missing.as_str()).run();
    assert!(
        !finished.status.success(),
        "started without its directory: {finished:?}"
    );
    assert!(
        finished.stderr_text().contains(&missing),
        "stderr does not name {missing}:\n{}",
        finished.stderr_text()
    );
}

#[test]
fn missing_positional_directory_exits_nonzero_naming_the_path() {
    let missing = missing_directory();
    let finished = Daemon::builder().arg(missing.as_str()).run();
    assert!(
        !finished.status.success(),
        "started without its directory: {finished:?}"
    );
    assert!(
        finished.stderr_text().contains(&missing),
        "stderr does not name {missing}:\n{}",
        finished.stderr_text()
    );
}

#[test]
fn positional_directory_is_watched() {
    let daemon = Daemon::builder().directory_as_argument().start();
    let path = daemon.path_str("song.flac");
    write_file(&daemon.path("song.flac"), b"positional");
    let created = daemon.wait_for_event("created", &path);
    assert_eq!(created["watched_directory"], daemon.dir_str());
}

#[test]
fn environment_configures_the_daemon() {
    let daemon = Daemon::builder()
        .env("INSTANCE_ID", "envid123")
        .env("EXTENSIONS", "mp3")
        .marker_extension("mp3")
        .start();
    write_file(&daemon.path("ignored.flac"), b"not listed");
    write_file(&daemon.path("taken.mp3"), b"listed");
    daemon.wait_for_event("created", &daemon.path_str("taken.mp3"));
    let messages = daemon.barrier();
    assert_eq!(
        summary(&messages),
        vec![("created".to_owned(), daemon.path_str("taken.mp3"))]
    );
    assert_eq!(messages[0]["instance_id"], "envid123");
}

#[test]
fn default_instance_id_is_eight_hex_digits() {
    let daemon = Daemon::start();
    write_file(&daemon.path("song.flac"), b"who am I");
    let created = daemon.wait_for_event("created", &daemon.path_str("song.flac"));
    let id = created["instance_id"].as_str().unwrap_or_default();
    assert!(
        id.len() == 8 && id.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "instance_id {id:?} is not 8 hex digits"
    );
}

#[test]
fn text_log_lines_carry_instance_and_directory_prefix() {
    let mut daemon = Daemon::builder()
        .arg("--instance-id")
        .arg("logs1234")
        .arg("--log-level")
        .arg("debug")
        .start();
    write_file(&daemon.path("song.flac"), b"something to log about");
    daemon.wait_for_event("created", &daemon.path_str("song.flac"));
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");

    let prefix = format!("[logs1234:{}]", daemon.dir_str());
    let lines = daemon.stderr_lines();
    let ready = lines
        .iter()
        .find(|line| line.contains(": ready:"))
        .expect("a ready line");
    assert!(
        ready.split_whitespace().nth(1) == Some("INFO"),
        "ready is not at INFO: {ready}"
    );
    let bad: Vec<&String> = lines
        .iter()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            let mut parts = line.split_whitespace();
            let timestamp_ok = parts
                .next()
                .is_some_and(|text| humantime::parse_rfc3339(text).is_ok());
            let level_ok = parts.next().is_some_and(|level| LEVELS.contains(&level));
            let prefix_ok = parts.next() == Some(prefix.as_str());
            !(timestamp_ok && level_ok && prefix_ok)
        })
        .collect();
    assert!(
        bad.is_empty(),
        "lines without `<RFC 3339> <LEVEL> {prefix}`: {bad:#?}"
    );
}

#[test]
fn json_log_lines_parse_with_required_fields() {
    let mut daemon = Daemon::builder()
        .arg("--instance-id")
        .arg("json1234")
        .arg("--log-format")
        .arg("json")
        .arg("--log-level")
        .arg("debug")
        .start();
    write_file(&daemon.path("song.flac"), b"something to log about");
    daemon.wait_for_event("created", &daemon.path_str("song.flac"));
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");

    let mut problems = Vec::new();
    let mut ready = false;
    for line in daemon
        .stderr_lines()
        .iter()
        .filter(|line| !line.trim().is_empty())
    {
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
            problems.push(format!("not a JSON object: {line}"));
            continue;
        };
        let text = |key: &str| object.get(key).and_then(Value::as_str);
        let ts_valid = text("ts").is_some_and(|ts| humantime::parse_rfc3339(ts).is_ok());
        if !ts_valid {
            problems.push(format!("ts missing or not RFC 3339: {line}"));
        }
        let level_known = text("level").is_some_and(|level| LEVELS.contains(&level.to_uppercase().as_str()));
        if !level_known {
            problems.push(format!("level missing or unknown: {line}"));
        }
        if text("instance_id") != Some("json1234") {
            problems.push(format!("instance_id: {line}"));
        }
        if text("watched_directory") != Some(daemon.dir_str().as_str()) {
            problems.push(format!("watched_directory: {line}"));
        }
        if text("target").is_none() {
            problems.push(format!("target: {line}"));
        }
        match text("message") {
            Some(message) => ready |= message.starts_with("ready:"),
            None => problems.push(format!("message: {line}")),
        }
    }
    assert!(ready, "no message starting with `ready:`");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn sigterm_exits_zero() {
    let mut daemon = Daemon::start();
    let started = Instant::now();
    let status = daemon.terminate();
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}\n{}",
        daemon.stderr_text()
    );
    // "Within a few seconds": an idle daemon has nothing to finish.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "SIGTERM took {elapsed:?}");
}

#[test]
fn sigint_exits_zero() {
    let mut daemon = Daemon::start();
    let status = daemon.interrupt();
    assert!(
        status.success(),
        "SIGINT exit: {status:?}\n{}",
        daemon.stderr_text()
    );
}

#[test]
fn sigterm_with_work_in_flight_exits_zero() {
    let mut daemon = Daemon::start();
    write_file(&daemon.path("first.flac"), b"first");
    daemon.wait_for_event("created", &daemon.path_str("first.flac"));
    // Still settling when the signal arrives.
    write_file(&daemon.path("second.flac"), b"second");
    let status = daemon.terminate();
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}\n{}",
        daemon.stderr_text()
    );
    assert!(
        !daemon.stderr_text().contains("panicked"),
        "{}",
        daemon.stderr_text()
    );
}

#[test]
fn closed_stdout_ends_the_process_cleanly() {
    let mut daemon = Daemon::builder().close_stdout_after(1).start();
    write_file(&daemon.path("first.flac"), b"first");
    let messages = daemon.wait_for_messages(1, DEADLINE);
    assert_eq!(event_type(&messages[0]), "created");
    // The reader is gone now; the next message hits a closed pipe.
    write_file(&daemon.path("second.flac"), b"second");
    let status = daemon.wait_exit(DEADLINE).unwrap_or_else(|| {
        panic!(
            "still running {DEADLINE:?} after stdout closed:\n{}",
            daemon.stderr_text()
        )
    });
    let stderr = daemon.stderr_text();
    assert!(
        !stderr.contains("panicked"),
        "panicked on a closed stdout:\n{stderr}"
    );
    assert!(
        status.success(),
        "a closed stdout is a normal end, got {status:?}:\n{stderr}"
    );
}
