//! The publisher: drains the registry's outbox into the sink, in order.
//!
//! One thread, so messages leave in the order they were recorded (which per
//! path is the order things happened). A message is marked published only
//! after the sink confirmed it: stdout after the line was written and flushed,
//! RabbitMQ after the broker's publisher confirm. Anything unconfirmed stays in
//! the outbox and goes out again, with the same `message_id`.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use uuid::Uuid;

use crate::message::Message;
use crate::registry::Registry;

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
}

/// Where messages go.
pub trait Sink: Send {
    /// Delivers `messages` in order and returns the ids the sink confirmed.
    fn deliver(&mut self, messages: &[Message]) -> Result<Vec<Uuid>, SinkError>;
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
        loop {
            let stopping = match wake.recv_timeout(IDLE_POLL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let deadline = stopping.then(|| Instant::now() + final_drain);
            match self.drain(deadline) {
                Ok(()) => failures = 0,
                Err(SinkError::Closed) => return PublisherExit::SinkClosed,
                Err(SinkError::Unavailable(reason)) => {
                    failures += 1;
                    if failures == 1 {
                        log::warn!("cannot publish now: {reason}");
                    }
                    if !stopping {
                        std::thread::sleep(crate::worker::backoff(failures.min(6)));
                    }
                }
            }
            if stopping {
                return PublisherExit::Stopped;
            }
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
                .map_err(|error| SinkError::Unavailable(error.to_string()))?;
            if batch.is_empty() {
                return Ok(());
            }
            let confirmed = self.sink.deliver(&batch)?;
            self.registry
                .mark_published(&confirmed)
                .map_err(|error| SinkError::Unavailable(error.to_string()))?;
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
