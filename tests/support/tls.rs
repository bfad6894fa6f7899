//! TLS listeners of a test's own in front of the shared servers, and the
//! certificates they present, made in the test.
//!
//! ```text
//! daemon ──TLS──▶ localhost:<ephemeral> (TlsProxy) ──plain──▶ the shared server
//! ```
//!
//! The shared RabbitMQ and PostgreSQL speak plaintext and their
//! configuration is not ours to change, so each test starts its own
//! TLS-terminating listener: for AMQP TLS starts with the first byte
//! (`amqps://`); for PostgreSQL the client first sends an 8-byte SSLRequest,
//! the listener answers `S` (or `N`, for a server without TLS), then the TLS
//! handshake follows and the decrypted stream, starting with the
//! StartupMessage, goes to the real server. The handshake and certificate
//! checks are the real rustls ones on both sides; only the server behind is
//! shared.
//!
//! [`Pki`] makes a CA, a second CA nobody trusts, and certificates for
//! `localhost` (good, expired, signed by the other CA), for another host,
//! and for a client, as PEM files in a directory of the test's own.
//!
//! Threads: one acceptor and one pump per connection, all named and joined
//! when the proxy is dropped. A pump forwards both directions with short
//! read timeouts, since a rustls stream cannot be read and written from two
//! threads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

/// How long a pump waits on one side before looking at the other.
const TURN: Duration = Duration::from_millis(5);

/// PostgreSQL's SSLRequest code (protocol 1234.5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The certificates of one test, as PEM files in a directory of its own.
pub struct Pki {
    directory: tempfile::TempDir,
}

/// A server or client certificate and its key, as files.
#[derive(Clone)]
pub struct CertifiedFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A CA, a second CA nobody trusts, and the certificates signed by them:
    /// `server` (localhost and 127.0.0.1, valid), `expired` (localhost,
    /// expired in 2021), `wrong_host` (only `elsewhere.invalid`), `rogue`
    /// (localhost, signed by the other CA) and `client`.
    pub fn new() -> Pki {
        let directory = tempfile::Builder::new()
            .prefix("file-watcher-pki-")
            .tempdir()
            .expect("create the PKI directory");
        let pki = Pki { directory };
        let ca = pki.authority("ca", "file-watcher test CA");
        let other = pki.authority("other-ca", "a CA nobody trusts");
        pki.leaf("server", &["localhost", "127.0.0.1"], &ca, false);
        pki.leaf("expired", &["localhost", "127.0.0.1"], &ca, true);
        pki.leaf("wrong-host", &["elsewhere.invalid"], &ca, false);
        pki.leaf("rogue", &["localhost", "127.0.0.1"], &other, false);
        pki.leaf("client", &["file-watcher-client"], &ca, false);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// The trusted CA's certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// The untrusted CA's certificate file.
    pub fn other_ca_file(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// `name`'s certificate and key files (`server`, `expired`, …).
    pub fn files(&self, name: &str) -> CertifiedFiles {
        CertifiedFiles {
            certificate: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        }
    }

    fn authority(&self, name: &str, common_name: &str) -> Issuer<'static, KeyPair> {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, common_name);
        let certificate = params.self_signed(&key).expect("self-sign the CA");
        write(&self.path(&format!("{name}.pem")), certificate.pem());
        Issuer::new(params, key)
    }

    fn leaf(&self, name: &str, names: &[&str], issuer: &Issuer<'static, KeyPair>, expired: bool) {
        let key = KeyPair::generate().expect("generate a key");
        let mut params =
            CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())
                .expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let certificate = params.signed_by(&key, issuer).expect("sign a certificate");
        write(&self.path(&format!("{name}.pem")), certificate.pem());
        write(&self.path(&format!("{name}.key")), key.serialize_pem());
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

fn write(path: &Path, content: String) {
    std::fs::write(path, content).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

/// How the listener starts a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TLS from the first byte (AMQPS).
    Amqps,
    /// PostgreSQL's SSLRequest, answered `S`, then TLS.
    Postgres,
    /// PostgreSQL's SSLRequest answered `N`: a server without TLS; the
    /// connection goes on in plaintext.
    PostgresWithoutTls,
}

/// A TLS-terminating listener of one test; dropping it closes every
/// connection and joins its threads.
pub struct TlsProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    protocol: Protocol,
    config: Arc<ServerConfig>,
    stopping: AtomicBool,
    handshakes: AtomicUsize,
    plaintext_sessions: AtomicUsize,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl TlsProxy {
    /// Listens on `127.0.0.1:0` presenting `server`; with `client_ca`, asks
    /// for a client certificate signed by it and refuses connections
    /// without one.
    pub fn start(
        target: SocketAddr,
        protocol: Protocol,
        server: &CertifiedFiles,
        client_ca: Option<&Path>,
    ) -> TlsProxy {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&server.certificate)
            .expect("open the server certificate")
            .collect::<Result<_, _>>()
            .expect("read the server certificate");
        let key = PrivateKeyDer::from_pem_file(&server.key).expect("read the server key");
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("default TLS versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for certificate in CertificateDer::pem_file_iter(path).expect("open the client CA") {
                    roots
                        .add(certificate.expect("read the client CA"))
                        .expect("add the client CA");
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .expect("a server configuration");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TLS proxy");
        let address = listener.local_addr().expect("the TLS proxy's address");
        let shared = Arc::new(Shared {
            target,
            protocol,
            config: Arc::new(config),
            stopping: AtomicBool::new(false),
            handshakes: AtomicUsize::new(0),
            plaintext_sessions: AtomicUsize::new(0),
            pumps: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("tls-accept-{}", address.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawn the TLS proxy's acceptor")
        };
        TlsProxy {
            address,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// TLS handshakes completed so far (a refused certificate never counts).
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// Connections that went on in plaintext after an `N`.
    pub fn plaintext_sessions(&self) -> usize {
        self.shared.plaintext_sessions.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stopping`.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let pumps = std::mem::take(&mut *self.shared.pumps.lock().unwrap_or_else(PoisonError::into_inner));
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for (number, client) in listener.incoming().enumerate() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let pump = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("tls-pump-{number}"))
                .spawn(move || {
                    // A refused handshake or a closed socket ends the connection.
                    let _ = serve(client, &shared);
                })
                .expect("spawn a TLS pump")
        };
        shared
            .pumps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pump);
    }
}

fn serve(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    if shared.protocol != Protocol::Amqps {
        let mut request = [0u8; 8];
        client.read_exact(&mut request)?;
        if request != SSL_REQUEST {
            // sslmode=disable: the StartupMessage came first.
            shared.plaintext_sessions.fetch_add(1, Ordering::SeqCst);
            let mut server = TcpStream::connect(shared.target)?;
            server.write_all(&request)?;
            return pump(client, server, &shared.stopping);
        }
        if shared.protocol == Protocol::PostgresWithoutTls {
            client.write_all(b"N")?;
            shared.plaintext_sessions.fetch_add(1, Ordering::SeqCst);
            let server = TcpStream::connect(shared.target)?;
            return pump(client, server, &shared.stopping);
        }
        client.write_all(b"S")?;
    }
    let connection = ServerConnection::new(shared.config.clone()).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(connection, client);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    shared.handshakes.fetch_add(1, Ordering::SeqCst);
    let server = TcpStream::connect(shared.target)?;
    pump(tls, server, &shared.stopping)
}

/// Forwards both ways until either side closes or the proxy stops.
fn pump<C: Read + Write + Socket>(
    mut client: C,
    mut server: TcpStream,
    stopping: &AtomicBool,
) -> io::Result<()> {
    client.socket().set_read_timeout(Some(TURN))?;
    server.set_read_timeout(Some(TURN))?;
    server.set_nodelay(true)?;
    let mut buffer = vec![0u8; 64 * 1024];
    let result = loop {
        if stopping.load(Ordering::SeqCst) {
            break Ok(());
        }
        match forward(&mut client, &mut server, &mut buffer) {
            Ok(false) => {}
            other => break other.map(|_| ()),
        }
        match forward(&mut server, &mut client, &mut buffer) {
            Ok(false) => {}
            other => break other.map(|_| ()),
        }
    };
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.socket().shutdown(Shutdown::Both);
    result
}

/// One read from `from` passed on to `to`: `Ok(true)` when `from` closed.
fn forward(from: &mut impl Read, to: &mut impl Write, buffer: &mut [u8]) -> io::Result<bool> {
    match from.read(buffer) {
        Ok(0) => Ok(true),
        Ok(read) => {
            to.write_all(&buffer[..read])?;
            to.flush()?;
            Ok(false)
        }
        Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// The TCP socket under a stream, for timeouts and shutdown.
trait Socket {
    fn socket(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl Socket for StreamOwned<ServerConnection, TcpStream> {
    fn socket(&self) -> &TcpStream {
        &self.sock
    }
}
