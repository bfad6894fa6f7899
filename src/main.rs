//! The binary: parse flags, set up logging, run the pipeline until a signal.

/// The static musl build allocates through jemalloc: musl's own allocator
/// takes one global lock, and under a burst of events a third of the
/// daemon's time went to waiting for it (see BENCHMARKS.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: one arena and no per-thread
/// caches, which keep an idle daemon under 10 MiB (each arena and cache
/// costs memory, with a dozen threads) and still leave no lock to wait on
/// that shows in a burst.
#[cfg(target_env = "musl")]
#[export_name = "_rjem_malloc_conf"]
static ALLOCATOR_SETTINGS: &[u8; 23] = b"narenas:1,tcache:false\0";

use std::process::ExitCode;

use file_watcher::config::{Args, Config};
use file_watcher::observe::server::Listener;
use file_watcher::{logging, ops, pipeline, shutdown};

fn main() -> ExitCode {
    let mut args = Args::from_environment_and_command_line();
    let command = args.command.take();
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("file-watcher: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = command {
        return ops::run(command, &config);
    }
    // Bound before anything starts: a bad address or a port in use is a
    // configuration error, like a bad value.
    let metrics = match config.metrics_addr.map(Listener::bind).transpose() {
        Ok(metrics) => metrics,
        Err(error) => {
            eprintln!("file-watcher: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = logging::init(
        config.log_level,
        config.log_format,
        &config.instance_id,
        &config.watched_directory(),
    ) {
        eprintln!("file-watcher: cannot set up logging: {error}");
        return ExitCode::FAILURE;
    }
    let (stop_sender, stop_receiver) = crossbeam_channel::bounded(1);
    let signals = match shutdown::SignalThread::spawn(stop_sender) {
        Ok(signals) => signals,
        Err(error) => {
            log::error!("cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = pipeline::run_observed(config, stop_receiver, metrics);
    signals.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{}", logging::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
