//! Configuration: environment variables first, flags mirror them.
//!
//! Parsing happens in two steps (as in ripgrep): clap collects raw strings,
//! then [`Config::from_args`] validates them into types that cannot be wrong,
//! failing with one line that names the variable, the flag and the value.
//! Secrets (passwords in URLs) are never echoed back: from the raw arguments
//! on, URLs are [`SecretUrl`]s and the legacy password a [`Secret`], so even
//! `{:?}` of [`Args`] or [`Config`] shows them redacted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::filter::{Filter, FilterError};
use crate::redact::{Secret, SecretUrl};
use crate::registry::postgres::DatabaseTls;
use crate::tls::{ClientTls, Identity, Trust, Verify};

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
    #[arg(long, env = "INSTANCE_ID", global = true)]
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
    /// Changes a worker records in one database transaction (1: one each).
    #[arg(long, env = "BATCH_SIZE", default_value = "256")]
    pub batch_size: String,
    /// Files larger than this many bytes are hashed in a lane of their own,
    /// one at a time, so they never hold up the others [default: 1 GiB].
    #[arg(long, env = "HUGE_FILE_BYTES", default_value = "1073741824")]
    pub huge_file_bytes: String,
    /// Poll the tree every N ms instead of using inotify (NFS, SMB, FUSE mounts).
    #[arg(long, env = "POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<String>,
    /// Walk the whole tree this often and compare it with the registry
    /// (`30s`, `5m`, `1h`; `0` turns it off): the safety net for lost events.
    #[arg(long, env = "RESCAN_INTERVAL", default_value = "1h")]
    pub rescan_interval: String,
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
    #[arg(long, env = "RABBITMQ_URL", hide_env_values = true, global = true)]
    pub rabbitmq_url: Option<SecretUrl>,
    /// Legacy broker settings, used when RABBITMQ_URL is unset; RABBITMQ_HOST
    /// being set is what turns the broker on.
    #[arg(long, env = "RABBITMQ_HOST")]
    pub rabbitmq_host: Option<String>,
    #[arg(long, env = "RABBITMQ_PORT", default_value = "5672")]
    pub rabbitmq_port: String,
    #[arg(long, env = "RABBITMQ_USER", default_value = "guest")]
    pub rabbitmq_user: String,
    /// [default: guest]
    #[arg(long, env = "RABBITMQ_PASS", hide_env_values = true)]
    pub rabbitmq_pass: Option<Secret>,
    /// A file holding RABBITMQ_URL (a Docker or Kubernetes secret); one
    /// trailing newline is ignored. Setting both is an error.
    #[arg(long, env = "RABBITMQ_URL_FILE", value_name = "FILE")]
    pub rabbitmq_url_file: Option<PathBuf>,
    /// A file holding RABBITMQ_PASS; one trailing newline is ignored.
    #[arg(long, env = "RABBITMQ_PASS_FILE", value_name = "FILE")]
    pub rabbitmq_pass_file: Option<PathBuf>,
    /// amqps:// only: PEM file of the CA that signed the broker's certificate
    /// [default: the roots built into the binary]. The host name is always verified.
    #[arg(long, env = "RABBITMQ_CA_FILE", value_name = "FILE")]
    pub rabbitmq_ca_file: Option<PathBuf>,
    /// amqps:// only: PEM client certificate (chain) for mutual TLS; needs RABBITMQ_KEY_FILE.
    #[arg(long, env = "RABBITMQ_CERT_FILE", value_name = "FILE")]
    pub rabbitmq_cert_file: Option<PathBuf>,
    /// amqps:// only: PEM private key of RABBITMQ_CERT_FILE.
    #[arg(long, env = "RABBITMQ_KEY_FILE", value_name = "FILE")]
    pub rabbitmq_key_file: Option<PathBuf>,
    /// Topic exchange messages are published to.
    #[arg(long, env = "EXCHANGE", default_value = "file_events", global = true)]
    pub exchange: String,
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db. Unset: no registry database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<SecretUrl>,
    /// A file holding DATABASE_URL; one trailing newline is ignored.
    #[arg(long, env = "DATABASE_URL_FILE", value_name = "FILE")]
    pub database_url_file: Option<PathBuf>,
    /// A file that exists only while the share is mounted (relative paths are
    /// below DIR); while it is missing no deletion is published.
    #[arg(long, env = "SENTINEL_FILE")]
    pub sentinel_file: Option<PathBuf>,
    /// Schema holding the registry tables [default: public].
    #[arg(long, env = "DB_SCHEMA", global = true)]
    pub db_schema: Option<String>,
    /// Connections in this instance's pool; instances × pool size must stay
    /// below the server's max_connections.
    #[arg(long, env = "DB_POOL_SIZE", default_value = "4")]
    pub db_pool_size: String,
    /// Serve /metrics, /healthz and /readyz at this IP address and port
    /// (e.g. 127.0.0.1:9464). Unset: off.
    #[arg(long, env = "METRICS_ADDR", global = true)]
    pub metrics_addr: Option<String>,
    /// An operator command instead of the daemon (the default).
    #[command(subcommand)]
    pub command: Option<crate::ops::Command>,
}

impl Args {
    /// The command line and the environment, as [`Parser::parse`] reads
    /// them, except that a variable set to the empty string counts as unset:
    /// compose (`KEY: ${KEY:-}`), systemd (`Environment=KEY=`) and `.env`
    /// files write empty values for settings meant to keep their default.
    /// Except `EXCLUDE`, whose empty value has always meant "exclude
    /// nothing". An empty flag (`--settle-ms ''`) is still checked, and
    /// refused where it is not a valid value. Only the top level's arguments
    /// are looked at (global ones included): no subcommand has variables of
    /// its own.
    pub fn from_environment_and_command_line() -> Args {
        const EMPTY_IS_A_VALUE: [&str; 1] = ["EXCLUDE"];
        let mut command = Args::command();
        let empty: Vec<clap::Id> = command
            .get_arguments()
            .filter(|arg| {
                arg.get_env().is_some_and(|name| {
                    !EMPTY_IS_A_VALUE.iter().any(|kept| name == *kept)
                        && std::env::var_os(name).is_some_and(|value| value.is_empty())
                })
            })
            .map(|arg| arg.get_id().clone())
            .collect();
        for id in empty {
            command = command.mut_arg(id, |arg| arg.env(None));
        }
        let mut matches = command.get_matches_mut();
        Args::from_arg_matches_mut(&mut matches).unwrap_or_else(|error| error.format(&mut command).exit())
    }
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
    /// Most changes a worker records in one transaction (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Files over this size are hashed one at a time in the huge-file lane.
    pub huge_file_bytes: u64,
    pub watch_mode: WatchMode,
    /// How often the whole tree is walked and compared with the registry;
    /// `None` when RESCAN_INTERVAL is 0.
    pub rescan_interval: Option<Duration>,
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
    /// Test hook, from `FILE_WATCHER_TEST_OPEN_GATE` (no flag, not for
    /// operators): while this file exists a worker that has looked at a file
    /// waits before opening it, so tests can swap the file in between.
    pub test_open_gate: Option<PathBuf>,
    /// Where /metrics, /healthz and /readyz are served; `None`: not at all.
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    /// May hold a password; prints redacted.
    pub url: SecretUrl,
    pub exchange: String,
    pub dead_letter_exchange: String,
    /// For amqps://: the trust (RABBITMQ_CA_FILE or the bundled roots) and
    /// the client certificate, already read and checked. `None` for amqp://.
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// May hold a password; prints redacted.
    pub url: SecretUrl,
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

impl Config {
    /// Validates raw arguments, one setting per step. The steps run in this
    /// order, so with several bad values the first step's error is the one
    /// reported. Reads only the files that hold secrets (`*_FILE`) and
    /// certificates, so that a bad one stops the start naming its variable;
    /// whether the watched directory exists is checked at start-up, where
    /// the error can say more.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let args = read_secret_files(args)?;
        let data_dir = parse_data_dir(&args.data_dir)?;
        let instance_id = parse_instance_id(args.instance_id.as_deref())?;
        let filter = parse_filter(&args.extensions, &args.exclude)?;
        let settle = parse_millis("SETTLE_MS", "settle-ms", &args.settle_ms, 0)?;
        let workers = parse_workers(args.workers.as_deref())?;
        let batch_size = parse_batch_size(&args.batch_size)?;
        let huge_file_bytes = parse_huge_file_bytes(&args.huge_file_bytes)?;
        let watch_mode = parse_watch_mode(args.poll_interval_ms.as_deref())?;
        let rescan_interval = parse_rescan_interval(&args.rescan_interval)?;
        let log_level = parse_log_level(&args.log_level)?;
        let log_format = parse_log_format(&args.log_format)?;
        let broker = parse_broker(&args)?;
        let database = parse_database(&args)?;
        let scan_existing = parse_scan_existing(args.scan_existing.as_deref())?;
        let sentinel = parse_sentinel(args.sentinel_file.as_deref(), &data_dir)?;
        let metrics_addr = parse_metrics_addr(args.metrics_addr.as_deref())?;
        // The settings read outside clap: test hooks with no flag.
        let test_stall_file = std::env::var_os("FILE_WATCHER_TEST_STALL_FILE").map(PathBuf::from);
        let test_open_gate = std::env::var_os("FILE_WATCHER_TEST_OPEN_GATE").map(PathBuf::from);
        Ok(Config {
            data_dir,
            instance_id,
            filter,
            settle,
            workers,
            batch_size,
            huge_file_bytes,
            watch_mode,
            rescan_interval,
            log_level,
            log_format,
            scan_existing,
            broker,
            database,
            sentinel,
            test_stall_file,
            test_open_gate,
            metrics_addr,
        })
    }

    /// The watched directory as it appears in messages and logs: as path
    /// text, like the `file_path`s below it.
    pub fn watched_directory(&self) -> String {
        crate::path_text::encode(self.data_dir.as_os_str())
    }
}

/// DATA_DIR (the positional DIR), normalized; see [`normalize_path`].
fn parse_data_dir(data_dir: &Path) -> Result<PathBuf, ConfigError> {
    normalize_path(data_dir).ok_or_else(|| {
        invalid(
            "DATA_DIR",
            "DIR",
            &data_dir.to_string_lossy(),
            "not a usable path",
        )
    })
}

/// INSTANCE_ID as given (not trimmed); unset, the first 8 hex digits of a
/// new UUIDv4.
fn parse_instance_id(id: Option<&str>) -> Result<String, ConfigError> {
    let Some(id) = id else {
        return Ok(uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
    };
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(invalid(
            "INSTANCE_ID",
            "instance-id",
            id,
            "use 1 to 64 characters from A-Z a-z 0-9 - _ .",
        ));
    }
    Ok(id.to_owned())
}

/// EXTENSIONS and EXCLUDE, compiled once; the error names whichever of the
/// two the filter refused.
fn parse_filter(extensions: &str, exclude: &str) -> Result<Filter, ConfigError> {
    Filter::new(extensions, exclude).map_err(|error| match error {
        FilterError::Extensions(reason) => invalid("EXTENSIONS", "extensions", extensions, reason),
        FilterError::Exclude(reason) => invalid("EXCLUDE", "exclude", exclude, reason),
    })
}

/// WORKERS; unset, the CPU count, at least 2.
fn parse_workers(value: Option<&str>) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Ok(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2));
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(invalid(
            "WORKERS",
            "workers",
            value,
            "expected a whole number from 1 to 256",
        )),
    }
}

/// BATCH_SIZE: from 1 (every change in a transaction of its own) to 10 000.
fn parse_batch_size(value: &str) -> Result<usize, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(invalid(
            "BATCH_SIZE",
            "batch-size",
            value,
            "expected a whole number from 1 to 10000",
        )),
    }
}

/// HUGE_FILE_BYTES: a whole number of bytes, at least 1.
fn parse_huge_file_bytes(value: &str) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(bytes) if bytes >= 1 => Ok(bytes),
        _ => Err(invalid(
            "HUGE_FILE_BYTES",
            "huge-file-bytes",
            value,
            "expected a whole number of bytes, at least 1",
        )),
    }
}

/// POLL_INTERVAL_MS set (at least 10 ms) means polling; unset, inotify.
fn parse_watch_mode(poll_interval_ms: Option<&str>) -> Result<WatchMode, ConfigError> {
    match poll_interval_ms {
        None => Ok(WatchMode::Inotify),
        Some(value) => parse_millis("POLL_INTERVAL_MS", "poll-interval-ms", value, 10).map(WatchMode::Poll),
    }
}

/// RESCAN_INTERVAL: a duration such as `30s`, `5m` or `1h`, at least one
/// second; `0` turns the periodic rescan off.
fn parse_rescan_interval(value: &str) -> Result<Option<Duration>, ConfigError> {
    let text = value.trim();
    if text == "0" {
        return Ok(None);
    }
    match humantime::parse_duration(text) {
        Ok(interval) if interval >= Duration::from_secs(1) => Ok(Some(interval)),
        Ok(_) => Err(invalid(
            "RESCAN_INTERVAL",
            "rescan-interval",
            value,
            "must be at least 1s (or 0 to turn it off)",
        )),
        Err(_) => Err(invalid(
            "RESCAN_INTERVAL",
            "rescan-interval",
            value,
            "expected a duration such as 30s, 5m or 1h, or 0 to turn it off",
        )),
    }
}

fn parse_log_level(value: &str) -> Result<log::LevelFilter, ConfigError> {
    value.trim().parse::<log::LevelFilter>().map_err(|_| {
        invalid(
            "LOG_LEVEL",
            "log-level",
            value,
            "expected error, warn, info, debug or trace",
        )
    })
}

fn parse_log_format(value: &str) -> Result<LogFormat, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(invalid(
            "LOG_FORMAT",
            "log-format",
            value,
            "expected text or json",
        )),
    }
}

/// The broker, from RABBITMQ_URL or else from the legacy RABBITMQ_HOST
/// family; with neither (or only blank values) there is no broker. EXCHANGE
/// is checked first, even when there is no broker.
fn parse_broker(args: &Args) -> Result<Option<BrokerConfig>, ConfigError> {
    let exchange = parse_exchange(&args.exchange)?;
    let url = match (&args.rabbitmq_url, &args.rabbitmq_host) {
        (Some(url), _) if !url.is_blank() => parse_rabbitmq_url(url)?,
        (_, Some(host)) if !host.trim().is_empty() => legacy_rabbitmq_url(
            host,
            &args.rabbitmq_port,
            &args.rabbitmq_user,
            args.rabbitmq_pass.as_ref().unwrap_or(&Secret::from("guest")),
        )?,
        _ => return Ok(None),
    };
    let tls = parse_broker_tls(args, &url)?;
    Ok(Some(BrokerConfig {
        url,
        dead_letter_exchange: format!("{exchange}.dlx"),
        exchange,
        tls,
    }))
}

/// RABBITMQ_CA_FILE, RABBITMQ_CERT_FILE and RABBITMQ_KEY_FILE, read and
/// checked now. Set with an amqp:// URL they are an error: the operator
/// meant TLS and would not get it.
fn parse_broker_tls(args: &Args, url: &SecretUrl) -> Result<Option<ClientTls>, ConfigError> {
    let file_error = |variable: &'static str, flag: &'static str, path: &Path, reason: String| {
        invalid(variable, flag, &path.to_string_lossy(), reason)
    };
    if url.scheme() != Some("amqps") {
        let set = [
            ("RABBITMQ_CA_FILE", "rabbitmq-ca-file", &args.rabbitmq_ca_file),
            (
                "RABBITMQ_CERT_FILE",
                "rabbitmq-cert-file",
                &args.rabbitmq_cert_file,
            ),
            ("RABBITMQ_KEY_FILE", "rabbitmq-key-file", &args.rabbitmq_key_file),
        ];
        if let Some((variable, flag, Some(path))) = set.into_iter().find(|(_, _, path)| path.is_some()) {
            return Err(file_error(
                variable,
                flag,
                path,
                format!("TLS files need an amqps:// broker URL, not {url}"),
            ));
        }
        return Ok(None);
    }
    let trust = match &args.rabbitmq_ca_file {
        None => Trust::bundled(),
        Some(path) => Trust::from_file(path)
            .map_err(|error| file_error("RABBITMQ_CA_FILE", "rabbitmq-ca-file", path, error.to_string()))?,
    };
    let identity = match (&args.rabbitmq_cert_file, &args.rabbitmq_key_file) {
        (None, None) => None,
        (Some(certificate), Some(key)) => Some(Identity::from_files(certificate, key).map_err(|error| {
            file_error(
                "RABBITMQ_CERT_FILE",
                "rabbitmq-cert-file",
                certificate,
                error.to_string(),
            )
        })?),
        (Some(path), None) => {
            return Err(file_error(
                "RABBITMQ_CERT_FILE",
                "rabbitmq-cert-file",
                path,
                "needs RABBITMQ_KEY_FILE too".to_owned(),
            ))
        }
        (None, Some(path)) => {
            return Err(file_error(
                "RABBITMQ_KEY_FILE",
                "rabbitmq-key-file",
                path,
                "needs RABBITMQ_CERT_FILE too".to_owned(),
            ))
        }
    };
    ClientTls::new(&trust, Verify::Full, identity.as_ref())
        .map(Some)
        .map_err(|error| {
            let path = args.rabbitmq_cert_file.as_deref().unwrap_or(Path::new(""));
            file_error(
                "RABBITMQ_CERT_FILE",
                "rabbitmq-cert-file",
                path,
                error.to_string(),
            )
        })
}

/// RABBITMQ_URL_FILE, RABBITMQ_PASS_FILE and DATABASE_URL_FILE: each read
/// into the setting it stands for, which must not be set as well. The error
/// names the file, never its content.
fn read_secret_files(mut args: Args) -> Result<Args, ConfigError> {
    fn read(variable: &'static str, flag: &'static str, path: &Path) -> Result<String, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            invalid(
                variable,
                flag,
                &path.to_string_lossy(),
                format!("cannot read it: {error}"),
            )
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
    }
    fn both(variable: &'static str, flag: &'static str, shown: String, file_variable: &str) -> ConfigError {
        invalid(
            variable,
            flag,
            &shown,
            format!("{file_variable} is set too; set only one of {variable} and {file_variable}"),
        )
    }
    if let Some(path) = &args.rabbitmq_url_file {
        if let Some(url) = &args.rabbitmq_url {
            return Err(both(
                "RABBITMQ_URL",
                "rabbitmq-url",
                url.to_string(),
                "RABBITMQ_URL_FILE",
            ));
        }
        args.rabbitmq_url = Some(SecretUrl::new(read(
            "RABBITMQ_URL_FILE",
            "rabbitmq-url-file",
            path,
        )?));
    }
    if let Some(path) = &args.rabbitmq_pass_file {
        if args.rabbitmq_pass.is_some() {
            return Err(both(
                "RABBITMQ_PASS",
                "rabbitmq-pass",
                "***".to_owned(),
                "RABBITMQ_PASS_FILE",
            ));
        }
        args.rabbitmq_pass = Some(Secret::from(read(
            "RABBITMQ_PASS_FILE",
            "rabbitmq-pass-file",
            path,
        )?));
    }
    if let Some(path) = &args.database_url_file {
        if let Some(url) = &args.database_url {
            return Err(both(
                "DATABASE_URL",
                "database-url",
                url.to_string(),
                "DATABASE_URL_FILE",
            ));
        }
        args.database_url = Some(SecretUrl::new(read(
            "DATABASE_URL_FILE",
            "database-url-file",
            path,
        )?));
    }
    Ok(args)
}

/// EXCHANGE as given (not trimmed), as long as it is not blank.
fn parse_exchange(value: &str) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(invalid("EXCHANGE", "exchange", value, "must not be empty"));
    }
    Ok(value.to_owned())
}

/// RABBITMQ_URL as given; only the scheme is checked here. The error shows
/// the URL redacted, never its password.
fn parse_rabbitmq_url(url: &SecretUrl) -> Result<SecretUrl, ConfigError> {
    if !matches!(url.scheme(), Some("amqp" | "amqps")) {
        return Err(invalid(
            "RABBITMQ_URL",
            "rabbitmq-url",
            &url.to_string(),
            "expected amqp:// or amqps://",
        ));
    }
    Ok(url.clone())
}

/// The URL the legacy variables describe, on the default vhost `/`. Only
/// RABBITMQ_PORT can be wrong; user and password may hold any character.
fn legacy_rabbitmq_url(
    host: &str,
    port: &str,
    user: &str,
    password: &Secret,
) -> Result<SecretUrl, ConfigError> {
    let port = port
        .trim()
        .parse::<u16>()
        .map_err(|_| invalid("RABBITMQ_PORT", "rabbitmq-port", port, "expected a port number"))?;
    Ok(SecretUrl::new(format!(
        "amqp://{}:{}@{}:{}/%2f",
        percent_encode(user),
        percent_encode(password.expose()),
        host.trim(),
        port
    )))
}

/// The registry database, on when DATABASE_URL is set and not blank.
/// DB_POOL_SIZE and DB_SCHEMA are checked even when it is off.
fn parse_database(args: &Args) -> Result<Option<DatabaseConfig>, ConfigError> {
    let pool_size = parse_pool_size(&args.db_pool_size)?;
    let schema = parse_schema(args.db_schema.as_deref())?;
    Ok(match &args.database_url {
        Some(url) if !url.is_blank() => {
            // sslmode and the certificate files it names, checked now.
            DatabaseTls::from_url(url)
                .map_err(|reason| invalid("DATABASE_URL", "database-url", &url.to_string(), reason))?;
            Some(DatabaseConfig {
                url: url.clone(),
                schema,
                pool_size,
            })
        }
        _ => None,
    })
}

fn parse_pool_size(value: &str) -> Result<u32, ConfigError> {
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(invalid(
            "DB_POOL_SIZE",
            "db-pool-size",
            value,
            "expected a whole number from 1 to 64",
        )),
    }
}

/// DB_SCHEMA as given (not trimmed), if set.
fn parse_schema(schema: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(schema) = schema else {
        return Ok(None);
    };
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
    Ok(Some(schema.to_owned()))
}

/// SCAN_EXISTING; a bare `--scan-existing` arrives as `true`, unset is false.
fn parse_scan_existing(value: Option<&str>) -> Result<bool, ConfigError> {
    let Some(value) = value else {
        return Ok(false);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(
            "SCAN_EXISTING",
            "scan-existing",
            value,
            "expected true or false",
        )),
    }
}

/// SENTINEL_FILE, relative to the (already normalized) data directory;
/// empty means none.
fn parse_sentinel(path: Option<&Path>, data_dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        None => Ok(None),
        Some(path) if path.as_os_str().is_empty() => Ok(None),
        Some(path) => normalize_path(&data_dir.join(path)).map(Some).ok_or_else(|| {
            invalid(
                "SENTINEL_FILE",
                "sentinel-file",
                &path.to_string_lossy(),
                "not a usable path",
            )
        }),
    }
}

/// METRICS_ADDR: an IP literal and a port (no host name: nothing to resolve,
/// and `file-watcher healthcheck` needs no DNS); empty means off.
fn parse_metrics_addr(value: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            invalid(
                "METRICS_ADDR",
                "metrics-addr",
                value.unwrap_or_default(),
                "expected an IP address and a port, e.g. 127.0.0.1:9464",
            )
        }),
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

/// Absolute, without `.`/`..` components or a trailing slash; symlinks are
/// kept as given (an operator's `/data/music` stays `/data/music` in messages).
/// `None` for an empty path or one that is not UTF-8.
fn normalize_path(path: &Path) -> Option<PathBuf> {
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
            ("--metrics-addr", "localhost:9464", "METRICS_ADDR"),
        ] {
            let error = parse(&["/tmp", flag, value]).unwrap_err();
            assert_eq!(error.variable, variable);
        }
    }

    #[test]
    fn metrics_addr_is_an_ip_and_a_port_or_off() {
        assert_eq!(parse(&["/tmp"]).unwrap().metrics_addr, None);
        assert_eq!(parse(&["/tmp", "--metrics-addr", ""]).unwrap().metrics_addr, None);
        let config = parse(&["/tmp", "--metrics-addr", "127.0.0.1:9464"]).unwrap();
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        let config = parse(&["/tmp", "--metrics-addr", "[::1]:9464"]).unwrap();
        assert_eq!(config.metrics_addr, Some("[::1]:9464".parse().unwrap()));
        let error = parse(&["/tmp", "--metrics-addr", "127.0.0.1"]).unwrap_err();
        assert_eq!(error.variable, "METRICS_ADDR");
    }

    /// A subcommand is recognised after the daemon's flags too, and the
    /// flags the operator commands read are accepted after it.
    #[test]
    fn subcommands_share_the_daemon_settings() {
        let args = Args::try_parse_from(["file-watcher", "--exchange", "x", "instances", "--json"]).unwrap();
        assert!(matches!(args.command, Some(crate::ops::Command::Instances(_))));
        assert_eq!(args.exchange, "x");
        let args = Args::try_parse_from(["file-watcher", "replay", "--db-schema", "s", "--dry-run"]).unwrap();
        assert!(matches!(args.command, Some(crate::ops::Command::Replay(_))));
        assert_eq!(args.db_schema.as_deref(), Some("s"));
        let args = Args::try_parse_from(["file-watcher", "/data/music"]).unwrap();
        assert!(args.command.is_none());
        assert_eq!(args.data_dir, PathBuf::from("/data/music"));
    }

    #[test]
    fn defaults_are_documented_values() {
        let config = parse(&["/tmp/music/"]).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/music"));
        assert_eq!(config.settle, Duration::from_millis(500));
        assert!(config.workers >= 2);
        assert_eq!(config.huge_file_bytes, 1 << 30);
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
        assert_eq!(broker.url.expose(), "amqp://u:p%40ss@broker:5672/%2f");
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
        assert_eq!(config.broker.unwrap().url.expose(), "amqp://a:b@h/%2f");
    }

    #[test]
    fn relative_and_dotted_paths_become_absolute() {
        let config = parse(&["/tmp/a/../b/./c"]).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/b/c"));
    }

    /// The exact lines operators and `tests/e2e/cli.rs` see, one per step that
    /// can fail, so that moving code between steps cannot change a byte.
    #[test]
    fn error_lines_are_exact() {
        for (arguments, expected) in [
            (
                &["/tmp", "--instance-id", "a b"][..],
                r#"invalid value "a b" for INSTANCE_ID (--instance-id): use 1 to 64 characters from A-Z a-z 0-9 - _ ."#,
            ),
            (
                &["/tmp", "--extensions", ""],
                r#"invalid value "" for EXTENSIONS (--extensions): expected a comma-separated list of extensions, or *"#,
            ),
            (
                &["/tmp", "--settle-ms", "abc"],
                r#"invalid value "abc" for SETTLE_MS (--settle-ms): expected a whole number of milliseconds"#,
            ),
            (
                &["/tmp", "--workers", "257"],
                r#"invalid value "257" for WORKERS (--workers): expected a whole number from 1 to 256"#,
            ),
            (
                &["/tmp", "--huge-file-bytes", "1GiB"],
                r#"invalid value "1GiB" for HUGE_FILE_BYTES (--huge-file-bytes): expected a whole number of bytes, at least 1"#,
            ),
            (
                &["/tmp", "--poll-interval-ms", "9"],
                r#"invalid value "9" for POLL_INTERVAL_MS (--poll-interval-ms): must be at least 10"#,
            ),
            (
                &["/tmp", "--log-level", "loud"],
                r#"invalid value "loud" for LOG_LEVEL (--log-level): expected error, warn, info, debug or trace"#,
            ),
            (
                &["/tmp", "--log-format", "xml"],
                r#"invalid value "xml" for LOG_FORMAT (--log-format): expected text or json"#,
            ),
            (
                &["/tmp", "--exchange", " "],
                r#"invalid value " " for EXCHANGE (--exchange): must not be empty"#,
            ),
            (
                &["/tmp", "--rabbitmq-url", "http://user:secret@host/"],
                r#"invalid value "http://user:***@host/" for RABBITMQ_URL (--rabbitmq-url): expected amqp:// or amqps://"#,
            ),
            (
                &["/tmp", "--rabbitmq-host", "h", "--rabbitmq-port", "99999"],
                r#"invalid value "99999" for RABBITMQ_PORT (--rabbitmq-port): expected a port number"#,
            ),
            (
                &["/tmp", "--db-pool-size", "65"],
                r#"invalid value "65" for DB_POOL_SIZE (--db-pool-size): expected a whole number from 1 to 64"#,
            ),
            (
                &["/tmp", "--db-schema", "1abc"],
                r#"invalid value "1abc" for DB_SCHEMA (--db-schema): use lower-case letters, digits and _, not starting with a digit"#,
            ),
            (
                &["/tmp", "--scan-existing", "maybe"],
                r#"invalid value "maybe" for SCAN_EXISTING (--scan-existing): expected true or false"#,
            ),
        ] {
            let error = parse(arguments).expect_err(expected);
            assert_eq!(error.to_string(), expected);
        }
        // clap itself refuses an empty DIR or DATA_DIR; operators meet this
        // line for a path that is not UTF-8.
        assert_eq!(
            parse_data_dir(Path::new("")).unwrap_err().to_string(),
            r#"invalid value "" for DATA_DIR (--DIR): not a usable path"#
        );
    }

    #[test]
    fn with_several_bad_values_the_first_step_reports() {
        for (arguments, variable) in [
            (&["/tmp", "--workers", "0", "--settle-ms", "x"][..], "SETTLE_MS"),
            (
                &["/tmp", "--log-format", "xml", "--poll-interval-ms", "1"],
                "POLL_INTERVAL_MS",
            ),
            (&["/tmp", "--db-pool-size", "0", "--exchange", ""], "EXCHANGE"),
            (
                &["/tmp", "--db-schema", "X", "--db-pool-size", "0"],
                "DB_POOL_SIZE",
            ),
            (
                &["/tmp", "--scan-existing", "maybe", "--db-schema", "X"],
                "DB_SCHEMA",
            ),
        ] {
            assert_eq!(parse(arguments).unwrap_err().variable, variable, "{arguments:?}");
        }
    }

    /// A bad value is reported even when the part it configures is off, so
    /// turning the broker or the database on later cannot reveal it.
    #[test]
    fn broker_and_database_settings_are_checked_while_off() {
        assert_eq!(
            parse(&["/tmp", "--exchange", ""]).unwrap_err().variable,
            "EXCHANGE"
        );
        assert_eq!(
            parse(&["/tmp", "--db-pool-size", "0"]).unwrap_err().variable,
            "DB_POOL_SIZE"
        );
        assert_eq!(
            parse(&["/tmp", "--db-schema", "X"]).unwrap_err().variable,
            "DB_SCHEMA"
        );
        // RABBITMQ_PORT matters only for the legacy host form.
        assert!(parse(&["/tmp", "--rabbitmq-port", "x"]).unwrap().broker.is_none());
    }

    #[test]
    fn instance_id_is_checked_as_given_or_generated() {
        assert_eq!(parse_instance_id(Some("a.B-c_9")).unwrap(), "a.B-c_9");
        assert!(parse_instance_id(Some(&"x".repeat(64))).is_ok());
        for bad in ["", " ab", "é", &"x".repeat(65)] {
            assert!(parse_instance_id(Some(bad)).is_err(), "{bad:?}");
        }
        let generated = parse_instance_id(None).unwrap();
        assert!(generated.len() == 8 && generated.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn numbers_are_trimmed_and_bounded() {
        assert_eq!(parse_workers(Some(" 256 ")).unwrap(), 256);
        assert!(parse_workers(Some("0")).is_err());
        assert!(parse_workers(None).unwrap() >= 2);
        assert_eq!(parse_batch_size(" 1 ").unwrap(), 1);
        assert!(parse_batch_size("0").is_err());
        assert!(parse_batch_size("10001").is_err());
        assert_eq!(parse_pool_size("64").unwrap(), 64);
        assert!(parse_pool_size("65").is_err());
        assert_eq!(
            parse_watch_mode(Some(" 10 ")).unwrap(),
            WatchMode::Poll(Duration::from_millis(10))
        );
        assert_eq!(parse_watch_mode(None).unwrap(), WatchMode::Inotify);
    }

    #[test]
    fn words_are_read_case_insensitively() {
        assert_eq!(parse_log_format(" JSON ").unwrap(), LogFormat::Json);
        assert_eq!(parse_log_level(" DEBUG ").unwrap(), log::LevelFilter::Debug);
        for (value, expected) in [
            ("Yes", true),
            (" on ", true),
            ("1", true),
            ("", false),
            ("OFF", false),
        ] {
            assert_eq!(parse_scan_existing(Some(value)).unwrap(), expected, "{value:?}");
        }
        assert!(!parse_scan_existing(None).unwrap());
    }

    #[test]
    fn legacy_url_encodes_credentials_and_trims_the_host() {
        assert_eq!(
            legacy_rabbitmq_url(" h ", " 5673 ", "a b", &Secret::from("p:/@%é"))
                .unwrap()
                .expose(),
            "amqp://a%20b:p%3A%2F%40%25%C3%A9@h:5673/%2f"
        );
        // A blank RABBITMQ_URL counts as unset, so the legacy host applies.
        let config = parse(&["/tmp", "--rabbitmq-url", " ", "--rabbitmq-host", "h"]).unwrap();
        assert_eq!(
            config.broker.unwrap().url.expose(),
            "amqp://guest:guest@h:5672/%2f"
        );
    }

    /// `*_FILE` secrets: read, one trailing newline dropped, exclusive with
    /// the variable they stand for; an amqps:// URL gets its TLS settings.
    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("rabbitmq_url");
        std::fs::write(&url_file, "amqps://u:File-s3cret@broker/%2f\r\n").unwrap();
        let database_file = dir.path().join("database_url");
        std::fs::write(
            &database_file,
            "postgres://u:Db-s3cret@db/registry?sslmode=verify-full\n",
        )
        .unwrap();
        let url_path = url_file.to_str().unwrap();
        let database_path = database_file.to_str().unwrap();
        let config = parse(&[
            "/tmp",
            "--rabbitmq-url-file",
            url_path,
            "--database-url-file",
            database_path,
        ])
        .unwrap();
        let broker = config.broker.as_ref().unwrap();
        assert_eq!(broker.url.expose(), "amqps://u:File-s3cret@broker/%2f");
        assert_eq!(
            format!("{:?}", broker.tls.as_ref().unwrap()),
            "verify chain and host against bundled roots"
        );
        assert_eq!(
            config.database.as_ref().unwrap().url.expose(),
            "postgres://u:Db-s3cret@db/registry?sslmode=verify-full"
        );
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");

        let error = parse(&[
            "/tmp",
            "--rabbitmq-url",
            "amqp://h/",
            "--rabbitmq-url-file",
            url_path,
        ])
        .unwrap_err();
        assert!(error.to_string().contains("RABBITMQ_URL_FILE") && error.variable == "RABBITMQ_URL");
        let error = parse(&["/tmp", "--rabbitmq-pass-file", "/nonexistent/pass"]).unwrap_err();
        assert_eq!(error.variable, "RABBITMQ_PASS_FILE");
        let pass_file = dir.path().join("pass");
        std::fs::write(&pass_file, "p@ss\n").unwrap();
        let legacy = parse(&[
            "/tmp",
            "--rabbitmq-host",
            "h",
            "--rabbitmq-pass-file",
            pass_file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            legacy.broker.unwrap().url.expose(),
            "amqp://guest:p%40ss@h:5672/%2f"
        );
    }

    /// Issue 8: `{:?}` of the raw arguments and of the configuration (and of
    /// its parts) can never show a password, whichever way it was given.
    #[test]
    fn debug_output_holds_no_password() {
        let secrets = ["Url-s3cret", "Db-s3cret", "Pass-s3cret"];
        let argv = [
            "file-watcher",
            "/tmp",
            "--rabbitmq-url",
            "amqp://watcher:Url-s3cret@broker/%2f",
            "--database-url",
            "postgres://watcher:Db-s3cret@db/registry",
            "--rabbitmq-pass",
            "Pass-s3cret",
        ];
        let args = Args::try_parse_from(argv).unwrap();
        let mut printed = vec![format!("{args:?}"), format!("{args:#?}")];
        let config = Config::from_args(args).unwrap();
        printed.push(format!("{config:?}"));
        printed.push(format!("{config:#?}"));
        printed.push(format!("{:?}", config.broker.as_ref().unwrap()));
        printed.push(format!("{:?}", config.database.as_ref().unwrap()));
        // The legacy variables build a URL with the password inside.
        let legacy = parse(&[
            "/tmp",
            "--rabbitmq-host",
            "broker",
            "--rabbitmq-pass",
            "Pass-s3cret",
        ])
        .unwrap();
        printed.push(format!("{legacy:?}"));
        for text in &printed {
            for secret in secrets {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        assert!(
            printed[2].contains("amqp://watcher:***@broker/%2f"),
            "{}",
            printed[2]
        );
        assert!(
            printed[2].contains("postgres://watcher:***@db/registry"),
            "{}",
            printed[2]
        );
    }

    #[test]
    fn sentinel_is_resolved_below_the_data_dir() {
        let data_dir = Path::new("/data/music");
        let sentinel = |path: &str| parse_sentinel(Some(Path::new(path)), data_dir).unwrap();
        assert_eq!(sentinel("mounted"), Some(PathBuf::from("/data/music/mounted")));
        assert_eq!(sentinel("../x/./y"), Some(PathBuf::from("/data/x/y")));
        assert_eq!(sentinel("/abs/s"), Some(PathBuf::from("/abs/s")));
        assert_eq!(sentinel(""), None);
        assert_eq!(parse_sentinel(None, data_dir).unwrap(), None);
    }

    #[test]
    fn rescan_interval_takes_durations_and_zero_turns_it_off() {
        let interval =
            |value: &str| parse(&["/tmp", "--rescan-interval", value]).map(|config| config.rescan_interval);
        assert_eq!(
            parse(&["/tmp"]).unwrap().rescan_interval,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(interval("30s").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(interval("5m").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(interval("1h").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(interval("0").unwrap(), None);
        for bad in ["soon", "10", "500ms", "1 fortnight"] {
            let error = interval(bad).unwrap_err();
            assert_eq!(error.variable, "RESCAN_INTERVAL", "{bad}");
        }
    }
}
