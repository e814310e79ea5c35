//! What the cluster is called in NATS: subjects, stream and bucket names, and the key
//! tokens that stand for client ids, topics and filters.
//!
//! MQTT strings may hold `.`, `*`, `>` and spaces, which NATS subjects and KV keys do not
//! allow, so a string never becomes a subject as it is: it is base64url-encoded (no
//! padding: the alphabet is `A-Z a-z 0-9 - _`, valid in any subject token and KV key).
//! Long strings would make subjects past NATS's control-line limit (4 KiB), so one whose
//! encoding exceeds `MAX_PLAIN` is named by `=` and the hex of its SHA-256 instead (`=`
//! never occurs in unpadded base64url, so the two forms cannot collide); the records
//! keep the string itself, so nothing needs to be decoded from a hashed token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Encoded strings longer than this are hashed.
const MAX_PLAIN: usize = 128;

/// One subject token (and KV key part) for `s`.
pub fn token(s: &str) -> String {
    if s.is_empty() {
        // An empty token would leave an empty subject level.
        return "=".into();
    }
    let encoded = URL_SAFE_NO_PAD.encode(s.as_bytes());
    if encoded.len() <= MAX_PLAIN {
        return encoded;
    }
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(65);
    out.push('=');
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The string a token stands for, if it is not a hashed one.
pub fn untoken(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    if token.starts_with('=') {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

/// The names of one cluster's subjects, streams and buckets.
#[derive(Debug, Clone)]
pub struct Names {
    /// `ternmq.<cluster>`: every subject of the cluster starts with it.
    prefix: String,
    /// `ternmq-<cluster>`: streams and buckets start with it.
    stem: String,
}

impl Names {
    pub fn new(cluster: &str) -> Names {
        Names {
            prefix: format!("ternmq.{cluster}"),
            stem: format!("ternmq-{cluster}"),
        }
    }

    /// Where QoS 1/2 messages for `node` are published (captured by the messages stream).
    pub fn node_subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }

    /// Where QoS 0 messages for `node` are published (core NATS only).
    pub fn live_subject(&self, node: &str) -> String {
        format!("{}.live.{node}", self.prefix)
    }

    /// Where `node` answers requests of the other nodes (session hand-over).
    pub fn control_subject(&self, node: &str) -> String {
        format!("{}.ctl.{node}", self.prefix)
    }

    /// The messages stream: one subject per node.
    pub fn messages_stream(&self) -> String {
        format!("{}-msgs", self.stem)
    }

    pub fn messages_subjects(&self) -> String {
        format!("{}.node.*", self.prefix)
    }

    /// The durable consumer through which `node` takes its messages.
    pub fn consumer(&self, node: &str) -> String {
        format!("node-{node}")
    }

    /// The durable consumer through which an adopter of `node` takes what is left for
    /// it (liveness.rs): another name, so that `node` starting again never reads it.
    pub fn adopter_consumer(&self, node: &str) -> String {
        format!("adopter-{node}")
    }

    /// The sessions' state (the `Store`): one subject per record.
    pub fn state_stream(&self) -> String {
        format!("{}-state", self.stem)
    }

    pub fn state_subjects(&self) -> String {
        format!("{}.state.>", self.prefix)
    }

    /// What every record subject starts with: `<prefix>.state.`.
    pub fn state_prefix(&self) -> String {
        format!("{}.state.", self.prefix)
    }

    /// Every record of one client: `<prefix>.state.<client>.>`.
    pub fn state_of(&self, client_id: &str) -> String {
        format!("{}.state.{}", self.prefix, token(client_id))
    }

    pub fn interest_bucket(&self) -> String {
        format!("{}-interest", self.stem)
    }

    pub fn retained_bucket(&self) -> String {
        format!("{}-retained", self.stem)
    }

    pub fn owners_bucket(&self) -> String {
        format!("{}-owners", self.stem)
    }

    pub fn nodes_bucket(&self) -> String {
        format!("{}-nodes", self.stem)
    }
}

/// The key of a node's interest in a filter: `<node>.<filter>`.
pub fn interest_key(node: &str, filter: &str) -> String {
    format!("{node}.{}", token(filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    }

    #[test]
    fn tokens_survive_what_subjects_forbid() {
        for s in [
            "a.b",
            "*",
            ">",
            "with space",
            "sport/+/#",
            "$SYS/x",
            "",
            "é/ü",
        ] {
            let t = token(s);
            assert!(valid_token(&t), "{s:?} -> {t:?}");
            assert_eq!(untoken(&t).as_deref(), Some(s));
        }
        assert_ne!(token("a.b"), token("a/b"));
    }

    #[test]
    fn long_strings_are_hashed_and_stay_short() {
        let long = "x/".repeat(500);
        let t = token(&long);
        assert!(t.starts_with('=') && t.len() == 65 && valid_token(&t));
        assert_eq!(untoken(&t), None);
        assert_ne!(t, token(&"y/".repeat(500)));
    }
}
