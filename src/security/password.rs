//! Password files: mosquitto's, read unchanged, plus argon2id and SCRAM-SHA-256 lines.
//!
//! One `user:hash` per line; blank lines and lines starting with `#` are kept as they are.
//! The hash is one of:
//!
//! | form | written by | check |
//! | --- | --- | --- |
//! | `$6$<b64 salt>$<b64 hash>` | mosquitto 1.x, `mosquitto_passwd -H sha512` | SHA-512(password ‖ salt) |
//! | `$7$<iterations>$<b64 salt>$<b64 hash>` | mosquitto 2.x `mosquitto_passwd` | PBKDF2-HMAC-SHA512, 64 bytes |
//! | `$argon2id$v=19$m=..,t=..,p=..$<salt>$<hash>` (PHC) | `ternmq passwd` (default) | argon2id, parameters from the line |
//! | `SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>` | `ternmq passwd --scram` | PBKDF2-HMAC-SHA256 → StoredKey |
//!
//! Base64 is the standard alphabet with padding (what mosquitto writes). The username is
//! everything before the first `:` (so it cannot contain one), trimmed of blanks as
//! mosquitto does. Unlike mosquitto, which drops a bad entry with a log line, a bad line
//! is an error at load naming the file and the line: the broker then refuses to start,
//! or keeps the previous file on reload.
//!
//! New hashes: argon2id with the argon2 crate's defaults (m = 19456 KiB, t = 2, p = 1,
//! 16-byte random salt, 32-byte output: OWASP's recommendation), or SCRAM-SHA-256 with
//! [`SCRAM_ITERATIONS`] iterations and a 16-byte random salt (PostgreSQL's defaults).
//!
//! Verifying costs milliseconds on purpose (argon2id about 20 ms on one core in a release
//! build): callers on the async runtime must run [`PasswordFile::verify`] in
//! `tokio::task::spawn_blocking`. The type is `Send + Sync`; share it in an `Arc`.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Iterations of new SCRAM-SHA-256 verifiers: RFC 7677's minimum, PostgreSQL's default.
pub const SCRAM_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("cannot read password file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot write password file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid username {0:?}: it must be non-empty, without `:` or control characters")]
    BadUsername(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("no random numbers from the operating system: {0}")]
    Random(getrandom::Error),
}

/// How a new or updated user's password is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewHash {
    #[default]
    Argon2id,
    /// A SCRAM-SHA-256 verifier: usable for MQTT 5 SCRAM authentication and for plain
    /// passwords.
    ScramSha256,
}

/// A SCRAM-SHA-256 verifier (RFC 5802): what the server stores instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    /// SaltedPassword = PBKDF2-HMAC-SHA256(password, salt, i); StoredKey = SHA-256(HMAC(
    /// SaltedPassword, "Client Key")); ServerKey = HMAC(SaltedPassword, "Server Key").
    /// The password is used as given (no SASLprep: clients must send the same bytes).
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramVerifier {
        let salted = salted_password(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(hmac_sha256(&salted, b"Client Key")).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// The line's hash text: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    fn parse(text: &str) -> Result<ScramVerifier, String> {
        let bad =
            || "SCRAM-SHA-256 verifier is not `<iter>:<salt>$<StoredKey>:<ServerKey>`".to_string();
        let (params, keys) = text.split_once('$').ok_or_else(bad)?;
        let (iterations, salt) = params.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        Ok(ScramVerifier {
            iterations: iterations_of(iterations)?,
            salt: b64(salt, "salt")?,
            stored_key: b64_array(stored, "StoredKey")?,
            server_key: b64_array(server, "ServerKey")?,
        })
    }

    fn verify(&self, password: &[u8]) -> bool {
        let candidate = ScramVerifier::derive(password, &self.salt, self.iterations);
        candidate.stored_key.ct_eq(&self.stored_key).into()
    }
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub(crate) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// A stored hash, parsed at load so that a bad line fails then, not at a login.
#[derive(Clone)]
enum Hash {
    /// mosquitto `$6$`: SHA-512(password ‖ salt).
    Sha512 {
        salt: Vec<u8>,
        hash: [u8; 64],
    },
    /// mosquitto `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: [u8; 64],
    },
    /// The PHC string, checked at load.
    Argon2id(String),
    Scram(ScramVerifier),
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        if let Some(rest) = text.strip_prefix("$6$") {
            let (salt, hash) = rest
                .split_once('$')
                .ok_or("`$6$` hash is not `$6$<salt>$<hash>`")?;
            Ok(Hash::Sha512 {
                salt: nonempty(b64(salt, "salt")?, "salt")?,
                hash: b64_array(hash, "hash")?,
            })
        } else if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.splitn(3, '$');
            let (Some(iterations), Some(salt), Some(hash)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err("`$7$` hash is not `$7$<iterations>$<salt>$<hash>`".into());
            };
            Ok(Hash::Pbkdf2Sha512 {
                iterations: iterations_of(iterations)?,
                salt: nonempty(b64(salt, "salt")?, "salt")?,
                hash: b64_array(hash, "hash")?,
            })
        } else if text.starts_with("$argon2id$") {
            let phc = PasswordHash::new(text).map_err(|e| format!("bad argon2id hash: {e}"))?;
            argon2::Params::try_from(&phc).map_err(|e| format!("bad argon2id parameters: {e}"))?;
            if phc.salt.is_none() || phc.hash.is_none() {
                return Err("argon2id hash without salt or hash".into());
            }
            Ok(Hash::Argon2id(text.to_owned()))
        } else if let Some(rest) = text.strip_prefix("SCRAM-SHA-256$") {
            Ok(Hash::Scram(ScramVerifier::parse(rest)?))
        } else if text.starts_with('$') || text.starts_with("SCRAM-") {
            let scheme = text.split('$').find(|s| !s.is_empty()).unwrap_or(text);
            Err(format!(
                "unsupported hash scheme `{scheme}` ($6$, $7$, $argon2id$ or SCRAM-SHA-256$)"
            ))
        } else {
            Err("not a hashed password (run `ternmq passwd` to hash it)".into())
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                let computed: [u8; 64] = digest.finalize().into();
                computed.ct_eq(hash).into()
            }
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash).into()
            }
            Hash::Argon2id(phc) => verify_argon2id(phc, password),
            Hash::Scram(v) => v.verify(password),
        }
    }

    /// Entries with the same cost key cost the same to verify.
    fn cost_key(&self) -> String {
        match self {
            Hash::Sha512 { .. } => "6".into(),
            Hash::Pbkdf2Sha512 { iterations, .. } => format!("7/{iterations}"),
            Hash::Argon2id(phc) => PasswordHash::new(phc)
                .map(|h| format!("argon2id/{}", h.params))
                .unwrap_or_default(),
            Hash::Scram(v) => format!("scram/{}", v.iterations),
        }
    }
}

/// argon2id's memory (19 MiB at the default parameters), kept between checks: allocated
/// for each check, 64-byte aligned, it made glibc's heap grow by its size at every check
/// (measured: +19 MiB per check, 1 GB after 100 failed logins). Reused, the broker
/// holds one per check running at once (`Broker::password_checks`), at most this many.
static ARGON2_MEMORY: parking_lot::Mutex<Vec<Vec<argon2::Block>>> =
    parking_lot::Mutex::new(Vec::new());
const ARGON2_MEMORY_KEPT: usize = 4;

/// A PHC argon2id line (checked at load) against `password`, in reused memory; the hash
/// compared in constant time.
fn verify_argon2id(phc: &str, password: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let version = argon2::Version::try_from(hash.version.unwrap_or(0x13));
    let (Ok(params), Ok(version)) = (argon2::Params::try_from(&hash), version) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut memory = ARGON2_MEMORY.lock().pop().unwrap_or_default();
    memory.resize(params.block_count(), argon2::Block::default());
    let mut out = vec![0u8; expected.len()];
    let hashed = Argon2::new(argon2::Algorithm::Argon2id, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..]);
    let mut kept = ARGON2_MEMORY.lock();
    if kept.len() < ARGON2_MEMORY_KEPT {
        kept.push(memory);
    }
    hashed.is_ok() && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

fn iterations_of(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("bad iteration count `{text}`")),
    }
}

fn b64(text: &str, what: &str) -> Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|e| format!("{what} is not valid base64: {e}"))
}

fn b64_array<const N: usize>(text: &str, what: &str) -> Result<[u8; N], String> {
    let bytes = b64(text, what)?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| format!("{what} is {len} bytes, expected {N}"))
}

fn nonempty(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        Err(format!("empty {what}"))
    } else {
        Ok(bytes)
    }
}

/// One line of the file, kept as written unless its user is updated.
#[derive(Clone)]
enum Line {
    Other(String),
    User {
        text: String,
        user: String,
        hash: Hash,
    },
}

/// A loaded password file. Unchanged lines are written back byte for byte.
#[derive(Clone)]
pub struct PasswordFile {
    lines: Vec<Line>,
    /// Username → index in `lines`.
    users: HashMap<String, usize>,
    /// The line verified (and its result ignored) for unknown users, so that they cost
    /// as much as the most common kind of entry.
    decoy: Option<usize>,
    /// Keys the fake SCRAM salts of unknown users (random per load).
    secret: [u8; 32],
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// An empty file (`ternmq passwd -c`).
    pub fn empty() -> Result<PasswordFile, PasswordError> {
        Self::from_lines(Vec::new())
    }

    /// Reads and checks a password file: a bad line is an error naming file and line.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Line(line, message) => PasswordError::Line {
                path: path.to_owned(),
                line,
                message,
            },
            ParseError::Other(e) => e,
        })
    }

    fn parse(text: &str) -> Result<PasswordFile, ParseError> {
        let mut lines = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        // Not `lines()`: a `\r` before the `\n` is kept, so the line is written back as read.
        for (index, raw) in text.split_inclusive('\n').enumerate() {
            let raw = raw.strip_suffix('\n').unwrap_or(raw);
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                lines.push(Line::Other(raw.to_owned()));
                continue;
            }
            let fail = |m: String| ParseError::Line(index + 1, m);
            let (user, hash) = trimmed
                .split_once(':')
                .ok_or_else(|| fail("not `user:hash`".into()))?;
            let user = user.trim();
            check_username(user).map_err(|e| fail(e.to_string()))?;
            if let Some(first) = seen.insert(user.to_owned(), index + 1) {
                return Err(fail(format!(
                    "user `{user}` already defined on line {first}"
                )));
            }
            let hash = Hash::parse(hash.trim()).map_err(|m| fail(format!("user `{user}`: {m}")))?;
            lines.push(Line::User {
                text: raw.to_owned(),
                user: user.to_owned(),
                hash,
            });
        }
        Self::from_lines(lines).map_err(ParseError::Other)
    }

    fn from_lines(lines: Vec<Line>) -> Result<PasswordFile, PasswordError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(PasswordError::Random)?;
        let mut file = PasswordFile {
            lines,
            users: HashMap::new(),
            decoy: None,
            secret,
        };
        file.reindex();
        Ok(file)
    }

    fn reindex(&mut self) {
        self.users.clear();
        let mut costs: HashMap<String, (usize, usize)> = HashMap::new();
        for (i, line) in self.lines.iter().enumerate() {
            if let Line::User { user, hash, .. } = line {
                self.users.insert(user.clone(), i);
                costs.entry(hash.cost_key()).or_insert((0, i)).0 += 1;
            }
        }
        // The most common cost; among equals, the one whose first line comes first.
        self.decoy = costs
            .into_values()
            .max_by_key(|&(count, first)| (count, std::cmp::Reverse(first)))
            .map(|(_, first)| first);
    }

    fn hash(&self, user: &str) -> Option<&Hash> {
        match self.lines.get(*self.users.get(user)?)? {
            Line::User { hash, .. } => Some(hash),
            Line::Other(_) => None,
        }
    }

    /// Whether `password` is `user`'s. Constant time in the hash comparison, and an
    /// unknown user costs the same as a known one (the most common kind of entry is
    /// verified and its result ignored). Slow on purpose: call it off the async runtime.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.hash(user) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(Line::User { hash, .. }) = self.decoy.and_then(|i| self.lines.get(i)) {
                    std::hint::black_box(hash.verify(password));
                }
                false
            }
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user's SCRAM-SHA-256 verifier, if the user's line is one.
    pub fn scram(&self, user: &str) -> Option<&ScramVerifier> {
        match self.hash(user)? {
            Hash::Scram(v) => Some(v),
            _ => None,
        }
    }

    /// The iteration count SCRAM exchanges of unknown users pretend to have: the most
    /// common one of the file's SCRAM lines, else [`SCRAM_ITERATIONS`].
    pub(crate) fn scram_decoy_iterations(&self) -> u32 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for line in &self.lines {
            if let Line::User {
                hash: Hash::Scram(v),
                ..
            } = line
            {
                *counts.entry(v.iterations).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|&(iterations, count)| (count, iterations))
            .map_or(SCRAM_ITERATIONS, |(iterations, _)| iterations)
    }

    /// A per-load random key (fake SCRAM salts of unknown users derive from it).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// Adds the user or replaces their hash (the line keeps its place).
    pub fn set(&mut self, user: &str, password: &[u8], how: NewHash) -> Result<(), PasswordError> {
        check_username(user)?;
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(PasswordError::Random)?;
        let (encoded, hash) = match how {
            NewHash::Argon2id => {
                let salt = SaltString::encode_b64(&salt)
                    .map_err(|e| PasswordError::Hash(e.to_string()))?;
                let phc = Argon2::default()
                    .hash_password(password, &salt)
                    .map_err(|e| PasswordError::Hash(e.to_string()))?
                    .to_string();
                (phc.clone(), Hash::Argon2id(phc))
            }
            NewHash::ScramSha256 => {
                let v = ScramVerifier::derive(password, &salt, SCRAM_ITERATIONS);
                (v.encode(), Hash::Scram(v))
            }
        };
        let line = Line::User {
            text: format!("{user}:{encoded}"),
            user: user.to_owned(),
            hash,
        };
        match self.users.get(user) {
            Some(&i) => self.lines[i] = line,
            None => self.lines.push(line),
        }
        self.reindex();
        Ok(())
    }

    /// Removes the user's line; false if there was none.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(&i) = self.users.get(user) else {
            return false;
        };
        self.lines.remove(i);
        self.reindex();
        true
    }

    /// The file's text: every line as read, except added or updated users.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Other(text) | Line::User { text, .. } => out.push_str(text),
            }
            out.push('\n');
        }
        out
    }

    /// Writes the file atomically: a temporary file in the same directory, then a rename.
    /// An existing file keeps its permissions (and owner, where allowed); a new one gets
    /// mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), PasswordError> {
        write_atomically(path, self.to_text().as_bytes()).map_err(|source| PasswordError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

enum ParseError {
    Line(usize, String),
    Other(PasswordError),
}

pub(crate) fn check_username(user: &str) -> Result<(), PasswordError> {
    if user.is_empty()
        || user.contains(':')
        || user.chars().any(char::is_control)
        || user.len() > 65535
    {
        return Err(PasswordError::BadUsername(user.to_owned()));
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let existing = std::fs::metadata(path).ok();
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if let Some(meta) = &existing {
            file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            // Root editing the broker's file should not take it from the broker's user;
            // anyone else cannot give a file away, which is fine.
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else if let Ok(d) = std::fs::File::open(dir) {
        // Makes the rename durable; not all filesystems allow syncing a directory.
        let _ = d.sync_all();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn parse(text: &str) -> PasswordFile {
        match PasswordFile::parse(text) {
            Ok(f) => f,
            Err(ParseError::Line(line, m)) => panic!("line {line}: {m}"),
            Err(ParseError::Other(e)) => panic!("{e}"),
        }
    }

    fn parse_err(text: &str) -> (usize, String) {
        match PasswordFile::parse(text) {
            Ok(_) => panic!("{text:?} parsed"),
            Err(ParseError::Line(line, m)) => (line, m),
            Err(ParseError::Other(e)) => panic!("{e}"),
        }
    }

    // Produced by mosquitto_passwd 2.0.11 (`-b` and `-H sha512 -b`): password "secret".
    const MOSQ_7: &str = "alice:$7$101$7kIDB0Vzox9gBkl+$kYDUQg6/45CaSJauwV0uNLF88v/nPWlIwFyiAjNSumCxvYHPj0AdeDqUTfmxMll3YLJD9QRaS978Rgow1vpLfA==";
    // password "x"
    const MOSQ_6: &str = "carol:$6$N6JbSmKAcviL8sdx$fpM28Av+NllhAy2C4YXY6xBF8IiJm2itGNRvmv/PQpnI38aD3KvnlE9WtPReTg14NnVtNDk8Qzzrl8uu0PNVFw==";

    #[test]
    fn mosquitto_hashes_recorded_from_mosquitto_passwd() {
        let file = parse(&format!("{MOSQ_7}\n{MOSQ_6}\n"));
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"secreT"));
        assert!(!file.verify("alice", b""));
        assert!(file.verify("carol", b"x"));
        assert!(!file.verify("carol", b"y"));
        assert!(!file.verify("nobody", b"secret"));
    }

    /// Files written by the real `mosquitto_passwd` (both hash kinds, a non-ASCII
    /// password). Skipped without the tool, except under CI=true where it must exist.
    #[test]
    fn mosquitto_passwd_files() {
        if Command::new("mosquitto_passwd").arg("-h").output().is_err() {
            let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
            assert!(
                !ci,
                "CI=true and mosquitto_passwd not found (tests/run.sh installs the mosquitto package)"
            );
            eprintln!("skipped: mosquitto_passwd not found");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let run = |args: &[&str]| {
            let out = Command::new("mosquitto_passwd")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "mosquitto_passwd {args:?}: {out:?}");
        };
        let p = path.to_str().unwrap();
        run(&["-c", "-b", p, "alice", "correct horse"]);
        run(&["-b", p, "bob", "pässwörd ✓"]);
        run(&["-H", "sha512", "-b", p, "carol", "s3cr3t:with:colons"]);
        let file = PasswordFile::load(&path).unwrap();
        assert_eq!(file.len(), 3);
        assert!(file.verify("alice", b"correct horse"));
        assert!(file.verify("bob", "pässwörd ✓".as_bytes()));
        assert!(file.verify("carol", b"s3cr3t:with:colons"));
        assert!(!file.verify("alice", "pässwörd ✓".as_bytes()));
        assert!(!file.verify("carol", b"s3cr3t"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("carol:$6$") && text.contains("alice:$7$101$"),
            "{text}"
        );
    }

    #[test]
    fn argon2id_and_scram_written_and_verified() {
        let mut file = PasswordFile::empty().unwrap();
        file.set("ann", b"pw-one", NewHash::Argon2id).unwrap();
        file.set("sam", b"pw-two", NewHash::ScramSha256).unwrap();
        let text = file.to_text();
        assert!(
            text.starts_with("ann:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{text}"
        );
        assert!(text.contains("\nsam:SCRAM-SHA-256$4096:"), "{text}");
        // Round trip through the text, as the broker reads it.
        let file = parse(&text);
        assert!(file.verify("ann", b"pw-one"));
        assert!(!file.verify("ann", b"pw-two"));
        assert!(file.verify("sam", b"pw-two"));
        assert!(!file.verify("sam", b"pw-one"));
        assert!(file.scram("sam").is_some());
        assert!(file.scram("ann").is_none());
    }

    #[test]
    fn scram_verifier_matches_rfc7677() {
        // RFC 7677 section 3: user "user", password "pencil", this salt, 4096 iterations.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::derive(b"pencil", &salt, 4096);
        // ServerSignature in the RFC's server-final message is HMAC(ServerKey, AuthMessage).
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        assert_eq!(
            B64.encode(hmac_sha256(&v.server_key, auth_message.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let file = parse(&format!("user:{}\n", v.encode()));
        assert!(file.verify("user", b"pencil"));
        assert!(!file.verify("user", b"pencil "));
    }

    #[test]
    fn other_lines_kept_byte_for_byte() {
        let original = format!("# users\r\n\n{MOSQ_7}\n   \n# carol below\n{MOSQ_6}\n");
        let mut file = parse(&original);
        assert_eq!(file.to_text(), original);
        file.set("carol", b"new", NewHash::Argon2id).unwrap();
        file.set("dave", b"d", NewHash::ScramSha256).unwrap();
        assert!(file.remove("alice"));
        assert!(!file.remove("alice"));
        let text = file.to_text();
        let lines: Vec<&str> = text.strip_suffix('\n').unwrap().split('\n').collect();
        assert_eq!(lines[0], "# users\r");
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "   ");
        assert_eq!(lines[3], "# carol below");
        assert!(lines[4].starts_with("carol:$argon2id$"));
        assert!(lines[5].starts_with("dave:SCRAM-SHA-256$"));
        assert_eq!(lines.len(), 6);
        let file = parse(&text);
        assert!(file.verify("carol", b"new") && file.verify("dave", b"d"));
        assert!(!file.contains("alice"));
    }

    #[test]
    fn bad_lines_are_errors_with_their_number() {
        for (text, line, needle) in [
            ("# c\nalice\n", 2, "not `user:hash`"),
            ("alice:plain\n", 1, "not a hashed password"),
            (":$6$YWJj$YWJj\n", 1, "invalid username"),
            ("a:$6$abc\n", 1, "`$6$` hash is not"),
            ("a:$6$!!!$YWJj\n", 1, "salt is not valid base64"),
            ("a:$6$YWJj$YWJj\n", 1, "hash is 3 bytes, expected 64"),
            ("a:$7$0$YWJj$YWJj\n", 1, "bad iteration count `0`"),
            ("a:$7$x$YWJj$YWJj\n", 1, "bad iteration count"),
            ("a:$7$101$YWJj\n", 1, "`$7$` hash is not"),
            (
                "a:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g\n",
                1,
                "unsupported hash scheme `argon2i`",
            ),
            (
                "a:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ\n",
                1,
                "without salt or hash",
            ),
            ("a:$argon2id$garbage\n", 1, "argon2id"),
            ("a:$1$abc$def\n", 1, "unsupported hash scheme `1`"),
            (
                "a:SCRAM-SHA-256$4096:c2FsdA==\n",
                1,
                "SCRAM-SHA-256 verifier is not",
            ),
            (
                "a:SCRAM-SHA-1$4096:c2FsdA==$a:b\n",
                1,
                "unsupported hash scheme",
            ),
        ] {
            let (at, message) = parse_err(text);
            assert_eq!(at, line, "{text:?}");
            assert!(message.contains(needle), "{text:?}: {message}");
        }
        let dup = format!("{MOSQ_7}\n{}\n", MOSQ_7);
        assert_eq!(
            parse_err(&dup),
            (2, "user `alice` already defined on line 1".into())
        );
    }

    #[test]
    fn load_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, format!("{MOSQ_7}\nbob:\n")).unwrap();
        let err = PasswordFile::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:2: user `bob`", path.display())),
            "{err}"
        );
        let err = PasswordFile::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read password file"), "{err}");
    }

    #[test]
    fn usernames_are_trimmed_like_mosquitto() {
        let file = parse(&format!("  {}  \n", MOSQ_7.replacen(':', " : ", 1)));
        assert!(file.verify("alice", b"secret"));
    }

    #[test]
    fn decoy_is_the_most_common_cost() {
        let mut file = PasswordFile::empty().unwrap();
        assert_eq!(file.decoy, None);
        // Nothing to verify against: still false.
        assert!(!file.verify("x", b"y"));
        file.set("s1", b"a", NewHash::ScramSha256).unwrap();
        file.set("a1", b"a", NewHash::Argon2id).unwrap();
        file.set("s2", b"a", NewHash::ScramSha256).unwrap();
        assert_eq!(file.decoy, Some(0));
        // The decoy's password does not let an unknown user in.
        assert!(!file.verify("unknown", b"a"));
        file.remove("s1");
        file.remove("s2");
        let Some(Line::User { user, .. }) = file.decoy.map(|i| &file.lines[i]) else {
            panic!("no decoy")
        };
        assert_eq!(user, "a1");
    }

    #[test]
    fn save_is_atomic_and_keeps_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let mut file = PasswordFile::empty().unwrap();
        file.set("a", b"b", NewHash::ScramSha256).unwrap();
        file.save(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        file.set("c", b"d", NewHash::ScramSha256).unwrap();
        file.save(&path).unwrap();
        assert_eq!(mode(&path), 0o640);
        let loaded = PasswordFile::load(&path).unwrap();
        assert!(loaded.verify("a", b"b") && loaded.verify("c", b"d"));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pw")]);
        // A failed write leaves the old file and no temporary file.
        let err = file
            .save(&dir.path().join("no-such-dir").join("pw"))
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot write password file"),
            "{err}"
        );
    }

    #[test]
    fn set_refuses_bad_usernames() {
        let mut file = PasswordFile::empty().unwrap();
        for bad in ["", "a:b", "a\nb"] {
            let result = file.set(bad, b"p", NewHash::ScramSha256);
            assert!(matches!(result, Err(PasswordError::BadUsername(_))));
        }
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<PasswordFile>();
    }
}
