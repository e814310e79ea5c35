//! SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, as MQTT 5 enhanced authentication
//! (Authentication Method `SCRAM-SHA-256`): no I/O, one value per exchange.
//!
//! ```text
//! CONNECT  auth data: client-first   n,,n=<user>,r=<client nonce>
//! AUTH 0x18 (server): server-first   r=<client nonce><server nonce>,s=<salt>,i=<iterations>
//! AUTH 0x18 (client): client-final   c=biws,r=<nonce>,p=<proof>
//! CONNACK 0x00:       server-final   v=<server signature>      (or CONNACK 0x87 on error)
//! ```
//!
//! Credentials are the password file's `SCRAM-SHA-256$...` lines (`ternmq passwd
//! --scram`). A user that is not in the file, or whose line is another kind of hash, gets
//! a server-first message like any other (a salt derived from the username and a per-load
//! secret, so it is the same on every try, and the file's usual iteration count), then
//! fails at the proof: the exchange does not tell which users exist. Both steps are cheap
//! (HMACs and one SHA-256; the client does the PBKDF2), so they can run on the runtime.
//!
//! Not supported: channel binding (`p=` gs2 flag: refused), an authorization identity
//! (`a=`: refused), SASLprep (the password bytes are used as given). Re-authentication
//! (AUTH 0x19) runs a new exchange with the same functions.

use super::password::{hmac_sha256, PasswordFile, ScramVerifier};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The Authentication Method name clients put in CONNECT.
pub const METHOD: &str = "SCRAM-SHA-256";

/// Why an exchange failed. Every failure is CONNACK 0x87 (Not authorized) for the client;
/// an unknown user fails as [`ScramError::InvalidProof`], like a wrong password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM authorization identity (a=) is not supported")]
    Authzid,
    #[error("SCRAM client-final message does not continue the exchange (nonce or channel binding differ)")]
    Mismatch,
    #[error("SCRAM proof is invalid")]
    InvalidProof,
    #[error("no random numbers from the operating system")]
    Random,
}

/// One exchange between its two steps: what `finish` needs from `start`.
pub struct ScramServer {
    username: String,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// `None`: unknown user (or not a SCRAM line): the exchange goes on, then fails.
    credentials: Option<ScramVerifier>,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramServer")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Reads the client-first message (CONNECT's Authentication Data) and returns the
    /// server-first message to send in AUTH (reason 0x18).
    pub fn start(
        creds: &PasswordFile,
        client_first: &[u8],
    ) -> Result<(ScramServer, Vec<u8>), ScramError> {
        let mut random = [0u8; 18];
        getrandom::fill(&mut random).map_err(|_| ScramError::Random)?;
        Self::start_with_nonce(creds, client_first, &B64.encode(random))
    }

    fn start_with_nonce(
        creds: &PasswordFile,
        client_first: &[u8],
        server_nonce: &str,
    ) -> Result<(ScramServer, Vec<u8>), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: "n," / "y," / "p=<cb>,", then "[a=<authzid>],".
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad gs2 channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Authzid);
        }
        let gs2_header = text[..text.len() - bare.len()].to_owned();
        let mut attrs = bare.split(',');
        let username = match attrs.next().and_then(|a| a.strip_prefix("n=")) {
            Some(name) => decode_saslname(name)?,
            None => return Err(ScramError::Malformed("client-first does not start with n=")),
        };
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| valid_nonce(n))
            .ok_or(ScramError::Malformed("client-first has no valid r="))?;
        // Further attributes are extensions, which a server may ignore (RFC 5802 5.1),
        // except the mandatory-extension flag `m=`, which belongs before n= anyway.

        let credentials = creds.scram(&username).cloned();
        let (salt, iterations) = match &credentials {
            Some(v) => (v.salt.clone(), v.iterations),
            None => (
                hmac_sha256(creds.secret(), username.as_bytes())[..16].to_vec(),
                creds.scram_decoy_iterations(),
            ),
        };
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
        let reply = server_first.clone().into_bytes();
        Ok((
            ScramServer {
                username,
                gs2_header,
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
                credentials,
            },
            reply,
        ))
    }

    /// The username of the exchange (from client-first), e.g. for logs.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Reads the client-final message (the client's AUTH data): on a valid proof returns
    /// the server-final message (for the CONNACK's Authentication Data) and the username.
    pub fn finish(self, client_final: &[u8]) -> Result<(Vec<u8>, String), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final has no p="))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("client-final does not start with c="))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("client-final has no r="))?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes())
            || nonce != self.nonce
        {
            return Err(ScramError::Mismatch);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;

        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        // An unknown user is checked against keys nobody has, so the work is the same.
        let (stored_key, server_key, known) = match &self.credentials {
            Some(v) => (v.stored_key, v.server_key, true),
            None => ([0u8; 32], [0u8; 32], false),
        };
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let client_key: [u8; 32] = std::array::from_fn(|i| proof[i] ^ signature[i]);
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        let valid: bool = computed.ct_eq(&stored_key).into();
        if !(valid && known) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac_sha256(&server_key, auth_message.as_bytes());
        Ok((
            format!("v={}", B64.encode(server_signature)).into_bytes(),
            self.username,
        ))
    }
}

/// A nonce is printable ASCII without `,` (RFC 5802 7).
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is malformed.
fn decode_saslname(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in username")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty username"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::password::{salted_password, NewHash};

    /// A SCRAM-SHA-256 client written from RFC 5802 section 3, to drive the server.
    struct Client {
        user: String,
        password: Vec<u8>,
        nonce: String,
    }

    struct ClientFinal {
        message: String,
        server_signature: [u8; 32],
    }

    impl Client {
        fn new(user: &str, password: &str, nonce: &str) -> Client {
            Client {
                user: user.into(),
                password: password.as_bytes().to_vec(),
                nonce: nonce.into(),
            }
        }

        fn bare(&self) -> String {
            let name = self.user.replace('=', "=3D").replace(',', "=2C");
            format!("n={name},r={}", self.nonce)
        }

        fn first(&self) -> String {
            format!("n,,{}", self.bare())
        }

        fn last(&self, server_first: &str) -> ClientFinal {
            let mut nonce = None;
            let mut salt = None;
            let mut iterations = None;
            for attr in server_first.split(',') {
                let (k, v) = attr.split_at(2);
                match k {
                    "r=" => nonce = Some(v.to_string()),
                    "s=" => salt = Some(B64.decode(v).unwrap()),
                    "i=" => iterations = Some(v.parse::<u32>().unwrap()),
                    _ => {}
                }
            }
            let nonce = nonce.unwrap();
            assert!(
                nonce.starts_with(&self.nonce),
                "server nonce must extend ours"
            );
            let salted = salted_password(&self.password, &salt.unwrap(), iterations.unwrap());
            let client_key = hmac_sha256(&salted, b"Client Key");
            let stored_key: [u8; 32] = Sha256::digest(client_key).into();
            let without_proof = format!("c=biws,r={nonce}");
            let auth_message = format!("{},{server_first},{without_proof}", self.bare());
            let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(signature)
                .map(|(k, s)| k ^ s)
                .collect();
            let server_key = hmac_sha256(&salted, b"Server Key");
            ClientFinal {
                message: format!("{without_proof},p={}", B64.encode(proof)),
                server_signature: hmac_sha256(&server_key, auth_message.as_bytes()),
            }
        }
    }

    fn file_with(user: &str, password: &str) -> PasswordFile {
        let mut file = PasswordFile::empty().unwrap();
        file.set(user, password.as_bytes(), NewHash::ScramSha256)
            .unwrap();
        file.set("argon", b"pw", NewHash::Argon2id).unwrap();
        file
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3, exactly.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let line = format!(
            "user:{}\n",
            ScramVerifier::derive(b"pencil", &salt, 4096).encode()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, line).unwrap();
        let file = PasswordFile::load(&path).unwrap();

        let client = Client::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (server, server_first) = ScramServer::start_with_nonce(
            &file,
            client.first().as_bytes(),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
        let server_first = text(server_first);
        assert_eq!(
            server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let last = client.last(&server_first);
        assert_eq!(
            last.message,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let (server_final, user) = server.finish(last.message.as_bytes()).unwrap();
        assert_eq!(
            text(server_final),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert_eq!(user, "user");
    }

    #[test]
    fn exchange_with_random_nonce_and_escaped_username() {
        let file = file_with("a,b=c", "s3cret");
        let client = Client::new("a,b=c", "s3cret", "abc123");
        assert!(client.first().contains("n=a=2Cb=3Dc,"));
        let (server, first) = ScramServer::start(&file, client.first().as_bytes()).unwrap();
        assert_eq!(server.username(), "a,b=c");
        let last = client.last(&text(first));
        let (server_final, user) = server.finish(last.message.as_bytes()).unwrap();
        assert_eq!(
            text(server_final),
            format!("v={}", B64.encode(last.server_signature))
        );
        assert_eq!(user, "a,b=c");
    }

    #[test]
    fn wrong_password_fails() {
        let file = file_with("u", "right");
        let client = Client::new("u", "wrong", "n0nce");
        let (server, first) = ScramServer::start(&file, client.first().as_bytes()).unwrap();
        let last = client.last(&text(first));
        assert_eq!(
            server.finish(last.message.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn unknown_users_look_like_known_ones_then_fail() {
        let file = file_with("u", "pw");
        let first_of = |user: &str| {
            let client = Client::new(user, "pw", "n0nce");
            let (server, first) = ScramServer::start(&file, client.first().as_bytes()).unwrap();
            (client, server, text(first))
        };
        let (_, _, known) = first_of("u");
        let (client, server, unknown) = first_of("ghost");
        let (_, _, again) = first_of("ghost");
        let salt = |m: &str| m.split(',').nth(1).unwrap().to_string();
        let rest = |m: &str| m.split(',').skip(2).collect::<Vec<_>>().join(",");
        // Same shape: a 16-byte salt, the file's iteration count; stable per user.
        assert_eq!(B64.decode(&salt(unknown.as_str())[2..]).unwrap().len(), 16);
        assert_eq!(rest(&known), rest(&unknown));
        assert_eq!(salt(&unknown), salt(&again));
        assert_ne!(salt(&unknown), salt(&first_of("ghost2").2));
        let last = client.last(&unknown);
        assert_eq!(
            server.finish(last.message.as_bytes()),
            Err(ScramError::InvalidProof)
        );
        // A user whose line is not SCRAM cannot use SCRAM, and fails the same way.
        let (client, server, first) = first_of("argon");
        let last = client.last(&first);
        assert_eq!(
            server.finish(last.message.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn tampered_final_messages_fail() {
        let file = file_with("u", "pw");
        let client = Client::new("u", "pw", "n0nce");
        // A fresh exchange and the right client-final for it.
        let exchange = || {
            let (server, first) = ScramServer::start(&file, client.first().as_bytes()).unwrap();
            (server, client.last(&text(first)).message)
        };
        let finish = |server: ScramServer, message: &str| server.finish(message.as_bytes());

        // Replayed from another exchange: the server nonce differs.
        let (_, old) = exchange();
        let (server, _) = exchange();
        assert_eq!(finish(server, &old), Err(ScramError::Mismatch));

        let (server, good) = exchange();
        let changed = good.replacen("c=biws", "c=eSws", 1);
        assert_eq!(finish(server, &changed), Err(ScramError::Mismatch));

        let (server, good) = exchange();
        let (head, _) = good.rsplit_once(",p=").unwrap();
        assert_eq!(
            finish(server, head),
            Err(ScramError::Malformed("client-final has no p="))
        );

        let (server, good) = exchange();
        let (head, _) = good.rsplit_once(",p=").unwrap();
        let short = format!("{head},p=AAAA");
        let expected = ScramError::Malformed("proof is not 32 bytes of base64");
        assert_eq!(finish(server, &short), Err(expected));

        let (server, good) = exchange();
        let no_c = good.replacen("c=biws,", "", 1);
        let expected = ScramError::Malformed("client-final does not start with c=");
        assert_eq!(finish(server, &no_c), Err(expected));

        // One flipped bit in the proof.
        let (server, good) = exchange();
        let (head, proof_text) = good.rsplit_once(",p=").unwrap();
        let mut proof_bytes = B64.decode(proof_text).unwrap();
        proof_bytes[0] ^= 1;
        let flipped = format!("{head},p={}", B64.encode(proof_bytes));
        assert_eq!(finish(server, &flipped), Err(ScramError::InvalidProof));
    }

    #[test]
    fn malformed_client_first() {
        let file = file_with("u", "pw");
        for (message, expected) in [
            (&b"\xff"[..], ScramError::Malformed("not UTF-8")),
            (b"n", ScramError::Malformed("no gs2 header")),
            (b"p=tls-unique,,n=u,r=x", ScramError::ChannelBinding),
            (
                b"x,,n=u,r=x",
                ScramError::Malformed("bad gs2 channel binding flag"),
            ),
            (b"n,a=admin,n=u,r=x", ScramError::Authzid),
            (
                b"n,,r=x,n=u",
                ScramError::Malformed("client-first does not start with n="),
            ),
            (
                b"n,,n=u",
                ScramError::Malformed("client-first has no valid r="),
            ),
            (
                b"n,,n=u,r=",
                ScramError::Malformed("client-first has no valid r="),
            ),
            (
                b"n,,n=u=2,r=x",
                ScramError::Malformed("bad escape in username"),
            ),
            (b"n,,n=,r=x", ScramError::Malformed("empty username")),
        ] {
            assert_eq!(
                ScramServer::start(&file, message).unwrap_err(),
                expected,
                "{message:?}"
            );
        }
        // `y` (client could bind, thinks we cannot) and extensions are accepted.
        assert!(ScramServer::start(&file, b"y,,n=u,r=x,ext=1").is_ok());
    }
}
