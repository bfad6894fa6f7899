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
//! - `cleanup`: deletes the queue, the exchanges and the schema.
//!
//! Talks to the servers given on the command line only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_io::Timer;
use clap::{Parser, Subcommand};
use file_watcher::config::{DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS};
use file_watcher::filter::Filter;
use futures_lite::future;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
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
        /// `NAME=DIR`, one per instance.
        #[arg(long = "instance", required = true)]
        instances: Vec<String>,
        /// Also write every delivery, in order, to this file.
        #[arg(long)]
        deliveries: Option<PathBuf>,
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
}

fn drain(arguments: &Arguments) -> Result<Vec<Delivery>, String> {
    let (connection, channel) = channel(&arguments.rabbitmq_url)?;
    let mut deliveries = Vec::new();
    let no_ack = BasicGetOptions { no_ack: true };
    while let Some(message) = bounded(
        "read the queue",
        channel.basic_get(arguments.queue.as_str().into(), no_ack),
    )?
    .map_err(|error| format!("read the queue: {error}"))?
    {
        let body: Value = serde_json::from_slice(&message.delivery.data)
            .map_err(|error| format!("a delivery is not JSON: {error}"))?;
        let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
        deliveries.push(Delivery {
            message_id: text("message_id"),
            event_type: text("event_type"),
            file_path: text("file_path"),
            old_path: text("old_path"),
            sha256: text("sha256_hash"),
        });
    }
    let _ = bounded("close", connection.close(200, "drained".into()));
    Ok(deliveries)
}

/// Announced files below `tree` and their SHA-256.
fn disk(tree: &Path, filter: &Filter) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in walkdir::WalkDir::new(tree).into_iter().filter_map(Result::ok) {
        let Ok(relative) = entry.path().strip_prefix(tree) else {
            continue;
        };
        if !entry.file_type().is_file() || !filter.announces(relative) {
            continue;
        }
        if let (Ok(content), Some(path)) = (std::fs::read(entry.path()), entry.path().to_str()) {
            files.insert(path.to_owned(), format!("{:x}", sha2::Sha256::digest(&content)));
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

fn check(
    arguments: &Arguments,
    schema: &str,
    wait: u64,
    instances: &[String],
    record: Option<&Path>,
) -> Result<bool, String> {
    let filter = Filter::new(DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE).map_err(|error| format!("{error:?}"))?;
    let instances: Vec<(String, PathBuf)> = instances
        .iter()
        .map(|spec| {
            let (name, dir) = spec
                .split_once('=')
                .ok_or_else(|| format!("--instance {spec:?}: expected NAME=DIR"))?;
            Ok((name.to_owned(), PathBuf::from(dir)))
        })
        .collect::<Result<_, String>>()?;
    let mut client = postgres::Client::connect(&arguments.database_url, postgres::NoTls)
        .map_err(|error| format!("connect to PostgreSQL: {error}"))?;
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .map_err(|error| format!("set search_path: {error}"))?;

    // Quiet means: every tree's registry agrees with its disk, all published.
    let deadline = Instant::now() + Duration::from_secs(wait);
    let started = Instant::now();
    let converged = loop {
        let mut all = true;
        for (_, tree) in &instances {
            let tree_text = tree.to_string_lossy();
            let registry = registered(&mut client, &tree_text)?;
            all &= registry.unpublished == 0 && registry.present == disk(tree, &filter);
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

    let deliveries = drain(arguments)?;
    if let Some(record) = record {
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
        "{:<14} {:>9} {:>9} {:>10} {:>6} {:>11} {:>12}",
        "instance", "expected", "recorded", "published", "lost", "duplicated", "unpublished"
    );
    let mut ok = converged;
    for (name, tree) in &instances {
        let tree_text = tree.to_string_lossy().into_owned();
        let prefix = format!("{tree_text}/");
        let on_disk = disk(tree, &filter);
        let registry = registered(&mut client, &tree_text)?;
        // The consumer's view: per path, the content of the last event, or None if gone.
        let mut view: HashMap<&str, Option<&str>> = HashMap::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut duplicated = 0;
        for delivery in deliveries
            .iter()
            .filter(|delivery| delivery.file_path.starts_with(&prefix))
        {
            if !seen.insert(&delivery.message_id) {
                duplicated += 1;
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
            "{:<14} {:>9} {:>9} {:>10} {:>6} {:>11} {:>12}",
            name,
            on_disk.len(),
            recorded,
            published,
            lost_paths.len(),
            duplicated,
            registry.unpublished
        );
        for line in lost.iter().take(20) {
            println!("    {line}");
        }
        ok &= lost.is_empty();
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
        } => check(&arguments, schema, *wait, instances, deliveries.as_deref()),
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
