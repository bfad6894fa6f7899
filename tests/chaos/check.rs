//! The consumer and judge of `scripts/chaos.sh` (an example, not a test:
//! `cargo build --release --example chaos_check`).
//!
//! - `declare`: the exchange (as the daemon declares it) and a durable queue
//!   bound to it with `file.#`, made before any daemon starts, so nothing
//!   published can be missed, whatever happens to the connections.
//! - `check`: waits until the registry agrees with the trees on disk and
//!   everything is published (or the wait runs out), drains the queue, and
//!   prints per instance: files expected (on disk), recorded (registry row
//!   with the same content), published (last delivered event for the path
//!   describes the file), lost (paths where the registry or the consumer's
//!   view disagrees with the disk), duplicated (deliveries of a message id
//!   already delivered). Exits 1 on any loss.
//! - `quiet`: only the wait of `check`.
//! - `consume`: reads the queue while a run goes on and writes every delivery,
//!   with the time it arrived, as one JSON line; `check --consumed` then judges
//!   those (and whatever is still queued) and adds, per instance, the events,
//!   their rate and latency (from the file's last write, its `modified_time`,
//!   to the delivery), deliveries carrying another instance's id (body or
//!   `x-instance-id` header), and changes announced twice under two message
//!   ids. Duplicated message ids fail the check too, except for instances
//!   named with `--may-repeat` (one killed mid-run republishes what it had not
//!   seen confirmed: at-least-once).
//! - `cleanup`: deletes the queue, the exchanges and the schema.
//!
//! It is the judge of `scripts/chaos.sh` and `scripts/stress.sh`.
//! Talks to the servers given on the command line only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_io::Timer;
use clap::{Parser, Subcommand};
use file_watcher::config::{DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS};
use file_watcher::filter::Filter;
use futures_lite::future;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use sha2::Digest;

#[derive(Parser)]
struct Arguments {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    rabbitmq_url: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    #[arg(long)]
    exchange: String,
    #[arg(long)]
    queue: String,
    #[command(subcommand)]
    command: Step,
}

#[derive(Subcommand)]
enum Step {
    Declare,
    Check {
        #[arg(long)]
        schema: String,
        /// Seconds to wait for the registry to agree with the disk.
        #[arg(long, default_value = "120")]
        wait: u64,
        /// `NAME=DIR` (or `NAME=DIR@WATCHED` when the daemon sees DIR as
        /// WATCHED, as in a container), one per instance.
        #[arg(long = "instance", required = true)]
        instances: Vec<String>,
        /// Also write every delivery, in order, to this file.
        #[arg(long)]
        deliveries: Option<PathBuf>,
        /// Deliveries already read by `consume` (JSON lines), judged before
        /// whatever is still in the queue.
        #[arg(long)]
        consumed: Option<PathBuf>,
        /// An instance that may deliver a message id twice (it was killed).
        #[arg(long = "may-repeat")]
        may_repeat: Vec<String>,
        /// `NAME=PEAK_RSS_KB,CPU_SECONDS`, measured by the caller, for the table.
        #[arg(long = "resources")]
        resources: Vec<String>,
    },
    /// Waits as `check` does, without touching the queue.
    Quiet {
        #[arg(long)]
        schema: String,
        #[arg(long, default_value = "120")]
        wait: u64,
        #[arg(long = "instance", required = true)]
        instances: Vec<String>,
    },
    Consume {
        /// Where each delivery goes, one JSON line, as it arrives.
        #[arg(long)]
        out: PathBuf,
        /// Stop once this file exists and the queue is empty.
        #[arg(long)]
        until: PathBuf,
    },
    Cleanup {
        #[arg(long)]
        schema: String,
    },
}

/// Every AMQP step gets this long.
const STEP: Duration = Duration::from_secs(30);

fn bounded<T>(what: &str, work: impl Future<Output = T>) -> Result<T, String> {
    future::block_on(future::or(async { Some(work.await) }, async {
        Timer::after(STEP).await;
        None
    }))
    .ok_or_else(|| format!("{what}: no answer within {STEP:?}"))
}

fn channel(url: &str) -> Result<(Connection, Channel), String> {
    let connection = bounded(
        "connect to RabbitMQ",
        Connection::connect(url, ConnectionProperties::default()),
    )?
    .map_err(|error| format!("connect to RabbitMQ: {error}"))?;
    let channel = bounded("open a channel", connection.create_channel())?
        .map_err(|error| format!("open a channel: {error}"))?;
    Ok((connection, channel))
}

fn declare(arguments: &Arguments) -> Result<(), String> {
    let (connection, channel) = channel(&arguments.rabbitmq_url)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    bounded(
        "declare the exchange",
        channel.exchange_declare(
            arguments.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        ),
    )?
    .map_err(|error| format!("declare the exchange: {error}"))?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    bounded(
        "declare the queue",
        channel.queue_declare(arguments.queue.as_str().into(), durable, FieldTable::default()),
    )?
    .map_err(|error| format!("declare the queue: {error}"))?;
    bounded(
        "bind the queue",
        channel.queue_bind(
            arguments.queue.as_str().into(),
            arguments.exchange.as_str().into(),
            "file.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )?
    .map_err(|error| format!("bind the queue: {error}"))?;
    let _ = bounded("close", connection.close(200, "declared".into()));
    Ok(())
}

fn cleanup(arguments: &Arguments, schema: &str) -> Result<(), String> {
    let (connection, channel) = channel(&arguments.rabbitmq_url)?;
    let _ = bounded(
        "delete the queue",
        channel.queue_delete(arguments.queue.as_str().into(), QueueDeleteOptions::default()),
    );
    for exchange in [arguments.exchange.clone(), format!("{}.dlx", arguments.exchange)] {
        let _ = bounded(
            "delete an exchange",
            channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()),
        );
    }
    let _ = bounded("close", connection.close(200, "cleaned up".into()));
    let mut client = postgres::Client::connect(&arguments.database_url, postgres::NoTls)
        .map_err(|error| format!("connect to PostgreSQL: {error}"))?;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .map_err(|error| format!("drop the schema: {error}"))
}

/// One delivery: the fields the comparison needs.
struct Delivery {
    message_id: String,
    event_type: String,
    file_path: String,
    old_path: String,
    sha256: String,
    /// `instance_id` of the body.
    instance: String,
    /// The `x-instance-id` header.
    header_instance: String,
    /// When it arrived here, and the file's last write, in ms since the epoch.
    received_ms: u64,
    modified_ms: Option<u64>,
}

impl Delivery {
    /// From the JSON line `consume` wrote (or `record` makes of a delivery).
    fn from_record(record: &Value) -> Delivery {
        let body = &record["body"];
        let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
        Delivery {
            message_id: text("message_id"),
            event_type: text("event_type"),
            file_path: text("file_path"),
            old_path: text("old_path"),
            sha256: text("sha256_hash"),
            instance: text("instance_id"),
            header_instance: record["header_instance"].as_str().unwrap_or_default().to_owned(),
            received_ms: record["received_ms"].as_u64().unwrap_or_default(),
            modified_ms: body["modified_time"]
                .as_str()
                .and_then(|time| humantime::parse_rfc3339(time).ok())
                .map(epoch_ms),
        }
    }
}

fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// One message as a JSON line: the time it arrived, its instance header and
/// its body.
fn record(message: &lapin::message::BasicGetMessage) -> Result<Value, String> {
    let body: Value = serde_json::from_slice(&message.delivery.data)
        .map_err(|error| format!("a delivery is not JSON: {error}"))?;
    let header_instance = message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| match headers.inner().get("x-instance-id") {
            Some(AMQPValue::LongString(text)) => Some(text.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(serde_json::json!({
        "received_ms": epoch_ms(SystemTime::now()),
        "header_instance": header_instance,
        "body": body,
    }))
}

/// Takes one message off the queue, if there is one.
fn get(channel: &Channel, queue: &str) -> Result<Option<lapin::message::BasicGetMessage>, String> {
    let no_ack = BasicGetOptions { no_ack: true };
    bounded("read the queue", channel.basic_get(queue.into(), no_ack))?
        .map_err(|error| format!("read the queue: {error}"))
}

fn drain(arguments: &Arguments) -> Result<Vec<Delivery>, String> {
    let (connection, channel) = channel(&arguments.rabbitmq_url)?;
    let mut deliveries = Vec::new();
    while let Some(message) = get(&channel, &arguments.queue)? {
        deliveries.push(Delivery::from_record(&record(&message)?));
    }
    let _ = bounded("close", connection.close(200, "drained".into()));
    Ok(deliveries)
}

/// Reads the queue as messages arrive until `until` exists and the queue is
/// empty, writing each as a JSON line to `out`.
fn consume(arguments: &Arguments, out: &Path, until: &Path) -> Result<(), String> {
    let (connection, channel) = channel(&arguments.rabbitmq_url)?;
    let file = std::fs::File::create(out).map_err(|error| format!("create {}: {error}", out.display()))?;
    let mut out_file = std::io::BufWriter::new(file);
    loop {
        match get(&channel, &arguments.queue)? {
            Some(message) => writeln!(out_file, "{}", record(&message)?),
            None if until.exists() => break,
            None => {
                out_file
                    .flush()
                    .map_err(|error| format!("write {}: {error}", out.display()))?;
                std::thread::sleep(Duration::from_millis(10));
                Ok(())
            }
        }
        .map_err(|error| format!("write {}: {error}", out.display()))?;
    }
    out_file
        .flush()
        .map_err(|error| format!("write {}: {error}", out.display()))?;
    let _ = bounded("close", connection.close(200, "consumed".into()));
    Ok(())
}

/// What `consume` wrote.
fn consumed(path: &Path) -> Result<Vec<Delivery>, String> {
    let file = std::fs::File::open(path).map_err(|error| format!("open {}: {error}", path.display()))?;
    std::io::BufReader::new(file)
        .lines()
        .map(|line| {
            let line = line.map_err(|error| format!("read {}: {error}", path.display()))?;
            let value: Value = serde_json::from_str(&line)
                .map_err(|error| format!("{}: not JSON: {error}", path.display()))?;
            Ok(Delivery::from_record(&value))
        })
        .collect()
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// One watched tree: where it is here, and the path the daemon watches it
/// under (another one inside a container), which is what its registry rows
/// and messages name.
struct Tree {
    name: String,
    here: PathBuf,
    watched: String,
}

/// Announced files of a tree, by the path the daemon names them with, and
/// their SHA-256.
fn disk(tree: &Tree, filter: &Filter) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&tree.here)
        .into_iter()
        .filter_map(Result::ok)
    {
        let Ok(relative) = entry.path().strip_prefix(&tree.here) else {
            continue;
        };
        if !entry.file_type().is_file() || !filter.announces(relative) {
            continue;
        }
        if let (Ok(content), Some(relative)) = (std::fs::read(entry.path()), relative.to_str()) {
            files.insert(
                format!("{}/{relative}", tree.watched),
                format!("{:x}", sha2::Sha256::digest(&content)),
            );
        }
    }
    files
}

/// What the registry says about one tree.
#[derive(Default)]
struct Registered {
    /// Present rows: path → SHA-256.
    present: BTreeMap<String, String>,
    /// Rows whose last message is not confirmed, plus outbox entries.
    unpublished: usize,
}

fn registered(client: &mut postgres::Client, tree: &str) -> Result<Registered, String> {
    let pattern = format!("{tree}/%");
    let mut registered = Registered::default();
    let rows = client
        .query(
            "SELECT file_path, state, sha256, published_at IS NULL FROM files WHERE file_path LIKE $1",
            &[&pattern],
        )
        .map_err(|error| format!("read files: {error}"))?;
    for row in rows {
        let path: String = row.get(0);
        if !path.starts_with(&format!("{tree}/")) {
            continue;
        }
        if row.get::<_, &str>(1) == "present" {
            registered.present.insert(path, row.get(2));
        }
        if row.get::<_, bool>(3) {
            registered.unpublished += 1;
        }
    }
    let outbox: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE file_path LIKE $1", &[&pattern])
        .map_err(|error| format!("read the outbox: {error}"))?
        .get(0);
    registered.unpublished += usize::try_from(outbox).unwrap_or(usize::MAX);
    Ok(registered)
}

/// What `check` is asked beyond the trees.
struct CheckOptions<'a> {
    schema: &'a str,
    wait: u64,
    record_to: Option<&'a Path>,
    consumed: Option<&'a Path>,
    may_repeat: &'a [String],
    /// Instance → (peak RSS in KiB, CPU seconds).
    resources: HashMap<String, (u64, f64)>,
}

fn parse_resources(specs: &[String]) -> Result<HashMap<String, (u64, f64)>, String> {
    specs
        .iter()
        .map(|spec| {
            let parsed = spec.split_once('=').and_then(|(name, values)| {
                let (rss, cpu) = values.split_once(',')?;
                Some((name.to_owned(), (rss.parse().ok()?, cpu.parse().ok()?)))
            });
            parsed.ok_or_else(|| format!("--resources {spec:?}: expected NAME=PEAK_RSS_KB,CPU_SECONDS"))
        })
        .collect()
}

/// Waits up to `wait` seconds until every tree's registry agrees with its
/// disk and everything is published; says how long it took, or that it did not.
fn converge(
    client: &mut postgres::Client,
    instances: &[Tree],
    filter: &Filter,
    wait: u64,
) -> Result<bool, String> {
    let deadline = Instant::now() + Duration::from_secs(wait);
    let started = Instant::now();
    let converged = loop {
        let mut all = true;
        for tree in instances {
            let registry = registered(client, &tree.watched)?;
            all &= registry.unpublished == 0 && registry.present == disk(tree, filter);
        }
        if all {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if converged {
        println!("quiet after {:.1} s", started.elapsed().as_secs_f64());
    } else {
        println!("NOT quiet after {wait} s: reporting what there is");
    }
    Ok(converged)
}

/// `NAME=DIR` or, for a tree the daemon sees under another path (a
/// container's bind mount), `NAME=DIR@WATCHED`.
fn parse_instances(specs: &[String]) -> Result<Vec<Tree>, String> {
    specs
        .iter()
        .map(|spec| {
            let (name, dir) = spec
                .split_once('=')
                .ok_or_else(|| format!("--instance {spec:?}: expected NAME=DIR or NAME=DIR@WATCHED"))?;
            let (here, watched) = dir.split_once('@').unwrap_or((dir, dir));
            Ok(Tree {
                name: name.to_owned(),
                here: PathBuf::from(here),
                watched: watched.trim_end_matches('/').to_owned(),
            })
        })
        .collect()
}

/// Connects to the registry in `schema`.
fn registry_client(arguments: &Arguments, schema: &str) -> Result<postgres::Client, String> {
    let mut client = postgres::Client::connect(&arguments.database_url, postgres::NoTls)
        .map_err(|error| format!("connect to PostgreSQL: {error}"))?;
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .map_err(|error| format!("set search_path: {error}"))?;
    Ok(client)
}

fn announced_filter() -> Result<Filter, String> {
    Filter::new(DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE).map_err(|error| format!("{error:?}"))
}

/// `quiet`: only the wait of `check`, leaving the queue alone.
fn quiet(arguments: &Arguments, schema: &str, wait: u64, instances: &[String]) -> Result<bool, String> {
    let instances = parse_instances(instances)?;
    converge(
        &mut registry_client(arguments, schema)?,
        &instances,
        &announced_filter()?,
        wait,
    )
}

fn check(arguments: &Arguments, instances: &[String], options: &CheckOptions) -> Result<bool, String> {
    let CheckOptions {
        schema,
        wait,
        record_to,
        ..
    } = *options;
    let filter = announced_filter()?;
    let instances = parse_instances(instances)?;
    let mut client = registry_client(arguments, schema)?;
    let converged = converge(&mut client, &instances, &filter, wait)?;

    let mut deliveries = match options.consumed {
        Some(path) => consumed(path)?,
        None => Vec::new(),
    };
    deliveries.extend(drain(arguments)?);
    if let Some(record) = record_to {
        let lines: Vec<String> = deliveries
            .iter()
            .map(|delivery| {
                format!(
                    "{} {} {} {} {}",
                    delivery.message_id,
                    delivery.event_type,
                    delivery.file_path,
                    delivery.old_path,
                    delivery.sha256
                )
            })
            .collect();
        std::fs::write(record, lines.join("\n") + "\n")
            .map_err(|error| format!("write {}: {error}", record.display()))?;
    }
    println!(
        "{:<14} {:>9} {:>9} {:>10} {:>6} {:>11} {:>12} {:>9} {:>7}",
        "instance",
        "expected",
        "recorded",
        "published",
        "lost",
        "duplicated",
        "unpublished",
        "wrong-id",
        "double"
    );
    let mut ok = converged;
    let mut traffic = Vec::new();
    for tree in &instances {
        let name = &tree.name;
        let prefix = format!("{}/", tree.watched);
        let on_disk = disk(tree, &filter);
        let registry = registered(&mut client, &tree.watched)?;
        // The consumer's view: per path, the content of the last event, or None if gone.
        let mut view: HashMap<&str, Option<&str>> = HashMap::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut duplicated = 0;
        let mut wrong_instance = Vec::new();
        // A change announced twice: the same content for the same path in two
        // consecutive deliveries with different message ids.
        let mut last_content: HashMap<&str, &str> = HashMap::new();
        let mut double = Vec::new();
        let mut latencies = Vec::new();
        let mut events = 0usize;
        let (mut first_ms, mut last_ms) = (u64::MAX, 0u64);
        for delivery in deliveries
            .iter()
            .filter(|delivery| delivery.file_path.starts_with(&prefix))
        {
            if !seen.insert(&delivery.message_id) {
                duplicated += 1;
                continue;
            }
            events += 1;
            if delivery.received_ms > 0 {
                first_ms = first_ms.min(delivery.received_ms);
                last_ms = last_ms.max(delivery.received_ms);
                if let Some(modified) = delivery.modified_ms {
                    latencies.push(delivery.received_ms.saturating_sub(modified));
                }
            }
            if delivery.instance != *name || delivery.header_instance != *name {
                wrong_instance.push(format!(
                    "{}: message {} carries instance {:?} (header {:?})",
                    delivery.file_path, delivery.message_id, delivery.instance, delivery.header_instance
                ));
            }
            if delivery.event_type == "deleted" {
                last_content.remove(delivery.file_path.as_str());
            } else {
                if matches!(delivery.event_type.as_str(), "renamed" | "moved") {
                    last_content.remove(delivery.old_path.as_str());
                }
                let previous = last_content.insert(&delivery.file_path, &delivery.sha256);
                if previous == Some(delivery.sha256.as_str()) {
                    double.push(format!(
                        "{}: {} (message {}) announces content already announced",
                        delivery.file_path, delivery.event_type, delivery.message_id
                    ));
                }
            }
            match delivery.event_type.as_str() {
                "deleted" => {
                    view.insert(&delivery.file_path, None);
                }
                "renamed" | "moved" => {
                    view.insert(&delivery.old_path, None);
                    view.insert(&delivery.file_path, Some(&delivery.sha256));
                }
                _ => {
                    view.insert(&delivery.file_path, Some(&delivery.sha256));
                }
            }
        }
        let recorded = on_disk
            .iter()
            .filter(|(path, sha256)| registry.present.get(*path) == Some(sha256))
            .count();
        let published = on_disk
            .iter()
            .filter(|(path, sha256)| view.get(path.as_str()).copied().flatten() == Some(sha256.as_str()))
            .count();
        let mut lost: Vec<String> = Vec::new();
        for (path, sha256) in &on_disk {
            if registry.present.get(path) != Some(sha256) {
                lost.push(format!("{path}: the registry does not hold this content"));
            }
            if view.get(path.as_str()).copied().flatten() != Some(sha256.as_str()) {
                lost.push(format!("{path}: the last message does not describe this content"));
            }
        }
        for path in registry
            .present
            .keys()
            .filter(|path| !on_disk.contains_key(*path))
        {
            lost.push(format!("{path}: gone, but the registry says present"));
        }
        for (path, _) in view
            .iter()
            .filter(|(path, state)| state.is_some() && !on_disk.contains_key(**path))
        {
            lost.push(format!("{path}: gone, but the last message says present"));
        }
        let lost_paths: HashSet<&str> = lost
            .iter()
            .map(|line| line.split(": ").next().unwrap_or_default())
            .collect();
        println!(
            "{:<14} {:>9} {:>9} {:>10} {:>6} {:>11} {:>12} {:>9} {:>7}",
            name,
            on_disk.len(),
            recorded,
            published,
            lost_paths.len(),
            duplicated,
            registry.unpublished,
            wrong_instance.len(),
            double.len()
        );
        for line in lost.iter().chain(&wrong_instance).chain(&double).take(20) {
            println!("    {line}");
        }
        let repeat_allowed = options.may_repeat.contains(name);
        if duplicated > 0 && !repeat_allowed {
            println!("    {duplicated} message ids delivered twice by an instance that was never killed");
        }
        ok &= lost.is_empty()
            && wrong_instance.is_empty()
            && double.is_empty()
            && (duplicated == 0 || repeat_allowed);
        latencies.sort_unstable();
        traffic.push((name.clone(), events, first_ms, last_ms, latencies));
    }
    if options.consumed.is_some() {
        println!();
        println!(
            "{:<14} {:>7} {:>9} {:>8} {:>8} {:>9} {:>6}",
            "instance", "events", "events/s", "p50 ms", "p99 ms", "peak RSS", "CPU s"
        );
        for (name, events, first_ms, last_ms, latencies) in &traffic {
            let span = last_ms.saturating_sub(*first_ms).max(1) as f64 / 1000.0;
            let show = |value: Option<u64>| value.map_or("-".to_owned(), |value| value.to_string());
            let (rss, cpu) = options
                .resources
                .get(name)
                .map_or(("-".to_owned(), "-".to_owned()), |(rss, cpu)| {
                    (format!("{:.1} MB", *rss as f64 / 1024.0), format!("{cpu:.2}"))
                });
            println!(
                "{:<14} {:>7} {:>9.0} {:>8} {:>8} {:>9} {:>6}",
                name,
                events,
                *events as f64 / span,
                show(quantile(latencies, 0.5)),
                show(quantile(latencies, 0.99)),
                rss,
                cpu
            );
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let result = match &arguments.command {
        Step::Declare => declare(&arguments).map(|()| true),
        Step::Check {
            schema,
            wait,
            instances,
            deliveries,
            consumed,
            may_repeat,
            resources,
        } => parse_resources(resources).and_then(|resources| {
            let options = CheckOptions {
                schema,
                wait: *wait,
                record_to: deliveries.as_deref(),
                consumed: consumed.as_deref(),
                may_repeat,
                resources,
            };
            check(&arguments, instances, &options)
        }),
        Step::Quiet {
            schema,
            wait,
            instances,
        } => quiet(&arguments, schema, *wait, instances),
        Step::Consume { out, until } => consume(&arguments, out, until).map(|()| true),
        Step::Cleanup { schema } => cleanup(&arguments, schema).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("chaos_check: {error}");
            ExitCode::from(2)
        }
    }
}
