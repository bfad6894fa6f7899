//! One instance in stdout mode (no database, no broker): what the watching
//! and settling stages cost on their own.
//!
//! `burst` writes files one by one into a directory made just before (the
//! daemon's watch on it comes after the first files: its scan of the new
//! directory finds those). Figures:
//! - `burst_tail_s`: the last file's write closing → the last announcement on stdout;
//! - `burst_writer_files_per_s`: how fast the files were written;
//! - `burst_peak_rss_kib`: VmHWM after the last announcement;
//! - `burst_rescans`: rescans the instance logged (event queue overflows).
//!
//! `memory` runs with a settle time of an hour, so nothing it sees leaves
//! the settle stage, and reads VmRSS once the daemon is quiet (no CPU time
//! used and VmRSS unchanged for half a second) before and after each step:
//! - `memory_idle_rss_kib`: VmRSS at start, stdout mode, empty tree;
//! - `memory_bytes_per_directory`: after making empty directories, each watched;
//! - `memory_bytes_per_pending_path`: after writing files into one new directory.
//!
//! Both are RSS differences divided by the count: they include the slack
//! of grown hash tables, which is what a user pays.

use std::sync::Arc;
use std::time::Duration;

use crate::arrivals::{wait_for, Arrivals, Watched};
use crate::daemon::{Daemon, Setup};
use crate::files::{self, Layout};
use crate::{progress, run_tag, Common, Deadline, Figures};

/// The settle time of `memory`: long enough that nothing settles while it measures.
const SETTLE_FOREVER_MS: u64 = 3_600_000;

/// How often, and for how many looks in a row, the daemon must be seen idle.
const QUIET_POLL: Duration = Duration::from_millis(100);
const QUIET_LOOKS: usize = 5;

pub fn burst(common: &Common, count: usize, size: usize) -> Result<Figures, String> {
    let directory = common.scenario_directory("burst")?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let tree = directory.join("tree");
    std::fs::create_dir(&tree).map_err(|error| format!("create {}: {error}", tree.display()))?;
    let announcements = Arc::new(Watched::new(Arrivals::default()));
    let setup = Setup {
        binary: &common.binary,
        tree: &tree,
        instance_id: format!("bench-{tag}"),
        settle_ms: common.settle_ms,
        sinks: None,
        env: &env,
        log: directory.join("instance.log"),
    };
    let daemon = Daemon::start(&setup, Some(Arc::clone(&announcements)))?;
    daemon.wait_ready(false, Deadline::after(Duration::from_secs(60)))?;

    progress(&format!("burst: {count} files into a new directory, stdout mode"));
    let deadline = Deadline::for_files(count);
    let root = tree.join("burst");
    std::fs::create_dir(&root).map_err(|error| format!("create {}: {error}", root.display()))?;
    let written = files::write(&root, Layout::Flat, count, size, None, &tag, deadline)?;
    let paths: Vec<String> = written.files.iter().map(|(path, _)| path.clone()).collect();
    let last = wait_for(&announcements, "created", 0, &paths, deadline)
        .map_err(|error| format!("burst: {error}; the instance's last lines:\n{}", daemon.tail()))?;

    let mut figures = Figures::new();
    let finished = written.finished();
    figures.insert(
        "burst_tail_s".into(),
        last.saturating_duration_since(finished).as_secs_f64(),
    );
    let writing = finished
        .saturating_duration_since(written.started)
        .as_secs_f64()
        .max(1e-9);
    figures.insert("burst_writer_files_per_s".into(), count as f64 / writing);
    figures.insert("burst_peak_rss_kib".into(), daemon.memory()?.peak as f64);
    figures.insert("burst_rescans".into(), daemon.rescans() as f64);
    daemon.stop()?;
    common.finish(&directory);
    Ok(figures)
}

pub fn memory(common: &Common, directories: usize, count: usize) -> Result<Figures, String> {
    let directory = common.scenario_directory("memory")?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let tree = directory.join("tree");
    std::fs::create_dir(&tree).map_err(|error| format!("create {}: {error}", tree.display()))?;
    let announcements = Arc::new(Watched::new(Arrivals::default()));
    let setup = Setup {
        binary: &common.binary,
        tree: &tree,
        instance_id: format!("bench-{tag}"),
        settle_ms: SETTLE_FOREVER_MS,
        sinks: None,
        env: &env,
        log: directory.join("instance.log"),
    };
    let daemon = Daemon::start(&setup, Some(announcements))?;
    daemon.wait_ready(false, Deadline::after(Duration::from_secs(60)))?;
    let idle = quiet_resident(&daemon, Deadline::after(Duration::from_secs(60)))?;

    progress(&format!(
        "memory: {directories} directories, then {count} pending files"
    ));
    let deadline = Deadline::for_files(directories + count);
    let parent = tree.join("directories");
    for number in 0..directories {
        let made = parent.join(format!("directory{number}"));
        std::fs::create_dir_all(&made).map_err(|error| format!("create {}: {error}", made.display()))?;
    }
    let with_directories = quiet_resident(&daemon, deadline)?;
    let root = tree.join("pending");
    std::fs::create_dir(&root).map_err(|error| format!("create {}: {error}", root.display()))?;
    files::write(&root, Layout::Flat, count, 4096, None, &tag, deadline)?;
    let with_pending = quiet_resident(&daemon, deadline)?;
    daemon.stop()?;
    common.finish(&directory);

    let per = |after: u64, before: u64, items: usize| {
        after.saturating_sub(before) as f64 * 1024.0 / items.max(1) as f64
    };
    let mut figures = Figures::new();
    figures.insert("memory_idle_rss_kib".into(), idle as f64);
    figures.insert(
        "memory_bytes_per_directory".into(),
        per(with_directories, idle, directories),
    );
    figures.insert(
        "memory_bytes_per_pending_path".into(),
        per(with_pending, with_directories, count),
    );
    Ok(figures)
}

/// VmRSS once the daemon has used no CPU time and kept the same VmRSS for
/// [`QUIET_LOOKS`] looks in a row: it has taken in every event so far.
fn quiet_resident(daemon: &Daemon, deadline: Deadline) -> Result<u64, String> {
    let mut last = (daemon.cpu_ticks()?, daemon.memory()?.resident);
    let mut quiet_looks = 0;
    while quiet_looks < QUIET_LOOKS {
        if deadline.passed() {
            return Err(format!(
                "the daemon was still busy at the deadline: {}",
                daemon.tail()
            ));
        }
        std::thread::sleep(QUIET_POLL);
        let now = (daemon.cpu_ticks()?, daemon.memory()?.resident);
        quiet_looks = if now == last { quiet_looks + 1 } else { 0 };
        last = now;
    }
    Ok(last.1)
}
