//! The binary: parse flags, set up logging, run the pipeline until a signal.

use std::process::ExitCode;

use clap::Parser;
use file_watcher::config::{Args, Config};
use file_watcher::{logging, pipeline, shutdown};

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
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
    let result = pipeline::run(config, stop_receiver);
    signals.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{}", logging::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
