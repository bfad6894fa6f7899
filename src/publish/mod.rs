//! The publisher: drains the registry's outbox into the sink, in order.
//!
//! One thread, so messages leave in the order they were recorded (which per
//! path is the order things happened). A message is marked published only
//! after the sink confirmed it: stdout after the line was written and flushed,
//! RabbitMQ after the broker's publisher confirm. Anything unconfirmed stays in
//! the outbox and goes out again, with the same `message_id` — unless the
//! sink refuses that one message for good (RabbitMQ: larger than its
//! `max_message_size`): then the registry sets it aside and the rest goes on.
//!
//! The sinks live beside it: [`stdout`] writes JSON lines, [`rabbitmq`] is
//! the sink over [`broker`], which owns the lapin connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use uuid::Uuid;

use crate::message::Encoded;
use crate::registry::{Health, Registry, RegistryError};

pub mod stdout;
pub mod rabbitmq;
pub mod broker;
mod window;

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

/// What a sink did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Confirmed, in the batch's order: a prefix of it.
    pub confirmed: Vec<Uuid>,
    /// The message right after `confirmed`, which the sink refuses for good:
    /// sending it again would fail the same way.
    pub refused: Option<Refused>,
}

impl Delivery {
    /// These were confirmed and nothing was refused.
    pub fn confirmed(confirmed: Vec<Uuid>) -> Delivery {
        Delivery {
            confirmed,
            refused: None,
        }
    }
}

/// A message the sink will never take, and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub message_id: Uuid,
    pub reason: String,
}

/// Where messages go.
pub trait Sink: Send {
    /// Delivers `messages` in order: says which the sink confirmed, and which
    /// one (if any) it refuses for good.
    fn deliver(&mut self, messages: &[Encoded]) -> Result<Delivery, SinkError>;

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

    /// The sink's window, when it can keep several batches unconfirmed at
    /// once (RabbitMQ); `None` when each batch is delivered before the next
    /// (stdout), or for now (RabbitMQ looking for a message it refuses).
    fn window(&mut self) -> Option<&mut dyn Window> {
        None
    }
}

/// Batches sent and not yet confirmed, so that the sink never idles while
/// the publisher waits for confirms or the registry (see [`window`]).
pub trait Window {
    /// Sends `batch` after those already in flight, without waiting for
    /// its confirms. On `Err` nothing in flight is known any more: the
    /// window is empty, and everything in it is to be sent again.
    fn send(&mut self, batch: Vec<Encoded>) -> Result<(), SinkError>;

    /// Waits for the oldest batch in flight and gives it back with what the
    /// sink did with it (a confirmed prefix, as [`Sink::deliver`] says);
    /// `None` when nothing is in flight. On `Err` the window is empty.
    fn confirm_oldest(&mut self) -> Option<Result<(Vec<Encoded>, Delivery), SinkError>>;

    /// Stops waiting for every batch in flight; they are to be sent again.
    fn forget(&mut self);
}

pub struct Publisher {
    pub registry: Arc<dyn Registry>,
    pub sink: Box<dyn Sink>,
    /// Registry outages are reported there (once), not by the publisher.
    pub health: Arc<Health>,
    /// What the metrics read; shared with the sink.
    pub counters: Arc<PublishCounters>,
}

/// The publisher's and the sink's counts, read by the metrics (atomics only:
/// bumped once per batch or per message, never locked).
#[derive(Debug, Default)]
pub struct PublishCounters {
    /// Messages handed to the sink (retries counted again).
    pub published: AtomicU64,
    /// Messages the sink confirmed and the outbox let go.
    pub confirmed: AtomicU64,
    /// Messages the broker nacked (retried later).
    pub nacked: AtomicU64,
    /// Messages the broker returned as unroutable (then acked).
    pub returned: AtomicU64,
    /// Messages set aside as never publishable.
    pub set_aside: AtomicU64,
    /// Rounds that failed to publish (sink unavailable).
    pub failures: AtomicU64,
    /// Successful connects to the broker after the first.
    pub broker_reconnects: AtomicU64,
    /// Whether the sink could deliver at the publisher's last loop turn.
    pub sink_connected: AtomicBool,
    /// The publisher's last loop turn, as [`crate::observe::health::stamp`].
    pub alive: AtomicU64,
    /// From a confirmed file's last write (its mtime) to its confirm.
    pub latency: crate::observe::metrics::Histogram,
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
    ///
    /// "Publishing again" is said once a message has gone out after failed
    /// attempts, and only then: a round that found the outbox empty proves
    /// nothing about the sink. While the sink is away (or its connection was
    /// lost) and there is nothing to publish, each round tries to reach it,
    /// so the sink reports the end of an outage even while the tree is quiet.
    pub fn run(mut self, wake: Receiver<()>, final_drain: Duration) -> PublisherExit {
        // Failed attempts (to connect or to deliver) since the last delivery.
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        if let Err(SinkError::Unavailable(reason)) = self.sink.prepare() {
            failures = 1;
            log::warn!("cannot publish now, messages wait in the outbox: {reason}");
        }
        loop {
            let counters = &self.counters;
            counters
                .alive
                .store(crate::observe::health::stamp(), Ordering::Relaxed);
            let connected = self.sink.is_connected();
            counters.sink_connected.store(connected, Ordering::Relaxed);
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
            // A connection lost while idle is made again at once, so that
            // `/readyz` (and the first message after) need not wait for it.
            match self.drain(&wake, deadline, failures > 0 || !connected) {
                Ok(published) => {
                    if published > 0 {
                        if failures > 0 {
                            log::info!("publishing again after {}", attempts(failures));
                        }
                        failures = 0;
                    }
                    retry_at = None;
                }
                Err(SinkError::Closed) => return PublisherExit::SinkClosed,
                Err(SinkError::Paused(reason)) => {
                    log::debug!("publishing paused: {reason}");
                    retry_at = Some(Instant::now() + IDLE_POLL);
                }
                Err(SinkError::Unavailable(reason)) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    if failures == 1 {
                        log::warn!("cannot publish now, messages wait in the outbox: {reason}");
                    } else {
                        log::debug!("publish attempt {failures} failed: {reason}");
                    }
                    retry_at = Some(Instant::now() + crate::backoff::RETRY.delay(failures));
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

    /// Publishes until the outbox is empty (or the deadline passes); returns
    /// how many messages the sink confirmed. With `reach_sink` (the last
    /// attempts failed), an empty outbox is the moment to try to reach a
    /// sink that is not connected. `wake` carries the workers' nudges, which
    /// tell the window whether reading the outbox again can find anything.
    fn drain(
        &mut self,
        wake: &Receiver<()>,
        deadline: Option<Instant>,
        reach_sink: bool,
    ) -> Result<usize, SinkError> {
        let mut published = 0;
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(published);
            }
            if self.sink.window().is_some() {
                match self.drain_window(wake, deadline, &mut published) {
                    Ok(window::Drained::Empty) => return self.drained(published, deadline, reach_sink),
                    Ok(window::Drained::Deadline) => return Ok(published),
                    // The broker closed the channel over the window: find the
                    // message it refuses, one at a time, at once.
                    Err(SinkError::Unavailable(_)) if self.sink.window().is_none() => continue,
                    Err(error) => return Err(error),
                }
            }
            let batch = self
                .registry
                .outgoing(BATCH)
                .map_err(|error| self.registry_error(error))?;
            if batch.is_empty() {
                return self.drained(published, deadline, reach_sink);
            }
            self.counters
                .published
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let Delivery { confirmed, refused } = self.sink.deliver(&batch)?;
            self.registry
                .mark_published(&confirmed)
                .map_err(|error| self.registry_error(error))?;
            published += confirmed.len();
            self.count_confirmed(&batch[..confirmed.len()]);
            if let Some(refused) = refused {
                // Out of the way, so the messages behind it go next round.
                self.set_aside(refused)?;
                continue;
            }
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

impl Publisher {
    /// The outbox is empty, after `published` messages. With `reach_sink`
    /// (the last attempts failed) and nothing published, this is the moment
    /// to try to reach a sink that is not connected.
    fn drained(
        &mut self,
        published: usize,
        deadline: Option<Instant>,
        reach_sink: bool,
    ) -> Result<usize, SinkError> {
        if reach_sink && published == 0 && deadline.is_none() && !self.sink.is_connected() {
            self.sink.prepare()?;
        }
        Ok(published)
    }

    /// Sets aside a message the sink refuses for good, and counts it.
    fn set_aside(&self, Refused { message_id, reason }: Refused) -> Result<(), SinkError> {
        self.counters.set_aside.fetch_add(1, Ordering::Relaxed);
        self.registry
            .set_aside(message_id, &reason)
            .map_err(|error| self.registry_error(error))
    }

    /// Counts `confirmed` (the batch's confirmed prefix) and their latency
    /// from the file's last write; deletions carry no mtime and are not
    /// timed. One clock read and one parse per message, on this thread only.
    fn count_confirmed(&self, confirmed: &[Encoded]) {
        self.counters
            .confirmed
            .fetch_add(confirmed.len() as u64, Ordering::Relaxed);
        let now = SystemTime::now();
        for message in confirmed {
            let Some(content) = &message.content else { continue };
            if let Ok(written) = humantime::parse_rfc3339(&content.modified_time) {
                let seconds = now.duration_since(written).unwrap_or_default().as_secs_f64();
                self.counters.latency.observe(seconds);
            }
        }
    }
}

/// "1 failed attempt", "3 failed attempts".
fn attempts(count: u32) -> String {
    match count {
        1 => "1 failed attempt".to_owned(),
        _ => format!("{count} failed attempts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Origin;
    use crate::registry::memory::MemoryRegistry;
    use crate::registry::{Applied, Change, Observed, Stat};

    /// Confirms every message up to the one it refuses.
    struct Refusing {
        refuse: Uuid,
    }

    impl Sink for Refusing {
        fn deliver(&mut self, messages: &[Encoded]) -> Result<Delivery, SinkError> {
            let mut delivery = Delivery::default();
            for message in messages {
                if message.message_id == self.refuse {
                    delivery.refused = Some(Refused {
                        message_id: message.message_id,
                        reason: "too large".into(),
                    });
                    break;
                }
                delivery.confirmed.push(message.message_id);
            }
            Ok(delivery)
        }
    }

    /// A registry holding one `created` message per name, in order.
    fn registry_with(dir: &std::path::Path, names: &[&str]) -> (Arc<MemoryRegistry>, Vec<Uuid>) {
        let registry = Arc::new(MemoryRegistry::new(Origin {
            instance_id: "test".into(),
            watched_directory: dir.to_str().unwrap().into(),
        }));
        let mut ids = Vec::new();
        for name in names {
            let path = dir.join(name);
            std::fs::write(&path, name).unwrap();
            let observed = Observed {
                path: path.to_str().unwrap().into(),
                stat: Stat::of(&path).unwrap().unwrap(),
                sha256: (*name).into(),
                xxh128: (*name).into(),
            };
            let change = Change::Present {
                observed,
                renamed_from: None,
            };
            match registry.apply(&change, Uuid::new_v4()).unwrap() {
                Applied::Recorded(messages) => ids.extend(messages.iter().map(|m| m.message_id)),
                Applied::Changed => panic!("the file did not change"),
            }
        }
        (registry, ids)
    }

    #[test]
    fn a_refused_message_is_set_aside_and_the_rest_go_out() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, ids) = registry_with(dir.path(), &["a.flac", "b.flac", "c.flac"]);
        let mut publisher = Publisher {
            registry: registry.clone(),
            sink: Box::new(Refusing { refuse: ids[1] }),
            health: Arc::new(Health::default()),
            counters: Arc::default(),
        };
        let (_nudge, wake) = crossbeam_channel::bounded(1);
        assert_eq!(publisher.drain(&wake, None, false).unwrap(), 2);
        assert!(registry.outgoing(10).unwrap().is_empty());
    }

    #[test]
    fn plural_only_for_several_attempts() {
        assert_eq!(attempts(1), "1 failed attempt");
        assert_eq!(attempts(3), "3 failed attempts");
    }
}
