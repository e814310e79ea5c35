// Test cases read best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

//! Real handshakes over loopback TCP between the acceptor and a tokio-rustls client (and
//! `openssl s_client`), with certificates made at test time: no key material in the tree.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ProtocolVersion};
use tokio_rustls::TlsConnector;

/// Bounds every wait, so that a broken handshake fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
type ServerEnd = io::Result<(TlsStream<TcpStream>, Peer)>;

/// A test certificate authority.
struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate issued by a `Ca`, with its key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn issue(&self, cn: Option<&str>, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for "localhost".
    fn server(&self, cn: &str) -> Leaf {
        let sans = vec![SanType::DnsName("localhost".try_into().unwrap())];
        self.issue(Some(cn), sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, cn: Option<&str>, sans: Vec<SanType>) -> Leaf {
        self.issue(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Files in a temporary directory, as a broker reads them.
struct Files(TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes the server's certificate (with the CA after it, as a chain) and key.
    fn server_config(&self, ca: &Ca, leaf: &Leaf) -> TlsConfig {
        let chain = format!("{}{}", leaf.cert_pem, ca.0.pem());
        TlsConfig::new(
            self.write("server.crt", &chain),
            self.write("server.key", &leaf.key_pem),
        )
    }

    /// `server_config` plus client certificates verified against `ca`.
    fn mtls_config(&self, ca: &Ca, leaf: &Leaf, identity: Option<IdentitySource>) -> TlsConfig {
        TlsConfig {
            client_ca_file: Some(self.write("client-ca.crt", &ca.0.pem())),
            require_client_cert: true,
            identity_as_username: identity,
            ..self.server_config(ca, leaf)
        }
    }
}

fn acceptor(config: TlsConfig) -> TlsAcceptor {
    TlsAcceptor::new(config, &[ALPN_MQTT], HANDSHAKE_TIMEOUT).unwrap()
}

/// A client trusting `trust`, limited to `versions`, sending `cert` when asked for one.
fn client(
    trust: &Ca,
    versions: &[&'static SupportedProtocolVersion],
    cert: Option<&Leaf>,
    alpn: &[&[u8]],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(trust.0.der().clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder
                .with_client_auth_cert(vec![leaf.der.clone()], key)
                .unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn default_client(trust: &Ca) -> ClientConfig {
    client(trust, rustls::DEFAULT_VERSIONS, None, &[ALPN_MQTT])
}

/// One handshake over loopback TCP: the acceptor's result and the client's.
async fn handshake(
    acceptor: &TlsAcceptor,
    client: ClientConfig,
) -> (ServerEnd, io::Result<ClientStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = async {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await
    };
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(WAIT, async { tokio::join!(server, client) })
        .await
        .expect("handshake hung")
}

/// The rustls error inside a failed handshake's io::Error.
fn rustls_error(e: &io::Error) -> &RustlsError {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<RustlsError>())
        .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
}

/// Echoes what the client writes, until it closes.
fn echo(mut stream: TlsStream<TcpStream>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            if stream.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    })
}

/// Sends `message` on an established connection and reads it back from `echo`.
async fn round_trip(client: &mut ClientStream, message: &[u8]) {
    client.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(WAIT, client.read_exact(&mut back))
        .await
        .expect("echo hung")
        .unwrap();
    assert_eq!(back, message);
}

fn server_certificate(client: &ClientStream) -> CertificateDer<'static> {
    client.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn handshake_with_a_client_trusting_the_ca() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let leaf = ca.server("server");
    let acceptor = acceptor(files.server_config(&ca, &leaf));

    let (server, client) = handshake(&acceptor, default_client(&ca)).await;
    let (stream, peer) = server.unwrap();
    let mut client = client.unwrap();
    assert_eq!(
        peer,
        Peer {
            identity_as_username: false,
            identity: None,
            client_cert: false,
            alpn: Some(b"mqtt".to_vec()),
            server_name: Some("localhost".into()),
        }
    );
    assert_eq!(server_certificate(&client), leaf.der);
    assert_eq!(
        client.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    echo(stream);
    round_trip(&mut client, b"CONNECT").await;
}

#[tokio::test]
async fn client_not_trusting_the_ca_fails() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let acceptor = acceptor(files.server_config(&ca, &ca.server("server")));

    let (server, client) = handshake(&acceptor, default_client(&Ca::new("other CA"))).await;
    let e = client.unwrap_err();
    assert!(
        matches!(
            rustls_error(&e),
            RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{e}"
    );
    assert!(server.is_err());
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let config = files.server_config(&ca, &ca.server("server"));
    let tls12_only = || client(&ca, &[&rustls::version::TLS12], None, &[ALPN_MQTT]);

    // The default (1.2) serves it...
    let (server, client) = handshake(&acceptor(config.clone()), tls12_only()).await;
    server.unwrap();
    assert_eq!(
        client.unwrap().get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );

    // ..."1.3" does not.
    let tls13 = acceptor(TlsConfig {
        min_version: TlsVersion::Tls13,
        ..config
    });
    let (server, client) = handshake(&tls13, tls12_only()).await;
    let e = server.unwrap_err();
    assert!(
        matches!(rustls_error(&e), RustlsError::PeerIncompatible(_)),
        "{e}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn alpn_is_a_parameter() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let config = files.server_config(&ca, &ca.server("server"));
    let mqtt = acceptor(config.clone());
    let ws = TlsAcceptor::new(config, &[ALPN_HTTP1], HANDSHAKE_TIMEOUT).unwrap();
    let offering = |alpn: &[&[u8]]| client(&ca, rustls::DEFAULT_VERSIONS, None, alpn);

    // A client offering no ALPN (mosquitto_pub's default) is served.
    let (server, client) = handshake(&mqtt, offering(&[])).await;
    assert_eq!(server.unwrap().1.alpn, None);
    client.unwrap();

    let (server, _) = handshake(&ws, offering(&[b"h2", ALPN_HTTP1])).await;
    assert_eq!(server.unwrap().1.alpn.as_deref(), Some(ALPN_HTTP1));

    // Offering only protocols the listener does not speak is refused (RFC 7301).
    let (server, _) = handshake(&mqtt, offering(&[ALPN_HTTP1])).await;
    let e = server.unwrap_err();
    assert!(
        matches!(rustls_error(&e), RustlsError::NoApplicationProtocol),
        "{e}"
    );
}

#[tokio::test]
async fn required_client_certificates() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let server_leaf = ca.server("server");
    let acceptor = acceptor(files.mtls_config(&ca, &server_leaf, Some(IdentitySource::Cn)));
    let with_cert = |leaf: &Leaf| client(&ca, rustls::DEFAULT_VERSIONS, Some(leaf), &[ALPN_MQTT]);

    // No certificate: refused.
    let (server, _) = handshake(&acceptor, default_client(&ca)).await;
    let e = server.unwrap_err();
    assert!(
        matches!(rustls_error(&e), RustlsError::NoCertificatesPresented),
        "{e}"
    );

    // A certificate from the CA: accepted, its CN is the identity.
    let alice = ca.client(Some("alice"), vec![]);
    let (server, client) = handshake(&acceptor, with_cert(&alice)).await;
    let (stream, peer) = server.unwrap();
    assert!(peer.client_cert && peer.identity_as_username);
    assert_eq!(peer.identity.as_deref(), Some("alice"));
    echo(stream);
    round_trip(&mut client.unwrap(), b"hello").await;

    // A certificate from another CA: refused.
    let mallory = Ca::new("other CA").client(Some("alice"), vec![]);
    let (server, _) = handshake(&acceptor, with_cert(&mallory)).await;
    let e = server.unwrap_err();
    assert!(
        matches!(
            rustls_error(&e),
            RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{e}"
    );

    // A server certificate (no clientAuth usage) is no client certificate.
    let (server, _) = handshake(&acceptor, with_cert(&ca.server("alice"))).await;
    assert!(server.is_err());
}

#[tokio::test]
async fn identity_from_the_san() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let acceptor =
        acceptor(files.mtls_config(&ca, &ca.server("server"), Some(IdentitySource::San)));
    let with_cert = |leaf: &Leaf| client(&ca, rustls::DEFAULT_VERSIONS, Some(leaf), &[ALPN_MQTT]);

    // The first DNS or email entry, skipping the kinds that are neither.
    let sans = vec![
        SanType::IpAddress([10, 0, 0, 7].into()),
        SanType::Rfc822Name("sensor-7@example.com".try_into().unwrap()),
        SanType::DnsName("sensor-7.example.com".try_into().unwrap()),
    ];
    let (server, _) = handshake(&acceptor, with_cert(&ca.client(Some("cn"), sans))).await;
    assert_eq!(
        server.unwrap().1.identity.as_deref(),
        Some("sensor-7@example.com")
    );

    let sans = vec![SanType::DnsName("sensor-8.example.com".try_into().unwrap())];
    let (server, _) = handshake(&acceptor, with_cert(&ca.client(None, sans))).await;
    assert_eq!(
        server.unwrap().1.identity.as_deref(),
        Some("sensor-8.example.com")
    );

    // Verified but with no such name: no identity (the connection layer refuses CONNECT).
    let only_ip = vec![SanType::IpAddress([10, 0, 0, 9].into())];
    let (server, _) = handshake(&acceptor, with_cert(&ca.client(Some("cn"), only_ip))).await;
    let peer = server.unwrap().1;
    assert!(peer.client_cert && peer.identity_as_username);
    assert_eq!(peer.identity, None);
}

#[tokio::test]
async fn optional_client_certificates_are_verified_when_presented() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let acceptor = acceptor(TlsConfig {
        require_client_cert: false,
        ..files.mtls_config(&ca, &ca.server("server"), Some(IdentitySource::Cn))
    });
    let with_cert = |leaf: &Leaf| client(&ca, rustls::DEFAULT_VERSIONS, Some(leaf), &[ALPN_MQTT]);

    let (server, _) = handshake(&acceptor, default_client(&ca)).await;
    let peer = server.unwrap().1;
    assert!(!peer.client_cert && peer.identity_as_username);
    assert_eq!(peer.identity, None);

    let (server, _) = handshake(&acceptor, with_cert(&ca.client(Some("bob"), vec![]))).await;
    assert_eq!(server.unwrap().1.identity.as_deref(), Some("bob"));

    // A certificate without a CN gives no identity under "cn".
    let sans = vec![SanType::DnsName("bob.example.com".try_into().unwrap())];
    let (server, _) = handshake(&acceptor, with_cert(&ca.client(None, sans))).await;
    let peer = server.unwrap().1;
    assert!(peer.client_cert);
    assert_eq!(peer.identity, None);

    let stranger = Ca::new("other CA").client(Some("bob"), vec![]);
    let (server, _) = handshake(&acceptor, with_cert(&stranger)).await;
    assert!(server.is_err());
}

#[tokio::test]
async fn reload_serves_new_files_and_keeps_established_connections() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let first = ca.server("first");
    let config = files.server_config(&ca, &first);
    let acceptor = acceptor(config.clone());

    let (server, client) = handshake(&acceptor, default_client(&ca)).await;
    let mut established = client.unwrap();
    assert_eq!(server_certificate(&established), first.der);
    echo(server.unwrap().0);

    let second = ca.server("second");
    files.server_config(&ca, &second);
    acceptor.reload().unwrap();

    let (server, client) = handshake(&acceptor, default_client(&ca)).await;
    server.unwrap();
    assert_eq!(server_certificate(&client.unwrap()), second.der);
    round_trip(&mut established, b"still here").await;

    // A failed reload names the file and leaves the last good files in use.
    std::fs::write(&config.key_file, "not a key").unwrap();
    let e = acceptor.reload().unwrap_err().to_string();
    assert!(e.contains(&config.key_file.display().to_string()), "{e}");
    let (server, client) = handshake(&acceptor, default_client(&ca)).await;
    server.unwrap();
    assert_eq!(server_certificate(&client.unwrap()), second.der);
    round_trip(&mut established, b"and still").await;

    // A clone is the same acceptor: reloading one reloads both.
    let clone = acceptor.clone();
    files.server_config(&ca, &first);
    clone.reload().unwrap();
    let (_, client) = handshake(&acceptor, default_client(&ca)).await;
    assert_eq!(server_certificate(&client.unwrap()), first.der);
}

#[tokio::test]
async fn silent_and_plaintext_clients_do_not_hold_the_socket() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let acceptor = TlsAcceptor::new(
        files.server_config(&ca, &ca.server("server")),
        &[ALPN_MQTT],
        Duration::from_millis(200),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // Connects and says nothing: the handshake gives up.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let e = tokio::time::timeout(WAIT, acceptor.accept(tcp))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);

    // Speaks plain MQTT (a CONNECT) to the TLS port: refused.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    plain
        .write_all(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04ab12")
        .await
        .unwrap();
    let e = tokio::time::timeout(WAIT, acceptor.accept(tcp))
        .await
        .unwrap()
        .unwrap_err();
    assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}");
}

/// The error of building an acceptor from `config`, as a message.
fn error(config: TlsConfig) -> String {
    TlsAcceptor::new(config, &[ALPN_MQTT], HANDSHAKE_TIMEOUT)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_files_are_named() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let leaf = ca.server("server");
    let good = files.server_config(&ca, &leaf);
    let name = |path: &Path| path.display().to_string();

    let missing = files.0.path().join("missing.crt");
    let e = error(TlsConfig {
        cert_file: missing.clone(),
        ..good.clone()
    });
    assert!(
        e.starts_with(&format!("cannot read {}: ", name(&missing))),
        "{e}"
    );

    // Certificate and key swapped.
    let e = error(TlsConfig {
        cert_file: good.key_file.clone(),
        key_file: good.cert_file.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&good.key_file)) && e.contains("no certificate"),
        "{e}"
    );

    let certs_only = files.write("certs-only.pem", &leaf.cert_pem);
    let e = error(TlsConfig {
        key_file: certs_only.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&certs_only)) && e.contains("no private key"),
        "{e}"
    );

    let other_key = files.write("other.key", &ca.server("server").key_pem);
    let e = error(TlsConfig {
        key_file: other_key.clone(),
        ..good.clone()
    });
    assert!(
        e.starts_with(&format!(
            "{}: the private key does not match the certificate in {} ",
            name(&other_key),
            name(&good.cert_file)
        )),
        "{e}"
    );

    let bad_key = files.write(
        "bad.key",
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    );
    let e = error(TlsConfig {
        key_file: bad_key.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&bad_key)) && e.contains("unusable private key"),
        "{e}"
    );

    let encrypted = files.write(
        "encrypted.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBAA==\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    let e = error(TlsConfig {
        key_file: encrypted.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&encrypted)) && e.contains("encrypted"),
        "{e}"
    );

    let truncated = files.write("truncated.crt", &leaf.cert_pem[..leaf.cert_pem.len() - 30]);
    let e = error(TlsConfig {
        cert_file: truncated.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&truncated)) && e.contains("not valid PEM"),
        "{e}"
    );

    let not_x509 = files.write(
        "not-x509.crt",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let e = error(TlsConfig {
        cert_file: not_x509.clone(),
        ..good.clone()
    });
    assert!(
        e.contains(&name(&not_x509)) && e.contains("not a valid X.509"),
        "{e}"
    );

    for (file, contents, says) in [
        ("empty-ca.crt", "", "no CA certificate"),
        ("key-as-ca.crt", leaf.key_pem.as_str(), "no CA certificate"),
        (
            "garbage-ca.crt",
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "not a usable CA certificate",
        ),
    ] {
        let ca_file = files.write(file, contents);
        let e = error(TlsConfig {
            client_ca_file: Some(ca_file.clone()),
            require_client_cert: true,
            ..good.clone()
        });
        assert!(e.contains(&name(&ca_file)) && e.contains(says), "{e}");
    }
    let unreadable = files.0.path().join("no-such-ca.crt");
    let e = error(TlsConfig {
        client_ca_file: Some(unreadable.clone()),
        ..good.clone()
    });
    assert!(
        e.starts_with(&format!("cannot read {}", name(&unreadable))),
        "{e}"
    );

    // Settings that cannot work together are refused even when built in code.
    let e = error(TlsConfig {
        require_client_cert: true,
        ..good.clone()
    });
    assert!(e.contains("client_ca_file"), "{e}");
}

#[test]
fn config_keys_and_defaults() {
    let parse = |text: &str| toml::from_str::<TlsConfig>(text).map_err(|e| e.to_string());
    let minimal = "cert_file = \"s.crt\"\nkey_file = \"s.key\"\n";

    let c = parse(minimal).unwrap();
    assert_eq!(c, TlsConfig::new("s.crt", "s.key"));
    assert_eq!(c.min_version, TlsVersion::Tls12);
    assert!(!c.require_client_cert && c.client_ca_file.is_none());

    // A client CA turns on required client certificates unless told otherwise.
    let c = parse(&format!("{minimal}client_ca_file = \"ca.crt\"\n")).unwrap();
    assert!(c.require_client_cert);
    let c = parse(&format!(
        "{minimal}client_ca_file = \"ca.crt\"\nrequire_client_cert = false\n\
         identity_as_username = \"san\"\nmin_version = \"1.3\"\n"
    ))
    .unwrap();
    assert!(!c.require_client_cert);
    assert_eq!(c.identity_as_username, Some(IdentitySource::San));
    assert_eq!(c.min_version, TlsVersion::Tls13);

    for (extra, says) in [
        ("min_version = \"1.1\"\n", "1.3"),
        ("identity_as_username = \"dn\"\n", "cn"),
        ("require_client_cert = true\n", "client_ca_file"),
        ("identity_as_username = \"cn\"\n", "client_ca_file"),
        ("cafile = \"ca.crt\"\n", "cafile"),
    ] {
        let e = parse(&format!("{minimal}{extra}")).unwrap_err();
        assert!(e.contains(says), "{extra}: {e}");
    }
    let e = parse("cert_file = \"s.crt\"\n").unwrap_err();
    assert!(e.contains("key_file"), "{e}");
}

/// Whether a command is installed; skips (outside CI) or fails (under CI) otherwise.
fn have(command: &str) -> bool {
    let found = Command::new(command)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    let in_ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    match (found, in_ci) {
        (true, _) => true,
        (false, true) => {
            panic!("CI=true and {command} is not installed (tests/run.sh installs it)")
        }
        (false, false) => {
            eprintln!("note: skipping: {command} not found (apt-get install {command})");
            false
        }
    }
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test CA recipe of docs/security.md, run with openssl; the keys come in the three
/// PEM encodings the key file may use.
fn openssl_pki(dir: &Path) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage = clientAuth\n").unwrap();
    let steps: &[&[&str]] = &[
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=ternmq test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
        // Server: an RSA key in PKCS#1 ("BEGIN RSA PRIVATE KEY").
        &["genrsa", "-traditional", "-out", "server.key", "2048"],
        &[
            "req",
            "-new",
            "-key",
            "server.key",
            "-subj",
            "/CN=localhost",
            "-out",
            "server.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "825",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
        // Client: an EC key in SEC1 ("BEGIN EC PRIVATE KEY").
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "client.key",
        ],
        &[
            "req",
            "-new",
            "-key",
            "client.key",
            "-subj",
            "/CN=alice",
            "-out",
            "client.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "825",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        ],
    ];
    for step in steps {
        openssl(dir, step);
    }
    let head = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    assert!(head("ca.key").starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(head("server.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(head("client.key").starts_with("-----BEGIN EC PRIVATE KEY-----"));
}

/// `openssl s_client` against the acceptor: it verifies the server against the CA, sends
/// the client certificate, agrees on "mqtt", and its bytes reach the acceptor's stream.
#[tokio::test]
async fn openssl_s_client_with_openssl_made_certificates() {
    if !have("openssl") {
        return;
    }
    let files = Files::new();
    let dir = files.0.path().to_owned();
    openssl_pki(&dir);
    let acceptor = acceptor(TlsConfig {
        cert_file: dir.join("server.crt"),
        key_file: dir.join("server.key"),
        client_ca_file: Some(dir.join("ca.crt")),
        require_client_cert: true,
        identity_as_username: Some(IdentitySource::Cn),
        min_version: TlsVersion::Tls12,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();

    // Answers the first line with the identity, then closes (which ends s_client).
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, peer) = acceptor.accept(tcp).await.unwrap();
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            line.extend_from_slice(&byte);
        }
        let reply = format!(
            "got {} from {:?}\n",
            String::from_utf8_lossy(&line).trim(),
            peer.identity
        );
        stream.write_all(reply.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        peer
    });

    let client = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
                "-verify_hostname",
                "localhost",
                "-CAfile",
                "ca.crt",
                "-verify_return_error",
                "-cert",
                "client.crt",
                "-key",
                "client.key",
                "-alpn",
                "mqtt",
                "-ign_eof",
            ])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"ping\n").unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (child.wait().unwrap(), out)
    });
    let peer = tokio::time::timeout(WAIT, server)
        .await
        .expect("s_client hung")
        .unwrap();
    let (status, out) = tokio::time::timeout(WAIT, client)
        .await
        .expect("s_client hung")
        .unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("ALPN protocol: mqtt"), "{out}");
    assert!(out.contains("got ping from Some(\"alice\")"), "{out}");
    assert_eq!(peer.identity.as_deref(), Some("alice"));
    assert_eq!(peer.alpn.as_deref(), Some(ALPN_MQTT));
}
