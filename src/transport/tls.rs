//! TLS for the listeners (docs/security.md, "TLS"): the `tls` table of a listener, and
//! the acceptor that turns an accepted socket into a TLS stream plus what the handshake
//! told about the client.
//!
//! The acceptor's rustls `ServerConfig` sits behind a lock so that `reload` (SIGHUP) can
//! swap in freshly read certificate, key and CA files: a handshake takes the config
//! current when it starts, and connections already established keep the one they
//! negotiated with. A reload that fails leaves the old config in place.
//!
//! rustls runs on the `ring` crypto provider: it builds with a C compiler alone, where
//! aws-lc-rs needs cmake (and NASM on some targets) and is a heavier build.

use parking_lot::RwLock;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use tokio_rustls::rustls::{
    self, CertificateError, Error as RustlsError, InconsistentKeys, RootCertStore, ServerConfig,
    SupportedProtocolVersion,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub use tokio_rustls::server::TlsStream;

use crate::config::{IdentitySource, TlsConfig, TlsVersion};

/// ALPN protocol id for MQTT over TLS (the IANA registry has "mqtt").
pub const ALPN_MQTT: &[u8] = b"mqtt";
/// ALPN protocol id for a WebSocket-over-TLS listener. Offer this one only there: "h2"
/// would let browsers pick HTTP/2, over which the HTTP/1.1 WebSocket upgrade cannot run.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN protocol id of HTTP/2, offered (before "http/1.1") by http listeners only.
pub const ALPN_H2: &[u8] = b"h2";

/// Why the TLS settings could not be used; every message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error(
        "{}: the private key does not match the certificate in {} \
         (the server's own certificate must come first there)",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{0}")]
    Config(String),
}

/// What the handshake established about the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The listener has `identity_as_username`: the MQTT username is `identity`, whatever
    /// CONNECT says, and a connection whose `identity` is `None` must be refused with
    /// CONNACK "bad user name or password", as mosquitto does.
    pub identity_as_username: bool,
    /// The username the client certificate stands for (only with `identity_as_username`);
    /// `None` without a certificate or without the CN/SAN asked for.
    pub identity: Option<String>,
    /// The client sent a certificate, and it verified against `client_ca_file`.
    pub client_cert: bool,
    /// The ALPN protocol agreed on, if the client offered one of the listener's.
    pub alpn: Option<Vec<u8>>,
    /// The host name the client asked for (SNI).
    pub server_name: Option<String>,
}

/// A listener's TLS acceptor: cheap to clone (one `Arc`), its config reloadable.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    config: TlsConfig,
    alpn: Vec<Vec<u8>>,
    handshake_timeout: Duration,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("config", &self.inner.config)
            .field("handshake_timeout", &self.inner.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads the files of `config`. `alpn` lists the ALPN protocols offered, most
    /// preferred first (`[ALPN_MQTT]` for MQTT, `[ALPN_HTTP1]` for WebSocket; empty: no
    /// ALPN). A client that offers ALPN but none of these is refused (RFC 7301); one that
    /// offers none is served. A handshake not done within `handshake_timeout` is dropped.
    pub fn new(
        config: TlsConfig,
        alpn: &[&[u8]],
        handshake_timeout: Duration,
    ) -> Result<TlsAcceptor, TlsError> {
        config.check().map_err(TlsError::Config)?;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let server_config = build(&config, &alpn)?;
        Ok(TlsAcceptor {
            inner: Arc::new(Inner {
                config,
                alpn,
                handshake_timeout,
                current: RwLock::new(server_config),
            }),
        })
    }

    pub fn config(&self) -> &TlsConfig {
        &self.inner.config
    }

    /// Re-reads the certificate, key and CA files: handshakes from now on use them,
    /// established connections are untouched. On error the previous files stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.inner.config, &self.inner.alpn)?;
        *self.inner.current.write() = fresh;
        Ok(())
    }

    /// The TLS handshake on an accepted connection, within the handshake timeout
    /// (`io::ErrorKind::TimedOut` past it).
    pub async fn accept<IO>(&self, io: IO) -> io::Result<(TlsStream<IO>, Peer)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let server_config = self.inner.current.read().clone();
        let handshake = tokio_rustls::TlsAcceptor::from(server_config).accept(io);
        let stream = tokio::time::timeout(self.inner.handshake_timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let conn = stream.get_ref().1;
        let client_cert = conn.peer_certificates().and_then(|chain| chain.first());
        let source = self.inner.config.identity_as_username;
        let peer = Peer {
            identity_as_username: source.is_some(),
            identity: source
                .zip(client_cert)
                .and_then(|(source, cert)| identity(cert, source)),
            client_cert: client_cert.is_some(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            server_name: conn.server_name().map(str::to_owned),
        };
        Ok((stream, peer))
    }
}

/// The MQTT username a client certificate stands for, if it has one of the kind asked for.
fn identity(cert: &CertificateDer<'_>, source: IdentitySource) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let name = match source {
        IdentitySource::Cn => cert.subject().iter_common_name().next()?.as_str().ok()?,
        IdentitySource::San => cert
            .subject_alternative_name()
            .ok()??
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) => Some(*s),
                _ => None,
            })?,
    };
    // An MQTT username must not contain U+0000 (MQTT-1.5.3-2); an empty one names nobody.
    (!name.is_empty() && !name.contains('\0')).then(|| name.to_owned())
}

/// A rustls server config from the files `config` names.
fn build(config: &TlsConfig, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let certs = read_certs(&config.cert_file, "certificate")?;
    // Checked here so that a broken certificate is blamed on the certificate file.
    ParsedCertificate::try_from(&certs[0]).map_err(|e| TlsError::File {
        path: config.cert_file.clone(),
        reason: format!(
            "the first certificate is not a valid X.509 certificate: {}",
            describe(e)
        ),
    })?;
    let key = read_key(&config.key_file)?;

    let versions: &[&SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let client_verifier = match &config.client_ca_file {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(ca_file) => {
            let builder = WebPkiClientVerifier::builder_with_provider(
                Arc::new(read_roots(ca_file)?),
                provider.clone(),
            );
            let builder = match config.require_client_cert {
                true => builder,
                false => builder.allow_unauthenticated(),
            };
            builder.build().map_err(|e| TlsError::File {
                path: ca_file.clone(),
                reason: format!("cannot verify client certificates with it: {e}"),
            })?
        }
    };

    let mut server_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Config(format!("tls: {e}")))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch) => TlsError::KeyMismatch {
                cert: config.cert_file.clone(),
                key: config.key_file.clone(),
            },
            e => TlsError::File {
                path: config.key_file.clone(),
                reason: format!("unusable private key: {}", describe(e)),
            },
        })?;
    server_config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(server_config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    let reason = match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: a \"{}\" block has no END line (truncated?)",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "not valid PEM: bad BEGIN line {:?}",
            String::from_utf8_lossy(&line)
        ),
        e => format!("not valid PEM: {e}"),
    };
    TlsError::File {
        path: path.to_owned(),
        reason,
    }
}

/// rustls words its errors for the peer's certificate; these are about our own files.
fn describe(e: RustlsError) -> String {
    match e {
        RustlsError::InvalidCertificate(CertificateError::BadEncoding) => "malformed DER".into(),
        RustlsError::InvalidCertificate(e) => format!("{e:?}"),
        RustlsError::General(message) => message,
        e => e.to_string(),
    }
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_owned(),
            reason: format!("no {what} in it (expected a PEM \"BEGIN CERTIFICATE\" block)"),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::File {
            path: path.to_owned(),
            reason: if text.windows(9).any(|w| w == b"ENCRYPTED") {
                "the private key is encrypted; give it unencrypted \
                 (openssl pkey -in KEY -out PLAIN_KEY)"
                    .into()
            } else {
                "no private key in it (expected a PEM \"BEGIN PRIVATE KEY\", \
                 \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)"
                    .into()
            },
        },
        e => pem_error(path, e),
    })
}

/// The CA certificates of `client_ca_file`, each a usable trust anchor.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_certs(path, "CA certificate")?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::File {
            path: path.to_owned(),
            reason: format!(
                "certificate {} is not a usable CA certificate: {}",
                i + 1,
                describe(e)
            ),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests;
