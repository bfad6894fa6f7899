//! The RabbitMQ sink: [`Broker`] seen through the publisher's [`Sink`].
//!
//! The broker answers per message (acked, nacked, returned); the publisher
//! needs "these were confirmed, in recorded order", so the answer is cut at
//! the first message that was not acked. The sink also owns what a single
//! `Broker` deliberately does not: reconnecting with backoff after a failure,
//! and waiting (not reconnecting) while RabbitMQ blocks publishing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::broker::{Broker, BrokerError, BrokerSettings};
use super::{Sink, SinkError};
use crate::logging;
use crate::message::Message;

/// The log target these lines had before the layout move, kept so that log
/// lines (and anyone's filters on them) stay the same.
const LOG_TARGET: &str = "file_watcher::publish";

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
    /// Messages the broker accepted but could route to no queue, over the
    /// life of the process (each one was also logged). Nothing in the daemon
    /// reads it yet: the metrics issue (#10) exports it as the returned
    /// (unroutable) count.
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
            log::warn!(target: LOG_TARGET, "lost the RabbitMQ connection; reconnecting");
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
                            target: LOG_TARGET,
                            "connected to RabbitMQ again after {} attempts",
                            self.failed_connects
                        );
                    }
                    self.failed_connects = 0;
                    self.broker = Some(broker);
                }
                Err(error) => {
                    self.failed_connects += 1;
                    self.next_connect = Instant::now() + crate::backoff::RETRY.delay(self.failed_connects);
                    return Err(SinkError::Unavailable(logging::error_chain(&error)));
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
            log::info!(target: LOG_TARGET, "RabbitMQ unblocked publishing; resuming");
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
                Err(SinkError::Unavailable(logging::error_chain(&error)))
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
