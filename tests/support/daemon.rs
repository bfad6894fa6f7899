//! The one runner of the real `file-watcher` binary: it runs it against a
//! directory of its own and lets the test wait for what the binary says.
//!
//! Each `Daemon` owns a fresh temporary directory laid out as
//!
//! ```text
//! <tmp>/watched   DATA_DIR (canonical path), the tree under test
//! <tmp>/outside   a sibling on the same filesystem, for moves in and out
//! ```
//!
//! so tests share nothing and run in parallel. The child gets a cleared
//! environment (only `PATH` is kept) plus what the builder sets, so the
//! developer's `RABBITMQ_URL`, `DATABASE_URL`, `EXTENSIONS`, ... cannot leak in;
//! with no broker configured the daemon prints one JSON message per line on
//! stdout.
//!
//! Two named threads read stdout and stderr into shared line buffers; every wait
//! is "check a condition, sleep on a condvar until the next line or the
//! deadline", never a fixed sleep. Dropping a `Daemon` kills the child, joins
//! both readers and removes the directory; if the test is panicking, the
//! captured stderr is printed so the failure explains itself.
//!
//! "Nothing was emitted" is checked with [`Daemon::barrier`]: after the action,
//! a marker file is written and its `created` awaited. The action happened
//! first, so it settles first; anything it (wrongly) produced is then already
//! in the buffer. Messages for *different* paths may leave in either order
//! (several workers hash in parallel), so a test waits for every message it
//! expects before it calls the barrier; the barrier only rules out extras.
//!
//! A test that needs the binary inside something else (a user namespace with
//! its own inotify limit) names a wrapper command
//! ([`DaemonBuilder::wrapped_in`]); everything else stays the same.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{TestBroker, TestDatabase, DEADLINE, SETTLE_MS};

/// Lines read from one of the child's pipes, and whether the pipe has closed.
#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A line buffer shared between its reader thread and the test.
#[derive(Default)]
struct SharedLines {
    state: Mutex<Lines>,
    /// Signalled on every new line and when the pipe closes.
    changed: Condvar,
}

impl SharedLines {
    fn push(&self, line: String) {
        self.state.lock().unwrap().lines.push(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.changed.notify_all();
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Calls `check` on every change until it returns `Some` or `deadline`
    /// passes (then `None`).
    fn wait_until<T>(&self, deadline: Instant, mut check: impl FnMut(&Lines) -> Option<T>) -> Option<T> {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(found) = check(&state) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// Reads `pipe` line by line into `shared` on a named thread. With `limit`,
/// stops after that many lines and drops the pipe (the reader goes away, as
/// with `file-watcher | head -1`).
fn spawn_reader(
    name: &str,
    pipe: impl Read + Send + 'static,
    shared: Arc<SharedLines>,
    limit: Option<usize>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut count = 0;
            loop {
                if limit.is_some_and(|limit| count >= limit) {
                    break;
                }
                let mut buffer = Vec::new();
                match reader.read_until(b'\n', &mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buffer);
                        shared.push(line.trim_end_matches(['\n', '\r']).to_owned());
                        count += 1;
                    }
                }
            }
            drop(reader);
            shared.close();
        })
        .expect("spawn reader thread")
}

/// Configures one run of the binary. Defaults: a fresh directory as
/// `DATA_DIR`, `SETTLE_MS=200`, everything else left to the daemon.
pub struct DaemonBuilder {
    /// A command the binary is run through (its path appended), if any.
    wrapper: Vec<OsString>,
    arguments: Vec<OsString>,
    environment: Vec<(String, String)>,
    /// Directories to create (relative to the watched directory) before the start.
    directories: Vec<PathBuf>,
    /// Files to create (relative to the watched directory) before the start.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Symbolic links to create (relative to the watched directory) before the start.
    symlinks: Vec<(PathBuf, PathBuf)>,
    /// Pass the watched directory as the positional `DIR` instead of `DATA_DIR`.
    directory_as_argument: bool,
    /// Extension of the barrier's marker files; must pass the daemon's filter.
    marker_extension: String,
    /// Stop reading stdout after this many lines and close the pipe.
    close_stdout_after: Option<usize>,
    /// Run the child as this (uid, gid) instead of the test's own user.
    user: Option<(u32, u32)>,
}

impl DaemonBuilder {
    /// Runs the binary through `command`: its program and arguments, then the
    /// binary's path, then the daemon's arguments. The wrapper must end by
    /// exec-ing the binary, so that signals and the exit reach the daemon
    /// (`sh -c '…; exec "$0" "$@"'`).
    pub fn wrapped_in<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, command: I) -> Self {
        self.wrapper = command.into_iter().map(Into::into).collect();
        self
    }

    pub fn arg(mut self, argument: impl Into<OsString>) -> Self {
        self.arguments.push(argument.into());
        self
    }

    /// Sets a variable for the child; later calls win, and these override the
    /// defaults (`DATA_DIR`, `SETTLE_MS`).
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.environment.push((name.to_owned(), value.into()));
        self
    }

    /// Creates the directory `relative` (parents included) in the watched
    /// directory before the daemon starts.
    pub fn directory(mut self, relative: impl Into<PathBuf>) -> Self {
        self.directories.push(relative.into());
        self
    }

    /// Creates `relative` with `content` in the watched directory before the
    /// daemon starts (parents included).
    pub fn file(mut self, relative: impl Into<PathBuf>, content: impl Into<Vec<u8>>) -> Self {
        self.files.push((relative.into(), content.into()));
        self
    }

    /// Creates the symbolic link `relative` → `target` in the watched
    /// directory before the daemon starts.
    pub fn symlink(mut self, relative: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.symlinks.push((relative.into(), target.into()));
        self
    }

    pub fn directory_as_argument(mut self) -> Self {
        self.directory_as_argument = true;
        self
    }

    pub fn marker_extension(mut self, extension: &str) -> Self {
        self.marker_extension = extension.to_owned();
        self
    }

    pub fn close_stdout_after(mut self, lines: usize) -> Self {
        self.close_stdout_after = Some(lines);
        self
    }

    /// Runs the daemon as `uid`:`gid` (the tests run as root, and root reads
    /// every file whatever its mode, so permission cases need another user;
    /// the image runs as 65534). The temporary directory is opened up (0755)
    /// so that user can reach the watched tree; what the test creates in it
    /// keeps the modes the test gives it. Dropping privileges from root also
    /// drops root's supplementary groups (std does so when a uid is set).
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Watches `dir` (another daemon's tree, a scenario's) instead of a
    /// directory of its own.
    pub fn watching(self, dir: &Path) -> Self {
        self.env("DATA_DIR", dir.to_str().expect("temp paths are UTF-8"))
    }

    /// Publishes to `broker` and records in `database`.
    pub fn with_sinks(self, broker: &TestBroker, database: &TestDatabase) -> Self {
        self.with_broker(broker).with_database(database)
    }

    pub fn with_broker(self, broker: &TestBroker) -> Self {
        self.env("RABBITMQ_URL", broker.url())
            .env("EXCHANGE", broker.exchange())
    }

    pub fn with_database(self, database: &TestDatabase) -> Self {
        self.env("DATABASE_URL", database.url())
            .env("DB_SCHEMA", database.schema())
    }

    /// Starts the daemon and waits for its `ready:` log line; panics with the
    /// captured stderr if it exits or the line does not come in time.
    #[track_caller]
    pub fn start(self) -> Daemon {
        let daemon = self.spawn();
        daemon.wait_ready(DEADLINE);
        daemon
    }

    /// Runs the binary to completion (for runs expected to exit by themselves:
    /// `--help`, bad configuration). Panics if it is still running at the deadline.
    #[track_caller]
    pub fn run(self) -> Finished {
        let mut daemon = self.spawn();
        let Some(status) = daemon.wait_exit(DEADLINE) else {
            panic!("still running after {DEADLINE:?}:\n{}", daemon.stderr_text());
        };
        Finished {
            status,
            stdout: daemon.stdout.snapshot(),
            stderr: daemon.stderr.snapshot(),
        }
    }

    /// Lays out the directory and starts the child without waiting for anything.
    pub fn spawn(self) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("file-watcher-test-")
            .tempdir()
            .expect("create temp dir");
        let root_path = root.path().canonicalize().expect("canonicalize temp dir");
        let data_dir = root_path.join("watched");
        let outside = root_path.join("outside");
        fs::create_dir(&data_dir).expect("create watched dir");
        fs::create_dir(&outside).expect("create outside dir");
        if self.user.is_some() {
            use std::os::unix::fs::PermissionsExt;
            for dir in [&root_path, &data_dir, &outside] {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("open up the temp dir");
            }
        }
        for relative in &self.directories {
            fs::create_dir_all(data_dir.join(relative)).expect("create a prepared directory");
        }
        for (relative, content) in &self.files {
            let path = data_dir.join(relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("create parent of a prepared file");
            }
            fs::write(&path, content).expect("write a prepared file");
        }
        for (relative, target) in &self.symlinks {
            std::os::unix::fs::symlink(target, data_dir.join(relative)).expect("create a prepared symlink");
        }

        let binary = env!("CARGO_BIN_EXE_file-watcher");
        let mut command = match self.wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        if !self.directory_as_argument {
            command.env("DATA_DIR", &data_dir);
        }
        command.env("SETTLE_MS", SETTLE_MS.to_string());
        for (name, value) in &self.environment {
            command.env(name, value);
        }
        command.args(&self.arguments);
        if self.directory_as_argument {
            command.arg(&data_dir);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn file-watcher");

        let stdout = Arc::new(SharedLines::default());
        let stderr = Arc::new(SharedLines::default());
        let readers = vec![
            spawn_reader(
                "daemon-stdout",
                child.stdout.take().unwrap(),
                stdout.clone(),
                self.close_stdout_after,
            ),
            spawn_reader(
                "daemon-stderr",
                child.stderr.take().unwrap(),
                stderr.clone(),
                None,
            ),
        ];
        Daemon {
            child,
            exit_status: None,
            readers,
            stdout,
            stderr,
            data_dir,
            outside,
            marker_extension: self.marker_extension,
            markers: AtomicUsize::new(0),
            _root: root,
        }
    }
}

/// What a run that ended by itself left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Finished {
    pub fn stdout_text(&self) -> String {
        self.stdout.join("\n")
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }

    /// Stderr lines that are not blank.
    pub fn stderr_nonblank(&self) -> Vec<&str> {
        self.stderr
            .iter()
            .map(String::as_str)
            .filter(|line| !line.trim().is_empty())
            .collect()
    }
}

/// A running `file-watcher` with its own directory. Killed on drop.
pub struct Daemon {
    child: Child,
    /// Set once the child has been reaped.
    exit_status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
    stdout: Arc<SharedLines>,
    stderr: Arc<SharedLines>,
    data_dir: PathBuf,
    outside: PathBuf,
    marker_extension: String,
    /// Numbers the barrier's marker files.
    markers: AtomicUsize,
    /// Removed after the child is killed (fields drop after `Drop::drop`).
    _root: TempDir,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            wrapper: Vec::new(),
            arguments: Vec::new(),
            environment: Vec::new(),
            directories: Vec::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
            directory_as_argument: false,
            marker_extension: "flac".to_owned(),
            close_stdout_after: None,
            user: None,
        }
    }

    /// Starts with all defaults.
    pub fn start() -> Daemon {
        Daemon::builder().start()
    }

    /// The watched directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.data_dir
    }

    /// The watched directory as the daemon should print it.
    pub fn dir_str(&self) -> String {
        self.data_dir.to_str().expect("temp paths are UTF-8").to_owned()
    }

    /// A sibling of the watched directory on the same filesystem.
    pub fn outside(&self) -> &Path {
        &self.outside
    }

    /// `relative` inside the watched directory.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.data_dir.join(relative)
    }

    /// `relative` inside the watched directory, as the daemon prints it.
    pub fn path_str(&self, relative: &str) -> String {
        self.path(relative)
            .to_str()
            .expect("temp paths are UTF-8")
            .to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[track_caller]
    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let outcome = self.stderr.wait_until(deadline, |lines| {
            if lines.lines.iter().any(|line| is_ready_line(line)) {
                Some(true)
            } else if lines.closed {
                Some(false)
            } else {
                None
            }
        });
        match outcome {
            Some(true) => {}
            Some(false) => panic!(
                "file-watcher closed stderr before logging `ready:`:\n{}",
                self.stderr_text()
            ),
            None => panic!(
                "no `ready:` log line within {timeout:?}; stderr so far:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Every stdout line so far, parsed. Panics on a line that is not a JSON
    /// object: stdout carries messages only.
    #[track_caller]
    pub fn messages(&self) -> Vec<Value> {
        parse_messages(&self.stdout.snapshot())
    }

    /// Messages that concern `path` (as `file_path` or `old_path`), in order.
    #[track_caller]
    pub fn messages_for(&self, path: &str) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|message| concerns(message, path))
            .collect()
    }

    /// Waits until at least `count` messages have arrived; returns all so far.
    #[track_caller]
    pub fn wait_for_messages(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let found = self.stdout.wait_until(deadline, |lines| {
            (lines.lines.len() >= count).then(|| parse_messages(&lines.lines))
        });
        let Some(messages) = found else {
            panic!(
                "expected at least {count} messages within {timeout:?}, got:\n{}\nstderr:\n{}",
                self.stdout_text(),
                self.stderr_text()
            );
        };
        messages
    }

    /// Waits for the first message that satisfies `predicate` and returns it.
    #[track_caller]
    pub fn wait_for(&self, mut predicate: impl FnMut(&Value) -> bool, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let found = self.stdout.wait_until(deadline, |lines| {
            parse_messages(&lines.lines)
                .into_iter()
                .find(|message| predicate(message))
        });
        let Some(message) = found else {
            panic!(
                "no matching message within {timeout:?}; messages:\n{}\nstderr:\n{}",
                self.stdout_text(),
                self.stderr_text()
            );
        };
        message
    }

    /// Waits for a message with this `event_type` and `file_path`.
    #[track_caller]
    pub fn wait_for_event(&self, wanted: &str, path: &str) -> Value {
        self.wait_for(
            |message| event_type(message) == wanted && file_path(message) == path,
            DEADLINE,
        )
    }

    /// Writes a fresh marker file and waits for its `created`. Returns every
    /// message so far, without markers. Whatever an earlier action produced
    /// has settled by then; wait for expected messages first (see the module
    /// doc), this only shows there are no others.
    #[track_caller]
    pub fn barrier(&self) -> Vec<Value> {
        let number = self.markers.fetch_add(1, Ordering::Relaxed);
        let name = format!("zz-marker-{number}.{}", self.marker_extension);
        let path = self.path(&name);
        fs::write(&path, format!("marker {number} {}", self.dir_str())).expect("write marker");
        let path = path.to_str().unwrap().to_owned();
        self.wait_for(
            |message| event_type(message) == "created" && file_path(message) == path,
            DEADLINE,
        );
        self.messages()
            .into_iter()
            .filter(|message| !is_marker(message))
            .collect()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.snapshot().join("\n")
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Stderr lines that contain every one of `parts`.
    pub fn stderr_lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.stderr_lines()
            .into_iter()
            .filter(|line| contains_all(line, parts))
            .collect()
    }

    /// Stderr lines logged at WARN or ERROR.
    pub fn warnings_and_errors(&self) -> Vec<String> {
        self.stderr_lines()
            .into_iter()
            .filter(|line| matches!(log_level(line), Some("WARN" | "ERROR")))
            .collect()
    }

    /// Waits for a stderr line containing `text`; returns it.
    #[track_caller]
    pub fn wait_for_stderr(&self, text: &str, timeout: Duration) -> String {
        self.wait_for_stderr_with(&[text], timeout)
    }

    /// Waits for a stderr line containing every one of `parts`; returns it.
    #[track_caller]
    pub fn wait_for_stderr_with(&self, parts: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let found = self.stderr.wait_until(deadline, |lines| {
            lines.lines.iter().find(|line| contains_all(line, parts)).cloned()
        });
        let Some(line) = found else {
            panic!(
                "no stderr line containing {parts:?} within {timeout:?}:\n{}",
                self.stderr_text()
            );
        };
        line
    }

    /// Waits until the start-up reconciliation's full scan of `dir` has been
    /// counted: every file it found is then pending in the settle stage, so a
    /// file written afterwards is handled after them.
    #[track_caller]
    pub fn wait_for_full_scan(&self, dir: &Path) -> String {
        self.wait_for_stderr(&format!("full scan of {} found", dir.display()), DEADLINE)
    }

    /// Sends `signal` (a name `kill` understands: `TERM`, `INT`, ...).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// SIGTERM, then waits for the exit. Panics if it does not come in time.
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// SIGINT, then waits for the exit. Panics if it does not come in time.
    #[track_caller]
    pub fn interrupt(&mut self) -> ExitStatus {
        self.stop_with("INT")
    }

    #[track_caller]
    fn stop_with(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let Some(status) = self.wait_exit(DEADLINE) else {
            panic!(
                "still running {DEADLINE:?} after SIG{signal}; stderr:\n{}",
                self.stderr_text()
            );
        };
        status
    }

    /// Waits for the child to exit by itself; `None` if it is still running
    /// at the deadline. The exit status is a process state with no event to
    /// wait on, so this polls `try_wait` every 10 ms until the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit_status = Some(status);
                // The pipes are closed now: let the readers take the last lines.
                self.join_readers();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Joins the reader threads; only once the child has exited (the pipes
    /// are then closed and the readers end).
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread panicked");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- file-watcher stdout ---\n{}\n--- file-watcher stderr ---\n{}\n---",
                self.stdout.snapshot().join("\n"),
                self.stderr.snapshot().join("\n")
            );
        }
    }
}

/// The readiness line: message starting with `ready:` in either log format.
fn is_ready_line(line: &str) -> bool {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => object
            .get("message")
            .and_then(Value::as_str)
            .is_some_and(|message| message.starts_with("ready:")),
        _ => line.contains(": ready:"),
    }
}

fn parse_messages(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(value @ Value::Object(_)) => value,
            _ => panic!("stdout line is not a JSON object: {line:?}"),
        })
        .collect()
}

fn contains_all(line: &str, parts: &[&str]) -> bool {
    parts.iter().all(|part| line.contains(part))
}

/// The log level of a text-format stderr line (`<ts> <LEVEL> [...] ...`).
pub fn log_level(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

fn concerns(message: &Value, path: &str) -> bool {
    file_path(message) == path || old_path(message) == Some(path)
}

fn is_marker(message: &Value) -> bool {
    file_path(message)
        .rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("zz-marker-"))
}

/// `event_type` of a message (empty if missing).
pub fn event_type(message: &Value) -> &str {
    message["event_type"].as_str().unwrap_or("")
}

/// `file_path` of a message (empty if missing).
pub fn file_path(message: &Value) -> &str {
    message["file_path"].as_str().unwrap_or("")
}

/// `old_path` of a message, if present.
pub fn old_path(message: &Value) -> Option<&str> {
    message.get("old_path").and_then(Value::as_str)
}

/// `(event_type, file_path)` pairs, for compact assertions.
pub fn summary(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|message| (event_type(message).to_owned(), file_path(message).to_owned()))
        .collect()
}

/// `(event_type, file_path, old_path)` for exact sequence assertions that show renames.
pub fn triples(messages: &[Value]) -> Vec<(String, String, Option<String>)> {
    messages
        .iter()
        .map(|message| {
            (
                event_type(message).to_owned(),
                file_path(message).to_owned(),
                old_path(message).map(str::to_owned),
            )
        })
        .collect()
}

/// The message carries the hashes and size of exactly `content`.
pub fn assert_content(message: &Value, content: &[u8]) {
    assert_eq!(
        message["sha256_hash"],
        super::sha256_hex(content),
        "sha256 of {message}"
    );
    assert_eq!(
        message["xxh128_hash"],
        super::xxh128_hex(content),
        "xxh128 of {message}"
    );
    assert_eq!(
        message["size_bytes"].as_u64(),
        Some(content.len() as u64),
        "size of {message}"
    );
}

/// The inotify watches process `pid` holds, read from /proc (one `inotify wd:`
/// line per watch in the fdinfo of its inotify descriptor).
pub fn inotify_watches(pid: u32) -> usize {
    let mut watches = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_inotify = fs::read_link(entry.path())
            .map(|target| target.to_string_lossy().contains("inotify"))
            .unwrap_or(false);
        if is_inotify {
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            watches += info
                .lines()
                .filter(|line| line.starts_with("inotify wd:"))
                .count();
        }
    }
    watches
}
