//! Memory over a long steady load: one instance with both sinks and a fixed
//! set of files, rewritten round after round (new contents each time, so
//! every rewrite is a `modified` the daemon hashes, records and publishes)
//! until `events` messages have come out. Each round waits for all of its
//! messages before the next begins, and VmRSS is read at the end of every
//! round. Whatever the daemon keeps per event, and never lets go of, shows
//! as growth from the warm rounds to the last.
//!
//! Figures:
//! - `steady_events`: `modified` messages received (repeats included);
//! - `steady_events_per_s`: those ÷ (first rewrite → last message);
//! - `steady_rss_warm_kib`: VmRSS after the first tenth of the rounds, once
//!   every buffer and table has grown to the size this load needs;
//! - `steady_rss_middle_kib`, `steady_rss_end_kib`: VmRSS after half the
//!   rounds, and after the last (growth that slows down is the allocator
//!   settling; growth at a steady pace is a leak);
//! - `steady_rss_growth_kib`: end − warm (flat memory: about 0);
//! - `steady_peak_rss_kib`: VmHWM at the end.

use std::time::{Duration, Instant};

use crate::arrivals::wait_for;
use crate::daemon::{Daemon, Setup};
use crate::files::{self, Layout};
use crate::sinks::RunSinks;
use crate::{progress, run_tag, Common, Deadline, Figures};

pub fn run(common: &Common, count: usize, events: usize, size: usize) -> Result<Figures, String> {
    let directory = common.scenario_directory("steady")?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let tree = directory.join("tree");
    std::fs::create_dir(&tree).map_err(|error| format!("create {}: {error}", tree.display()))?;
    let run_sinks = RunSinks::open(common, &tag)?;
    let (sinks, arrivals) = (&run_sinks.sinks, &run_sinks.arrivals);
    let setup = Setup {
        binary: &common.binary,
        tree: &tree,
        instance_id: format!("bench-{tag}"),
        settle_ms: common.settle_ms,
        sinks: Some(sinks),
        env: &env,
        log: directory.join("instance.log"),
    };
    let daemon = Daemon::start(&setup, None)?;
    daemon.wait_ready(true, Deadline::after(Duration::from_secs(120)))?;

    let root = tree.join("library");
    let deadline = Deadline::for_files(count);
    let written = files::write(&root, Layout::Albums, count, size, None, &tag, deadline)?;
    let paths: Vec<String> = written.files.into_iter().map(|(path, _)| path).collect();
    wait_for(arrivals, "created", 0, &paths, deadline)
        .map_err(|error| format!("steady: {error}; the instance's last lines:\n{}", daemon.tail()))?;

    let rounds = events.div_ceil(count).max(1);
    let warm_round = (rounds / 10).max(1);
    progress(&format!(
        "steady: {count} files rewritten {rounds} times, both sinks"
    ));
    let mut resident = Vec::with_capacity(rounds);
    let started = Instant::now();
    for round in 1..=rounds {
        let deadline = Deadline::for_files(count);
        files::rewrite(
            &root,
            Layout::Albums,
            count,
            size,
            1,
            &format!("{tag} round {round}"),
        )?;
        let expected = round * count;
        let arrived = arrivals.wait_until(deadline, |arrivals| arrivals.received("modified") >= expected);
        if !arrived {
            let received = arrivals.read(|arrivals| arrivals.received("modified"));
            return Err(format!(
                "steady: round {round}: {received} of {expected} modified messages by the deadline; \
                 the instance's last lines:\n{}",
                daemon.tail()
            ));
        }
        resident.push(daemon.memory()?.resident);
        if round % warm_round == 0 {
            progress(&format!(
                "steady: round {round} of {rounds}, VmRSS {} KiB",
                resident[round - 1]
            ));
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let received = arrivals.read(|arrivals| arrivals.received("modified"));
    let peak = daemon.memory()?.peak;
    daemon.stop()?;
    run_sinks.close()?;
    common.finish(&directory);

    let warm = resident[warm_round - 1];
    let middle = resident[(rounds / 2).max(1) - 1];
    let end = *resident.last().expect("at least one round");
    let mut figures = Figures::new();
    figures.insert("steady_events".into(), received as f64);
    figures.insert("steady_events_per_s".into(), received as f64 / elapsed);
    figures.insert("steady_rss_warm_kib".into(), warm as f64);
    figures.insert("steady_rss_middle_kib".into(), middle as f64);
    figures.insert("steady_rss_end_kib".into(), end as f64);
    figures.insert("steady_rss_growth_kib".into(), end as f64 - warm as f64);
    figures.insert("steady_peak_rss_kib".into(), peak as f64);
    Ok(figures)
}
