//! Authentication and authorization, without sockets: the connection core calls in.
//!
//! - [`password`]: password files (mosquitto's `$6$`/`$7$`, argon2id, SCRAM-SHA-256).
//! - [`passwd`]: `ternmq passwd`, which writes them.
//! - [`jwt`]: a JWT in the password field.
//! - [`acl`]: mosquitto's acl_file and the per-client [`acl::Authorizer`].
//! - [`scram`]: MQTT 5 enhanced authentication with SCRAM-SHA-256.
//! - [`backoff`]: slowing down repeated failures from one address.
//!
//! [`Authenticator`] ties the files together and reloads them (SIGHUP). See
//! `docs/security.md`.

pub mod acl;
pub mod backoff;
pub mod enhanced;
pub mod jwt;
pub mod passwd;
pub mod password;
pub mod scram;

use acl::{Acl, AclError, Authorizer, Client, TokenAcl};
use jwt::{JwtConfig, JwtConfigError, JwtError, JwtVerifier};
use parking_lot::RwLock;
use password::{PasswordError, PasswordFile};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The `[auth]` table of broker.toml. `allow_anonymous` is per listener (not here).
///
/// ```toml
/// [auth]
/// password_file = "/etc/ternmq/passwd"
/// acl_file = "/etc/ternmq/acl"
///
/// [auth.jwt]
/// jwks_file = "/etc/ternmq/jwks.json"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error(transparent)]
    Jwt(#[from] JwtConfigError),
}

/// Who a client is after CONNECT, and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The username checks were made for: the CONNECT's, or a token's claim.
    pub username: Option<String>,
    pub authorizer: Authorizer,
    /// How much longer the token logged in with is accepted: the connection closes then.
    pub valid_for: Option<Duration>,
}

#[derive(Debug)]
pub enum AuthResult {
    /// The password or the token was verified.
    Authenticated(Identity),
    /// Nothing was verified: no username (or none configured to check it against). The
    /// listener's `allow_anonymous` decides, as in mosquitto; the username, if any, is
    /// kept for the ACL.
    Anonymous(Identity),
    /// Credentials given and not valid: CONNACK 0x86 (v5) / 0x04 (v3).
    Denied(DenyReason),
}

/// Why credentials were refused, for the log (the client learns only "refused").
#[derive(Debug, thiserror::Error)]
pub enum DenyReason {
    #[error("bad username or password")]
    BadCredentials,
    #[error("username without password")]
    MissingPassword,
    #[error(transparent)]
    Token(JwtError),
    #[error("the token is for `{token}`, the CONNECT names `{connect}`")]
    UsernameMismatch { token: String, connect: String },
}

/// The loaded files, swapped whole on reload.
#[derive(Debug)]
struct Loaded {
    passwords: Option<Arc<PasswordFile>>,
    jwt: Option<Arc<JwtVerifier>>,
    acl: Arc<Acl>,
}

impl Loaded {
    fn load(config: &SecurityConfig) -> Result<Loaded, SecurityError> {
        Ok(Loaded {
            passwords: match &config.password_file {
                Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
                None => None,
            },
            jwt: match &config.jwt {
                Some(jwt) => Some(Arc::new(JwtVerifier::from_config(jwt)?)),
                None => None,
            },
            acl: Arc::new(match &config.acl_file {
                Some(path) => Acl::load(path)?,
                None => Acl::allow_all(),
            }),
        })
    }
}

/// The password file, JWT verifier and ACL of the broker. `Send + Sync`: share it in an
/// `Arc`. [`Authenticator::authenticate`] hashes passwords (milliseconds): call it in
/// `spawn_blocking`.
#[derive(Debug)]
pub struct Authenticator {
    config: SecurityConfig,
    loaded: RwLock<Arc<Loaded>>,
}

impl Authenticator {
    /// Loads every configured file; any error stops the start.
    pub fn load(config: SecurityConfig) -> Result<Authenticator, SecurityError> {
        let loaded = Loaded::load(&config)?;
        Ok(Authenticator {
            config,
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Reads the files again. On any error the previous ones stay in force and the error
    /// is returned (for the log), so a bad edit does not lock everyone out. Connected
    /// clients keep the [`Authorizer`] they got at CONNECT until the core rebuilds it.
    pub fn reload(&self) -> Result<(), SecurityError> {
        let loaded = Loaded::load(&self.config)?;
        *self.loaded.write() = Arc::new(loaded);
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.read().clone()
    }

    /// The password file, for SCRAM ([`scram::ScramServer::start`]).
    pub fn password_file(&self) -> Option<Arc<PasswordFile>> {
        self.current().passwords.clone()
    }

    pub fn acl(&self) -> Arc<Acl> {
        self.current().acl.clone()
    }

    /// The authorizer of a client authenticated some other way (SCRAM, a certificate),
    /// or rebuilt after a reload.
    pub fn authorizer(
        &self,
        username: Option<&str>,
        client_id: &str,
        token: Option<&TokenAcl>,
    ) -> Authorizer {
        self.current().acl.authorizer(
            &Client {
                username,
                client_id,
            },
            token,
        )
    }

    /// Checks CONNECT's credentials now. Blocking (password hashing): run it in
    /// `spawn_blocking`.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_id: &str,
    ) -> AuthResult {
        self.authenticate_at(username, password, client_id, SystemTime::now())
    }

    /// [`Authenticator::authenticate`] at a given time (token expiry).
    ///
    /// 1. A password shaped like a JWT, with `[auth.jwt]` configured, is verified as a
    ///    token; the identity is its username claim, and a CONNECT username, if given,
    ///    must be the same. If the token fails and the password file has the CONNECT's
    ///    username, the password file decides (a password may look like a token).
    /// 2. A username with a password file: the file decides; a missing password or an
    ///    unknown user is refused.
    /// 3. A username with only JWT configured: refused (the password is not a token).
    /// 4. Otherwise (no username, or nothing configured): anonymous.
    pub fn authenticate_at(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_id: &str,
        now: SystemTime,
    ) -> AuthResult {
        let loaded = self.current();
        let identity = |username: Option<String>, token: Option<&TokenAcl>, valid_for| {
            let authorizer = loaded.acl.authorizer(
                &Client {
                    username: username.as_deref(),
                    client_id,
                },
                token,
            );
            Identity {
                username,
                authorizer,
                valid_for,
            }
        };

        let mut token_error = None;
        if let (Some(jwt), Some(pw)) = (&loaded.jwt, password) {
            if let Some(token) = std::str::from_utf8(pw)
                .ok()
                .filter(|t| jwt::looks_like_jwt(t.as_bytes()))
            {
                match jwt.verify(token, now) {
                    Ok(claims) => {
                        if let Some(connect) =
                            username.filter(|u| !u.is_empty() && *u != claims.username)
                        {
                            return AuthResult::Denied(DenyReason::UsernameMismatch {
                                token: claims.username,
                                connect: connect.to_owned(),
                            });
                        }
                        return AuthResult::Authenticated(identity(
                            Some(claims.username),
                            claims.acl.as_ref(),
                            Some(claims.expires_at.duration_since(now).unwrap_or_default()),
                        ));
                    }
                    Err(e) => token_error = Some(e),
                }
            }
        }

        let Some(user) = username else {
            return match token_error {
                Some(e) => AuthResult::Denied(DenyReason::Token(e)),
                None => AuthResult::Anonymous(identity(None, None, None)),
            };
        };
        match (&loaded.passwords, password) {
            (Some(file), Some(pw)) => {
                // Verified even after a failed token, so that an unknown user costs as
                // much as a known one here too.
                if file.verify(user, pw) {
                    return AuthResult::Authenticated(identity(Some(user.to_owned()), None, None));
                }
                AuthResult::Denied(match token_error {
                    Some(e) if !file.contains(user) => DenyReason::Token(e),
                    _ => DenyReason::BadCredentials,
                })
            }
            (Some(_), None) => AuthResult::Denied(DenyReason::MissingPassword),
            (None, _) if loaded.jwt.is_some() => AuthResult::Denied(match token_error {
                Some(e) => DenyReason::Token(e),
                None => DenyReason::BadCredentials,
            }),
            (None, _) => AuthResult::Anonymous(identity(Some(user.to_owned()), None, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::acl::Access;
    use super::password::NewHash;
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    struct Setup {
        dir: tempfile::TempDir,
        auth: Authenticator,
    }

    impl Setup {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn write_passwords(path: &Path, users: &[(&str, &str)]) {
        let mut file = PasswordFile::empty().unwrap();
        for (user, pw) in users {
            file.set(user, pw.as_bytes(), NewHash::ScramSha256).unwrap();
        }
        file.save(path).unwrap();
    }

    fn setup(passwords: bool, acl: Option<&str>, jwt: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SecurityConfig::default();
        if passwords {
            let path = dir.path().join("passwd");
            write_passwords(&path, &[("alice", "wonderland"), ("dot", "pass.word.x")]);
            config.password_file = Some(path);
        }
        if let Some(text) = acl {
            let path = dir.path().join("acl");
            std::fs::write(&path, text).unwrap();
            config.acl_file = Some(path);
        }
        if jwt {
            config.jwt = Some(JwtConfig {
                secret: Some("k3y".into()),
                ..JwtConfig::default()
            });
        }
        let auth = Authenticator::load(config).unwrap();
        Setup { dir, auth }
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"k3y"),
        )
        .unwrap()
    }

    fn at_now(s: &Setup, user: Option<&str>, pw: Option<&str>) -> AuthResult {
        s.auth
            .authenticate_at(user, pw.map(str::as_bytes), "c1", at(NOW))
    }

    #[test]
    fn password_file_decides_for_usernames() {
        let s = setup(true, None, false);
        assert!(
            matches!(at_now(&s, Some("alice"), Some("wonderland")), AuthResult::Authenticated(i) if i.username.as_deref() == Some("alice"))
        );
        assert!(matches!(
            at_now(&s, Some("alice"), Some("nope")),
            AuthResult::Denied(DenyReason::BadCredentials)
        ));
        assert!(matches!(
            at_now(&s, Some("bob"), Some("wonderland")),
            AuthResult::Denied(DenyReason::BadCredentials)
        ));
        assert!(matches!(
            at_now(&s, Some("alice"), None),
            AuthResult::Denied(DenyReason::MissingPassword)
        ));
        assert!(matches!(at_now(&s, None, None), AuthResult::Anonymous(i) if i.username.is_none()));
    }

    #[test]
    fn nothing_configured_is_anonymous_with_username_kept() {
        let s = setup(false, Some("user bob\ntopic read b/#\n"), false);
        match at_now(&s, Some("bob"), Some("anything")) {
            AuthResult::Anonymous(i) => {
                assert_eq!(i.username.as_deref(), Some("bob"));
                assert!(i.authorizer.check("b/1", Access::Read));
                assert!(!i.authorizer.check("c/1", Access::Read));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens() {
        let s = setup(true, Some("topic read #\n"), true);
        let good = token(json!({"sub": "tok", "exp": NOW + 60, "acl": {"pub": ["t/%u"]}}));
        match at_now(&s, None, Some(&good)) {
            AuthResult::Authenticated(i) => {
                assert_eq!(i.username.as_deref(), Some("tok"));
                let leeway = Duration::from_secs(jwt::DEFAULT_LEEWAY);
                assert_eq!(i.valid_for, Some(Duration::from_secs(60) + leeway));
                // The token's rules replace the file's `#`.
                assert!(i.authorizer.check("t/tok", Access::Write));
                assert!(!i.authorizer.check("x", Access::Read));
            }
            other => panic!("{other:?}"),
        }
        // Same username in CONNECT: fine; another one: refused.
        assert!(matches!(
            at_now(&s, Some("tok"), Some(&good)),
            AuthResult::Authenticated(_)
        ));
        assert!(matches!(
            at_now(&s, Some("eve"), Some(&good)),
            AuthResult::Denied(DenyReason::UsernameMismatch { .. })
        ));
        // A token without ACL claim gets the file's rules for its username.
        let plain = token(json!({"sub": "tok", "exp": NOW + 60}));
        match at_now(&s, None, Some(&plain)) {
            AuthResult::Authenticated(i) => {
                assert!(!i.authorizer.check("x", Access::Read), "`tok` has no block")
            }
            other => panic!("{other:?}"),
        }
        let expired = token(json!({"sub": "tok", "exp": NOW - 60}));
        assert!(matches!(
            at_now(&s, None, Some(&expired)),
            AuthResult::Denied(DenyReason::Token(JwtError::Expired))
        ));
        assert!(matches!(
            at_now(&s, Some("zed"), Some(&expired)),
            AuthResult::Denied(DenyReason::Token(JwtError::Expired))
        ));
        // A password that merely looks like a token still works for a file user.
        assert!(jwt::looks_like_jwt(b"pass.word.x"));
        assert!(matches!(
            at_now(&s, Some("dot"), Some("pass.word.x")),
            AuthResult::Authenticated(_)
        ));
        assert!(matches!(
            at_now(&s, Some("dot"), Some("pass.word.y")),
            AuthResult::Denied(DenyReason::BadCredentials)
        ));
    }

    #[test]
    fn jwt_only_refuses_plain_passwords() {
        let s = setup(false, None, true);
        assert!(matches!(
            at_now(&s, Some("u"), Some("plain")),
            AuthResult::Denied(DenyReason::BadCredentials)
        ));
        assert!(matches!(at_now(&s, None, None), AuthResult::Anonymous(_)));
    }

    #[test]
    fn reload_keeps_the_old_files_on_error() {
        let s = setup(true, Some("topic read a\n"), false);
        std::fs::write(s.path("passwd"), "alice:not-a-hash\n").unwrap();
        let err = s.auth.reload().unwrap_err().to_string();
        assert!(err.contains("passwd:1: user `alice`"), "{err}");
        assert!(matches!(
            at_now(&s, Some("alice"), Some("wonderland")),
            AuthResult::Authenticated(_)
        ));
        write_passwords(&s.path("passwd"), &[("alice", "new")]);
        std::fs::write(s.path("acl"), "topic bogus a b\n").unwrap();
        assert!(s.auth.reload().unwrap_err().to_string().contains("acl:1:"));
        // Both stay old: the password file is not half-applied.
        assert!(matches!(
            at_now(&s, Some("alice"), Some("wonderland")),
            AuthResult::Authenticated(_)
        ));
        std::fs::write(s.path("acl"), "topic read b\n").unwrap();
        s.auth.reload().unwrap();
        assert!(matches!(
            at_now(&s, Some("alice"), Some("new")),
            AuthResult::Authenticated(_)
        ));
        assert!(s.auth.authorizer(None, "c", None).check("b", Access::Read));
    }

    #[test]
    fn load_errors_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = SecurityConfig {
            acl_file: Some(dir.path().join("missing")),
            ..SecurityConfig::default()
        };
        let err = Authenticator::load(config).unwrap_err().to_string();
        assert!(err.contains("cannot read acl_file"), "{err}");
    }

    #[test]
    fn config_from_toml() {
        #[derive(Deserialize)]
        struct File {
            auth: SecurityConfig,
        }
        let text = r#"
            [auth]
            password_file = "/etc/ternmq/passwd"
            acl_file = "/etc/ternmq/acl"

            [auth.jwt]
            jwks_file = "/etc/ternmq/jwks.json"
            algorithms = ["RS256"]
            leeway = 0
        "#;
        let file: File = toml::from_str(text).unwrap();
        assert_eq!(file.auth.password_file, Some("/etc/ternmq/passwd".into()));
        let jwt = file.auth.jwt.unwrap();
        assert_eq!(jwt.algorithms, vec!["RS256"]);
        assert_eq!(jwt.leeway, Some(0));
        let err = toml::from_str::<File>("[auth]\npasword_file = \"x\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown field `pasword_file`"), "{err}");
        let err = toml::from_str::<File>("[auth.jwt]\nsecrett = \"x\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown field `secrett`"), "{err}");
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Authenticator>();
        check::<AuthResult>();
    }
}
