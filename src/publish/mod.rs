//! The publisher: drains the registry's outbox into the sink, in order.
//!
//! One thread, so messages leave in the order they were recorded (which per
//! path is the order things happened). A message is marked published only
//! after the sink confirmed it: stdout after the line was written and flushed,
//! RabbitMQ after the broker's publisher confirm. Anything unconfirmed stays in
//! the outbox and goes out again, with the same `message_id`.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use uuid::Uuid;

use crate::message::Message;
use crate::registry::{Health, Registry, RegistryError};
use broker::{Broker, BrokerError, BrokerSettings};

pub mod broker;

/// Messages taken from the outbox per round.
const BATCH: usize = 256;
/// How often the outbox is looked at without a nudge (other instances'
/// leftovers, retries after a broker outage).
const IDLE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The reader of stdout went away: nothing can be delivered any more.
    #[error("stdout is closed")]
    Closed,
    /// Not delivered now; try again later.
    #[error("{0}")]
    Unavailable(String),
    /// Not now, and whoever noticed has already said so (the database is
    /// down, the broker blocked publishing): try again later, quietly.
    #[error("paused: {0}")]
    Paused(String),
}

/// Where messages go.
pub trait Sink: Send {
    /// Delivers `messages` in order and returns the ids the sink confirmed.
    fn deliver(&mut self, messages: &[Message]) -> Result<Vec<Uuid>, SinkError>;

    /// Gets ready to deliver (connects), so problems show at start rather
    /// than with the first file.
    fn prepare(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// True when delivering needs no new connection. The final drain at
    /// shutdown delivers only through a connection that is already open, so
    /// stopping is never held up by a connect attempt.
    fn is_connected(&self) -> bool {
        true
    }

    /// How long to wait before the next delivery is worth trying (a
    /// reconnect backoff); zero when the sink is ready.
    fn wait_hint(&self) -> Duration {
        Duration::ZERO
    }
}

/// One JSON object per line on stdout, flushed per line (`file-watcher dir | jq`).
pub struct StdoutSink {
    out: io::Stdout,
}

impl StdoutSink {
    pub fn new() -> StdoutSink {
        StdoutSink { out: io::stdout() }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new()
    }
}

impl Sink for StdoutSink {
    fn deliver(&mut self, messages: &[Message]) -> Result<Vec<Uuid>, SinkError> {
        let mut out = self.out.lock();
        let mut delivered = Vec::with_capacity(messages.len());
        for message in messages {
            let mut line = message.to_json();
            line.push(b'\n');
            match out.write_all(&line).and_then(|()| out.flush()) {
                Ok(()) => delivered.push(message.message_id),
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Err(SinkError::Closed),
                Err(error) => return Err(SinkError::Unavailable(format!("cannot write to stdout: {error}"))),
            }
        }
        Ok(delivered)
    }
}

pub struct Publisher {
    pub registry: Arc<dyn Registry>,
    pub sink: Box<dyn Sink>,
    /// Registry outages are reported there (once), not by the publisher.
    pub health: Arc<Health>,
}

/// Why the publisher stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum PublisherExit {
    /// Asked to stop (the wake channel closed).
    Stopped,
    /// The sink can never deliver again (stdout closed).
    SinkClosed,
}

impl Publisher {
    /// Runs until `wake` disconnects (then drains for at most `final_drain`)
    /// or the sink closes for good.
    pub fn run(mut self, wake: Receiver<()>, final_drain: Duration) -> PublisherExit {
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        if let Err(SinkError::Unavailable(reason)) = self.sink.prepare() {
            failures = 1;
            log::warn!("cannot publish now, messages wait in the outbox: {reason}");
        }
        loop {
            let now = Instant::now();
            let hint = self.sink.wait_hint();
            let not_before = retry_at.into_iter().chain(Some(now + hint)).max().unwrap_or(now);
            let wait = if not_before > now {
                not_before - now
            } else {
                IDLE_POLL
            };
            let stopping = match wake.recv_timeout(wait) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            if !stopping && Instant::now() < not_before {
                continue; // nudged during a backoff: the backoff still holds
            }
            if stopping && !self.sink.is_connected() {
                log::info!("not connected to the sink: unpublished messages stay in the outbox");
                return PublisherExit::Stopped;
            }
            let deadline = stopping.then(|| Instant::now() + final_drain);
            match self.drain(deadline) {
                Ok(()) => {
                    if failures > 0 {
                        log::info!("publishing again after {failures} failed attempts");
                    }
                    failures = 0;
                    retry_at = None;
                }
                Err(SinkError::Closed) => return PublisherExit::SinkClosed,
                Err(SinkError::Paused(reason)) => {
                    log::debug!("publishing paused: {reason}");
                    retry_at = Some(Instant::now() + IDLE_POLL);
                }
                Err(SinkError::Unavailable(reason)) => {
                    failures += 1;
                    if failures == 1 {
                        log::warn!("cannot publish now, messages wait in the outbox: {reason}");
                    } else {
                        log::debug!("publish attempt {failures} failed: {reason}");
                    }
                    retry_at = Some(Instant::now() + crate::worker::backoff(failures.min(6)));
                }
            }
            if stopping {
                return PublisherExit::Stopped;
            }
        }
    }

    /// A registry outage is the health flag's to report; the publisher just waits.
    fn registry_error(&self, error: RegistryError) -> SinkError {
        if error.is_unavailable() {
            self.health.down(&error);
            SinkError::Paused("waiting for the database".into())
        } else {
            SinkError::Unavailable(error.to_string())
        }
    }

    /// Publishes until the outbox is empty (or the deadline passes).
    fn drain(&mut self, deadline: Option<Instant>) -> Result<(), SinkError> {
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(());
            }
            let batch = self
                .registry
                .outgoing(BATCH)
                .map_err(|error| self.registry_error(error))?;
            if batch.is_empty() {
                return Ok(());
            }
            let confirmed = self.sink.deliver(&batch)?;
            self.registry
                .mark_published(&confirmed)
                .map_err(|error| self.registry_error(error))?;
            if confirmed.len() < batch.len() {
                return Err(SinkError::Unavailable(format!(
                    "{} of {} messages were not confirmed",
                    batch.len() - confirmed.len(),
                    batch.len()
                )));
            }
        }
    }
}

/// RabbitMQ through [`Broker`]: one connection and one confirm channel, made
/// and remade by this sink's own reconnect loop (lapin's automatic recovery is
/// not used: it would hide which messages were confirmed).
pub struct BrokerSink {
    settings: BrokerSettings,
    broker: Option<Broker>,
    /// Consecutive failed connects, for the capped, jittered backoff.
    failed_connects: u32,
    next_connect: Instant,
    /// A `connection.blocked` was reported and not yet lifted.
    blocked: bool,
    pub unroutable: Arc<AtomicU64>,
}

impl BrokerSink {
    pub fn new(settings: BrokerSettings) -> BrokerSink {
        BrokerSink {
            settings,
            broker: None,
            failed_connects: 0,
            next_connect: Instant::now(),
            blocked: false,
            unroutable: Arc::new(AtomicU64::new(0)),
        }
    }

    fn connected(&mut self) -> Result<&mut Broker, SinkError> {
        if self.broker.as_ref().is_some_and(|broker| !broker.is_usable()) {
            log::warn!("lost the RabbitMQ connection; reconnecting");
            self.broker = None;
        }
        if self.broker.is_none() {
            if Instant::now() < self.next_connect {
                return Err(SinkError::Unavailable("waiting to reconnect to RabbitMQ".into()));
            }
            match Broker::connect(&self.settings) {
                Ok(broker) => {
                    if self.failed_connects > 0 {
                        log::info!(
                            "connected to RabbitMQ again after {} attempts",
                            self.failed_connects
                        );
                    }
                    self.failed_connects = 0;
                    self.broker = Some(broker);
                }
                Err(error) => {
                    self.failed_connects += 1;
                    self.next_connect = Instant::now() + crate::worker::backoff(self.failed_connects.min(6));
                    return Err(SinkError::Unavailable(error_chain(&error)));
                }
            }
        }
        Ok(self.broker.as_mut().expect("connected above"))
    }
}

impl Sink for BrokerSink {
    fn prepare(&mut self) -> Result<(), SinkError> {
        self.connected().map(|_| ())
    }

    fn deliver(&mut self, messages: &[Message]) -> Result<Vec<Uuid>, SinkError> {
        let broker = self.connected()?;
        if broker.is_blocked() {
            // The broker module warned once, with the broker's reason.
            self.blocked = true;
            return Err(SinkError::Paused("RabbitMQ blocked publishing".into()));
        }
        if std::mem::take(&mut self.blocked) {
            log::info!("RabbitMQ unblocked publishing; resuming");
        }
        let broker = self.broker.as_mut().expect("connected above");
        match broker.publish(messages) {
            Ok(published) => {
                if published.unroutable > 0 {
                    self.unroutable
                        .fetch_add(published.unroutable as u64, Ordering::Relaxed);
                }
                // Keep the recorded order: stop at the first message the broker refused.
                let acked: HashSet<Uuid> = published.acked.into_iter().collect();
                let confirmed: Vec<Uuid> = messages
                    .iter()
                    .map(|message| message.message_id)
                    .take_while(|id| acked.contains(id))
                    .collect();
                Ok(confirmed)
            }
            Err(BrokerError::Blocked { .. }) => {
                self.blocked = true;
                Err(SinkError::Paused("RabbitMQ blocked publishing".into()))
            }
            Err(error) => {
                if let Some(broker) = self.broker.take() {
                    broker.close();
                }
                Err(SinkError::Unavailable(error_chain(&error)))
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.broker
            .as_ref()
            .is_some_and(|broker| broker.is_usable() && !broker.is_blocked())
    }

    fn wait_hint(&self) -> Duration {
        if self.broker.is_none() {
            self.next_connect.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        }
    }
}

/// An error and its causes on one line ("cannot connect …: Connection refused").
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
