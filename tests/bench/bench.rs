//! The tool behind `scripts/bench.sh` (an example, not a test:
//! `cargo build --release --example bench`). The script builds it, loops
//! over the runs and calls one subcommand per scenario; each scenario starts
//! the daemons it needs, writes the files, reads what comes out and appends
//! one JSON line of figures to `--results`. `report` then takes the median of
//! every figure over the runs, prints the table and writes the JSON.
//!
//! Scenarios, each in its own module and each measuring one thing the issue
//! asks about (BENCHMARKS.md says what each figure means):
//!
//! - [`ceilings`]: what the servers and the machine can do without the
//!   daemon — a raw publisher with a window of unconfirmed persistent
//!   messages, multi-row upserts into a table shaped like the registry, and
//!   `sha256sum` beside the daemon's own hashing of the same file.
//! - [`load`]: instances with PostgreSQL and RabbitMQ under files written as
//!   fast as possible or paced; throughput and the latency from a file's
//!   last write to its message arriving on the run's queue.
//! - [`import`]: a directory of files moved into a watched tree, then the
//!   catch-up after a restart.
//! - [`stdout`]: stdout mode, a burst of files into a new directory, and
//!   what pending paths and watched directories cost in memory.
//! - [`steady`]: memory over a million events on a fixed set of files.
//!
//! Underneath: [`files`] writes, [`daemon`] runs the real binary,
//! [`schema`] names and drops a scenario's registry schema, [`sinks`] makes
//! both sinks of a scenario and removes them, [`amqp`] owns the
//! run's exchange and queue and reads it, [`arrivals`] records what came out
//! and when, [`stats`] takes percentiles and medians.
//!
//! Every scenario isolates itself (own directory, exchange, queue, schema and
//! instance ids, removed afterwards), talks to the servers named on the
//! command line only, and bounds every wait (see [`Deadline`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

// What the scenarios stand on, in the order a file travels through a run:
// written, watched by the daemon, published, read, counted.
mod files;
mod daemon;
mod schema;
mod sinks;
mod amqp;
mod arrivals;
mod stats;
// The scenarios, in the order the script runs them, then the report.
mod ceilings;
mod load;
mod import;
mod stdout;
mod steady;
mod report;

/// One run's figures: name → value, the names BENCHMARKS.md lists.
pub type Figures = BTreeMap<String, f64>;

#[derive(Parser)]
#[command(about = "The benchmark's tool; run it through scripts/bench.sh")]
struct Arguments {
    #[command(subcommand)]
    command: Step,
}

#[derive(Subcommand)]
enum Step {
    /// The broker's ceiling: persistent messages under a window of unconfirmed ones.
    BrokerCeiling {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        messages: usize,
        /// Messages published and not yet confirmed, at most.
        #[arg(long)]
        window: usize,
    },
    /// PostgreSQL's ceiling: multi-row upserts into a table shaped like `files`, plus outbox rows.
    PostgresCeiling {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        files: usize,
        /// Files per statement (and per transaction).
        #[arg(long, default_value = "500")]
        batch: usize,
    },
    /// `sha256sum` and the daemon on the same big file.
    Hashing {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        mib: usize,
    },
    /// Instances with both sinks under files written as fast as possible, or paced.
    Load {
        #[command(flatten)]
        common: Common,
        /// Prefix of the figures' names (`throughput`, `paced`, `variant`).
        #[arg(long)]
        label: String,
        #[arg(long)]
        instances: usize,
        /// Files per instance.
        #[arg(long)]
        files: usize,
        #[arg(long, default_value = "4")]
        size_kib: usize,
        /// Files per second per instance; unset: as fast as the writer goes.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// A directory of files moved into the tree of one instance with both sinks.
    Import {
        #[command(flatten)]
        common: Common,
        /// Prefix of the figures' names (`import_small`, `import_large`).
        #[arg(long)]
        label: String,
        #[arg(long)]
        files: usize,
        #[arg(long, default_value = "4")]
        size_kib: usize,
        /// Then restart the instance twice: unchanged, and with 1% of the files changed.
        #[arg(long)]
        catch_up: bool,
    },
    /// Stdout mode: files written one by one into a new directory.
    Burst {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        files: usize,
        #[arg(long, default_value = "4")]
        size_kib: usize,
    },
    /// Stdout mode with a settle time of an hour: memory per watched directory and per pending path.
    Memory {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        directories: usize,
        #[arg(long)]
        files: usize,
    },
    /// One instance with both sinks: a fixed set of files rewritten until `events` messages came out.
    Steady {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        files: usize,
        #[arg(long)]
        events: usize,
        #[arg(long, default_value = "4")]
        size_kib: usize,
    },
    /// Medians over the runs: prints the table and writes the JSON.
    Report {
        /// The JSON lines the scenarios appended.
        #[arg(long)]
        results: PathBuf,
        /// Where the JSON goes.
        #[arg(long)]
        json: PathBuf,
        /// `NAME=VALUE`: how the benchmark was run, copied into the JSON.
        #[arg(long = "meta")]
        meta: Vec<String>,
    },
}

/// What every scenario needs: where things are, which servers, which run.
#[derive(Args)]
pub struct Common {
    /// The daemon under test.
    #[arg(long)]
    binary: PathBuf,
    /// A scratch directory on tmpfs (`/dev/shm`); each scenario works in a
    /// subdirectory of its own and removes it.
    #[arg(long)]
    work: PathBuf,
    /// The JSON lines file this scenario appends its figures to.
    #[arg(long)]
    results: PathBuf,
    /// Which run this is (1, 2, ...), recorded with the figures.
    #[arg(long)]
    run: u32,
    #[arg(long, default_value = "100")]
    settle_ms: u64,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    rabbitmq_url: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    /// Keep the scenario's directory (the daemons' logs) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// `NAME=VALUE` for every daemon this scenario starts (`WORKERS=4`, a batching switch, ...).
    #[arg(long = "env")]
    env: Vec<String>,
}

impl Common {
    /// `--env` as pairs; fails naming the bad value.
    fn daemon_env(&self) -> Result<Vec<(String, String)>, String> {
        self.env
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .filter(|(name, _)| !name.is_empty())
                    .map(|(name, value)| (name.to_owned(), value.to_owned()))
                    .ok_or_else(|| format!("--env {pair:?}: expected NAME=VALUE"))
            })
            .collect()
    }

    /// A fresh directory for one scenario, on the work directory's filesystem
    /// (so a `rename` from staging into a tree is a rename, not a copy), by
    /// its canonical path (the daemon reports paths below the canonical root).
    fn scenario_directory(&self, name: &str) -> Result<PathBuf, String> {
        let directory = self.work.join(format!("{name}-{}", self.run));
        if directory.exists() {
            std::fs::remove_dir_all(&directory)
                .map_err(|error| format!("remove {}: {error}", directory.display()))?;
        }
        std::fs::create_dir_all(&directory)
            .map_err(|error| format!("create {}: {error}", directory.display()))?;
        directory
            .canonicalize()
            .map_err(|error| format!("canonicalize {}: {error}", directory.display()))
    }

    /// Removes a scenario's directory once it is done, unless `--keep`. Best
    /// effort: the script removes the whole work directory at the end anyway.
    fn finish(&self, directory: &std::path::Path) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(directory);
        }
    }

    /// Appends this run's figures as one JSON line.
    fn append(&self, scenario: &str, figures: &Figures) -> Result<(), String> {
        use std::io::Write;
        let line = serde_json::json!({ "run": self.run, "scenario": scenario, "figures": figures });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.results)
            .map_err(|error| format!("open {}: {error}", self.results.display()))?;
        writeln!(file, "{line}").map_err(|error| format!("write {}: {error}", self.results.display()))
    }
}

/// The one bound on every wait: a fixed allowance plus so much per file, so
/// a slow daemon makes a scenario fail with a message naming what it was
/// waiting for, never hang. Generous on purpose: the point is to bound, not
/// to judge (the figures do that).
#[derive(Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// 120 s plus 10 ms per file: the daemon may be 100 files/s slow before this cuts a run short.
    pub fn for_files(files: usize) -> Deadline {
        let per_file = Duration::from_millis(10).saturating_mul(u32::try_from(files).unwrap_or(u32::MAX));
        Deadline(Instant::now() + Duration::from_secs(120) + per_file)
    }

    pub fn after(duration: Duration) -> Deadline {
        Deadline(Instant::now() + duration)
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    pub fn passed(self) -> bool {
        Instant::now() >= self.0
    }
}

/// A short random tag naming one scenario's schema, exchange, queue and instances.
pub fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Prints a progress line on stderr (stdout is the report's).
pub fn progress(message: &str) {
    eprintln!("bench: {message}");
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let result = match &arguments.command {
        Step::BrokerCeiling {
            common,
            messages,
            window,
        } => ceilings::broker(common, *messages, *window)
            .and_then(|figures| common.append("broker-ceiling", &figures)),
        Step::PostgresCeiling { common, files, batch } => ceilings::postgres(common, *files, *batch)
            .and_then(|figures| common.append("postgres-ceiling", &figures)),
        Step::Hashing { common, mib } => {
            ceilings::hashing(common, *mib).and_then(|figures| common.append("hashing", &figures))
        }
        Step::Load {
            common,
            label,
            instances,
            files,
            size_kib,
            rate,
        } => {
            let load = load::Load {
                label: label.clone(),
                instances: *instances,
                files: *files,
                size: size_kib * 1024,
                rate: *rate,
            };
            load::run(common, &load).and_then(|figures| common.append(label, &figures))
        }
        Step::Import {
            common,
            label,
            files,
            size_kib,
            catch_up,
        } => import::run(common, label, *files, size_kib * 1024, *catch_up)
            .and_then(|figures| common.append(label, &figures)),
        Step::Burst {
            common,
            files,
            size_kib,
        } => stdout::burst(common, *files, size_kib * 1024)
            .and_then(|figures| common.append("burst", &figures)),
        Step::Memory {
            common,
            directories,
            files,
        } => {
            stdout::memory(common, *directories, *files).and_then(|figures| common.append("memory", &figures))
        }
        Step::Steady {
            common,
            files,
            events,
            size_kib,
        } => steady::run(common, *files, *events, size_kib * 1024)
            .and_then(|figures| common.append("steady", &figures)),
        Step::Report { results, json, meta } => report::run(results, json, meta),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error}");
            ExitCode::FAILURE
        }
    }
}
