//! Publishing under publisher confirms: send a batch, wait for every
//! confirm, then read what the broker said about each message.
//!
//! Pipelined: every message is sent before the first confirm is awaited, so
//! a batch costs about one round trip; and sending ([`Broker::send`]) is
//! apart from waiting ([`Broker::confirms`]), so that the publisher can keep
//! several batches unconfirmed on the channel at once. The whole batch is bounded by the
//! confirm timeout, stretched by the time its bytes take on a slow link
//! ([`SLOWEST_LINK_BYTES_PER_SECOND`]): a large message must not time out,
//! and be retried forever, for its size alone.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use log::{debug, warn};
use uuid::Uuid;

use super::{block_on_until, Broker, BrokerError, APP_ID, LOG_TARGET};
use crate::message::{Encoded, Message};

/// The slowest link a batch is expected to cross (4 MiB/s, about 32 Mbit/s):
/// a batch may take the confirm timeout plus its size at this rate. Batches
/// of ordinary messages (a few hundred bytes each) gain a millisecond or so.
pub const SLOWEST_LINK_BYTES_PER_SECOND: u64 = 4 * 1024 * 1024;

/// What the broker said about one batch. Only `acked` messages are published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Acked by the broker: the broker has taken responsibility for them.
    /// Includes unroutable messages, which the broker acks after returning them.
    pub acked: Vec<Uuid>,
    /// Refused by the broker (an internal broker error); publish them again.
    pub nacked: Vec<Uuid>,
    /// How many messages matched no binding and were returned: they were
    /// accepted, but nobody will read them. Logged as warnings, one per message.
    pub unroutable: usize,
}

/// A batch on the wire: every message sent, their confirms still to come.
/// [`Broker::confirms`] waits for them. Several may be outstanding at once
/// (the publisher's window); their confirms arrive in the order sent.
pub struct Sent {
    pending: Vec<(Uuid, PublisherConfirm)>,
    started: Instant,
    /// The confirm timeout from `started`, stretched by the batch's bytes.
    deadline: Instant,
}

impl Broker {
    /// Publishes every message (mandatory, persistent) and waits for all of
    /// their confirms, within `confirm_timeout` plus the time the batch's
    /// bytes take at [`SLOWEST_LINK_BYTES_PER_SECOND`]. Pipelined: all messages are sent before the
    /// first confirm is awaited, so a batch costs about one round trip.
    ///
    /// An `Err` means the outcome of the batch is unknown (some messages may
    /// have been acked); the caller publishes the whole batch again on a new
    /// connection, and consumers may see duplicates with the same `message_id`.
    pub fn publish(&mut self, messages: &[Encoded]) -> Result<Published, BrokerError> {
        let sent = self.send(messages)?;
        self.confirms(sent)
    }

    /// Sends every message (mandatory, persistent) without waiting for a
    /// confirm; [`Broker::confirms`] waits for them. Sending is bounded by
    /// the same deadline as the confirms. An `Err` leaves the fate of this
    /// batch, and of every batch sent before it and not yet confirmed,
    /// unknown, as for [`Broker::publish`].
    pub fn send(&mut self, messages: &[Encoded]) -> Result<Sent, BrokerError> {
        self.check_ready()?;
        let bytes = messages.iter().map(|message| message.json().len()).sum();
        let started = Instant::now();
        let deadline = started + self.confirm_timeout + transfer_allowance(bytes);
        let sending = send(&self.channel, &self.exchange, messages, self.replay.as_deref());
        match block_on_until(deadline, sending) {
            Some(Ok(pending)) => Ok(Sent {
                pending,
                started,
                deadline,
            }),
            Some(Err(error)) => {
                self.abandoned = true;
                Err(error)
            }
            None => Err(self.timed_out(started, messages.len(), 0)),
        }
    }

    /// Waits for the confirms of `sent`, until its deadline, and reads what
    /// the broker said about each message.
    pub fn confirms(&mut self, sent: Sent) -> Result<Published, BrokerError> {
        let Sent {
            pending,
            started,
            deadline,
        } = sent;
        let total = pending.len();
        let confirmed = Cell::new(0usize);
        match block_on_until(deadline, await_confirms(pending, &self.exchange, &confirmed)) {
            Some(Ok(confirmations)) => {
                let published = self.read_confirmations(confirmations);
                debug!(
                    target: LOG_TARGET,
                    "published {} messages to exchange {} in {} ms ({} nacked, {} unroutable)",
                    published.acked.len(),
                    self.exchange,
                    started.elapsed().as_millis(),
                    published.nacked.len(),
                    published.unroutable
                );
                Ok(published)
            }
            Some(Err(error)) => {
                self.abandoned = true;
                Err(error)
            }
            None => Err(self.timed_out(started, total, confirmed.get())),
        }
    }

    /// The deadline of a batch passed with `confirmed` of its `total`
    /// messages confirmed. If the broker stopped reading from us (memory or
    /// disk alarm), the connection is fine and the batch just waits in it:
    /// keep the connection, and the caller resends what was not confirmed
    /// (same message ids) once the broker unblocks. As a batch is queued in
    /// lapin whole (see `send`), the messages of it that were still queued
    /// go out when the broker unblocks *and* again with the resend:
    /// consumers see those twice, with the same `message_id`. Otherwise the
    /// batch's fate is unknown and the connection is abandoned.
    fn timed_out(&mut self, started: Instant, total: usize, confirmed: usize) -> BrokerError {
        if self.is_blocked() {
            return self.blocked_error();
        }
        self.abandoned = true;
        BrokerError::ConfirmTimeout {
            exchange: self.exchange.clone(),
            waited_ms: started.elapsed().as_millis(),
            unconfirmed: total - confirmed,
            total,
        }
    }

    /// Refuses the batch, before sending anything, on a connection that has
    /// failed or that the broker has blocked.
    fn check_ready(&self) -> Result<(), BrokerError> {
        if !self.is_usable() {
            return Err(BrokerError::Unusable {
                connection_name: self.connection_name.clone(),
            });
        }
        if self.is_blocked() {
            return Err(self.blocked_error());
        }
        Ok(())
    }

    fn blocked_error(&self) -> BrokerError {
        BrokerError::Blocked {
            connection_name: self.connection_name.clone(),
            reason: self
                .blocked_reason()
                .unwrap_or_else(|| "no reason given".to_owned()),
        }
    }

    /// Sorts the confirms into acked and nacked and counts the returned
    /// messages; nacks and returns are logged, one warning per message.
    fn read_confirmations(&self, confirmations: Vec<(Uuid, Confirmation)>) -> Published {
        let mut published = Published::default();
        for (message_id, confirmation) in confirmations {
            let (acked, returned) = match confirmation {
                Confirmation::Ack(returned) => (true, returned),
                Confirmation::Nack(returned) => (false, returned),
                // Cannot happen on a channel in confirm mode; not confirmed is the safe reading.
                Confirmation::NotRequested => (false, None),
            };
            if acked {
                published.acked.push(message_id);
            } else {
                warn!(
                    target: LOG_TARGET,
                    "RabbitMQ nacked message {message_id} on exchange {}: not published",
                    self.exchange
                );
                published.nacked.push(message_id);
            }
            if let Some(returned) = returned {
                published.unroutable += 1;
                warn_unroutable(&returned);
            }
        }
        published
    }
}

/// How much longer than the confirm timeout `bytes` may take on the
/// slowest link expected.
fn transfer_allowance(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / SLOWEST_LINK_BYTES_PER_SECOND as f64)
}

/// Sends every message (mandatory, persistent, all with one timestamp),
/// its body as encoded, without waiting for a confirm;
/// returns each message's pending confirm.
///
/// lapin's `basic_publish` queues a message's frames and then waits until
/// its I/O thread has written them. Awaited one after the other, every
/// message cost two thread switches (the publisher parks, the I/O thread
/// wakes, writes one message, wakes the publisher): a third of the
/// publisher's and the I/O thread's time went to the scheduler. All the
/// publishes of a batch are therefore run together ([`in_order`]): each one
/// queues its frames on its first poll, in message order, and the I/O
/// thread writes the whole batch at once.
///
/// Per-path order rests on lapin queuing a message's frames (and taking its
/// delivery tag) before the first point at which `basic_publish` can wait,
/// as 4.12 does (`Channel::send_method_frame_with_body`). Check it again
/// when upgrading lapin; `tests/e2e/broker.rs`
/// (`batches_are_confirmed_and_delivered_in_order`) checks the order of
/// what arrives.
async fn send(
    channel: &Channel,
    exchange: &str,
    messages: &[Encoded],
    replay: Option<&str>,
) -> Result<Vec<(Uuid, PublisherConfirm)>, BrokerError> {
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_secs());
    let publishes = messages.iter().map(|message| async move {
        let routing_key = match replay {
            Some(prefix) => format!("{prefix}{}", message.routing_key()),
            None => message.routing_key(),
        };
        let mut properties = properties(message, timestamp);
        if replay.is_some() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert("x-replay".into(), AMQPValue::Boolean(true));
            properties = properties.with_headers(headers);
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                message.json().as_bytes(),
                properties,
            )
            .await
            .map_err(|source| BrokerError::Publish {
                message_id: message.message_id,
                exchange: exchange.to_owned(),
                routing_key,
                source: Box::new(source),
            })?;
        Ok((message.message_id, confirm))
    });
    // The first error in message order; the batch's fate is unknown then
    // whichever it is.
    in_order(publishes.collect()).await.into_iter().collect()
}

/// Runs `futures` together and returns their outputs in order. Each pass
/// polls every unfinished one in order, so the first poll of each comes
/// before the first poll of the next: for publishes, their frames are
/// queued in message order.
async fn in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    // Everything before this index is finished.
    let mut finished = 0;
    std::future::poll_fn(|context| {
        for (future, output) in futures[finished..].iter_mut().zip(&mut outputs[finished..]) {
            if output.is_none() {
                if let Poll::Ready(value) = future.as_mut().poll(context) {
                    *output = Some(value);
                }
            }
        }
        while outputs.get(finished).is_some_and(Option::is_some) {
            finished += 1;
        }
        if finished < outputs.len() {
            return Poll::Pending;
        }
        Poll::Ready(outputs.drain(..).flatten().collect())
    })
    .await
}

/// Waits for the confirms in publish order, counting them in `confirmed` so
/// that a timeout can say how many were still missing.
async fn await_confirms(
    pending: Vec<(Uuid, PublisherConfirm)>,
    exchange: &str,
    confirmed: &Cell<usize>,
) -> Result<Vec<(Uuid, Confirmation)>, BrokerError> {
    let mut confirmations = Vec::with_capacity(pending.len());
    for (message_id, confirm) in pending {
        let confirmation = confirm.await.map_err(|source| BrokerError::Confirm {
            message_id,
            exchange: exchange.to_owned(),
            source: Box::new(source),
        })?;
        confirmed.set(confirmed.get() + 1);
        confirmations.push((message_id, confirmation));
    }
    Ok(confirmations)
}

/// A `mandatory` message that matched no binding came back. It is named by
/// its own `message_id`, not by the confirmation it rode on (see the module
/// docs of `broker`).
fn warn_unroutable(returned: &BasicReturnMessage) {
    let delivery = &returned.delivery;
    let returned_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "<no message_id>".to_owned(), ToString::to_string);
    warn!(
        target: LOG_TARGET,
        "unroutable message {returned_id}: exchange {} has no queue bound for routing key {} ({} {}); the broker accepted it, but no consumer will see it",
        delivery.exchange, delivery.routing_key, returned.reply_code, returned.reply_text
    );
}

/// The AMQP properties and headers consumers rely on (see the crate's message contract).
fn properties(message: &Message, timestamp: u64) -> BasicProperties {
    let long_string = |text: &str| AMQPValue::LongString(LongString::from(text));
    let mut headers = FieldTable::default();
    headers.insert("x-instance-id".into(), long_string(&message.instance_id));
    headers.insert(
        "x-watched-directory".into(),
        long_string(&message.watched_directory),
    );
    headers.insert("x-event-type".into(), long_string(message.event_type.as_str()));
    headers.insert(
        "x-schema-version".into(),
        AMQPValue::LongLongInt(i64::from(message.schema_version)),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message.message_id.to_string().into())
        .with_correlation_id(message.correlation_id.to_string().into())
        .with_timestamp(timestamp)
        .with_app_id(ShortString::from(APP_ID))
        .with_type(message.event_type.as_str().into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{EventType, Origin};

    /// Started in order, every one before any finishes; finished in any
    /// order; returned in order.
    #[test]
    fn in_order_starts_every_future_before_any_finishes() {
        let log = std::cell::RefCell::new(Vec::new());
        let futures: Vec<_> = (0..5usize)
            .map(|index| {
                let log = &log;
                async move {
                    log.borrow_mut().push(format!("start {index}"));
                    // The first finishes last.
                    for _ in 0..(5 - index) {
                        futures_lite::future::yield_now().await;
                    }
                    log.borrow_mut().push(format!("end {index}"));
                    index * 10
                }
            })
            .collect();
        let outputs = futures_lite::future::block_on(in_order(futures));
        assert_eq!(
            *log.borrow(),
            [
                "start 0", "start 1", "start 2", "start 3", "start 4", "end 4", "end 3", "end 2", "end 1",
                "end 0"
            ]
        );
        assert_eq!(outputs, vec![0, 10, 20, 30, 40]);
        assert!(futures_lite::future::block_on(in_order(Vec::<std::future::Ready<u8>>::new())).is_empty());
    }

    #[test]
    fn large_batches_get_time_for_their_bytes() {
        assert_eq!(transfer_allowance(0), Duration::ZERO);
        assert!(transfer_allowance(256 * 600) < Duration::from_millis(50));
        let huge = transfer_allowance(128 * 1024 * 1024);
        assert_eq!(huge, Duration::from_secs(32));
    }

    #[test]
    fn properties_carry_the_contract() {
        let origin = Origin {
            instance_id: "abcd1234".into(),
            watched_directory: "/data/music".into(),
        };
        let message = origin.message(
            EventType::Moved,
            "/data/music/b/x.flac",
            Some("/data/music/a/x.flac"),
            Uuid::new_v4(),
            None,
        );
        let properties = properties(&message, 1_700_000_000);
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let message_id = message.message_id.to_string();
        assert_eq!(
            properties.message_id().as_ref().map(ShortString::as_str),
            Some(message_id.as_str())
        );
        let correlation_id = message.correlation_id.to_string();
        assert_eq!(
            properties.correlation_id().as_ref().map(ShortString::as_str),
            Some(correlation_id.as_str())
        );
        assert_eq!(properties.timestamp(), &Some(1_700_000_000));
        assert_eq!(
            properties.app_id().as_ref().map(ShortString::as_str),
            Some("file-watcher")
        );
        assert_eq!(properties.kind().as_ref().map(ShortString::as_str), Some("moved"));
        let headers = properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers["x-instance-id"], AMQPValue::LongString("abcd1234".into()));
        assert_eq!(
            headers["x-watched-directory"],
            AMQPValue::LongString("/data/music".into())
        );
        assert_eq!(headers["x-event-type"], AMQPValue::LongString("moved".into()));
        assert_eq!(headers["x-schema-version"], AMQPValue::LongLongInt(1));
        assert_eq!(headers.len(), 4);
    }
}
