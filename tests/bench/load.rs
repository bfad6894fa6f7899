//! Instances with both sinks (PostgreSQL registry, RabbitMQ with confirms)
//! under load: each gets a tree of its own and a writer thread that writes
//! its files as fast as it can (throughput) or at a fixed rate (paced
//! latency). All instances share one schema and one exchange, as production
//! instances share one database and one broker.
//!
//! Figures (`<label>_…`):
//! - `events_per_s`: files of all instances ÷ (first write → last message on the queue);
//! - `latency_p50_ms`, `latency_p99_ms`, `latency_max_ms`: per file, its last
//!   write's close → its `created` arriving on the run's queue;
//! - `writer_files_per_s`: how fast the writers went (must exceed the daemons');
//! - `cpu_us_per_event`: CPU time (user + system) of all instances during the
//!   load ÷ files: with `events_per_s`, how much of the machine they used;
//! - `idle_rss_kib`: VmRSS of the largest instance, started and warmed up, before the load;
//! - `peak_rss_kib`: VmHWM of the largest instance after the load;
//! - `rescans`: rescans the instances logged (event queue overflows).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::arrivals::{wait_for, Arrivals, Watched};
use crate::daemon::{cpu_seconds, Daemon, Setup};
use crate::files::{self, Layout, Written};
use crate::sinks::RunSinks;
use crate::stats::percentile;
use crate::{progress, run_tag, Common, Deadline, Figures};

pub struct Load {
    pub label: String,
    pub instances: usize,
    /// Per instance.
    pub files: usize,
    /// Bytes per file.
    pub size: usize,
    /// Files per second per instance; `None`: as fast as the writer goes.
    pub rate: Option<f64>,
}

/// How long an idle instance is left alone before its resident memory is read.
const IDLE: Duration = Duration::from_secs(1);

pub fn run(common: &Common, load: &Load) -> Result<Figures, String> {
    let directory = common.scenario_directory(&load.label)?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let run_sinks = RunSinks::open(common, &tag)?;
    let (sinks, arrivals) = (&run_sinks.sinks, &run_sinks.arrivals);
    let trees: Vec<PathBuf> = (1..=load.instances)
        .map(|number| directory.join(format!("tree-{number}")))
        .collect();
    let mut daemons = Vec::new();
    for (number, tree) in trees.iter().enumerate() {
        std::fs::create_dir(tree).map_err(|error| format!("create {}: {error}", tree.display()))?;
        let setup = Setup {
            binary: &common.binary,
            tree,
            instance_id: format!("bench-{tag}-{}", number + 1),
            settle_ms: common.settle_ms,
            sinks: Some(sinks),
            env: &env,
            log: directory.join(format!("instance-{}.log", number + 1)),
        };
        daemons.push(Daemon::start(&setup, None)?);
    }
    let start_deadline = Deadline::after(Duration::from_secs(120));
    for daemon in &daemons {
        daemon.wait_ready(true, start_deadline)?;
    }
    warm_up(&trees, arrivals, start_deadline)?;
    std::thread::sleep(IDLE);
    let mut idle_rss = 0;
    for daemon in &daemons {
        idle_rss = idle_rss.max(daemon.memory()?.resident);
    }

    let total = load.instances * load.files;
    progress(&format!(
        "{}: {} instances × {} files{}",
        load.label,
        load.instances,
        load.files,
        load.rate
            .map_or(String::new(), |rate| format!(" at {rate} files/s each"))
    ));
    let deadline = Deadline::for_files(total);
    let cpu_before = cpu_seconds(&daemons)?;
    let written = write_all(&trees, load, &tag, deadline)?;
    let paths: Vec<String> = written
        .iter()
        .flat_map(|writer| writer.files.iter().map(|(path, _)| path.clone()))
        .collect();
    // Before the load, the warm-up files were the only `created` messages.
    wait_for(arrivals, "created", trees.len(), &paths, deadline).map_err(|error| {
        let tails: Vec<String> = daemons.iter().map(Daemon::tail).collect();
        format!(
            "{}: {error}; the instances' last lines:\n{}",
            load.label,
            tails.join("\n")
        )
    })?;

    let cpu = cpu_seconds(&daemons)? - cpu_before;
    let mut peak_rss = 0;
    let mut rescans = 0;
    for daemon in &daemons {
        peak_rss = peak_rss.max(daemon.memory()?.peak);
        rescans += daemon.rescans();
    }
    let started = written
        .iter()
        .map(|writer| writer.started)
        .min()
        .expect("one writer at least");
    let writing_ended = written
        .iter()
        .map(Written::finished)
        .max()
        .expect("one writer at least");
    let (latencies, last_arrival) = arrivals.read(|arrivals| {
        let mut latencies = Vec::with_capacity(total);
        let mut last = started;
        for (path, closed) in written.iter().flat_map(|writer| &writer.files) {
            let arrived = arrivals.first("created", path).expect("every file arrived");
            latencies.push(arrived.saturating_duration_since(*closed).as_secs_f64() * 1000.0);
            last = last.max(arrived);
        }
        (latencies, last)
    });
    for daemon in daemons {
        daemon.stop()?;
    }
    run_sinks.close()?;
    common.finish(&directory);

    let label = &load.label;
    let seconds = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64().max(1e-9);
    let mut figures = Figures::new();
    let mut put = |name: &str, value: f64| figures.insert(format!("{label}_{name}"), value);
    put("events_per_s", total as f64 / seconds(started, last_arrival));
    put("latency_p50_ms", percentile(&latencies, 50.0).unwrap_or(0.0));
    put("latency_p99_ms", percentile(&latencies, 99.0).unwrap_or(0.0));
    put("latency_max_ms", percentile(&latencies, 100.0).unwrap_or(0.0));
    put(
        "writer_files_per_s",
        total as f64 / seconds(started, writing_ended),
    );
    put("cpu_us_per_event", cpu * 1e6 / total.max(1) as f64);
    put("idle_rss_kib", idle_rss as f64);
    put("peak_rss_kib", peak_rss as f64);
    put("rescans", rescans as f64);
    Ok(figures)
}

/// One file per tree, awaited on the queue: proves every instance is
/// connected to both servers before anything is measured.
pub fn warm_up(trees: &[PathBuf], arrivals: &Watched<Arrivals>, deadline: Deadline) -> Result<(), String> {
    let mut paths = Vec::new();
    for tree in trees {
        let path = tree.join("warm-up.flac");
        std::fs::write(&path, files::path_text(&path)?)
            .map_err(|error| format!("write {}: {error}", path.display()))?;
        paths.push(files::path_text(&path)?);
    }
    let arrived = arrivals.wait_until(deadline, |arrivals| {
        paths.iter().all(|path| arrivals.first("created", path).is_some())
    });
    if arrived {
        Ok(())
    } else {
        Err("the warm-up files did not arrive on the queue".to_owned())
    }
}

/// One writer thread per tree, all started together.
fn write_all(trees: &[PathBuf], load: &Load, tag: &str, deadline: Deadline) -> Result<Vec<Written>, String> {
    std::thread::scope(|scope| {
        let writers: Vec<_> = trees
            .iter()
            .enumerate()
            .map(|(number, tree)| {
                let root = tree.join("load");
                let tag = format!("{tag}-{number}");
                std::thread::Builder::new()
                    .name(format!("writer-{}", number + 1))
                    .spawn_scoped(scope, move || {
                        files::write(
                            &root,
                            Layout::Albums,
                            load.files,
                            load.size,
                            load.rate,
                            &tag,
                            deadline,
                        )
                    })
                    .map_err(|error| format!("start a writer: {error}"))
            })
            .collect();
        writers
            .into_iter()
            .map(|writer| writer?.join().map_err(|_| "a writer panicked".to_owned())?)
            .collect()
    })
}
