//! What the security tests share: files in a temporary directory, the password tools,
//! CONNECT packets with credentials, a test PKI (rcgen), JWTs signed with keys made now,
//! and a SCRAM-SHA-256 client written from RFC 5802.

use crate::common::client::{connect_v5, Client};
use crate::common::mosquitto::{in_ci, on_path, Proc};
use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use ternmq::protocol::{ByteStr, Connect, Packet, Protocol};

// ---------------------------------------------------------------------------------------
// Files and tools
// ---------------------------------------------------------------------------------------

/// Files in a temporary directory, as a broker reads them.
pub struct Files(tempfile::TempDir);

impl Files {
    pub fn new() -> Files {
        Files(tempfile::tempdir().expect("temporary directory"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write a test file");
        path
    }
}

/// Whether `tools` are installed; skips (outside CI) or fails (under CI) otherwise.
pub fn tools_available(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let what = format!(
        "{} not found on PATH (run tests/run.sh, which installs them)",
        missing.join(", ")
    );
    assert!(!in_ci(), "CI=true and {what}");
    eprintln!("note: skipping: {what}");
    false
}

/// `mosquitto_passwd -b` (the password as an argument: fine for a test), with `-c` to
/// create the file and `-H sha512` for mosquitto 1.x's `$6$` instead of 2.x's `$7$`.
pub fn mosquitto_passwd(file: &Path, user: &str, password: &str, create: bool, sha512: bool) {
    let mut cmd = Command::new("mosquitto_passwd");
    if create {
        cmd.arg("-c");
    }
    if sha512 {
        cmd.args(["-H", "sha512"]);
    }
    cmd.arg("-b").arg(file).args([user, password]);
    let out = cmd.output().expect("run mosquitto_passwd");
    assert!(out.status.success(), "mosquitto_passwd failed: {out:?}");
}

/// `ternmq passwd FILE USER` with the password on standard input, as a script runs it;
/// `--scram` stores a SCRAM-SHA-256 verifier instead of argon2id.
pub fn ternmq_passwd(file: &Path, user: &str, password: &str, scram: bool) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternmq"));
    cmd.arg("passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    if scram {
        cmd.arg("--scram");
    }
    cmd.arg(file).arg(user);
    let mut p = Proc::spawn(cmd, Some(format!("{password}\n").into_bytes()));
    let status = wait_blocking(&mut p);
    assert!(status.success(), "ternmq passwd failed: {}", p.describe());
}

fn wait_blocking(p: &mut Proc) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = p.exited() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{}", p.describe());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// CONNECT with credentials
// ---------------------------------------------------------------------------------------

/// A CONNECT (Clean Start, keep-alive 60 s) with a username and password when given.
pub fn login(
    protocol: Protocol,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Connect {
    Connect {
        protocol,
        username: user.map(ByteStr::from),
        password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
        ..connect_v5(client_id)
    }
}

/// Connects with `connect` and asserts the CONNACK's reason code.
pub async fn connect_expecting(
    target: impl Into<crate::common::client::Target>,
    connect: Connect,
    code: ternmq::protocol::ReasonCode,
) -> Client {
    let (c, ack) = Client::connect_with(target, connect).await;
    assert_eq!(ack.code, code, "{}: CONNACK code", c.name);
    c
}

/// A 3.1.1 CONNECT's bytes, for raw sockets (clean session, `keep_alive` seconds).
pub fn connect_bytes(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let connect = Connect {
        keep_alive,
        ..login(Protocol::V311, client_id, None, None)
    };
    crate::common::client::encode(&Packet::Connect(Box::new(connect)), Protocol::V311).to_vec()
}

// ---------------------------------------------------------------------------------------
// A test PKI
// ---------------------------------------------------------------------------------------

/// A certificate authority made at test time.
pub struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key, in PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    fn issue(&self, cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        let sans = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        self.issue("localhost", sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with Common Name `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key`; returns their paths.
    pub fn write(&self, files: &Files, name: &str) -> (PathBuf, PathBuf) {
        (
            files.write(&format!("{name}.crt"), &self.cert),
            files.write(&format!("{name}.key"), &self.key),
        )
    }
}

// ---------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------

/// Seconds since the epoch, `offset` from now.
pub fn unix_time(offset: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now + offset
}

pub fn sign_jwt(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &serde_json::Value,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

/// A fresh P-256 key pair: (private PKCS#8 PEM, public SPKI PEM).
pub fn p256_key() -> (String, String) {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
    (
        secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
}

// ---------------------------------------------------------------------------------------
// SCRAM-SHA-256, the client side (RFC 5802 section 3, RFC 7677)
// ---------------------------------------------------------------------------------------

pub struct ScramClient {
    user: String,
    password: String,
    nonce: String,
    /// Set by `client_final`: the ServerSignature the server must prove.
    server_signature: Option<Vec<u8>>,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl ScramClient {
    pub fn new(user: &str, password: &str) -> ScramClient {
        // A nonce of printable characters without ',' (RFC 5802 section 5.1).
        let mut random = [0u8; 18];
        getrandom::fill(&mut random).unwrap();
        use base64::Engine;
        ScramClient {
            user: user.into(),
            password: password.into(),
            nonce: b64().encode(random),
            server_signature: None,
        }
    }

    fn bare(&self) -> String {
        // saslname: '=' and ',' escaped.
        let name = self.user.replace('=', "=3D").replace(',', "=2C");
        format!("n={name},r={}", self.nonce)
    }

    /// client-first-message: no channel binding ("n,,").
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.bare()).into_bytes()
    }

    /// client-final-message for the server-first-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Vec<u8> {
        use base64::Engine;
        use sha2::Digest;
        let server_first = std::str::from_utf8(server_first).expect("server-first is text");
        let attr = |name: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {server_first}"))
        };
        let nonce = attr("r=");
        assert!(
            nonce.starts_with(&self.nonce),
            "the server nonce extends ours"
        );
        let salt = b64().decode(attr("s=")).unwrap();
        let iterations: u32 = attr("i=").parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(
            self.password.as_bytes(),
            &salt,
            iterations,
            &mut salted,
        );
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = sha2::Sha256::digest(&client_key);
        // c=biws: base64 of the GS2 header "n,,".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.bare());
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        format!("{without_proof},p={}", b64().encode(proof)).into_bytes()
    }

    /// Whether the server-final-message proves the server knows the verifier.
    pub fn verifies(&self, server_final: &[u8]) -> bool {
        use base64::Engine;
        let expected = self
            .server_signature
            .as_ref()
            .expect("client_final was sent");
        std::str::from_utf8(server_final)
            .ok()
            .and_then(|s| s.strip_prefix("v="))
            .and_then(|v| b64().decode(v).ok())
            .is_some_and(|v| &v == expected)
    }
}
