//! What every end-to-end test stands on, written once: one runner for the
//! real binary, one fixture per shared server, one fault proxy, one way to
//! block on a future with a deadline, one way to poll a condition.
//!
//! - [`daemon`]: [`Daemon`] runs the real `file-watcher` on a directory of its
//!   own (optionally through a wrapper command) and waits on what it prints.
//! - [`broker`]: [`TestBroker`], an exchange and a queue of the test's own on
//!   the real RabbitMQ.
//! - [`database`]: [`TestDatabase`], a schema of the test's own on the real
//!   PostgreSQL.
//! - [`proxy`]: [`FaultProxy`], a TCP proxy that cuts, refuses or freezes, so
//!   one test can have an outage of its own while the others go on.
//! - [`tls`]: [`TlsProxy`], a TLS listener of a test's own in front of a
//!   shared server, and [`Pki`], the certificates it presents.
//! - [`block_on`]: the one place a test blocks on a future (lapin's), always
//!   raced against a deadline.
//!
//! Every fixture isolates its test (own directory, exchange, queue, schema),
//! so tests run in parallel and rerun without cleanup. Waits check a
//! condition and sleep on a condvar (or, where there is nothing to wait on,
//! poll every [`POLL`]) until a deadline; never a fixed sleep standing in
//! for synchronisation.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub mod block_on;
pub mod broker;
pub mod daemon;
pub mod database;
pub mod proxy;
pub mod tls;

pub use block_on::{until, within};
pub use broker::{Delivered, TestBroker};
pub use daemon::{
    assert_content, event_type, file_path, inotify_watches, old_path, summary, triples, Daemon, DaemonBuilder,
};
pub use database::{FileRow, TestDatabase};
pub use proxy::FaultProxy;
pub use tls::{Pki, TlsProxy};

/// How long any single wait may take. Generous: CI has two cores and builds
/// other tests at the same time.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often a condition with no event to wait on (a table, a process list,
/// a server's state) is looked at again while a test waits for it.
pub const POLL: Duration = Duration::from_millis(25);

/// The settle time tests run with unless they set their own: short, so tests
/// are quick, yet long enough that back-to-back writes fall inside it.
pub const SETTLE_MS: u64 = 200;

/// Asks `condition` again every [`POLL`] until it holds; fails the test,
/// saying `what` was awaited, after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(POLL);
    }
}

/// Runs `program` to completion and returns its stdout; fails the test if
/// it cannot start or exits non-zero.
#[track_caller]
pub fn run(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Lower-case hex SHA-256, as the messages carry it.
pub fn sha256_hex(content: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(content))
}

/// Lower-case hex XXH3-128, as the messages carry it.
pub fn xxh128_hex(content: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(content))
}

/// Opens (creating or truncating), writes and closes: one finished write.
#[track_caller]
pub fn write_file(path: &Path, content: impl AsRef<[u8]>) {
    fs::write(path, content).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}
