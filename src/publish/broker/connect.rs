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
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, Connection, ConnectionProperties};
use log::info;

use super::declare::{exchange_declarations, exchange_kind};
use super::settings::{amqp_uri, BrokerSettings};
use super::{block_on_until, lock, Broker, BrokerError, APP_ID, LOG_TARGET};
use crate::redact::redact_url;

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
