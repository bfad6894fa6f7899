//! What a [`Broker`](super::Broker) connects to, and the one place where the
//! URL, which holds a password, becomes the URI lapin gets.
//!
//! Everything that leaves this file names the URL redacted: the `Debug` of
//! [`BrokerSettings`] (its URL is a [`SecretUrl`]) and every
//! [`BrokerError::InvalidUrl`].

use std::time::Duration;

use lapin::uri::AMQPUri;

use super::BrokerError;
use crate::redact::SecretUrl;
use crate::tls::{ClientTls, Trust, Verify};

/// Everything [`Broker::connect`](super::Broker::connect) needs; built by
/// the configuration.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `amqp://user:pass@host:port/vhost`, optionally with `?heartbeat=N`
    /// (which then wins over `heartbeat`). Holds a password; prints redacted.
    pub url: SecretUrl,
    /// Topic exchange every message is published to (`file_events`).
    pub exchange: String,
    /// Where the consumers' queues dead-letter to (`file_events.dlx`). The
    /// daemon only declares it, so that it exists before any consumer needs it.
    pub dead_letter_exchange: String,
    /// Shown by RabbitMQ (`client_properties.connection_name`), so an operator
    /// can tell which instance holds a connection: `file_watcher_<instance_id>`.
    pub connection_name: String,
    /// Bounds the whole of [`Broker::connect`](super::Broker::connect) (TCP,
    /// handshake, channel, declarations) and
    /// [`Broker::close`](super::Broker::close).
    pub connect_timeout: Duration,
    /// Bounds one [`Broker::publish`](super::Broker::publish) call: sending
    /// the batch and waiting for all of its publisher confirms (plus the time
    /// its bytes take on a slow link, which only matters for huge messages).
    pub confirm_timeout: Duration,
    /// Requested AMQP heartbeat. A broker that stops answering (frozen, or
    /// behind a dead network path) is noticed after two intervals.
    pub heartbeat: Duration,
    /// How `amqps://` is verified (always chain and host name) and the client
    /// certificate, if any; `None` means the bundled roots and no client
    /// certificate. Not used for `amqp://`.
    pub tls: Option<ClientTls>,
}

impl BrokerSettings {
    /// The TLS configuration an `amqps://` connection uses.
    pub(super) fn client_tls(&self) -> ClientTls {
        self.tls.clone().unwrap_or_else(|| {
            ClientTls::new(&Trust::bundled(), Verify::Full, None)
                .expect("a configuration without a client certificate always builds")
        })
    }
}

/// The largest AMQP frame asked for, unless the URL's `frame_max` query
/// says otherwise. lapin keeps room for 32 frames each way, zero-filled, for
/// the life of a connection: at RabbitMQ's default of 128 KiB that is 8 MiB,
/// about half of an idle daemon's resident memory, for messages of under
/// 1 KiB. A longer body is split over frames. The one frame that cannot be
/// split, the content header, holds the watched directory, at most 4 × 4,095
/// bytes of path text (see `path_text`), well under this.
pub const FRAME_MAX: u32 = 32 * 1024;

/// The URI lapin connects to: `settings.url` with our heartbeat and
/// [`FRAME_MAX`], unless the URL asks for its own.
pub(super) fn amqp_uri(settings: &BrokerSettings) -> Result<AMQPUri, BrokerError> {
    let url = settings.url.to_string();
    let exposed = settings.url.expose();
    let mut uri: AMQPUri = exposed
        .parse()
        .map_err(|reason: String| BrokerError::InvalidUrl {
            url: url.clone(),
            // Some parse errors quote the whole input.
            reason: if exposed.is_empty() {
                reason
            } else {
                reason.replace(exposed, &url)
            },
        })?;
    if uri.query.heartbeat.is_none() {
        // Whole seconds, at least one: 0 would mean "whatever the broker wants".
        let seconds = settings.heartbeat.as_secs().clamp(1, u64::from(u16::MAX));
        uri.query.heartbeat = Some(u16::try_from(seconds).unwrap_or(u16::MAX));
    }
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> BrokerSettings {
        BrokerSettings {
            url: SecretUrl::new(url),
            exchange: "file_events".into(),
            dead_letter_exchange: "file_events.dlx".into(),
            connection_name: "file_watcher_test".into(),
            connect_timeout: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
            tls: None,
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
    fn frames_are_small_unless_the_url_sets_their_size() {
        let uri = amqp_uri(&settings("amqp://127.0.0.1/%2f")).unwrap();
        assert_eq!(uri.query.frame_max, Some(FRAME_MAX));
        let uri = amqp_uri(&settings("amqp://127.0.0.1/%2f?frame_max=131072")).unwrap();
        assert_eq!(uri.query.frame_max, Some(131072));
    }

    #[test]
    fn amqps_is_accepted_with_bundled_roots_by_default() {
        let settings = settings("amqps://user:hunter2@host/%2f");
        let uri = amqp_uri(&settings).unwrap();
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(
            format!("{:?}", settings.client_tls()),
            "verify chain and host against bundled roots"
        );
    }
}
