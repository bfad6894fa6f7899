//! Logging, set up once: every line names the instance and the watched directory.
//!
//! Text lines read `<ts> <LEVEL> [<instance>:<dir>] <target>: <message>`; JSON
//! lines are one object with `ts`, `level`, `instance_id`, `watched_directory`,
//! `target` and `message`, so aggregators can split instances. Logs go to
//! stderr: stdout carries messages in stdout mode.
//!
//! One entry is one line: text lines escape control characters
//! ([`EscapeControls`]), so a file name holding a newline or a terminal
//! escape cannot start a forged entry or recolour the terminal; JSON lines
//! are escaped by `serde_json`.
//!
//! Errors are logged as one line with their causes ([`error_chain`]), by
//! `main` for the error that stops the process and by the sinks for the
//! reason a delivery failed.

use std::fmt;
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
        // lapin's I/O crates (polling, async_io, async_global_executor), notify
        // and mio are chatty at debug: they stay at info at most, even when
        // LOG_LEVEL asks for debug or trace.
        .level_for("polling", level.min(log::LevelFilter::Info))
        .level_for("async_io", level.min(log::LevelFilter::Info))
        .level_for("async_global_executor", level.min(log::LevelFilter::Info))
        .level_for("notify", level.min(log::LevelFilter::Info))
        // The poller logs each walk error itself, at every poll, and hands it
        // to us as well: the settle stage reports it (once, for a path too long).
        .level_for("notify::poll", level.min(log::LevelFilter::Error))
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
                "{}",
                Escaped(&format_args!(
                    "{} {} {} {}: {}",
                    humantime::format_rfc3339_millis(SystemTime::now()),
                    record.level(),
                    prefix,
                    record.target(),
                    message
                ))
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

/// Shows what it wraps with its control characters escaped; see
/// [`EscapeControls`].
struct Escaped<'a>(&'a fmt::Arguments<'a>);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::write(&mut EscapeControls(formatter), *self.0)
    }
}

/// Writes through to `W`, with `\n`, `\r` and `\t` as those two characters,
/// other C0 controls and DEL as `\xNN` (so ESC is `\x1b`), and C1 controls as
/// `\u{NN}`. Backslashes are left alone: the aim is one entry per line and
/// no terminal escapes, and a path keeps the spelling it has in messages.
struct EscapeControls<W>(W);

impl<W: fmt::Write> fmt::Write for EscapeControls<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let control = rest[at..].chars().next().expect("found above");
            match control {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\0'..='\x7f' => write!(self.0, "\\x{:02x}", u32::from(control))?,
                _ => write!(self.0, "\\u{{{:x}}}", u32::from(control))?,
            }
            rest = &rest[at + control.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// An error and its causes on one line ("cannot connect …: Connection refused").
/// A cause whose text the error already quotes is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot connect to RabbitMQ at amqp://host")]
        Connect(#[source] std::io::Error),
        #[error("registry: {0}")]
        Quoting(#[source] std::io::Error),
    }

    fn escaped(text: &str) -> String {
        Escaped(&format_args!("{text}")).to_string()
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\nFAKE ERROR line.flac"), "a\\nFAKE ERROR line.flac");
        assert_eq!(escaped("\r\t\u{1b}[31m\u{0}\u{7f}"), "\\r\\t\\x1b[31m\\x00\\x7f");
        assert_eq!(escaped("c1 \u{85}\u{9b}"), "c1 \\u{85}\\u{9b}");
        let ordinary = "/m/🎵 café \"q\" back\\slash \\x41.flac";
        assert_eq!(escaped(ordinary), ordinary);
    }

    #[test]
    fn error_chain_names_each_cause_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(
            error_chain(&Outer::Connect(refused())),
            "cannot connect to RabbitMQ at amqp://host: Connection refused"
        );
        assert_eq!(
            error_chain(&Outer::Quoting(refused())),
            "registry: Connection refused"
        );
    }
}
