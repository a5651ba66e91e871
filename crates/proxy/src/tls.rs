//! TLS: the client-facing server configuration (with certificates swapped in place when their
//! files change) and the client configuration for `https://` backends.
//!
//! Both use rustls with the aws-lc-rs provider, TLS 1.3 and 1.2 only. With the provider's
//! `prefer-post-quantum` feature the hybrid X25519MLKEM768 key exchange is offered first; peers
//! that do not know it negotiate X25519 (or P-256/P-384).
//!
//! Clients resume sessions with stateless tickets ([`ticketer`]): sealed with keys that rotate
//! (rustls' aws-lc-rs `Ticketer`, every six hours, the previous key still accepted), one ticketer
//! per process, so a client resumes on any worker and across certificate and configuration
//! reloads. No 0-RTT: early data can be replayed, and requests to a key broker must not be.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{BackendTls, TlsFiles};

/// A TLS set-up problem: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file has no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is missing or wrong.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere: aws-lc-rs, post-quantum hybrid key exchange preferred.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = File::open(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            what: "no PEM certificate found",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = File::open(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or(TlsError::Pem {
            path: path.display().to_string(),
            what: "no PEM private key found",
        })
}

/// Loads a certificate chain and its key as a signing-ready [`CertifiedKey`].
pub(crate) fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let ck = CertifiedKey::from_der(certs, key, &provider())?;
    Ok(Arc::new(ck))
}

/// Serves the current certificate; [`CertStore::reload`] swaps it without touching connections.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// Modification stamp of the files when last loaded, to notice changes.
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

impl CertStore {
    /// Loads the files.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let key = certified_key(&files)?;
        let stamp = stamp(&files);
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::new(key),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    /// Re-reads the files if they changed since the last load (or always, with `force`).
    /// Returns whether a new certificate is in use; on error the old one stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if !force && now == *last {
            return Ok(false);
        }
        let key = certified_key(&self.files)?;
        self.current.store(key);
        *last = now;
        Ok(true)
    }
}

fn stamp(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The client-facing server configuration: ALPN `h2` and `http/1.1`, TLS 1.3 and 1.2.
pub(crate) fn server_config_with(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = ticketer()?;
    config.send_tls13_tickets = TLS13_TICKETS;
    // No 0-RTT (rustls' default, stated here because it matters): replayable requests.
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// TLS 1.3 tickets sent after each handshake. A ticket is single-use, and every resumed
/// handshake brings a new one, so one is enough for a client that reconnects (a KBS client keeps
/// one connection, or opens one per session); each ticket costs about 2 % of a full handshake
/// (`cargo bench --bench tls_handshake`).
pub const TLS13_TICKETS: usize = 1;

/// The process's ticketer: stateless tickets under rotating keys, shared by every server
/// configuration so that tickets outlive reloads.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(Arc::clone(t));
    }
    let made = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::clone(TICKETER.get_or_init(|| made)))
}

/// Checks that the files make a server configuration (used when validating settings).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(CertStore::new(files.clone())?)
}

/// The configuration for TLS to backends: the given CA (or the system's roots), optional client
/// certificate, ALPN `http/1.1` for the pooled HTTP/1.1 connections, or `h2` alone when the
/// backends speak HTTP/2 (`backend-protocol = "http2"`).
pub fn client_config(tls: &BackendTls, http2: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(accept_any_certificate())
    } else {
        let mut roots = RootCertStore::empty();
        match &tls.ca {
            Some(ca) => {
                for cert in read_certs(ca)? {
                    roots.add(cert)?;
                }
            }
            None => {
                // The system's trust store; unreadable entries are skipped, as browsers do.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &tls.client_auth {
        Some(files) => builder.with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(Arc::new(config))
}

/// A verifier that accepts any certificate and still checks signatures are well-formed, so the
/// handshake completes: `--backend-insecure-skip-verify`, and benchmark clients. Never for
/// production.
pub fn accept_any_certificate() -> Arc<dyn ServerCertVerifier> {
    Arc::new(NoVerification(provider()))
}

/// See [`accept_any_certificate`].
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
