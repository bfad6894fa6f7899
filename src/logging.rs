//! Logging, set up once: every line names the instance and the watched directory.
//!
//! Text lines read `<ts> <LEVEL> [<instance>:<dir>] <target>: <message>`; JSON
//! lines are one object with `ts`, `level`, `instance_id`, `watched_directory`,
//! `target` and `message`, so aggregators can split instances. Logs go to
//! stderr: stdout carries messages in stdout mode.

use std::time::SystemTime;

use crate::config::LogFormat;

pub fn init(
    level: log::LevelFilter,
    format: LogFormat,
    instance_id: &str,
    watched_directory: &str,
) -> Result<(), log::SetLoggerError> {
    let prefix = format!("[{instance_id}:{watched_directory}]");
    let instance_id = instance_id.to_owned();
    let watched_directory = watched_directory.to_owned();
    let dispatch = fern::Dispatch::new()
        .level(level)
        // lapin's I/O internals are chatty at debug; keep them at warn unless asked for trace.
        .level_for("polling", level.min(log::LevelFilter::Info))
        .level_for("async_io", level.min(log::LevelFilter::Info))
        .level_for("async_global_executor", level.min(log::LevelFilter::Info))
        .level_for("notify", level.min(log::LevelFilter::Info))
        .level_for("mio", level.min(log::LevelFilter::Info))
        // Spans arrive as log records through tracing's `log` feature; they carry no news.
        .level_for("tracing::span", level.min(log::LevelFilter::Warn))
        // lapin reports every failed connect and every lost connection itself,
        // at ERROR, three lines at a time; `broker` and `publish` report the
        // same facts once per outage, with the connection name. lapin's own
        // lines appear from LOG_LEVEL=debug on.
        .level_for(
            "lapin",
            if level >= log::LevelFilter::Debug {
                level
            } else {
                log::LevelFilter::Off
            },
        )
        .level_for("postgres", level.min(log::LevelFilter::Info))
        .level_for("tokio_postgres", level.min(log::LevelFilter::Info));
    let dispatch = match format {
        LogFormat::Text => dispatch.format(move |out, message, record| {
            out.finish(format_args!(
                "{} {} {} {}: {}",
                humantime::format_rfc3339_millis(SystemTime::now()),
                record.level(),
                prefix,
                record.target(),
                message
            ))
        }),
        LogFormat::Json => dispatch.format(move |out, message, record| {
            let line = serde_json::json!({
                "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "level": record.level().as_str(),
                "instance_id": instance_id,
                "watched_directory": watched_directory,
                "target": record.target(),
                "message": message.to_string(),
            });
            out.finish(format_args!("{line}"))
        }),
    };
    dispatch.chain(std::io::stderr()).apply()
}
