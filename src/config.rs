//! Configuration: environment variables first, flags mirror them.
//!
//! Parsing happens in two steps (as in ripgrep): clap collects raw strings,
//! then [`Config::from_args`] validates them into types that cannot be wrong,
//! failing with one line that names the variable, the flag and the value.
//! Secrets (passwords in URLs) are never echoed back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::filter::Filter;
use crate::redact::redact_url;

pub const DEFAULT_EXTENSIONS: &str = "mp3,flac,wav,wave,m4a,mp4,m4b,m4p,m4v,m4r,ogg,oga,opus,aac,wma";

/// Temporary and NAS system names: partial downloads (`*.part`, `*.tmp`,
/// `*.crdownload`, `*.!qb`), office lock files (`.~*`), hidden files including
/// rsync temporaries (`.*`, e.g. `.x.flac.AbC123`), Synology thumbnails
/// (`@eaDir`), NAS recycle bins (`#recycle`), desktop trash (`.Trash-*`) and
/// macOS metadata (`.DS_Store`). Matched case-insensitively against every
/// path component below the watched directory.
pub const DEFAULT_EXCLUDE: &str = "*.part,*.tmp,*.crdownload,*.!qb,.~*,.*,@eaDir,#recycle,.Trash-*,.DS_Store";

/// Raw command line and environment, checked only by clap's syntax.
#[derive(Debug, Parser)]
#[command(name = "file-watcher", version, about, long_about = None, allow_negative_numbers = true)]
pub struct Args {
    /// Directory tree to watch, recursively.
    #[arg(env = "DATA_DIR", default_value = "/data/music", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Identity of this process in logs, messages, the broker connection name
    /// and registry rows [default: first 8 hex digits of a new UUIDv4].
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Comma-separated extensions to announce (case-insensitive); `*` for all files.
    #[arg(long, env = "EXTENSIONS", default_value = DEFAULT_EXTENSIONS)]
    pub extensions: String,
    /// Comma-separated glob patterns matched against each path component;
    /// matching files and directories are never announced.
    #[arg(long, env = "EXCLUDE", default_value = DEFAULT_EXCLUDE)]
    pub exclude: String,
    /// Quiet time, after the writer closed the file, before it counts as finished.
    #[arg(long, env = "SETTLE_MS", default_value = "500")]
    pub settle_ms: String,
    /// Hashing and recording threads [default: CPU count, at least 2].
    #[arg(long, env = "WORKERS")]
    pub workers: Option<String>,
    /// Poll the tree every N ms instead of using inotify (NFS, SMB, FUSE mounts).
    #[arg(long, env = "POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<String>,
    /// error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `text` (with an `[instance:dir]` prefix) or `json` (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Without a database: announce files present at start once each as `created`.
    #[arg(long, env = "SCAN_EXISTING", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub scan_existing: Option<String>,
    /// RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2f. Unset: see RABBITMQ_HOST.
    #[arg(long, env = "RABBITMQ_URL", hide_env_values = true)]
    pub rabbitmq_url: Option<String>,
    /// Legacy broker settings, used when RABBITMQ_URL is unset; RABBITMQ_HOST
    /// being set is what turns the broker on.
    #[arg(long, env = "RABBITMQ_HOST")]
    pub rabbitmq_host: Option<String>,
    #[arg(long, env = "RABBITMQ_PORT", default_value = "5672")]
    pub rabbitmq_port: String,
    #[arg(long, env = "RABBITMQ_USER", default_value = "guest")]
    pub rabbitmq_user: String,
    #[arg(
        long,
        env = "RABBITMQ_PASS",
        default_value = "guest",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub rabbitmq_pass: String,
    /// Topic exchange messages are published to.
    #[arg(long, env = "EXCHANGE", default_value = "file_events")]
    pub exchange: String,
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db. Unset: no registry database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A file that exists only while the share is mounted (relative paths are
    /// below DIR); while it is missing no deletion is published.
    #[arg(long, env = "SENTINEL_FILE")]
    pub sentinel_file: Option<PathBuf>,
    /// Schema holding the registry tables [default: public].
    #[arg(long, env = "DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Connections in this instance's pool; instances × pool size must stay
    /// below the server's max_connections.
    #[arg(long, env = "DB_POOL_SIZE", default_value = "4")]
    pub db_pool_size: String,
}

/// Validated configuration. There is deliberately no `Default`: every
/// component gets the values the operator chose, passed explicitly.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute path of the watched tree, without a trailing slash.
    pub data_dir: PathBuf,
    pub instance_id: String,
    pub filter: Filter,
    pub settle: Duration,
    pub workers: usize,
    pub watch_mode: WatchMode,
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    pub scan_existing: bool,
    pub broker: Option<BrokerConfig>,
    pub database: Option<DatabaseConfig>,
    /// Absolute path of the sentinel file, if one is configured.
    pub sentinel: Option<PathBuf>,
    /// Test hook, from `FILE_WATCHER_TEST_STALL_FILE` (no flag, not for
    /// operators): while this file exists notify's thread stalls before each
    /// event, so tests and `scripts/chaos.sh` can overflow the kernel queue.
    pub test_stall_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    Inotify,
    Poll(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// May hold a password: log only `redacted_url`.
    pub url: String,
    pub exchange: String,
    pub dead_letter_exchange: String,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// May hold a password: log only a redacted form.
    pub url: String,
    pub schema: Option<String>,
    pub pool_size: u32,
}

/// A value that failed validation, named by its variable and flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for {variable} (--{flag}): {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

fn invalid(
    variable: &'static str,
    flag: &'static str,
    value: &str,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        variable,
        flag,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_millis(
    variable: &'static str,
    flag: &'static str,
    value: &str,
    minimum: u64,
) -> Result<Duration, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(millis) if millis >= minimum => Ok(Duration::from_millis(millis)),
        Ok(_) => Err(invalid(
            variable,
            flag,
            value,
            format!("must be at least {minimum}"),
        )),
        Err(_) => Err(invalid(
            variable,
            flag,
            value,
            "expected a whole number of milliseconds",
        )),
    }
}

impl Config {
    /// Validates raw arguments. Does not touch the filesystem: whether the
    /// directory exists is checked at start-up, where the error can say more.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let data_dir = normalize_dir(&args.data_dir).ok_or_else(|| {
            invalid(
                "DATA_DIR",
                "DIR",
                &args.data_dir.to_string_lossy(),
                "not a usable path",
            )
        })?;

        let instance_id = match args.instance_id {
            Some(id) => {
                let valid = !id.is_empty()
                    && id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !valid {
                    return Err(invalid(
                        "INSTANCE_ID",
                        "instance-id",
                        &id,
                        "use 1 to 64 characters from A-Z a-z 0-9 - _ .",
                    ));
                }
                id
            }
            None => uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        };

        let filter = Filter::new(&args.extensions, &args.exclude).map_err(|error| match error {
            crate::filter::FilterError::Extensions(reason) => {
                invalid("EXTENSIONS", "extensions", &args.extensions, reason)
            }
            crate::filter::FilterError::Exclude(reason) => {
                invalid("EXCLUDE", "exclude", &args.exclude, reason)
            }
        })?;

        let settle = parse_millis("SETTLE_MS", "settle-ms", &args.settle_ms, 0)?;

        let workers = match &args.workers {
            None => std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            Some(value) => match value.trim().parse::<usize>() {
                Ok(n) if (1..=256).contains(&n) => n,
                _ => {
                    return Err(invalid(
                        "WORKERS",
                        "workers",
                        value,
                        "expected a whole number from 1 to 256",
                    ))
                }
            },
        };

        let watch_mode = match &args.poll_interval_ms {
            None => WatchMode::Inotify,
            Some(value) => WatchMode::Poll(parse_millis("POLL_INTERVAL_MS", "poll-interval-ms", value, 10)?),
        };

        let log_level = args.log_level.trim().parse::<log::LevelFilter>().map_err(|_| {
            invalid(
                "LOG_LEVEL",
                "log-level",
                &args.log_level,
                "expected error, warn, info, debug or trace",
            )
        })?;

        let log_format = match args.log_format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                return Err(invalid(
                    "LOG_FORMAT",
                    "log-format",
                    &args.log_format,
                    "expected text or json",
                ))
            }
        };

        if args.exchange.trim().is_empty() {
            return Err(invalid(
                "EXCHANGE",
                "exchange",
                &args.exchange,
                "must not be empty",
            ));
        }
        let broker_url = match (args.rabbitmq_url, args.rabbitmq_host) {
            (Some(url), _) if !url.trim().is_empty() => {
                if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                    return Err(invalid(
                        "RABBITMQ_URL",
                        "rabbitmq-url",
                        &redact_url(&url),
                        "expected amqp:// or amqps://",
                    ));
                }
                Some(url)
            }
            (_, Some(host)) if !host.trim().is_empty() => {
                let port = args.rabbitmq_port.trim().parse::<u16>().map_err(|_| {
                    invalid(
                        "RABBITMQ_PORT",
                        "rabbitmq-port",
                        &args.rabbitmq_port,
                        "expected a port number",
                    )
                })?;
                Some(format!(
                    "amqp://{}:{}@{}:{}/%2f",
                    percent_encode(&args.rabbitmq_user),
                    percent_encode(&args.rabbitmq_pass),
                    host.trim(),
                    port
                ))
            }
            _ => None,
        };
        let broker = broker_url.map(|url| BrokerConfig {
            url,
            dead_letter_exchange: format!("{}.dlx", args.exchange),
            exchange: args.exchange.clone(),
        });

        let pool_size = match args.db_pool_size.trim().parse::<u32>() {
            Ok(n) if (1..=64).contains(&n) => n,
            _ => {
                return Err(invalid(
                    "DB_POOL_SIZE",
                    "db-pool-size",
                    &args.db_pool_size,
                    "expected a whole number from 1 to 64",
                ))
            }
        };
        if let Some(schema) = &args.db_schema {
            let valid = !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !schema.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(invalid(
                    "DB_SCHEMA",
                    "db-schema",
                    schema,
                    "use lower-case letters, digits and _, not starting with a digit",
                ));
            }
        }
        let database = match args.database_url {
            Some(url) if !url.trim().is_empty() => Some(DatabaseConfig {
                url,
                schema: args.db_schema,
                pool_size,
            }),
            _ => None,
        };

        let scan_existing = match args
            .scan_existing
            .as_deref()
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => false,
            Some(value) => match value.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "" | "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(invalid(
                        "SCAN_EXISTING",
                        "scan-existing",
                        args.scan_existing.as_deref().unwrap_or_default(),
                        "expected true or false",
                    ))
                }
            },
        };
        let sentinel = match args.sentinel_file {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(normalize_dir(&data_dir.join(path.clone())).ok_or_else(|| {
                invalid(
                    "SENTINEL_FILE",
                    "sentinel-file",
                    &path.to_string_lossy(),
                    "not a usable path",
                )
            })?),
            None => None,
        };

        Ok(Config {
            sentinel,
            data_dir,
            instance_id,
            filter,
            settle,
            workers,
            watch_mode,
            log_level,
            log_format,
            scan_existing,
            broker,
            database,
            test_stall_file: std::env::var_os("FILE_WATCHER_TEST_STALL_FILE").map(PathBuf::from),
        })
    }

    /// The watched directory as it appears in messages and logs.
    pub fn watched_directory(&self) -> String {
        self.data_dir.to_string_lossy().into_owned()
    }
}

/// Absolute, without `.`/`..` components or a trailing slash; symlinks are
/// kept as given (an operator's `/data/music` stays `/data/music` in messages).
fn normalize_dir(path: &Path) -> Option<PathBuf> {
    if path.as_os_str().is_empty() {
        return None;
    }
    let absolute = std::path::absolute(path).ok()?;
    let mut normalized = PathBuf::new();
    for component in absolute.components() {
        match component {
            std::path::Component::ParentDir => {
                normalized.pop();
            }
            std::path::Component::CurDir => {}
            other => normalized.push(other),
        }
    }
    normalized.to_str()?;
    Some(normalized)
}

/// Percent-encodes a URL userinfo part (legacy RABBITMQ_USER/RABBITMQ_PASS may hold any character).
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["file-watcher"];
        argv.extend_from_slice(arguments);
        Config::from_args(Args::try_parse_from(argv).expect("clap accepts raw strings"))
    }

    #[test]
    fn errors_name_variable_flag_and_value() {
        let error = parse(&["/tmp", "--settle-ms", "abc"]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("SETTLE_MS") && text.contains("--settle-ms") && text.contains("\"abc\""),
            "{text}"
        );
        assert!(!text.contains('\n'));
        for (flag, value, variable) in [
            ("--workers", "0", "WORKERS"),
            ("--poll-interval-ms", "-5", "POLL_INTERVAL_MS"),
            ("--log-format", "xml", "LOG_FORMAT"),
            ("--log-level", "loud", "LOG_LEVEL"),
            ("--instance-id", "a b", "INSTANCE_ID"),
            ("--db-pool-size", "0", "DB_POOL_SIZE"),
            ("--db-schema", "x;drop", "DB_SCHEMA"),
            ("--extensions", "", "EXTENSIONS"),
        ] {
            let error = parse(&["/tmp", flag, value]).unwrap_err();
            assert_eq!(error.variable, variable);
        }
    }

    #[test]
    fn defaults_are_documented_values() {
        let config = parse(&["/tmp/music/"]).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/music"));
        assert_eq!(config.settle, Duration::from_millis(500));
        assert!(config.workers >= 2);
        assert_eq!(config.watch_mode, WatchMode::Inotify);
        assert_eq!(config.instance_id.len(), 8);
        assert!(config.broker.is_none() && config.database.is_none());
    }

    #[test]
    fn legacy_rabbitmq_variables_build_a_url() {
        let config = parse(&[
            "/tmp",
            "--rabbitmq-host",
            "broker",
            "--rabbitmq-user",
            "u",
            "--rabbitmq-pass",
            "p@ss",
        ])
        .unwrap();
        let broker = config.broker.unwrap();
        assert_eq!(broker.url, "amqp://u:p%40ss@broker:5672/%2f");
        assert_eq!(broker.exchange, "file_events");
        assert_eq!(broker.dead_letter_exchange, "file_events.dlx");
        let config = parse(&[
            "/tmp",
            "--rabbitmq-url",
            "amqp://a:b@h/%2f",
            "--rabbitmq-host",
            "ignored",
        ])
        .unwrap();
        assert_eq!(config.broker.unwrap().url, "amqp://a:b@h/%2f");
    }

    #[test]
    fn relative_and_dotted_paths_become_absolute() {
        let config = parse(&["/tmp/a/../b/./c"]).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/b/c"));
    }
}
