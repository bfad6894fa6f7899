//! What the servers and the machine can do without the daemon, measured in
//! the same run as the daemon's figures so that each can be read as a share
//! of its ceiling:
//!
//! - `broker`: a raw publisher sends persistent, mandatory messages shaped
//!   like the daemon's (same body size, properties and headers) to a durable
//!   queue that a consumer drains, keeping a window of unconfirmed messages.
//!   `ceiling_broker_msgs_per_s`, and `ceiling_broker_body_bytes` (the mean
//!   body); `ceiling_broker_consumed_msgs_per_s` is the rate up to the
//!   reader's last delivery, which shows the tool's own reader keeps up.
//! - `postgres`: multi-row upserts into a table shaped like the registry's
//!   `files`, plus one `outbox` row per file, one transaction per batch.
//!   `ceiling_postgres_files_per_s`.
//! - `hashing`: one big file hashed by `sha256sum` (`ceiling_sha256sum_mb_per_s`)
//!   (and, where installed, `openssl dgst -sha256`: coreutils may be built
//!   without the CPU's SHA instructions, `ceiling_openssl_sha256_mb_per_s`)
//!   and by the daemon in stdout mode with a settle time of 0, timed from its
//!   rename into the tree to its announcement (`hash_daemon_mb_per_s`; the
//!   daemon computes SHA-256 and XXH3-128 in one pass), and the daemon's
//!   VmHWM after it (`hash_peak_rss_kib`). MB are 10^6 bytes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, NoTls};

use crate::amqp::{self, RunBroker};
use crate::arrivals::{wait_for, Arrivals, Watched};
use crate::daemon::{Daemon, Setup};
use crate::files;
use crate::schema::Schema;
use crate::{progress, run_tag, Common, Deadline, Figures};

pub fn broker(common: &Common, messages: usize, window: usize) -> Result<Figures, String> {
    let tag = run_tag();
    let broker = RunBroker::declare(&common.rabbitmq_url, &tag)?;
    let arrivals = Arc::new(Watched::new(Arrivals::default()));
    let reader = broker.read_into(Arc::clone(&arrivals))?;
    let bodies: Vec<Vec<u8>> = (0..messages).map(|index| body(&tag, index)).collect();
    progress(&format!("broker ceiling: {messages} messages, window {window}"));
    let deadline = Deadline::for_files(messages);
    let (started, confirmed) =
        amqp::publish_windowed(&broker.url, &broker.exchange, &bodies, window, deadline)?;
    // The reader must keep up for the latencies of the other scenarios to mean anything.
    let drained = arrivals.wait_until(deadline, |arrivals| arrivals.count("created") >= messages);
    let consumed = arrivals.read(|arrivals| arrivals.last_arrival());
    reader.stop()?;
    broker.remove()?;
    if !drained {
        return Err("broker ceiling: the reader did not get every message by the deadline".to_owned());
    }
    let rate =
        |until: Instant| messages as f64 / until.saturating_duration_since(started).as_secs_f64().max(1e-9);
    let mut figures = Figures::new();
    figures.insert("ceiling_broker_msgs_per_s".into(), rate(confirmed));
    figures.insert(
        "ceiling_broker_consumed_msgs_per_s".into(),
        rate(consumed.unwrap_or(confirmed)),
    );
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    figures.insert(
        "ceiling_broker_body_bytes".into(),
        bytes as f64 / messages.max(1) as f64,
    );
    Ok(figures)
}

/// A `created` body as the daemon would publish it for a file of a load run.
fn body(tag: &str, index: usize) -> Vec<u8> {
    let tree = format!(
        "/dev/shm/file-watcher-bench.AbCdEf/throughput-1/tree-{}",
        index % 3 + 1
    );
    serde_json::to_vec(&serde_json::json!({
        "schema_version": 1,
        "message_id": uuid::Uuid::new_v4(),
        "correlation_id": uuid::Uuid::new_v4(),
        "timestamp": "2026-11-27T10:00:00.123Z",
        "event_type": "created",
        "file_path": format!("{tree}/load/album{}/track{index}.flac", index / 100),
        "instance_id": format!("bench-{tag}-{}", index % 3 + 1),
        "watched_directory": tree,
        "sha256_hash": format!("{:064x}", index),
        "xxh128_hash": format!("{:032x}", index),
        "size_bytes": 4096,
        "modified_time": "2026-11-27T09:59:59.987Z",
        "file_type": "flac",
    }))
    .expect("a JSON value serializes")
}

/// One file's values, made before the clock starts.
struct Row {
    path: String,
    sha256: String,
    xxh128: String,
    size: i64,
    mtime: i64,
    message_id: String,
    body: String,
}

pub fn postgres(common: &Common, count: usize, batch: usize) -> Result<Figures, String> {
    let batch = batch.max(1);
    let schema = Schema::new(&common.database_url, &format!("bench_{}", run_tag()));
    let mut client = Client::connect(&common.database_url, NoTls)
        .map_err(|error| format!("connect to PostgreSQL: {error}"))?;
    // Shaped like the registry's tables (OPERATIONS.md), so a row costs what the daemon's does.
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\";
             SET search_path TO \"{schema}\";
             CREATE TABLE files (file_path text COLLATE \"C\" PRIMARY KEY, state text NOT NULL,
               sha256 text NOT NULL, xxh128 text NOT NULL, size_bytes bigint NOT NULL,
               mtime_ns bigint NOT NULL, ctime_ns bigint NOT NULL, last_event text NOT NULL,
               old_path text COLLATE \"C\", instance_id text NOT NULL, watched_directory text NOT NULL,
               message_id uuid NOT NULL, published_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX files_present_sha256 ON files (sha256) WHERE state = 'present';
             CREATE TABLE outbox (id bigserial PRIMARY KEY, message_id uuid NOT NULL UNIQUE,
               file_path text COLLATE \"C\" NOT NULL, body text NOT NULL, instance_id text NOT NULL,
               created_at timestamptz NOT NULL DEFAULT now());",
            schema = schema.name
        ))
        .map_err(|error| format!("create the ceiling's tables: {error}"))?;
    let rows: Vec<Row> = (0..count)
        .map(|index| Row {
            path: format!("/dev/shm/bench/tree/album{}/track{index}.flac", index / 100),
            sha256: format!("{:064x}", index),
            xxh128: format!("{:032x}", index),
            size: 4096,
            mtime: 1_700_000_000_000_000_000 + index as i64,
            message_id: uuid::Uuid::new_v4().to_string(),
            body: String::from_utf8(body("ceiling", index)).expect("JSON is UTF-8"),
        })
        .collect();
    progress(&format!(
        "PostgreSQL ceiling: {count} files, {batch} per statement"
    ));
    let deadline = Deadline::for_files(count);
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        if deadline.passed() {
            return Err("PostgreSQL ceiling: not done by the deadline".to_owned());
        }
        upsert(&mut client, chunk)?;
    }
    let elapsed = started.elapsed();
    drop(client);
    schema.drop_now()?;
    let mut figures = Figures::new();
    figures.insert(
        "ceiling_postgres_files_per_s".into(),
        count as f64 / elapsed.as_secs_f64().max(1e-9),
    );
    Ok(figures)
}

/// One transaction: the rows upserted in one statement, their outbox entries in another.
fn upsert(client: &mut Client, rows: &[Row]) -> Result<(), String> {
    const STATE: &str = "present";
    const EVENT: &str = "created";
    const INSTANCE: &str = "bench-ceiling";
    const DIRECTORY: &str = "/dev/shm/bench/tree";
    let mut file_values = Vec::with_capacity(rows.len());
    let mut file_parameters: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 11);
    let mut outbox_values = Vec::with_capacity(rows.len());
    let mut outbox_parameters: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 4);
    for (number, row) in rows.iter().enumerate() {
        let first = number * 11;
        let mut placeholders: Vec<String> = (1..=11).map(|column| format!("${}", first + column)).collect();
        placeholders[10].push_str("::text::uuid"); // message_id
        file_values.push(format!("({})", placeholders.join(",")));
        file_parameters.extend([
            &row.path as &(dyn ToSql + Sync),
            &STATE,
            &row.sha256,
            &row.xxh128,
            &row.size,
            &row.mtime,
            &row.mtime,
            &EVENT,
            &INSTANCE,
            &DIRECTORY,
            &row.message_id,
        ]);
        let first = number * 4;
        outbox_values.push(format!(
            "(${}::text::uuid,${},${},${})",
            first + 1,
            first + 2,
            first + 3,
            first + 4
        ));
        outbox_parameters.extend([
            &row.message_id as &(dyn ToSql + Sync),
            &row.path,
            &row.body,
            &INSTANCE,
        ]);
    }
    let files = format!(
        "INSERT INTO files (file_path, state, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, last_event,
           instance_id, watched_directory, message_id) VALUES {}
         ON CONFLICT (file_path) DO UPDATE SET state = EXCLUDED.state, sha256 = EXCLUDED.sha256,
           xxh128 = EXCLUDED.xxh128, size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns,
           ctime_ns = EXCLUDED.ctime_ns, last_event = EXCLUDED.last_event, message_id = EXCLUDED.message_id,
           published_at = NULL, updated_at = now()",
        file_values.join(",")
    );
    let outbox = format!(
        "INSERT INTO outbox (message_id, file_path, body, instance_id) VALUES {}",
        outbox_values.join(",")
    );
    let mut transaction = client.transaction().map_err(|error| format!("begin: {error}"))?;
    transaction
        .execute(files.as_str(), &file_parameters)
        .map_err(|error| format!("upsert files: {error}"))?;
    transaction
        .execute(outbox.as_str(), &outbox_parameters)
        .map_err(|error| format!("insert into the outbox: {error}"))?;
    transaction.commit().map_err(|error| format!("commit: {error}"))
}

pub fn hashing(common: &Common, mib: usize) -> Result<Figures, String> {
    let directory = common.scenario_directory("hashing")?;
    let tag = run_tag();
    let env = common.daemon_env()?;
    let tree = directory.join("tree");
    std::fs::create_dir(&tree).map_err(|error| format!("create {}: {error}", tree.display()))?;
    let staged = directory.join("big.flac");
    progress(&format!("hashing: a {mib} MiB file, sha256sum then the daemon"));
    files::write_big(&staged, mib)?;
    let megabytes = (mib << 20) as f64 / 1e6;

    let sha256sum = time_hashing("sha256sum", &[], &staged)?
        .ok_or_else(|| "hashing: sha256sum is not installed".to_owned())?;
    let openssl = time_hashing("openssl", &["dgst", "-sha256"], &staged)?;

    let announcements = Arc::new(Watched::new(Arrivals::default()));
    let setup = Setup {
        binary: &common.binary,
        tree: &tree,
        instance_id: format!("bench-{tag}"),
        // Nothing to wait for: a renamed file is complete.
        settle_ms: 0,
        sinks: None,
        env: &env,
        log: directory.join("instance.log"),
    };
    let daemon = Daemon::start(&setup, Some(Arc::clone(&announcements)))?;
    daemon.wait_ready(false, Deadline::after(Duration::from_secs(60)))?;
    let path = tree.join("big.flac");
    let moved = Instant::now();
    std::fs::rename(&staged, &path).map_err(|error| format!("move the big file in: {error}"))?;
    let deadline = Deadline::after(Duration::from_secs(120) + Duration::from_millis(10 * mib as u64));
    let announced = wait_for(
        &announcements,
        "created",
        0,
        &[files::path_text(&path)?],
        deadline,
    )
    .map_err(|error| format!("hashing: {error}; the instance's last lines:\n{}", daemon.tail()))?;
    let daemon_time = announced.saturating_duration_since(moved);
    let peak = daemon.memory()?.peak;
    daemon.stop()?;
    common.finish(&directory);

    let mut figures = Figures::new();
    figures.insert(
        "ceiling_sha256sum_mb_per_s".into(),
        megabytes / sha256sum.as_secs_f64().max(1e-9),
    );
    figures.insert(
        "hash_daemon_mb_per_s".into(),
        megabytes / daemon_time.as_secs_f64().max(1e-9),
    );
    if let Some(openssl) = openssl {
        figures.insert(
            "ceiling_openssl_sha256_mb_per_s".into(),
            megabytes / openssl.as_secs_f64().max(1e-9),
        );
    }
    figures.insert("hash_peak_rss_kib".into(), peak as f64);
    Ok(figures)
}

/// How long `program arguments… file` takes; `None` if it is not installed.
fn time_hashing(program: &str, arguments: &[&str], file: &Path) -> Result<Option<Duration>, String> {
    let started = Instant::now();
    let output = match Command::new(program).args(arguments).arg(file).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("run {program}: {error}")),
    };
    let elapsed = started.elapsed();
    if !output.status.success() {
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(Some(elapsed))
}
