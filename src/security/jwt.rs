//! Token authentication: a JWT (RFC 7519, JWS compact form) in the MQTT password field.
//!
//! Keys: an HMAC secret (`secret` or `secret_file`: HS256/384/512), a PEM public key
//! (`public_key_file`: RSA for RS*/PS*, P-256/P-384 for ES256/ES384, Ed25519 for EdDSA)
//! or a JWKS file (`jwks_file`, RFC 7517: the key is chosen by the token's `kid`; a token
//! without `kid` is accepted only when the set has one key). Exactly one of them.
//!
//! `algorithms` lists the accepted `alg` values; by default the one the key implies (HS256
//! for a secret, RS256 / ES256 / ES384 / EdDSA for a public key, the keys' `alg` or kind for
//! a JWKS). The `alg` must also suit the key, so an RSA public key is never taken as an
//! HMAC secret, and `none` is never accepted.
//!
//! Claims: `exp` is required, and the token is refused from `exp` on; `nbf`, when present,
//! refuses it before then; both with `leeway` seconds of tolerance for clock skew (default
//! [`DEFAULT_LEEWAY`]). `iss` and `aud` are checked when `issuer` / `audience` are
//! configured. The username is the `username_claim` claim (default `sub`), a non-empty
//! string. The `acl_claim` claim (default `acl`), when present, carries [`TokenAcl`] rules
//! that replace the acl_file's for that client; a malformed one refuses the token.
//!
//! Time is passed in (`now`), so the checks are tested without waiting.

use super::acl::TokenAcl;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: u64 = 5;

/// `[auth.jwt]` in broker.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// HMAC secret, as text.
    pub secret: Option<String>,
    /// File holding the HMAC secret (a trailing newline is not part of it).
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519).
    pub public_key_file: Option<PathBuf>,
    /// JWKS file: `{"keys": [...]}`.
    pub jwks_file: Option<PathBuf>,
    /// Accepted `alg` values; empty: the key's own.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Claim holding the username (default `sub`).
    pub username_claim: Option<String>,
    /// Claim holding ACL rules (default `acl`).
    pub acl_claim: Option<String>,
    /// Seconds of tolerance on `exp` and `nbf` (default [`DEFAULT_LEEWAY`]).
    pub leeway: Option<u64>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's), if set.
    pub audience: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("[auth.jwt] needs exactly one of secret, secret_file, public_key_file, jwks_file")]
    KeySource,
    #[error("[auth.jwt] cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[auth.jwt] {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("[auth.jwt] the HMAC secret is empty")]
    EmptySecret,
    #[error("[auth.jwt] algorithm `{0}`: unknown, or unusable with the configured key")]
    Algorithm(String),
}

/// Why a token was refused (CONNACK 0x86 Bad user name or password / 0x04).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("no key for the token (kid {0:?})")]
    UnknownKey(Option<String>),
    #[error("token rejected: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token has no valid `{0}` claim")]
    Claim(String),
    #[error("token ACL claim `{claim}`: {message}")]
    Acl { claim: String, message: String },
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub username: String,
    /// Rules replacing the acl_file's, if the token has the ACL claim.
    pub acl: Option<TokenAcl>,
    /// When the token stops being accepted (`exp` + leeway): a connection made with it
    /// is closed then.
    pub expires_at: SystemTime,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, which the token's must then equal.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys. `Send + Sync`; share it in an `Arc`.
/// Checking an RSA or EC signature takes well under a millisecond.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    algorithms: Vec<Algorithm>,
    username_claim: String,
    acl_claim: String,
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Loads the key files. Errors name the file and what is wrong.
    pub fn from_config(config: &JwtConfig) -> Result<JwtVerifier, JwtConfigError> {
        let sources = [
            config.secret.is_some(),
            config.secret_file.is_some(),
            config.public_key_file.is_some(),
            config.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(JwtConfigError::KeySource);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| JwtConfigError::Read {
                path: path.clone(),
                source,
            })
        };
        let single = |key: DecodingKey| Key {
            kid: None,
            alg: None,
            key,
        };
        let keys = if let Some(secret) = &config.secret {
            vec![single(hmac_key(secret.as_bytes())?)]
        } else if let Some(path) = &config.secret_file {
            let bytes = read(path)?;
            let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
            vec![single(hmac_key(secret)?)]
        } else if let Some(path) = &config.public_key_file {
            let pem = read(path)?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|e| JwtConfigError::Key {
                    path: path.clone(),
                    message: format!("not a PEM RSA, EC or Ed25519 public key ({e})"),
                })?;
            // An EC key's curve decides between ES256 and ES384: jsonwebtoken does not
            // tell, so the default is ES256 and P-384 keys need `algorithms = ["ES384"]`.
            vec![single(key)]
        } else if let Some(path) = &config.jwks_file {
            jwks_keys(path, &read(path)?)?
        } else {
            return Err(JwtConfigError::KeySource);
        };

        let algorithms = if config.algorithms.is_empty() {
            let mut algs: Vec<Algorithm> = Vec::new();
            for k in &keys {
                let alg = k.alg.unwrap_or_else(|| default_algorithm(&k.key));
                if !algs.contains(&alg) {
                    algs.push(alg);
                }
            }
            algs
        } else {
            config
                .algorithms
                .iter()
                .map(|name| {
                    let alg = Algorithm::from_str(name)
                        .map_err(|_| JwtConfigError::Algorithm(name.clone()))?;
                    // Each listed algorithm must suit at least one key.
                    if keys.iter().any(|k| suits(k, alg)) {
                        Ok(alg)
                    } else {
                        Err(JwtConfigError::Algorithm(name.clone()))
                    }
                })
                .collect::<Result<_, _>>()?
        };
        Ok(JwtVerifier {
            keys,
            algorithms,
            username_claim: config
                .username_claim
                .clone()
                .unwrap_or_else(|| "sub".into()),
            acl_claim: config.acl_claim.clone().unwrap_or_else(|| "acl".into()),
            leeway: config.leeway.unwrap_or(DEFAULT_LEEWAY),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// Verifies the signature and claims of `token` at time `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(JwtError::Algorithm(alg));
        }
        let key = match (&header.kid, self.keys.as_slice()) {
            (None, [only]) => only,
            (None, _) => return Err(JwtError::UnknownKey(None)),
            // A single configured key (not from a JWKS) serves any kid.
            (Some(_), [only]) if only.kid.is_none() => only,
            (Some(kid), keys) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| JwtError::UnknownKey(Some(kid.clone())))?,
        };
        if !suits(key, alg) {
            return Err(JwtError::Algorithm(alg));
        }

        let mut validation = Validation::new(alg);
        // exp and nbf are checked below against `now`, not the system clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        if let Some(aud) = &self.audience {
            validation.validate_aud = true;
            validation.set_audience(&[aud]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(JwtError::Invalid)?;
        let claims = data.claims;

        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = self.leeway as f64;
        let exp = numeric_date(&claims, "exp")?.ok_or_else(|| JwtError::Claim("exp".into()))?;
        if now >= exp + leeway {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")? {
            if now + leeway < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        let username = match claims.get(&self.username_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(JwtError::Claim(self.username_claim.clone())),
        };
        let acl = match claims.get(&self.acl_claim) {
            None => None,
            Some(value) => {
                let bad = |message: String| JwtError::Acl {
                    claim: self.acl_claim.clone(),
                    message,
                };
                let acl = TokenAcl::deserialize(value).map_err(|e| bad(e.to_string()))?;
                acl.validate().map_err(|e| bad(e.to_string()))?;
                Some(acl)
            }
        };
        let expires_at = Duration::try_from_secs_f64(exp + leeway)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .ok_or_else(|| JwtError::Claim("exp".into()))?;
        Ok(Claims {
            username,
            acl,
            expires_at,
        })
    }
}

/// Whether `password` has the shape of a JWS compact token: three base64url parts.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    let mut parts = 0;
    for part in password.split(|b| *b == b'.') {
        parts += 1;
        let ok = !part.is_empty()
            && part
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
        if !ok || parts > 3 {
            return false;
        }
    }
    parts == 3
}

fn hmac_key(secret: &[u8]) -> Result<DecodingKey, JwtConfigError> {
    if secret.is_empty() {
        return Err(JwtConfigError::EmptySecret);
    }
    Ok(DecodingKey::from_secret(secret))
}

fn jwks_keys(path: &Path, bytes: &[u8]) -> Result<Vec<Key>, JwtConfigError> {
    let fail = |message: String| JwtConfigError::Key {
        path: path.to_owned(),
        message,
    };
    let set: JwkSet =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("not a JWKS: {e}")))?;
    if set.keys.is_empty() {
        return Err(fail("the JWKS has no keys".into()));
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| fail(format!("key {i}: {e}")))?;
            let alg = match &jwk.common.key_algorithm {
                None => None,
                Some(ka) => Some(Algorithm::from_str(&ka.to_string()).map_err(|_| {
                    fail(format!("key {i}: `alg` {ka} is not a signature algorithm"))
                })?),
            };
            // P-384 keys without `alg` mean ES384.
            let alg = alg.or(match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                    Some(Algorithm::ES384)
                }
                _ => None,
            });
            Ok(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

fn default_algorithm(key: &DecodingKey) -> Algorithm {
    key.family().algorithms()[0]
}

fn suits(key: &Key, alg: Algorithm) -> bool {
    key.key.family().algorithms().contains(&alg) && key.alg.is_none_or(|a| a == alg)
}

/// A NumericDate claim (seconds since the epoch, possibly fractional), if present.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
            _ => Err(JwtError::Claim(name.into())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::rand_core::OsRng;
    use rsa::traits::PublicKeyParts;
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn hs_config(secret: &str) -> JwtConfig {
        JwtConfig {
            secret: Some(secret.into()),
            ..JwtConfig::default()
        }
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn hs(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            None,
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
    }

    /// An RSA key pair made once per test run: (private PKCS#1 PEM, public SPKI PEM, n, e).
    fn rsa_key() -> &'static (String, String, Vec<u8>, Vec<u8>) {
        static KEY: OnceLock<(String, String, Vec<u8>, Vec<u8>)> = OnceLock::new();
        KEY.get_or_init(|| {
            let private = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
            let public = private.to_public_key();
            (
                private.to_pkcs1_pem(LineEnding::LF).unwrap().to_string(),
                public.to_public_key_pem(LineEnding::LF).unwrap(),
                public.n().to_bytes_be(),
                public.e().to_bytes_be(),
            )
        })
    }

    /// A fresh P-256 key pair: (private PKCS#8 PEM, public SPKI PEM, x, y).
    fn ec_key() -> (String, String, Vec<u8>, Vec<u8>) {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let secret = p256::SecretKey::random(&mut OsRng);
        let public = secret.public_key();
        let point = p256::EncodedPoint::from(public);
        (
            secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public.to_public_key_pem(LineEnding::LF).unwrap(),
            point.x().unwrap().to_vec(),
            point.y().unwrap().to_vec(),
        )
    }

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn hs256_valid_token() {
        let v = JwtVerifier::from_config(&hs_config("s3cret")).unwrap();
        let token = hs(json!({"sub": "alice", "exp": NOW + 60}));
        let claims = v.verify(&token, at(NOW)).unwrap();
        assert_eq!(claims.username, "alice");
        assert_eq!(claims.acl, None);
        assert_eq!(claims.expires_at, at(NOW + 65), "exp + the leeway");
    }

    #[test]
    fn wrong_secret_and_tampering_fail() {
        let v = JwtVerifier::from_config(&hs_config("other")).unwrap();
        let token = hs(json!({"sub": "alice", "exp": NOW + 60}));
        assert!(matches!(
            v.verify(&token, at(NOW)),
            Err(JwtError::Invalid(_))
        ));
        let v = JwtVerifier::from_config(&hs_config("s3cret")).unwrap();
        // Same signature, other payload.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = B64URL.encode(br#"{"sub":"admin","exp":9999999999}"#);
        assert!(matches!(
            v.verify(&parts.join("."), at(NOW)),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            v.verify("abc", at(NOW)),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn exp_is_required_and_checked_with_leeway() {
        let v = JwtVerifier::from_config(&hs_config("s3cret")).unwrap();
        let token = hs(json!({"sub": "alice", "exp": NOW}));
        // Valid until exp + leeway (5 s), refused from then on.
        assert!(v.verify(&token, at(NOW + 4)).is_ok());
        assert!(matches!(
            v.verify(&token, at(NOW + 5)),
            Err(JwtError::Expired)
        ));
        let none = hs(json!({"sub": "alice"}));
        assert!(matches!(v.verify(&none, at(NOW)), Err(JwtError::Claim(c)) if c == "exp"));
        let text = hs(json!({"sub": "alice", "exp": "tomorrow"}));
        assert!(matches!(v.verify(&text, at(NOW)), Err(JwtError::Claim(c)) if c == "exp"));
        // No leeway configured: refused at exp itself.
        let strict = JwtVerifier::from_config(&JwtConfig {
            leeway: Some(0),
            ..hs_config("s3cret")
        })
        .unwrap();
        assert!(strict.verify(&token, at(NOW - 1)).is_ok());
        assert!(matches!(
            strict.verify(&token, at(NOW)),
            Err(JwtError::Expired)
        ));
    }

    #[test]
    fn nbf_is_checked() {
        let v = JwtVerifier::from_config(&hs_config("s3cret")).unwrap();
        let token = hs(json!({"sub": "a", "exp": NOW + 600, "nbf": NOW + 100}));
        assert!(matches!(
            v.verify(&token, at(NOW + 94)),
            Err(JwtError::NotYetValid)
        ));
        assert!(v.verify(&token, at(NOW + 95)).is_ok());
        let fractional = hs(json!({"sub": "a", "exp": NOW as f64 + 10.5}));
        assert!(v.verify(&fractional, at(NOW + 15)).is_ok());
        assert!(matches!(
            v.verify(&fractional, at(NOW + 16)),
            Err(JwtError::Expired)
        ));
    }

    #[test]
    fn username_claim_and_acl_claim() {
        let v = JwtVerifier::from_config(&JwtConfig {
            username_claim: Some("user".into()),
            acl_claim: Some("perm".into()),
            ..hs_config("s3cret")
        })
        .unwrap();
        let token = hs(json!({"user": "bob", "sub": "ignored", "exp": NOW + 60,
            "perm": {"pub": ["up/%c"], "sub": ["down/%u/#"]}}));
        let claims = v.verify(&token, at(NOW)).unwrap();
        assert_eq!(claims.username, "bob");
        let acl = claims.acl.unwrap();
        assert_eq!(acl.publish, vec!["up/%c"]);
        assert_eq!(acl.subscribe, vec!["down/%u/#"]);
        assert!(acl.all.is_empty());
        for (bad, what) in [
            (json!({"pub": "x"}), "invalid type"),
            (json!({"publish": ["x"]}), "unknown field"),
            (json!({"all": ["a/#/b"]}), "not a valid topic filter"),
        ] {
            let token = hs(json!({"user": "bob", "exp": NOW + 60, "perm": bad}));
            let err = v.verify(&token, at(NOW)).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        let token = hs(json!({"sub": "bob", "exp": NOW + 60}));
        assert!(matches!(v.verify(&token, at(NOW)), Err(JwtError::Claim(c)) if c == "user"));
        let empty = hs(json!({"user": "", "exp": NOW + 60}));
        assert!(matches!(v.verify(&empty, at(NOW)), Err(JwtError::Claim(_))));
    }

    #[test]
    fn issuer_and_audience() {
        let v = JwtVerifier::from_config(&JwtConfig {
            issuer: Some("https://idp".into()),
            audience: Some("mqtt".into()),
            ..hs_config("s3cret")
        })
        .unwrap();
        let ok =
            hs(json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp", "aud": ["x", "mqtt"]}));
        assert!(v.verify(&ok, at(NOW)).is_ok());
        for bad in [
            json!({"sub": "a", "exp": NOW + 60, "iss": "https://other", "aud": "mqtt"}),
            json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp", "aud": "web"}),
            json!({"sub": "a", "exp": NOW + 60, "aud": "mqtt"}),
            json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp"}),
        ] {
            assert!(
                matches!(
                    v.verify(&hs(bad.clone()), at(NOW)),
                    Err(JwtError::Invalid(_))
                ),
                "{bad}"
            );
        }
        // Without audience configured, a token's aud is not a reason to refuse it.
        let plain = JwtVerifier::from_config(&hs_config("s3cret")).unwrap();
        assert!(plain.verify(&ok, at(NOW)).is_ok());
    }

    #[test]
    fn rs256_with_pem_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public, _, _) = rsa_key();
        let v = JwtVerifier::from_config(&JwtConfig {
            public_key_file: Some(write(&dir, "pub.pem", public)),
            ..JwtConfig::default()
        })
        .unwrap();
        let key = EncodingKey::from_rsa_pem(private.as_bytes()).unwrap();
        let claims = json!({"sub": "dev", "exp": NOW + 60});
        let token = sign(Algorithm::RS256, None, &claims, &key);
        assert_eq!(v.verify(&token, at(NOW)).unwrap().username, "dev");
        // RS512 is the same key family but not accepted unless configured.
        let rs512 = sign(Algorithm::RS512, None, &claims, &key);
        assert!(matches!(
            v.verify(&rs512, at(NOW)),
            Err(JwtError::Algorithm(Algorithm::RS512))
        ));
        // Algorithm confusion: an HS256 token "signed" with the public key PEM as secret.
        let forged = sign(
            Algorithm::HS256,
            None,
            &claims,
            &EncodingKey::from_secret(public.as_bytes()),
        );
        assert!(matches!(
            v.verify(&forged, at(NOW)),
            Err(JwtError::Algorithm(Algorithm::HS256))
        ));
        // Even when HS256 is listed, the RSA key cannot verify it.
        let listed = JwtConfig {
            public_key_file: Some(dir.path().join("pub.pem")),
            algorithms: vec!["RS256".into(), "HS256".into()],
            ..JwtConfig::default()
        };
        assert!(
            matches!(JwtVerifier::from_config(&listed), Err(JwtConfigError::Algorithm(a)) if a == "HS256")
        );
        // alg "none": an unsigned token.
        let unsigned = format!(
            "{}.{}.",
            B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64URL.encode(br#"{"sub":"dev","exp":9999999999}"#)
        );
        assert!(v.verify(&unsigned, at(NOW)).is_err());
    }

    #[test]
    fn es256_with_pem_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public, _, _) = ec_key();
        let v = JwtVerifier::from_config(&JwtConfig {
            public_key_file: Some(write(&dir, "ec.pem", &public)),
            ..JwtConfig::default()
        })
        .unwrap();
        let key = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
        let token = sign(
            Algorithm::ES256,
            None,
            &json!({"sub": "ec", "exp": NOW + 60}),
            &key,
        );
        assert_eq!(v.verify(&token, at(NOW)).unwrap().username, "ec");
        // Another EC key's signature.
        let (other, _, _, _) = ec_key();
        let other = EncodingKey::from_ec_pem(other.as_bytes()).unwrap();
        let token = sign(
            Algorithm::ES256,
            None,
            &json!({"sub": "ec", "exp": NOW + 60}),
            &other,
        );
        assert!(matches!(
            v.verify(&token, at(NOW)),
            Err(JwtError::Invalid(_))
        ));
    }

    #[test]
    fn jwks_selects_the_key_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let (rsa_private, _, n, e) = rsa_key();
        let (ec_private, _, x, y) = ec_key();
        let jwks = json!({"keys": [
            {"kty": "RSA", "kid": "r1", "use": "sig", "alg": "RS256", "n": B64URL.encode(n), "e": B64URL.encode(e)},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": B64URL.encode(x), "y": B64URL.encode(y)},
        ]});
        let v = JwtVerifier::from_config(&JwtConfig {
            jwks_file: Some(write(&dir, "jwks.json", &jwks.to_string())),
            ..JwtConfig::default()
        })
        .unwrap();
        let rsa = EncodingKey::from_rsa_pem(rsa_private.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap();
        let claims = json!({"sub": "k", "exp": NOW + 60});
        assert!(v
            .verify(&sign(Algorithm::RS256, Some("r1"), &claims, &rsa), at(NOW))
            .is_ok());
        assert!(v
            .verify(&sign(Algorithm::ES256, Some("e1"), &claims, &ec), at(NOW))
            .is_ok());
        // Wrong kid for the signature, unknown kid, no kid with two keys.
        assert!(v
            .verify(&sign(Algorithm::ES256, Some("r1"), &claims, &ec), at(NOW))
            .is_err());
        assert!(matches!(
            v.verify(&sign(Algorithm::RS256, Some("zz"), &claims, &rsa), at(NOW)),
            Err(JwtError::UnknownKey(Some(k))) if k == "zz"
        ));
        assert!(matches!(
            v.verify(&sign(Algorithm::RS256, None, &claims, &rsa), at(NOW)),
            Err(JwtError::UnknownKey(None))
        ));
    }

    #[test]
    fn config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let none = JwtConfig::default();
        assert!(matches!(
            JwtVerifier::from_config(&none),
            Err(JwtConfigError::KeySource)
        ));
        let two = JwtConfig {
            secret: Some("a".into()),
            jwks_file: Some("x".into()),
            ..JwtConfig::default()
        };
        assert!(matches!(
            JwtVerifier::from_config(&two),
            Err(JwtConfigError::KeySource)
        ));
        assert!(matches!(
            JwtVerifier::from_config(&hs_config("")),
            Err(JwtConfigError::EmptySecret)
        ));
        let bad_alg = JwtConfig {
            algorithms: vec!["HS257".into()],
            ..hs_config("x")
        };
        assert!(matches!(
            JwtVerifier::from_config(&bad_alg),
            Err(JwtConfigError::Algorithm(_))
        ));
        let missing = JwtConfig {
            public_key_file: Some(dir.path().join("missing.pem")),
            ..JwtConfig::default()
        };
        let err = JwtVerifier::from_config(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let garbage = JwtConfig {
            public_key_file: Some(write(&dir, "bad.pem", "not a key")),
            ..JwtConfig::default()
        };
        let err = JwtVerifier::from_config(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("bad.pem") && err.contains("not a PEM"),
            "{err}"
        );
        let jwks = JwtConfig {
            jwks_file: Some(write(&dir, "j.json", r#"{"keys": []}"#)),
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::from_config(&jwks)
            .unwrap_err()
            .to_string()
            .contains("no keys"));
    }

    #[test]
    fn secret_file_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let v = JwtVerifier::from_config(&JwtConfig {
            secret_file: Some(write(&dir, "secret", "s3cret\n")),
            ..JwtConfig::default()
        })
        .unwrap();
        assert!(v
            .verify(&hs(json!({"sub": "a", "exp": NOW + 1})), at(NOW))
            .is_ok());
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt(b"eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt(b"a-b_c.d.e"));
        for not in [
            &b"password"[..],
            b"a.b",
            b"a.b.c.d",
            b"a..c",
            b"a.b.",
            b"a b.c.d",
            b"a.b.c=",
            b"",
        ] {
            assert!(!looks_like_jwt(not), "{not:?}");
        }
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<JwtVerifier>();
    }
}
