//! The RabbitMQ sink: one connection, one channel in confirm mode, and the
//! exchanges the daemon declares.
//!
//! The rest of the daemon is synchronous threads; lapin is async. All of the
//! async stays in this file: every call into lapin is driven by
//! [`futures_lite::future::block_on`] and raced against an [`async_io::Timer`],
//! so no method of [`Broker`] can wait longer than the timeout it was given,
//! even against a broker that accepts TCP connections and then says nothing.
//!
//! Failure policy: a `Broker` never repairs itself. lapin's automatic
//! recovery is left off; once the connection or channel fails,
//! [`Broker::is_usable`] turns false and the caller drops the `Broker` and
//! calls [`Broker::connect`] again in its own reconnect loop. A message counts
//! as published only when the broker acked it; everything else is retried by
//! the caller with the same bytes (and the same `message_id`), so consumers
//! see at-least-once delivery.
//!
//! How lapin 4.12 is used, since it is easy to get wrong:
//! - *Returns*: `mandatory` publishes that match no binding come back as
//!   `basic.return` before their `basic.ack`; lapin attaches the returned
//!   message to a [`Confirmation::Ack`]. With a `multiple` ack it may attach it
//!   to another confirmation of the same batch, so the returned message's own
//!   properties (not the confirmation it rides on) say which message it was.
//! - *Blocking*: `connection.blocked` / `unblocked` set
//!   [`lapin::ConnectionStatus::blocked`] and are also sent as
//!   [`lapin::Event`]s on [`lapin::Connection::events_listener`]; the events
//!   carry the broker's reason, which is logged.
//! - *Heartbeats*: requested through the URI's `heartbeat` query; lapin sends
//!   at half the negotiated interval and fails the connection with
//!   `MissingHeartbeatError` after two intervals of silence.
//! - *Sockets*: the TCP connection is opened here (through
//!   [`lapin::Connection::connector`]) rather than by lapin, because lapin
//!   runs its I/O loop on a thread of its own that nothing can stop before
//!   the AMQP handshake finishes. Keeping a handle on the socket lets a timed
//!   out connect, and [`Broker::close`], shut the socket down, which ends that
//!   thread instead of leaving it blocked on a frozen broker.
//! - *Logs*: lapin logs through `tracing`; with `tracing`'s `log` feature and
//!   no tracing subscriber installed, its events become `log` records (targets
//!   `lapin::…`) and reach our log output like any other (checked by
//!   `tests/broker.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_io::{Async, Timer};
use futures_lite::{future, Stream, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    AsyncTcpStream, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event,
    ExchangeKind,
};
use log::{debug, info, warn};
use uuid::Uuid;

use crate::message::Message;
use crate::redact::redact_url;

/// The log target these lines had before the layout move, kept so that log
/// lines (and anyone's filters on them, tests/broker.rs too) stay the same.
const LOG_TARGET: &str = "file_watcher::broker";

/// `app_id` of every message, so consumers can tell who published it.
pub const APP_ID: &str = "file-watcher";

/// Everything [`Broker::connect`] needs; built by the configuration.
#[derive(Clone)]
pub struct BrokerSettings {
    /// `amqp://user:pass@host:port/vhost`, optionally with `?heartbeat=N`
    /// (which then wins over `heartbeat`). Holds a password: never log it,
    /// log [`redact_url`] of it.
    pub url: String,
    /// Topic exchange every message is published to (`file_events`).
    pub exchange: String,
    /// Where the consumers' queues dead-letter to (`file_events.dlx`). The
    /// daemon only declares it, so that it exists before any consumer needs it.
    pub dead_letter_exchange: String,
    /// Shown by RabbitMQ (`client_properties.connection_name`), so an operator
    /// can tell which instance holds a connection: `file_watcher_<instance_id>`.
    pub connection_name: String,
    /// Bounds the whole of [`Broker::connect`] (TCP, handshake, channel,
    /// declarations) and [`Broker::close`].
    pub connect_timeout: Duration,
    /// Bounds one [`Broker::publish`] call: sending the batch and waiting for
    /// all of its publisher confirms.
    pub confirm_timeout: Duration,
    /// Requested AMQP heartbeat. A broker that stops answering (frozen, or
    /// behind a dead network path) is noticed after two intervals.
    pub heartbeat: Duration,
}

impl fmt::Debug for BrokerSettings {
    /// By hand, because a derived `Debug` would print the password.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("BrokerSettings")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

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

/// Why the broker could not be reached or did not take a batch. Every variant
/// names what it is about; URLs in it are redacted, and lapin's errors carry
/// no URL, so no variant can hold a password. lapin's errors are boxed: they
/// are large, and errors are rare while `Result`s are everywhere.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid RabbitMQ URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to RabbitMQ at {url}")]
    Connect {
        url: String,
        #[source]
        source: Box<lapin::Error>,
    },
    #[error("cannot open a channel on RabbitMQ connection {connection_name}")]
    OpenChannel {
        connection_name: String,
        #[source]
        source: Box<lapin::Error>,
    },
    #[error("cannot enable publisher confirms on RabbitMQ connection {connection_name}")]
    EnableConfirms {
        connection_name: String,
        #[source]
        source: Box<lapin::Error>,
    },
    #[error("cannot declare exchange {exchange}")]
    DeclareExchange {
        exchange: String,
        #[source]
        source: Box<lapin::Error>,
    },
    /// `step` is what was under way: "connect", "open channel", "declare exchange file_events", …
    #[error("{step} at RabbitMQ {url} did not finish within the connect timeout of {waited_ms} ms")]
    ConnectTimeout {
        url: String,
        step: String,
        waited_ms: u128,
    },
    #[error("cannot publish message {message_id} to exchange {exchange} with routing key {routing_key}")]
    Publish {
        message_id: Uuid,
        exchange: String,
        routing_key: String,
        #[source]
        source: Box<lapin::Error>,
    },
    #[error("lost the publisher confirm of message {message_id} on exchange {exchange}")]
    Confirm {
        message_id: Uuid,
        exchange: String,
        #[source]
        source: Box<lapin::Error>,
    },
    /// `unconfirmed` counts in publish order, from the first confirm not yet seen.
    #[error("confirm timeout after {waited_ms} ms: {unconfirmed} of {total} messages on exchange {exchange} not confirmed")]
    ConfirmTimeout {
        exchange: String,
        waited_ms: u128,
        unconfirmed: usize,
        total: usize,
    },
    /// Nothing was sent: a blocked connection would only pile frames up in memory.
    #[error("RabbitMQ has blocked connection {connection_name} ({reason}); nothing was published")]
    Blocked { connection_name: String, reason: String },
    #[error("RabbitMQ connection {connection_name} is closed or failed; reconnect")]
    Unusable { connection_name: String },
}

/// One exchange as the daemon declares it. As data, so that
/// `compose/rabbitmq/definitions.json` can be checked against it (a consumer
/// redeclaring an exchange with other flags gets `PRECONDITION_FAILED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDeclaration {
    pub name: String,
    /// Exchange type, as RabbitMQ spells it.
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// Always empty: the consumers declare the exchange without arguments, and
    /// arguments are part of the equivalence check.
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// The exchanges the daemon declares, in declaration order. The daemon never
/// declares a queue: queues, their dead-lettering and their TTL belong to the
/// consumers.
pub fn exchange_declarations(exchange: &str, dead_letter_exchange: &str) -> Vec<ExchangeDeclaration> {
    [exchange, dead_letter_exchange]
        .into_iter()
        .map(|name| ExchangeDeclaration {
            name: name.to_owned(),
            kind: "topic",
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: BTreeMap::new(),
        })
        .collect()
}

/// A connection to RabbitMQ with one channel in confirm mode, on which the
/// exchanges have been declared. Not shared: one publisher thread owns it.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    /// A second handle on the TCP socket, to end lapin's I/O thread at once
    /// when closing (see the module docs).
    socket: SocketSlot,
    /// `connection.blocked` and friends; polled, never waited on.
    events: Mutex<Pin<Box<dyn Stream<Item = Event> + Send>>>,
    /// The broker's reason for the current block, from the last
    /// `ConnectionBlocked` event.
    blocked_reason: Mutex<Option<String>>,
    /// Set when a batch failed or timed out: frames of it may still sit in
    /// lapin's buffers and confirms of it may still arrive, so the next batch
    /// gets a fresh connection. Closing then skips the polite
    /// `connection.close`, which would only wait on the same broker again.
    abandoned: bool,
    /// Set once the connection has been closed, so `Drop` does not close twice.
    closed: bool,
    /// The broker's URL for logs and errors, password already hidden.
    redacted_url: String,
    /// Where `publish` sends; named in its errors and warnings.
    exchange: String,
    /// Names this connection in our logs as it is named in RabbitMQ's.
    connection_name: String,
    /// Bounds the polite `connection.close`: the connect timeout, or what is
    /// left of it when setting up failed.
    close_timeout: Duration,
    confirm_timeout: Duration,
}

impl Broker {
    /// Connects, sets the `connection_name` client property, opens one
    /// channel, enables publisher confirms and declares the exchange and the
    /// dead-letter exchange, all within `settings.connect_timeout`.
    pub fn connect(settings: &BrokerSettings) -> Result<Broker, BrokerError> {
        let started = Instant::now();
        let deadline = started + settings.connect_timeout;
        let url = redact_url(&settings.url);
        let uri = amqp_uri(settings)?;
        let timeout = |step: String| BrokerError::ConnectTimeout {
            url: url.clone(),
            step,
            waited_ms: started.elapsed().as_millis(),
        };

        let properties = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.as_str().into())
            .with_client_property("product".into(), APP_ID.into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        let socket = SocketSlot::default();
        let runtime = lapin::runtime::default_runtime().map_err(|source| BrokerError::Connect {
            url: url.clone(),
            source: Box::new(source),
        })?;
        let connecting = {
            let socket = socket.clone();
            // lapin calls this on its I/O thread; it may block that thread on
            // DNS, but never the caller, and the TCP connect itself stops at
            // the deadline.
            Connection::connector(
                uri,
                runtime,
                async move |uri: AMQPUri, _runtime| {
                    let stream = open_socket(&uri.authority.host, uri.authority.port, deadline).await?;
                    socket.keep(stream.get_ref().try_clone()?);
                    Ok(AsyncTcpStream::Plain(stream))
                },
                properties,
            )
        };
        let connection = match block_on_until(deadline, connecting) {
            Some(Ok(connection)) => connection,
            Some(Err(source)) => {
                socket.shut_down();
                return Err(BrokerError::Connect {
                    url,
                    source: Box::new(source),
                });
            }
            None => {
                socket.shut_down();
                return Err(timeout("connect".to_owned()));
            }
        };
        let channel = match block_on_until(deadline, connection.create_channel()) {
            Some(Ok(channel)) => channel,
            Some(Err(source)) => {
                socket.shut_down();
                return Err(BrokerError::OpenChannel {
                    connection_name: settings.connection_name.clone(),
                    source: Box::new(source),
                });
            }
            None => {
                socket.shut_down();
                return Err(timeout("open channel".to_owned()));
            }
        };
        let mut broker = Broker {
            events: Mutex::new(Box::pin(connection.events_listener())),
            connection,
            channel,
            socket,
            blocked_reason: Mutex::new(None),
            abandoned: false,
            closed: false,
            redacted_url: url.clone(),
            exchange: settings.exchange.clone(),
            connection_name: settings.connection_name.clone(),
            close_timeout: settings.connect_timeout,
            confirm_timeout: settings.confirm_timeout,
        };
        if let Err(error) = broker.prepare(settings, started, deadline) {
            // Dropping `broker` closes the connection, within what is left of
            // the connect timeout: nothing after a timeout, so a stalled broker
            // is not waited on twice.
            broker.close_timeout = deadline.saturating_duration_since(Instant::now());
            return Err(error);
        }
        info!(
            target: LOG_TARGET,
            "connected to RabbitMQ at {url} as {} in {} ms: exchange {}, dead letters to {}, heartbeat {} s",
            settings.connection_name,
            started.elapsed().as_millis(),
            settings.exchange,
            settings.dead_letter_exchange,
            broker.heartbeat().as_secs(),
        );
        Ok(broker)
    }

    /// Enables publisher confirms and declares the exchanges, by `deadline`.
    fn prepare(
        &self,
        settings: &BrokerSettings,
        started: Instant,
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        let timeout = |step: String| BrokerError::ConnectTimeout {
            url: self.redacted_url.clone(),
            step,
            waited_ms: started.elapsed().as_millis(),
        };
        match block_on_until(
            deadline,
            self.channel.confirm_select(ConfirmSelectOptions::default()),
        ) {
            Some(Ok(())) => {}
            Some(Err(source)) => {
                return Err(BrokerError::EnableConfirms {
                    connection_name: self.connection_name.clone(),
                    source: Box::new(source),
                })
            }
            None => return Err(timeout("enable publisher confirms".to_owned())),
        }
        for declaration in exchange_declarations(&settings.exchange, &settings.dead_letter_exchange) {
            debug_assert!(declaration.arguments.is_empty(), "declared without arguments");
            let options = ExchangeDeclareOptions {
                passive: false,
                durable: declaration.durable,
                auto_delete: declaration.auto_delete,
                internal: declaration.internal,
                nowait: false,
            };
            let declaring = self.channel.exchange_declare(
                declaration.name.as_str().into(),
                exchange_kind(declaration.kind),
                options,
                FieldTable::default(),
            );
            match block_on_until(deadline, declaring) {
                Some(Ok(())) => {}
                Some(Err(source)) => {
                    return Err(BrokerError::DeclareExchange {
                        exchange: declaration.name,
                        source: Box::new(source),
                    })
                }
                None => return Err(timeout(format!("declare exchange {}", declaration.name))),
            }
        }
        Ok(())
    }

    /// Publishes every message (mandatory, persistent) and waits for all of
    /// their confirms, within `confirm_timeout`. Pipelined: all messages are
    /// sent before the first confirm is awaited, so a batch costs about one
    /// round trip.
    ///
    /// An `Err` means the outcome of the batch is unknown (some messages may
    /// have been acked); the caller publishes the whole batch again on a new
    /// connection, and consumers may see duplicates with the same `message_id`.
    pub fn publish(&mut self, messages: &[Message]) -> Result<Published, BrokerError> {
        if !self.is_usable() {
            return Err(BrokerError::Unusable {
                connection_name: self.connection_name.clone(),
            });
        }
        if self.is_blocked() {
            return Err(BrokerError::Blocked {
                connection_name: self.connection_name.clone(),
                reason: self
                    .blocked_reason()
                    .unwrap_or_else(|| "no reason given".to_owned()),
            });
        }
        if messages.is_empty() {
            return Ok(Published::default());
        }

        let started = Instant::now();
        let deadline = started + self.confirm_timeout;
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since_epoch| since_epoch.as_secs());
        let confirmed = std::cell::Cell::new(0usize);
        let channel = &self.channel;
        let exchange = &self.exchange;
        let publishing = async {
            let mut pending = Vec::with_capacity(messages.len());
            for message in messages {
                let routing_key = message.routing_key();
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &message.to_json(),
                        properties(message, timestamp),
                    )
                    .await
                    .map_err(|source| BrokerError::Publish {
                        message_id: message.message_id,
                        exchange: exchange.clone(),
                        routing_key,
                        source: Box::new(source),
                    })?;
                pending.push((message.message_id, confirm));
            }
            let mut confirmations = Vec::with_capacity(pending.len());
            for (message_id, confirm) in pending {
                let confirmation = confirm.await.map_err(|source| BrokerError::Confirm {
                    message_id,
                    exchange: exchange.clone(),
                    source: Box::new(source),
                })?;
                confirmed.set(confirmed.get() + 1);
                confirmations.push((message_id, confirmation));
            }
            Ok(confirmations)
        };
        let confirmations = match block_on_until(deadline, publishing) {
            Some(Ok(confirmations)) => confirmations,
            Some(Err(error)) => {
                self.abandoned = true;
                return Err(error);
            }
            // The broker stopped reading from us (memory or disk alarm): the
            // connection is fine, the batch just waits in it. Keep the
            // connection; the caller resends what was not confirmed (same
            // message ids) once the broker unblocks.
            None if self.is_blocked() => {
                return Err(BrokerError::Blocked {
                    connection_name: self.connection_name.clone(),
                    reason: self
                        .blocked_reason()
                        .unwrap_or_else(|| "no reason given".to_owned()),
                });
            }
            None => {
                self.abandoned = true;
                return Err(BrokerError::ConfirmTimeout {
                    exchange: self.exchange.clone(),
                    waited_ms: started.elapsed().as_millis(),
                    unconfirmed: messages.len() - confirmed.get(),
                    total: messages.len(),
                });
            }
        };

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
        }
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

    /// False once the connection or the channel has failed or closed, or a
    /// batch was abandoned; the caller then drops this `Broker` and connects again.
    pub fn is_usable(&self) -> bool {
        // Draining first logs why the connection failed, under its name.
        self.drain_events();
        !self.abandoned
            && !self.closed
            && self.connection.status().connected()
            && self.channel.status().connected()
    }

    /// True while the broker has sent `connection.blocked` (memory or disk
    /// alarm) and not yet `connection.unblocked`. The connection is still
    /// healthy: wait, do not reconnect (a new connection would be blocked too).
    pub fn is_blocked(&self) -> bool {
        self.drain_events();
        self.connection.status().blocked()
    }

    /// The broker's reason for the current block ("low on memory", …), if blocked.
    pub fn blocked_reason(&self) -> Option<String> {
        if !self.is_blocked() {
            return None;
        }
        lock(&self.blocked_reason).clone()
    }

    /// The heartbeat interval agreed with the broker (the lower of ours and
    /// the broker's).
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.connection.configuration().heartbeat()))
    }

    /// Closes the connection politely if it is still up, within
    /// `connect_timeout`, then releases the socket. Best effort: failures are
    /// logged, not returned, since the caller is leaving anyway.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if !self.abandoned && !self.close_timeout.is_zero() && self.connection.status().connected() {
            let deadline = Instant::now() + self.close_timeout;
            let closing = self.connection.close(200, "file-watcher closing".into());
            match block_on_until(deadline, closing) {
                Some(Ok(())) => {
                    // lapin ends its I/O loop and the socket itself after a clean
                    // close; shutting the socket under it makes it log errors.
                    debug!(target: LOG_TARGET, "closed RabbitMQ connection {}", self.connection_name);
                    return;
                }
                Some(Err(error)) => debug!(
                    target: LOG_TARGET,
                    "closing RabbitMQ connection {} at {}: {error}",
                    self.connection_name, self.redacted_url
                ),
                None => warn!(
                    target: LOG_TARGET,
                    "closing RabbitMQ connection {} at {} took longer than {} ms; dropping it",
                    self.connection_name,
                    self.redacted_url,
                    self.close_timeout.as_millis()
                ),
            }
        }
        // Not closed cleanly (or never connected): end lapin's I/O thread by force.
        self.socket.shut_down();
    }

    /// Takes the connection events that arrived since the last call, logs
    /// them and remembers the block reason. Never waits.
    fn drain_events(&self) {
        let mut events = lock(&self.events);
        while let Some(Some(event)) =
            block_on_until(Instant::now(), future::poll_once(events.next())).flatten()
        {
            match event {
                Event::ConnectionBlocked(reason) => {
                    warn!(
                        target: LOG_TARGET,
                        "RabbitMQ blocked connection {} ({reason}): nothing is published until its alarm clears",
                        self.connection_name
                    );
                    *lock(&self.blocked_reason) = Some(reason);
                }
                Event::ConnectionUnblocked => {
                    info!(target: LOG_TARGET, "RabbitMQ unblocked connection {}", self.connection_name);
                    *lock(&self.blocked_reason) = None;
                }
                Event::Error(error) => {
                    warn!(target: LOG_TARGET, "RabbitMQ connection {} failed: {error}", self.connection_name)
                }
                other => {
                    debug!(target: LOG_TARGET, "RabbitMQ connection {}: {other:?}", self.connection_name)
                }
            }
        }
    }
}

impl Drop for Broker {
    /// Closing here too means a `Broker` dropped on an error path still ends
    /// lapin's I/O thread and does not leave a half-open socket behind.
    fn drop(&mut self) {
        self.shut();
    }
}

/// The URI lapin connects to: `settings.url` with our heartbeat unless the URL
/// asks for its own.
fn amqp_uri(settings: &BrokerSettings) -> Result<AMQPUri, BrokerError> {
    let url = redact_url(&settings.url);
    let mut uri: AMQPUri = settings
        .url
        .parse()
        .map_err(|reason: String| BrokerError::InvalidUrl {
            url: url.clone(),
            // Some parse errors quote the whole input.
            reason: if settings.url.is_empty() {
                reason
            } else {
                reason.replace(&settings.url, &url)
            },
        })?;
    if uri.scheme == AMQPScheme::AMQPS {
        return Err(BrokerError::InvalidUrl {
            url,
            reason: "amqps:// needs TLS, which this build of file-watcher does not include".to_owned(),
        });
    }
    if uri.query.heartbeat.is_none() {
        // Whole seconds, at least one: 0 would mean "whatever the broker wants".
        let seconds = settings.heartbeat.as_secs().clamp(1, u64::from(u16::MAX));
        uri.query.heartbeat = Some(u16::try_from(seconds).unwrap_or(u16::MAX));
    }
    Ok(uri)
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
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

/// Drives `future` on this thread until it finishes or `deadline` passes
/// (`None`). The only way this module waits on lapin.
fn block_on_until<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    future::block_on(future::or(async { Some(work.await) }, async {
        Timer::at(deadline).await;
        None
    }))
}

/// Opens the TCP connection to the broker, trying each address of `host` in
/// turn, and gives up at `deadline`.
async fn open_socket(host: &str, port: u16, deadline: Instant) -> io::Result<Async<TcpStream>> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for address in (host, port).to_socket_addrs()? {
        let connecting = future::or(Async::<TcpStream>::connect(address), async {
            Timer::at(deadline).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TCP connect to {address} timed out"),
            ))
        });
        match connecting.await {
            Ok(stream) => {
                stream.get_ref().set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// A handle on the connection's socket, shared with the connect callback
/// that lapin runs on its own thread.
#[derive(Clone, Default)]
struct SocketSlot(Arc<Mutex<Option<TcpStream>>>);

impl SocketSlot {
    fn keep(&self, socket: TcpStream) {
        *lock(&self.0) = Some(socket);
    }

    /// Shuts the socket down: lapin's I/O loop then reads end-of-file and
    /// exits, whatever state the handshake or the broker is in.
    fn shut_down(&self) {
        if let Some(socket) = lock(&self.0).take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Locks `mutex`, also after a panic elsewhere: every value guarded here
/// stays consistent whatever line a panic interrupted.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{EventType, Origin};

    fn settings(url: &str) -> BrokerSettings {
        BrokerSettings {
            url: url.to_owned(),
            exchange: "file_events".into(),
            dead_letter_exchange: "file_events.dlx".into(),
            connection_name: "file_watcher_test".into(),
            connect_timeout: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
        }
    }

    #[test]
    fn invalid_url_errors_name_the_redacted_url_only() {
        for url in [
            "amqp:hunter2",
            "http://user:hunter2@host/",
            "amqp://user:hunter2@host:notaport/",
            "",
        ] {
            let error = amqp_uri(&settings(url)).unwrap_err();
            let text = error.to_string();
            assert!(!text.contains("hunter2"), "{url}: {text}");
            assert!(
                matches!(error, BrokerError::InvalidUrl { .. }),
                "{url}: {error:?}"
            );
        }
        let debug = format!("{:?}", settings("amqp://user:hunter2@host/"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn heartbeat_comes_from_settings_unless_the_url_sets_one() {
        let uri = amqp_uri(&settings("amqp://guest:guest@127.0.0.1:5672/%2f")).unwrap();
        assert_eq!(uri.query.heartbeat, Some(10));
        let uri = amqp_uri(&settings("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=3")).unwrap();
        assert_eq!(uri.query.heartbeat, Some(3));
        let mut quick = settings("amqp://127.0.0.1/%2f");
        quick.heartbeat = Duration::from_millis(300);
        assert_eq!(amqp_uri(&quick).unwrap().query.heartbeat, Some(1));
    }

    #[test]
    fn amqps_is_refused_with_a_reason() {
        let error = amqp_uri(&settings("amqps://user:hunter2@host/%2f")).unwrap_err();
        assert!(error.to_string().contains("TLS"), "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn exchanges_are_durable_topics_without_arguments() {
        let declarations = exchange_declarations("file_events", "file_events.dlx");
        let names: Vec<&str> = declarations
            .iter()
            .map(|declaration| declaration.name.as_str())
            .collect();
        assert_eq!(names, ["file_events", "file_events.dlx"]);
        for declaration in &declarations {
            assert_eq!(declaration.kind, "topic");
            assert!(declaration.durable && !declaration.auto_delete && !declaration.internal);
            assert!(declaration.arguments.is_empty());
        }
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
