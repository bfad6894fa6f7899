//! The HTTP side: `/metrics`, `/healthz` and `/readyz` at `METRICS_ADDR`.
//!
//! tiny_http accepts connections on a thread of its own and queues the
//! requests; our `metrics` thread answers them one at a time (scrapes and
//! probes are rare and cheap). Stopping sets a flag and unblocks the thread,
//! which is then joined.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::registry::Registry;
use tiny_http::{Header, Request, Response, Server};

use super::{health, metrics, Sources};

/// A bound, not yet serving, `METRICS_ADDR`: bound before the pipeline
/// starts, so a bad address or a port in use stops the process at once.
pub struct Listener {
    server: Server,
    address: SocketAddr,
}

/// Why `METRICS_ADDR` could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on METRICS_ADDR {address}: {reason}")]
pub struct BindError {
    pub address: SocketAddr,
    pub reason: String,
}

impl Listener {
    pub fn bind(address: SocketAddr) -> Result<Listener, BindError> {
        let server = Server::http(address).map_err(|error| BindError {
            address,
            reason: error.to_string(),
        })?;
        Ok(Listener { server, address })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// The `metrics` thread, serving until [`MetricsServer::stop`].
pub struct MetricsServer {
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl MetricsServer {
    pub fn spawn(listener: Listener, sources: Sources) -> std::io::Result<MetricsServer> {
        let server = Arc::new(listener.server);
        let stopping = Arc::new(AtomicBool::new(false));
        let registry = metrics::registry(&sources);
        log::info!(
            "serving /metrics, /healthz and /readyz at http://{}",
            listener.address
        );
        let thread = {
            let (server, stopping) = (server.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || serve(&server, &stopping, &registry, &sources))?
        };
        Ok(MetricsServer {
            server,
            stopping,
            thread,
        })
    }

    pub fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        self.server.unblock();
        if self.thread.join().is_err() {
            log::error!("thread metrics panicked");
        }
    }
}

fn serve(server: &Server, stopping: &AtomicBool, registry: &Registry, sources: &Sources) {
    loop {
        match server.recv() {
            Ok(request) => answer(request, registry, sources),
            Err(_) if stopping.load(Ordering::Acquire) => return,
            // A failed accept (a client that went away): nothing to answer.
            Err(error) => log::debug!("metrics server: {error}"),
        }
    }
}

fn answer(request: Request, registry: &Registry, sources: &Sources) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let (status, content_type, body) = match path.as_str() {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::encode(registry),
        ),
        "/healthz" => probe(health::liveness(sources)),
        "/readyz" => probe(health::readiness(sources)),
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(error) = request.respond(response) {
        log::debug!("metrics server: cannot answer {path}: {error}");
    }
}

/// 200 or 503, with the probe's one line as the body.
fn probe(result: Result<String, String>) -> (u16, &'static str, String) {
    match result {
        Ok(line) => (200, "text/plain", line + "\n"),
        Err(line) => (503, "text/plain", line + "\n"),
    }
}
