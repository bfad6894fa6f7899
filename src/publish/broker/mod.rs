//! The lapin connection under the RabbitMQ sink: one connection, one channel
//! in confirm mode, and the exchanges the daemon declares.
//!
//! The rest of the daemon is synchronous threads; lapin is async. All of the
//! async stays in this module: every call into lapin is driven by
//! `block_on_until`, which parks the calling thread until lapin wakes it or
//! a deadline passes, so no method of [`Broker`] can wait longer than the
//! timeout it was given, even against a broker that accepts TCP connections
//! and then says nothing.
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
//!   message to a [`Confirmation::Ack`](lapin::Confirmation::Ack). With a
//!   `multiple` ack it may attach it to another confirmation of the same
//!   batch, so the returned message's own properties (not the confirmation it
//!   rides on) say which message it was.
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
//!   `tests/e2e/broker.rs`).
//!
//! The parts, in the order a connection lives through them: `settings.rs`
//! (what to connect to, and the URI lapin gets), `connect.rs` (TCP,
//! handshake, channel, confirms), `declare.rs` (the exchanges), `confirm.rs`
//! (publishing a batch and reading its confirms); this file holds the
//! [`Broker`] itself, its errors, its state and its close.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_lite::{future, Stream, StreamExt};
use lapin::{Channel, Connection, Event};
use log::{debug, info, warn};
use uuid::Uuid;

mod settings;
mod connect;
mod declare;
mod confirm;

pub use confirm::{Published, Sent};
pub use declare::{exchange_declarations, ExchangeDeclaration};
pub use settings::{BrokerSettings, FRAME_MAX};

use connect::SocketSlot;

/// The log target these lines had before the layout move, kept so that log
/// lines (and anyone's filters on them, tests/e2e/broker.rs too) stay the same.
const LOG_TARGET: &str = "file_watcher::broker";

/// `app_id` of every message, so consumers can tell who published it.
pub const APP_ID: &str = "file-watcher";

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

/// AMQP's PRECONDITION_FAILED.
const PRECONDITION_FAILED: u16 = 406;

impl BrokerError {
    /// The broker's words when it closed the channel with 406
    /// PRECONDITION_FAILED over what was published. On `basic.publish` that
    /// is about a message, not the connection: RabbitMQ answers so to a
    /// message larger than its `max_message_size` (and to a bad `expiration`
    /// or `user_id`, which the daemon never sets). The same message would be
    /// refused again; other messages would not.
    pub fn refusal(&self) -> Option<String> {
        let source = match self {
            BrokerError::Publish { source, .. } | BrokerError::Confirm { source, .. } => source,
            _ => return None,
        };
        match source.kind() {
            lapin::ErrorKind::ProtocolError(error) if error.get_id() == PRECONDITION_FAILED => {
                Some(error.to_string())
            }
            _ => None,
        }
    }
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
    /// Set by `file-watcher replay` ([`Broker::for_replay`]): the routing
    /// key prefix its messages get, and their `x-replay: true` header.
    replay: Option<String>,
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

    /// True when the broker closed the channel (a channel-level error, over
    /// something that was sent on it) while the connection stayed up.
    pub fn channel_closed_by_broker(&self) -> bool {
        !self.closed && self.connection.status().connected() && !self.channel.status().connected()
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

    /// From now on every message is published as a replay: with the header
    /// `x-replay: true`, and its routing key after `routing_key_prefix`
    /// (`replay.` gives `replay.file.created`; empty keeps `file.created`).
    /// The body stays exactly the message contract.
    pub fn for_replay(&mut self, routing_key_prefix: &str) {
        self.replay = Some(routing_key_prefix.to_owned());
    }

    /// The largest frame agreed with the broker, in bytes (the lower of ours,
    /// [`FRAME_MAX`] unless the URL sets one, and the broker's).
    pub fn frame_max(&self) -> u32 {
        self.connection.configuration().frame_max()
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

/// Drives `work` on this thread until it finishes or `deadline` passes
/// (`None`). The only way this module waits on lapin.
///
/// The thread parks with a timeout and lapin's wakers unpark it. An
/// [`async_io::Timer`] raced against the work would do the same, but
/// registering one wakes async-io's reactor thread: at a trickle, where
/// every message is a batch of its own and its confirm is waited for, that
/// was a reactor wakeup and about five system calls per message
/// (BENCHMARKS.md, "Waiting on lapin without a timer").
///
/// The wait uses the thread's park token, so it must not nest (nothing
/// driven here calls it again): an inner wait could take the outer one's
/// wake, leaving the outer to run into its deadline.
fn block_on_until<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    thread_local! {
        static WAKER: Waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    }
    let mut work = pin!(work);
    WAKER.with(|waker| {
        let mut context = Context::from_waker(waker);
        loop {
            if let Poll::Ready(output) = work.as_mut().poll(&mut context) {
                return Some(output);
            }
            // A wake that came before this park makes it return at once, and
            // a spurious return only polls again: no wake is lost.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::park_timeout(left);
        }
    })
}

/// Wakes the thread waiting in [`block_on_until`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Locks `mutex`, also after a panic elsewhere: every value guarded here
/// stays consistent whatever line a panic interrupted.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn a_wait_polls_once_even_past_its_deadline() {
        // `drain_events` asks with a deadline of "now" and must get the answer.
        assert_eq!(
            block_on_until(Instant::now() - Duration::from_secs(1), future::ready(7)),
            Some(7)
        );
    }

    #[test]
    fn a_wait_nothing_wakes_ends_at_its_deadline_and_not_before() {
        // An unpark left over from earlier (a late wake) must not end it early.
        std::thread::current().unpark();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(50);
        assert_eq!(block_on_until(deadline, future::pending::<()>()), None);
        assert!(Instant::now() >= deadline);
    }

    /// Ready once `ready` is set; whoever sets it wakes the waker it left.
    struct Flag {
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Flag {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<&'static str> {
            *lock(&self.waker) = Some(context.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready("woken")
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        for delay in [0, 1, 20] {
            let ready = Arc::new(AtomicBool::new(false));
            let waker: Arc<Mutex<Option<Waker>>> = Arc::default();
            let waking = std::thread::spawn({
                let (ready, waker) = (ready.clone(), waker.clone());
                move || {
                    std::thread::sleep(Duration::from_millis(delay));
                    ready.store(true, Ordering::SeqCst);
                    if let Some(waker) = lock(&waker).take() {
                        waker.wake();
                    }
                }
            });
            let flag = Flag { ready, waker };
            // A lost wake would leave the wait to run into this deadline.
            let deadline = Instant::now() + Duration::from_secs(30);
            assert_eq!(
                block_on_until(deadline, flag),
                Some("woken"),
                "woken after {delay} ms"
            );
            assert!(Instant::now() < deadline);
            waking.join().unwrap();
        }
    }
}
