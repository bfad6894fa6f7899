//! TLS client settings for the broker (`amqps://`) and the database
//! (`sslmode`), built once at start from the files the operator names.
//!
//! One TLS stack for both: rustls with the `ring` provider, which builds
//! for the static musl binary with a plain C compiler. Trust comes from a CA
//! file or, without one, from Mozilla's roots compiled into the binary
//! (`webpki-root-certs`): the scratch image has no `/etc/ssl` to read.
//!
//! How much is verified is a [`Verify`] level, so that PostgreSQL's
//! `sslmode` can be followed exactly: the broker always uses
//! [`Verify::Full`] (chain and host name).
//!
//! Everything here is read and checked before any connection is tried: an
//! unreadable file, a file with no certificate, a key that does not match its
//! certificate are settings errors, which the configuration reports naming
//! the variable. Only a server that cannot be reached (or that presents a
//! certificate we refuse) is a matter for the connection's retries.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A TLS file that could not be used, named by its path.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no usable CA certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} holds no PEM private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("client certificate {} and key {} cannot be used together: {reason}", certificate.display(), key.display())]
    Identity {
        certificate: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Whom to trust: a CA file, or the roots compiled into the binary.
#[derive(Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    /// `CA /path` or `bundled roots`, for logs and `Debug`.
    source: String,
}

impl Trust {
    /// Mozilla's roots, as shipped in this build.
    pub fn bundled() -> Trust {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
        Trust {
            roots: Arc::new(roots),
            source: "bundled roots".to_owned(),
        }
    }

    /// Every certificate in the PEM file at `path`; at least one must be a
    /// usable trust anchor.
    pub fn from_file(path: &Path) -> Result<Trust, TlsError> {
        let certificates = read_certificates(path)?;
        let mut roots = RootCertStore::empty();
        for certificate in certificates {
            roots.add(certificate).map_err(|error| TlsError::BadCertificate {
                path: path.to_owned(),
                reason: error.to_string(),
            })?;
        }
        Ok(Trust {
            roots: Arc::new(roots),
            source: format!("CA {}", path.display()),
        })
    }
}

/// A client certificate chain and its key, for mutual TLS.
#[derive(Clone)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    certificate_path: PathBuf,
    key_path: PathBuf,
}

impl Identity {
    /// The chain (leaf first) in `certificate` and the private key in `key`,
    /// both PEM. Whether they belong together is checked by
    /// [`ClientTls::new`].
    pub fn from_files(certificate: &Path, key: &Path) -> Result<Identity, TlsError> {
        let chain = read_certificates(certificate)?;
        let key_bytes = read(key)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|error| TlsError::BadKey {
            path: key.to_owned(),
            reason: error.to_string(),
        })?;
        Ok(Identity {
            chain,
            key: Arc::new(private_key),
            certificate_path: certificate.to_owned(),
            key_path: key.to_owned(),
        })
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The chain up to a trusted root, the validity dates, and the host name
    /// (amqps://, sslmode=verify-full).
    Full,
    /// The chain and the dates, not the name (sslmode=verify-ca, and
    /// sslmode=require with sslrootcert, as libpq does).
    ChainOnly,
    /// Nothing: the connection is encrypted but the server unauthenticated
    /// (sslmode=require or prefer without sslrootcert, as libpq does). The
    /// handshake's signatures are still checked.
    Nothing,
}

/// A ready rustls client configuration, and what it was built from.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// `verify full against CA /x, client certificate /y`, for logs and `Debug`.
    description: String,
}

impl ClientTls {
    /// Builds the configuration; fails when the identity's key does not match
    /// its certificate (or is of a kind rustls cannot sign with).
    pub fn new(trust: &Trust, verify: Verify, identity: Option<&Identity>) -> Result<ClientTls, TlsError> {
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Full => web_pki(trust, &provider),
            Verify::ChainOnly => Arc::new(ChainOnly(web_pki(trust, &provider))),
            Verify::Nothing => Arc::new(Unverified(Arc::clone(&provider))),
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut description = match verify {
            Verify::Full => format!("verify chain and host against {}", trust.source),
            Verify::ChainOnly => format!("verify chain (not host) against {}", trust.source),
            Verify::Nothing => "encrypt without verifying the server".to_owned(),
        };
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                description.push_str(&format!(
                    ", client certificate {}",
                    identity.certificate_path.display()
                ));
                builder
                    .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                    .map_err(|error| TlsError::Identity {
                        certificate: identity.certificate_path.clone(),
                        key: identity.key_path.clone(),
                        reason: error.to_string(),
                    })?
            }
        };
        Ok(ClientTls {
            config: Arc::new(config),
            description,
        })
    }

    /// The rustls configuration, for the connectors.
    pub fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.description)
    }
}

impl fmt::Display for ClientTls {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.description)
    }
}

/// The one crypto provider of this build.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn web_pki(trust: &Trust, provider: &Arc<CryptoProvider>) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(Arc::clone(&trust.roots), Arc::clone(provider))
        .build()
        // Fails only for an empty root store, which `Trust` never holds
        // (a file without certificates is refused when it is read).
        .expect("a verifier over a non-empty root store")
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// The PEM certificates in `path`, at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// libpq's verify-ca: webpki checks the chain (and the dates) before the
/// name, so a certificate refused only for its name has passed everything
/// verify-ca asks for.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// libpq's require/prefer without a root certificate: encrypted, any server
/// certificate accepted; the handshake signatures are still verified, so the
/// peer holds the key of the certificate it showed.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_roots_are_there() {
        assert!(Trust::bundled().roots.len() > 50);
        let tls = ClientTls::new(&Trust::bundled(), Verify::Full, None).unwrap();
        assert_eq!(format!("{tls:?}"), "verify chain and host against bundled roots");
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = Trust::from_file(&missing).err().unwrap().to_string();
        assert!(error.contains("missing.pem"), "{error}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = Trust::from_file(&empty).err().unwrap().to_string();
        assert!(
            error.contains("empty.pem") && error.contains("no PEM certificate"),
            "{error}"
        );
        let error = Identity::from_files(&empty, &empty).err().unwrap().to_string();
        assert!(error.contains("empty.pem"), "{error}");
    }
}
