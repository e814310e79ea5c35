//! A listener's `tls` table (docs/security.md, "TLS"): plain data, checked when read.
//! `transport::tls` builds the acceptor from it.

use serde::Deserialize;
use std::path::PathBuf;

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (mosquitto's default also admits 1.2).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Where `identity_as_username` takes the MQTT username from in a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// The first Common Name of the subject (mosquitto's `use_identity_as_username`).
    Cn,
    /// The first DNS name or email address of the Subject Alternative Name extension.
    San,
}

/// A listener's `tls` table: `tls = { cert_file = "...", key_file = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawTlsConfig")]
pub struct TlsConfig {
    /// PEM: the server certificate first, then the intermediates, if any.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), unencrypted.
    pub key_file: PathBuf,
    pub min_version: TlsVersion,
    /// PEM CA certificates that client certificates are verified against; set, it turns
    /// on client certificates (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse clients without a certificate (default). When
    /// false, a certificate is still asked for and verified when the client sends one.
    pub require_client_cert: bool,
    /// Take the MQTT username from the client certificate instead of CONNECT.
    pub identity_as_username: Option<IdentitySource>,
}

/// The table as written, before the checks that involve several keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    min_version: TlsVersion,
    client_ca_file: Option<PathBuf>,
    require_client_cert: Option<bool>,
    identity_as_username: Option<IdentitySource>,
}

impl TryFrom<RawTlsConfig> for TlsConfig {
    type Error = String;

    fn try_from(raw: RawTlsConfig) -> Result<TlsConfig, String> {
        let config = TlsConfig {
            require_client_cert: raw
                .require_client_cert
                .unwrap_or(raw.client_ca_file.is_some()),
            cert_file: raw.cert_file,
            key_file: raw.key_file,
            min_version: raw.min_version,
            client_ca_file: raw.client_ca_file,
            identity_as_username: raw.identity_as_username,
        };
        config.check()?;
        Ok(config)
    }
}

impl TlsConfig {
    /// A server certificate and key, every other key at its default (no client certificates).
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            min_version: TlsVersion::default(),
            client_ca_file: None,
            require_client_cert: false,
            identity_as_username: None,
        }
    }

    /// Client certificates are only asked for when there is a CA to verify them against.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.client_ca_file.is_none() {
            if self.require_client_cert {
                return Err("tls: `require_client_cert = true` needs `client_ca_file`".into());
            }
            if self.identity_as_username.is_some() {
                return Err("tls: `identity_as_username` needs `client_ca_file`".into());
            }
        }
        Ok(())
    }
}
