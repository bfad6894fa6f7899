//! Bulk import: a directory of files (albums of 100 tracks), made beside the
//! tree on the same tmpfs, renamed into the watched tree of one instance
//! with both sinks; then, optionally, the catch-up after restarts.
//!
//! Figures (`<label>_…`):
//! - `files_per_s`: files ÷ (the rename → the last `created` on the queue);
//! - `us_per_file`: the same time per file, in µs (the issue compares it at 10k and 100k);
//! - `cpu_us_per_event`: the instance's CPU time during the import ÷ files;
//! - `peak_rss_kib`: VmHWM of the instance after the import;
//! - `rescans`: rescans it logged.
//!
//! With `--catch-up` (figures without the label: there is one catch-up):
//! - `catchup_unchanged_s`: SIGTERM, restart, start → reconciled (see
//!   [`reconciled_at`]), nothing having changed while it was down;
//! - `catchup_changed_s`: SIGTERM, 1% of the files rewritten (same size,
//!   new contents), restart, start → reconciled and every rewritten file's
//!   `modified` on the queue, whichever is later.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::arrivals::{wait_for, Arrivals, Watched};
use crate::daemon::{cpu_seconds, Daemon, Setup};
use crate::files::{self, Layout};
use crate::load::warm_up;
use crate::sinks::RunSinks;
use crate::{progress, run_tag, Common, Deadline, Figures};

/// One file in this many is rewritten for `catchup_changed_s`.
const CHANGED_ONE_IN: usize = 100;

pub fn run(
    common: &Common,
    label: &str,
    count: usize,
    size: usize,
    catch_up: bool,
) -> Result<Figures, String> {
    let directory = common.scenario_directory(label)?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let staging = directory.join("staging");
    let tree = directory.join("tree");
    for made in [&staging, &tree] {
        std::fs::create_dir(made).map_err(|error| format!("create {}: {error}", made.display()))?;
    }
    progress(&format!("{label}: staging {count} files"));
    let deadline = Deadline::for_files(count);
    files::write(
        &staging.join("import"),
        Layout::Albums,
        count,
        size,
        None,
        &tag,
        deadline,
    )?;

    let run_sinks = RunSinks::open(common, &tag)?;
    let (sinks, arrivals) = (&run_sinks.sinks, &run_sinks.arrivals);
    let setup = |start: usize| Setup {
        binary: &common.binary,
        tree: &tree,
        instance_id: format!("bench-{tag}"),
        settle_ms: common.settle_ms,
        sinks: Some(sinks),
        env: &env,
        log: directory.join(format!("instance-start-{start}.log")),
    };
    let daemon = Daemon::start(&setup(1), None)?;
    let start_deadline = Deadline::after(Duration::from_secs(120));
    daemon.wait_ready(true, start_deadline)?;
    warm_up(std::slice::from_ref(&tree), arrivals, start_deadline)?;

    progress(&format!("{label}: moving {count} files into the tree"));
    let imported = tree.join("import");
    let before = arrivals.read(|arrivals| arrivals.count("created"));
    let cpu_before = cpu_seconds(std::slice::from_ref(&daemon))?;
    let moved = Instant::now();
    std::fs::rename(staging.join("import"), &imported)
        .map_err(|error| format!("move the import in: {error}"))?;
    let paths: Vec<String> = (0..count)
        .map(|index| files::path_text(&Layout::Albums.path(&imported, index)))
        .collect::<Result<_, _>>()?;
    let last = wait_for(arrivals, "created", before, &paths, deadline)
        .map_err(|error| format!("{label}: {error}; the instance's last lines:\n{}", daemon.tail()))?;
    let cpu = cpu_seconds(std::slice::from_ref(&daemon))? - cpu_before;
    let elapsed = last.saturating_duration_since(moved).as_secs_f64().max(1e-9);
    let mut figures = Figures::new();
    figures.insert(format!("{label}_files_per_s"), count as f64 / elapsed);
    figures.insert(format!("{label}_us_per_file"), elapsed * 1e6 / count as f64);
    figures.insert(format!("{label}_cpu_us_per_event"), cpu * 1e6 / count as f64);
    figures.insert(format!("{label}_peak_rss_kib"), daemon.memory()?.peak as f64);
    figures.insert(format!("{label}_rescans"), daemon.rescans() as f64);
    daemon.stop()?;

    if catch_up {
        progress(&format!("{label}: restart with nothing changed"));
        let restarted = Instant::now();
        let daemon = Daemon::start(&setup(2), None)?;
        let deadline = Deadline::for_files(count);
        let reconciled = reconciled_at(&daemon, &tree, 1, arrivals, common.settle_ms, deadline)?;
        figures.insert(
            "catchup_unchanged_s".into(),
            reconciled.saturating_duration_since(restarted).as_secs_f64(),
        );
        daemon.stop()?;

        let before = arrivals.read(|arrivals| arrivals.count("modified"));
        let changed = files::rewrite(
            &imported,
            Layout::Albums,
            count,
            size,
            CHANGED_ONE_IN,
            "rewritten",
        )?;
        progress(&format!("{label}: restart with {} files changed", changed.len()));
        let restarted = Instant::now();
        let daemon = Daemon::start(&setup(3), None)?;
        let deadline = Deadline::for_files(count);
        let reconciled = reconciled_at(&daemon, &tree, 2, arrivals, common.settle_ms, deadline)?;
        let last = wait_for(arrivals, "modified", before, &changed, deadline)
            .map_err(|error| format!("{label}: {error}; the instance's last lines:\n{}", daemon.tail()))?;
        figures.insert(
            "catchup_changed_s".into(),
            reconciled
                .max(last)
                .saturating_duration_since(restarted)
                .as_secs_f64(),
        );
        daemon.stop()?;
    }
    run_sinks.close()?;
    common.finish(&directory);
    Ok(figures)
}

/// When a restarted daemon has reconciled its tree with the registry.
///
/// Its `catch-up complete` line is not enough: it comes when the scan and
/// the sweep are done, while the scan's files still wait in the settle stage
/// to be checked one by one. So once it appears, a marker file is written
/// into the tree: it becomes ready one settle time later, behind every file
/// the scan found, and ready jobs leave oldest first, so its `created`
/// arrives once they have all been checked. Returns the later of the line
/// and the marker's arrival less the marker's own settle time.
fn reconciled_at(
    daemon: &Daemon,
    tree: &Path,
    number: usize,
    arrivals: &Watched<Arrivals>,
    settle_ms: u64,
    deadline: Deadline,
) -> Result<Instant, String> {
    daemon.wait_ready(true, deadline)?;
    let caught_up = daemon.caught_up_at().expect("waited for it");
    let marker = tree.join(format!("catch-up-marker-{number}.flac"));
    let before = arrivals.read(|arrivals| arrivals.count("created"));
    std::fs::write(&marker, files::path_text(&marker)?)
        .map_err(|error| format!("write {}: {error}", marker.display()))?;
    let arrived = wait_for(
        arrivals,
        "created",
        before,
        &[files::path_text(&marker)?],
        deadline,
    )
    .map_err(|error| {
        format!(
            "catch-up marker: {error}; the instance's last lines:\n{}",
            daemon.tail()
        )
    })?;
    let marker_settled = arrived
        .checked_sub(Duration::from_millis(settle_ms))
        .unwrap_or(arrived);
    Ok(caught_up.max(marker_settled))
}
