//! The RabbitMQ sink: [`Broker`] seen through the publisher's [`Sink`].
//!
//! The broker answers per message (acked, nacked, returned); the publisher
//! needs "these were confirmed, in recorded order", so the answer is cut at
//! the first message that was not acked. The sink also owns what a single
//! `Broker` deliberately does not: reconnecting with backoff after a failure,
//! and waiting (not reconnecting) while RabbitMQ blocks publishing.
//!
//! A nack is not the message's fault (a queue full with `reject-publish`, an
//! internal error): it is retried. A message RabbitMQ will never take (larger
//! than its `max_message_size`) is refused differently: the broker closes
//! the channel with 406 PRECONDITION_FAILED, and the rest of the batch fails
//! with it (messages sent after it see only a closed channel), so which
//! message it was is not known. So when the broker closes the channel over a
//! batch, the sink publishes the same batch again one message at a time on a
//! fresh connection; a message whose lone publish is refused with 406 is the
//! one, and goes back to the publisher as [`Refused`] to be set aside.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::broker::{Broker, BrokerError, BrokerSettings, Published, Sent};
use super::{Delivery, PublishCounters, Refused, Sink, SinkError, Window};
use crate::logging;
use crate::message::Encoded;

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
    /// The broker refused one message of the last batch (see the module
    /// docs): publish one message at a time until that message is found, or
    /// until a whole batch went out that way.
    one_at_a_time: bool,
    /// Returned (unroutable), nacked and reconnect counts, for the metrics;
    /// each unroutable message is also logged.
    counters: Arc<PublishCounters>,
    /// Set by the first successful connect: later ones are reconnects.
    connected_once: bool,
    /// Batches sent through the window, oldest first, with their confirms
    /// still to come. All on the current connection: a new one starts empty.
    in_flight: VecDeque<(Vec<Encoded>, Sent)>,
}

impl BrokerSink {
    pub fn new(settings: BrokerSettings) -> BrokerSink {
        BrokerSink {
            settings,
            broker: None,
            failed_connects: 0,
            next_connect: Instant::now(),
            blocked: false,
            one_at_a_time: false,
            counters: Arc::default(),
            connected_once: false,
            in_flight: VecDeque::new(),
        }
    }

    /// Counts into `counters` (the publisher's) instead of a set of its own.
    pub fn counting(mut self, counters: Arc<PublishCounters>) -> BrokerSink {
        self.counters = counters;
        self
    }

    fn connected(&mut self) -> Result<&mut Broker, SinkError> {
        if self.broker.as_ref().is_some_and(|broker| !broker.is_usable()) {
            log::warn!(target: LOG_TARGET, "lost the RabbitMQ connection; reconnecting");
            self.broker = None;
            self.in_flight.clear();
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
                    if std::mem::replace(&mut self.connected_once, true) {
                        self.counters.broker_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
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

    /// Closes the connection after a failed batch; the next call connects
    /// again. Whatever was in flight on it is forgotten: its fate is unknown.
    fn drop_connection(&mut self) {
        self.in_flight.clear();
        if let Some(broker) = self.broker.take() {
            broker.close();
        }
    }

    /// The confirmed prefix of `messages`, counting unroutable ones.
    fn confirmed(&mut self, messages: &[Encoded], published: Published) -> Vec<Uuid> {
        let counters = &self.counters;
        counters
            .returned
            .fetch_add(published.unroutable as u64, Ordering::Relaxed);
        counters
            .nacked
            .fetch_add(published.nacked.len() as u64, Ordering::Relaxed);
        // Keep the recorded order: stop at the first message the broker did not ack.
        let acked: HashSet<Uuid> = published.acked.into_iter().collect();
        messages
            .iter()
            .map(|message| message.message_id)
            .take_while(|id| acked.contains(id))
            .collect()
    }

    /// Publishes `messages` one by one, each alone on the channel, so that a
    /// refusal names its message. Stops at the first message not confirmed.
    fn deliver_one_at_a_time(&mut self, messages: &[Encoded]) -> Result<Delivery, SinkError> {
        let mut delivery = Delivery::default();
        for message in messages {
            let outcome = match self.connected() {
                Ok(broker) => broker.publish(std::slice::from_ref(message)),
                Err(error) if delivery.confirmed.is_empty() => return Err(error),
                Err(_) => return Ok(delivery),
            };
            match outcome {
                Ok(published) => {
                    let confirmed = self.confirmed(std::slice::from_ref(message), published);
                    if confirmed.is_empty() {
                        return Ok(delivery); // nacked: retried later, like any nack
                    }
                    delivery.confirmed.extend(confirmed);
                }
                Err(BrokerError::Blocked { .. }) => {
                    self.blocked = true;
                    if delivery.confirmed.is_empty() {
                        return Err(SinkError::Paused("RabbitMQ blocked publishing".into()));
                    }
                    return Ok(delivery);
                }
                Err(error) => {
                    self.drop_connection();
                    if let Some(reason) = error.refusal() {
                        self.one_at_a_time = false;
                        delivery.refused = Some(Refused {
                            message_id: message.message_id,
                            reason: format!("RabbitMQ refused it: {reason}"),
                        });
                        return Ok(delivery);
                    }
                    if delivery.confirmed.is_empty() {
                        return Err(SinkError::Unavailable(logging::error_chain(&error)));
                    }
                    return Ok(delivery);
                }
            }
        }
        // The whole batch went out: whatever was refused is no longer in it.
        self.one_at_a_time = false;
        Ok(delivery)
    }

    /// A connected broker that is not blocked, or why not. Says once that a
    /// block was lifted.
    fn ready(&mut self) -> Result<&mut Broker, SinkError> {
        let broker = self.connected()?;
        if broker.is_blocked() {
            // The broker module warned once, with the broker's reason.
            self.blocked = true;
            return Err(SinkError::Paused("RabbitMQ blocked publishing".into()));
        }
        if std::mem::take(&mut self.blocked) {
            log::info!(target: LOG_TARGET, "RabbitMQ unblocked publishing; resuming");
        }
        Ok(self.broker.as_mut().expect("connected above"))
    }

    /// The part of a failed publish that does not depend on how it was
    /// sent. Blocked by the broker: `Err(Paused)`, and the connection is
    /// kept. Otherwise the connection is dropped, and the answer says
    /// whether the broker closed the channel over a message it refuses
    /// rather than the connection failing.
    fn after_failure(&mut self, error: &BrokerError) -> Result<bool, SinkError> {
        if let BrokerError::Blocked { .. } = error {
            self.blocked = true;
            return Err(SinkError::Paused("RabbitMQ blocked publishing".into()));
        }
        let channel_closed = self.broker.as_ref().is_some_and(Broker::channel_closed_by_broker);
        self.drop_connection();
        Ok(channel_closed || error.refusal().is_some())
    }

    /// What a failed publish of `messages` (sent, or being confirmed) means
    /// for them: the broker blocked us (wait), closed the channel over one
    /// message it refuses (find it, one message at a time), or the outcome
    /// is unknown (an outage: they are sent again later).
    fn failed(&mut self, messages: &[Encoded], error: BrokerError) -> Result<Delivery, SinkError> {
        if self.after_failure(&error)? && messages.len() > 1 {
            // Not an outage: look for the message at once, on a new connection.
            log::warn!(
                target: LOG_TARGET,
                "RabbitMQ closed the channel over a batch of {} messages; \
                 publishing them one at a time to find one it refuses",
                messages.len()
            );
            self.one_at_a_time = true;
            return self.deliver_one_at_a_time(messages);
        }
        match error.refusal() {
            Some(reason) => Ok(Delivery {
                confirmed: Vec::new(),
                refused: Some(Refused {
                    message_id: messages[0].message_id,
                    reason: format!("RabbitMQ refused it: {reason}"),
                }),
            }),
            None => Err(SinkError::Unavailable(logging::error_chain(&error))),
        }
    }
}

impl Sink for BrokerSink {
    fn prepare(&mut self) -> Result<(), SinkError> {
        self.connected().map(|_| ())
    }

    fn deliver(&mut self, messages: &[Encoded]) -> Result<Delivery, SinkError> {
        self.ready()?;
        if self.one_at_a_time {
            return self.deliver_one_at_a_time(messages);
        }
        let broker = self.broker.as_mut().expect("ready above");
        match broker.publish(messages) {
            Ok(published) => Ok(Delivery::confirmed(self.confirmed(messages, published))),
            Err(error) => self.failed(messages, error),
        }
    }

    /// Batches go out through the window, except while looking for a
    /// message the broker refuses: that takes one message at a time.
    fn window(&mut self) -> Option<&mut dyn Window> {
        if self.one_at_a_time {
            return None;
        }
        Some(self)
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

impl Window for BrokerSink {
    fn send(&mut self, batch: Vec<Encoded>) -> Result<(), SinkError> {
        // A connection lost under batches in flight is not quietly replaced:
        // their fate is unknown, and the publisher must start over from them.
        if !self.in_flight.is_empty() && !self.broker.as_ref().is_some_and(Broker::is_usable) {
            self.in_flight.clear();
            return Err(SinkError::Unavailable(
                "lost the RabbitMQ connection with messages unconfirmed".into(),
            ));
        }
        let sent = match self.ready() {
            Ok(broker) => broker.send(&batch),
            Err(error) => {
                self.in_flight.clear();
                return Err(error);
            }
        };
        match sent {
            Ok(sent) => {
                self.in_flight.push_back((batch, sent));
                Ok(())
            }
            Err(error) => Err(self.window_failed(error)),
        }
    }

    fn confirm_oldest(&mut self) -> Option<Result<(Vec<Encoded>, Delivery), SinkError>> {
        let (batch, sent) = self.in_flight.pop_front()?;
        let Some(broker) = self.broker.as_mut() else {
            self.in_flight.clear();
            return Some(Err(SinkError::Unavailable("lost the RabbitMQ connection".into())));
        };
        Some(match broker.confirms(sent) {
            Ok(published) => {
                let delivery = Delivery::confirmed(self.confirmed(&batch, published));
                Ok((batch, delivery))
            }
            Err(error) => Err(self.window_failed(error)),
        })
    }

    fn forget(&mut self) {
        self.in_flight.clear();
    }
}

impl BrokerSink {
    /// What a failed send or confirm means for the window: everything in
    /// flight is of unknown fate. If the broker closed the channel (over a
    /// message it refuses, most likely), the sink goes one message at a time
    /// ([`Sink::window`] says `None`) until the message is found.
    fn window_failed(&mut self, error: BrokerError) -> SinkError {
        self.in_flight.clear();
        let refused = match self.after_failure(&error) {
            Ok(refused) => refused,
            Err(paused) => return paused,
        };
        if refused {
            log::warn!(
                target: LOG_TARGET,
                "RabbitMQ closed the channel with messages unconfirmed; \
                 publishing them one at a time to find one it refuses"
            );
            self.one_at_a_time = true;
        }
        SinkError::Unavailable(logging::error_chain(&error))
    }
}
