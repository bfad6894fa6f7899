//! Observability: what an operator (or Prometheus, or a container runtime)
//! can ask a running instance, without reading its logs.
//!
//! - [`metrics`] turns the stages' counters into the Prometheus text format;
//!   every series carries `instance_id`. The stages only bump atomics they
//!   already own ([`WatchCounters`], [`WorkerCounters`], [`PublishCounters`],
//!   [`Health`]); the numbers are read when scraped, so metrics cost the hot
//!   path a few relaxed atomic adds and nothing else (no lock, no allocation).
//! - [`health`] answers `/healthz` (the settle, worker and publisher threads
//!   made progress recently) and `/readyz` (catch-up done, broker and
//!   database connected).
//! - [`server`] serves both and `/metrics` at `METRICS_ADDR` on one named
//!   thread (`metrics`), owned and joined by [`Observer`].
//! - [`systemd`] tells systemd `READY=1` after catch-up and pets its
//!   watchdog while `/healthz` would pass (thread `systemd`), when a
//!   `Type=notify` unit runs the daemon.
//! - [`heartbeat`] keeps this instance's row in the `instances` table fresh
//!   (thread `heartbeat`), and marks it stopped on a clean exit.
//!
//! Started by the pipeline before the stages and stopped after them, so the
//! last heartbeat carries the final counts.

pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod server;
pub mod systemd;

use std::sync::Arc;

use crate::publish::PublishCounters;
use crate::registry::{Deferred, Health};
use crate::watch::WatchCounters;
use crate::work::WorkerCounters;

use self::heartbeat::Heartbeat;
use self::server::{Listener, MetricsServer};

/// Everything the metrics, the probes and the heartbeat read: the stages'
/// own counters, shared, plus what the heartbeat learns from the database.
#[derive(Clone)]
pub struct Sources {
    pub instance_id: String,
    pub watch: Arc<WatchCounters>,
    pub worker: Arc<WorkerCounters>,
    pub publish: Arc<PublishCounters>,
    /// Whether the database answered last time.
    pub health: Arc<Health>,
    /// Set once the registry is installed (the database was reached).
    pub deferred: Arc<Deferred>,
    /// Whether a database and a broker are configured (`/readyz` waits for them).
    pub database: bool,
    pub broker: bool,
    /// The outbox as the heartbeat last measured it (with a database).
    pub outbox: Arc<heartbeat::OutboxGauges>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Sources")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The metrics server, the heartbeat and the systemd notifier, each
/// optional; stopping joins them.
pub struct Observer {
    server: Option<MetricsServer>,
    heartbeat: Option<Heartbeat>,
    systemd: Option<systemd::Notifier>,
}

impl Observer {
    /// Starts the metrics server on `listener` (if `METRICS_ADDR` is set) and
    /// the heartbeat (if a database is configured).
    pub fn start(
        sources: Sources,
        listener: Option<Listener>,
        heartbeat: Option<heartbeat::Settings>,
    ) -> std::io::Result<Observer> {
        let server = match listener {
            Some(listener) => Some(MetricsServer::spawn(listener, sources.clone())?),
            None => None,
        };
        let systemd = match systemd::wanted() {
            true => Some(systemd::Notifier::spawn(sources.clone())?),
            false => None,
        };
        let heartbeat = match heartbeat {
            Some(settings) => Some(Heartbeat::spawn(settings, sources)?),
            None => None,
        };
        Ok(Observer {
            server,
            heartbeat,
            systemd,
        })
    }

    /// Marks the instance stopped (best effort, bounded) and stops serving.
    pub fn stop(self) {
        if let Some(systemd) = self.systemd {
            systemd.stop();
        }
        if let Some(heartbeat) = self.heartbeat {
            heartbeat.stop();
        }
        if let Some(server) = self.server {
            server.stop();
        }
    }
}
