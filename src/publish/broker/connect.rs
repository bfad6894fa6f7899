//! Setting up a [`Broker`]: TCP, the AMQP handshake, one channel, publisher
//! confirms and the exchanges, all within one connect timeout.
//!
//! Every step is raced against the same deadline. A step that fails or runs
//! out of time before the `Broker` exists shuts the socket down, so lapin's
//! I/O thread ends with the attempt instead of waiting on a broker that went
//! quiet; after that, dropping the `Broker` does it.

use std::io;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_io::{Async, Timer};
use futures_lite::future;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::RustlsConnector;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{AsyncTcpStream, Channel, Connection, ConnectionProperties};
use log::info;

use super::settings::{amqp_uri, BrokerSettings};
use super::{block_on_until, lock, Broker, BrokerError, APP_ID, LOG_TARGET};

/// One call of [`Broker::connect`]: what every step needs to stop at the
/// deadline and to say where it stopped.
pub(super) struct ConnectAttempt<'a> {
    pub(super) settings: &'a BrokerSettings,
    /// `settings.url` with the password hidden, for errors and logs.
    pub(super) url: String,
    pub(super) started: Instant,
    /// `started` plus the connect timeout: no step runs past it.
    pub(super) deadline: Instant,
}

impl ConnectAttempt<'_> {
    /// `step` ("connect", "open channel", "declare exchange file_events", …)
    /// did not finish by the deadline.
    pub(super) fn timed_out(&self, step: String) -> BrokerError {
        BrokerError::ConnectTimeout {
            url: self.url.clone(),
            step,
            waited_ms: self.started.elapsed().as_millis(),
        }
    }
}

impl Broker {
    /// Connects, sets the `connection_name` client property, opens one
    /// channel, enables publisher confirms and declares the exchange and the
    /// dead-letter exchange, all within `settings.connect_timeout`.
    pub fn connect(settings: &BrokerSettings) -> Result<Broker, BrokerError> {
        let started = Instant::now();
        let attempt = ConnectAttempt {
            settings,
            url: settings.url.to_string(),
            started,
            deadline: started + settings.connect_timeout,
        };
        let uri = amqp_uri(settings)?;
        let socket = SocketSlot::default();
        let connection = open_connection(&attempt, uri, &socket)?;
        let channel = open_channel(&attempt, &connection, &socket)?;
        let mut broker = Broker::new(&attempt, connection, channel, socket);
        if let Err(error) = broker.prepare(&attempt) {
            // Dropping `broker` closes the connection, within what is left of
            // the connect timeout: nothing after a timeout, so a stalled broker
            // is not waited on twice.
            broker.close_timeout = attempt.deadline.saturating_duration_since(Instant::now());
            return Err(error);
        }
        let url = &attempt.url;
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

    /// The `Broker` over a fresh connection and channel, before confirms are
    /// enabled and exchanges declared.
    fn new(
        attempt: &ConnectAttempt<'_>,
        connection: Connection,
        channel: Channel,
        socket: SocketSlot,
    ) -> Broker {
        let settings = attempt.settings;
        Broker {
            events: Mutex::new(Box::pin(connection.events_listener())),
            connection,
            channel,
            socket,
            blocked_reason: Mutex::new(None),
            replay: None,
            abandoned: false,
            closed: false,
            redacted_url: attempt.url.clone(),
            exchange: settings.exchange.clone(),
            connection_name: settings.connection_name.clone(),
            close_timeout: settings.connect_timeout,
            confirm_timeout: settings.confirm_timeout,
        }
    }

    /// Enables publisher confirms and declares the exchanges, by the deadline.
    fn prepare(&self, attempt: &ConnectAttempt<'_>) -> Result<(), BrokerError> {
        self.enable_confirms(attempt)?;
        self.declare_exchanges(attempt)
    }

    fn enable_confirms(&self, attempt: &ConnectAttempt<'_>) -> Result<(), BrokerError> {
        match block_on_until(
            attempt.deadline,
            self.channel.confirm_select(ConfirmSelectOptions::default()),
        ) {
            Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(BrokerError::EnableConfirms {
                connection_name: self.connection_name.clone(),
                source: Box::new(source),
            }),
            None => Err(attempt.timed_out("enable publisher confirms".to_owned())),
        }
    }
}

/// TCP and the AMQP handshake, with our client properties. Shuts the socket
/// down when it fails.
fn open_connection(
    attempt: &ConnectAttempt<'_>,
    uri: AMQPUri,
    socket: &SocketSlot,
) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(attempt.settings.connection_name.as_str().into())
        .with_client_property("product".into(), APP_ID.into())
        .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
    let runtime = lapin::runtime::default_runtime().map_err(|source| BrokerError::Connect {
        url: attempt.url.clone(),
        source: Box::new(source),
    })?;
    let tls = (uri.scheme == AMQPScheme::AMQPS).then(|| attempt.settings.client_tls());
    let connecting = {
        let socket = socket.clone();
        let deadline = attempt.deadline;
        // lapin calls this on its I/O thread; it may block that thread on
        // DNS, but never the caller, and the TCP connect itself stops at
        // the deadline.
        Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, _runtime| {
                let stream = open_socket(&uri.authority.host, uri.authority.port, deadline).await?;
                socket.keep(stream.get_ref().try_clone()?);
                let stream = AsyncTcpStream::Plain(stream);
                match &tls {
                    // The handshake is bounded by the same deadline: the
                    // caller stops waiting and shuts the socket down.
                    Some(tls) => Ok(stream
                        .into_rustls(&RustlsConnector::from(tls.config()), &uri.authority.host)
                        .await?),
                    None => Ok(stream),
                }
            },
            properties,
        )
    };
    match block_on_until(attempt.deadline, connecting) {
        Some(Ok(connection)) => Ok(connection),
        Some(Err(source)) => {
            socket.shut_down();
            Err(BrokerError::Connect {
                url: attempt.url.clone(),
                source: Box::new(source),
            })
        }
        None => {
            socket.shut_down();
            Err(attempt.timed_out("connect".to_owned()))
        }
    }
}

/// The one channel every publish goes through. Shuts the socket down when
/// it fails.
fn open_channel(
    attempt: &ConnectAttempt<'_>,
    connection: &Connection,
    socket: &SocketSlot,
) -> Result<Channel, BrokerError> {
    match block_on_until(attempt.deadline, connection.create_channel()) {
        Some(Ok(channel)) => Ok(channel),
        Some(Err(source)) => {
            socket.shut_down();
            Err(BrokerError::OpenChannel {
                connection_name: attempt.settings.connection_name.clone(),
                source: Box::new(source),
            })
        }
        None => {
            socket.shut_down();
            Err(attempt.timed_out("open channel".to_owned()))
        }
    }
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
pub(super) struct SocketSlot(Arc<Mutex<Option<TcpStream>>>);

impl SocketSlot {
    fn keep(&self, socket: TcpStream) {
        *lock(&self.0) = Some(socket);
    }

    /// Shuts the socket down: lapin's I/O loop then reads end-of-file and
    /// exits, whatever state the handshake or the broker is in.
    pub(super) fn shut_down(&self) {
        if let Some(socket) = lock(&self.0).take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}
