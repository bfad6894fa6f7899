//! RabbitMQ for one scenario: an exchange of its own (declared as the daemon
//! declares it), a durable queue bound to it with `file.#`, a reader that
//! records every delivery in [`Arrivals`], and the raw publisher that
//! measures the broker's ceiling.
//!
//! The queue is durable, as the consumers' queues are, so persistent
//! messages cost the broker what they cost in production (written to disk
//! before the confirm). It also expires by itself ten minutes after its last
//! use, should a run die before [`RunBroker::remove`].
//!
//! lapin is async; every call here is raced against a deadline with
//! `futures-lite` and an `async-io` timer.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::{future, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use crate::arrivals::{Arrivals, Watched};
use crate::Deadline;

/// Each setup or teardown call gets this long.
const STEP: Duration = Duration::from_secs(30);

/// How often the reader looks at its stop flag while the queue is quiet.
const READER_POLL: Duration = Duration::from_millis(100);

/// Runs `work` to completion, or gives up with `None` at `deadline`.
fn by<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    future::block_on(future::or(async { Some(work.await) }, async {
        Timer::at(deadline).await;
        None
    }))
}

/// Runs `work` to completion, or fails naming `what` at `deadline`.
fn until<T>(what: &str, deadline: Instant, work: impl Future<Output = T>) -> Result<T, String> {
    by(deadline, work).ok_or_else(|| format!("{what}: no answer in time"))
}

fn step<T, E: std::fmt::Display>(what: &str, work: impl Future<Output = Result<T, E>>) -> Result<T, String> {
    until(what, Instant::now() + STEP, work)?.map_err(|error| format!("{what}: {error}"))
}

pub fn connect(url: &str) -> Result<(Connection, Channel), String> {
    let connection = step(
        "connect to RabbitMQ",
        Connection::connect(url, ConnectionProperties::default()),
    )?;
    let channel = step("open a channel", connection.create_channel())?;
    Ok((connection, channel))
}

/// The scenario's exchange and queue (both named `file_watcher_bench_<tag>`).
pub struct RunBroker {
    pub url: String,
    pub exchange: String,
    queue: String,
    removed: bool,
}

impl RunBroker {
    pub fn declare(url: &str, tag: &str) -> Result<RunBroker, String> {
        let name = format!("file_watcher_bench_{tag}");
        let (connection, channel) = connect(url)?;
        // As the daemon declares it: another declaration would make the daemon's fail.
        let as_the_daemon_does = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        step(
            "declare the exchange",
            channel.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                as_the_daemon_does,
                FieldTable::default(),
            ),
        )?;
        let broker = RunBroker {
            url: url.to_owned(),
            exchange: name.clone(),
            queue: name.clone(),
            removed: false,
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongUInt(10 * 60 * 1000));
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        step(
            "declare the queue",
            channel.queue_declare(name.as_str().into(), durable, arguments),
        )?;
        step(
            "bind the queue",
            channel.queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "file.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )?;
        let _ = step("close", connection.close(200, "declared".into()));
        Ok(broker)
    }

    /// Starts a thread that consumes the queue (without acks, so the reader
    /// never holds the broker back) into `arrivals`.
    pub fn read_into(&self, arrivals: Arc<Watched<Arrivals>>) -> Result<QueueReader, String> {
        let (connection, channel) = connect(&self.url)?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = step(
            "start consuming",
            channel.basic_consume(
                self.queue.as_str().into(),
                "bench".into(),
                no_ack,
                FieldTable::default(),
            ),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("queue-reader".into())
            .spawn(move || {
                let mut consumer = consumer;
                let result = loop {
                    if stopping.load(Ordering::Relaxed) {
                        break Ok(());
                    }
                    match by(Instant::now() + READER_POLL, consumer.next()) {
                        None => continue, // quiet: look at the stop flag again
                        Some(None) => break Err("the broker cancelled the consumer".to_owned()),
                        Some(Some(Err(error))) => break Err(format!("reading the queue: {error}")),
                        Some(Some(Ok(delivery))) => {
                            let at = Instant::now();
                            arrivals.update(|arrivals| arrivals.record(&delivery.data, at));
                        }
                    }
                };
                let _ = step("close", connection.close(200, "read".into()));
                drop(channel);
                result
            })
            .map_err(|error| format!("start the queue reader: {error}"))?;
        Ok(QueueReader {
            stop,
            thread: Some(thread),
        })
    }

    /// Deletes the queue and the exchanges (ours and the `.dlx` the daemon declared).
    pub fn remove(mut self) -> Result<(), String> {
        self.removed = true;
        remove(&self.url, &self.queue, &self.exchange)
    }
}

impl Drop for RunBroker {
    fn drop(&mut self) {
        if !self.removed {
            let _ = remove(&self.url, &self.queue, &self.exchange);
        }
    }
}

fn remove(url: &str, queue: &str, exchange: &str) -> Result<(), String> {
    let (connection, channel) = connect(url)?;
    step(
        "delete the queue",
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
    )?;
    for name in [exchange.to_owned(), format!("{exchange}.dlx")] {
        step(
            "delete an exchange",
            channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()),
        )?;
    }
    let _ = step("close", connection.close(200, "removed".into()));
    Ok(())
}

/// The thread consuming the run's queue; stopped and joined by [`QueueReader::stop`] or on drop.
pub struct QueueReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl QueueReader {
    /// Stops the reader; fails if it had stopped reading on its own (an error).
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the queue reader panicked".to_owned()),
            None => Ok(()),
        }
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Messages published together (at most): the daemon's batch (`BATCH`).
const PUBLISH_GROUP: usize = 256;

/// Publishes `bodies` to `exchange` as the daemon does (persistent,
/// mandatory, routing key `file.created`, the daemon's properties and
/// headers), in groups of up to [`PUBLISH_GROUP`], keeping at most `window`
/// unconfirmed; returns when the first publish started and when the last
/// confirm came. Fails on a nack or a return.
pub fn publish_windowed(
    url: &str,
    exchange: &str,
    bodies: &[Vec<u8>],
    window: usize,
    deadline: Deadline,
) -> Result<(Instant, Instant), String> {
    let (connection, channel) = connect(url)?;
    step(
        "select confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )?;
    let window = window.max(1);
    let publishing = async {
        let started = Instant::now();
        let mut unconfirmed = VecDeque::with_capacity(window);
        // Groups of messages published together, as the daemon publishes a
        // batch: each publish waits until lapin's I/O thread has written its
        // frames, so one at a time would cost two thread switches each.
        // (Order within a group does not matter here; the daemon keeps it.)
        let group_size = PUBLISH_GROUP.min(window);
        for (group, chunk) in bodies.chunks(group_size).enumerate() {
            while unconfirmed.len() + chunk.len() > window {
                let oldest = unconfirmed.pop_front().expect("the window is not empty");
                acked(oldest.await)?;
            }
            let publishes = chunk.iter().enumerate().map(|(offset, body)| {
                channel.basic_publish(
                    exchange.into(),
                    "file.created".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties(group * group_size + offset),
                )
            });
            for confirm in futures_util::future::join_all(publishes).await {
                unconfirmed.push_back(confirm.map_err(|error| format!("publish: {error}"))?);
            }
        }
        while let Some(confirm) = unconfirmed.pop_front() {
            acked(confirm.await)?;
        }
        Ok::<_, String>((started, Instant::now()))
    };
    let times = until("publish and confirm", deadline.instant(), publishing)?;
    let _ = step("close", connection.close(200, "published".into()));
    times
}

fn acked(confirmation: lapin::Result<Confirmation>) -> Result<(), String> {
    match confirmation.map_err(|error| format!("confirm: {error}"))? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err("a message came back unroutable".to_owned()),
        Confirmation::Nack(_) => Err("the broker nacked a message".to_owned()),
        Confirmation::NotRequested => Err("confirms are not on".to_owned()),
    }
}

/// The daemon's properties and headers (see `publish/broker/confirm.rs`),
/// so each frame is the size the daemon's are.
fn properties(index: usize) -> BasicProperties {
    let long_string = |text: &str| AMQPValue::LongString(LongString::from(text));
    let mut headers = FieldTable::default();
    headers.insert("x-instance-id".into(), long_string("bench-ceiling"));
    headers.insert("x-watched-directory".into(), long_string("/dev/shm/bench/tree"));
    headers.insert("x-event-type".into(), long_string("created"));
    headers.insert("x-schema-version".into(), AMQPValue::LongLongInt(1));
    let id = uuid::Uuid::from_u128(index as u128).to_string();
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.as_str().into())
        .with_correlation_id(id.as_str().into())
        .with_timestamp(1_700_000_000)
        .with_app_id("file-watcher".into())
        .with_type("created".into())
        .with_headers(headers)
}
