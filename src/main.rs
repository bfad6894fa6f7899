//! The binary: parse flags, set up logging, run the pipeline until a signal.

use std::process::ExitCode;

use clap::Parser;
use file_watcher::config::{Args, Config};
use file_watcher::observe::server::Listener;
use file_watcher::{logging, ops, pipeline, shutdown};

fn main() -> ExitCode {
    let mut args = Args::parse();
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
