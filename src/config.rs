//! broker.toml: every setting, its default, and the checks that name the key and line of
//! a bad value.
//!
//! Range checks run inside deserialization (the `deserialize_with` functions below), so
//! that toml reports them with the file position of the offending value, exactly like an
//! unknown key or a wrong type.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// error | warn | info | debug | trace (RUST_LOG, if set, wins).
    #[serde(deserialize_with = "log_level")]
    pub log_level: String,
    pub listeners: Vec<Listener>,
    pub mqtt: Mqtt,
    pub session: SessionLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Tcp,
    /// MQTT over WebSocket (docs/websocket.md).
    Ws,
}

/// The path a ws listener serves when none is configured (`/` is always served too).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawListener")]
pub struct Listener {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// ws only: the HTTP path served besides `/` (default `/mqtt`).
    pub path: Option<String>,
    /// ws only: `Origin` values allowed to upgrade; empty allows any.
    pub allowed_origins: Vec<String>,
}

/// A listener as written, before the checks that involve several of its keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(rename = "type")]
    kind: ListenerKind,
    bind: SocketAddr,
    #[serde(default, deserialize_with = "ws_path")]
    path: Option<String>,
    #[serde(default, deserialize_with = "origins")]
    allowed_origins: Vec<String>,
}

impl TryFrom<RawListener> for Listener {
    type Error = String;

    fn try_from(raw: RawListener) -> Result<Listener, String> {
        if raw.kind != ListenerKind::Ws {
            // toml points at the first [[listeners]] here, so name the listener by its bind.
            let ws_only = [
                ("path", raw.path.is_some()),
                ("allowed_origins", !raw.allowed_origins.is_empty()),
            ];
            if let Some((key, _)) = ws_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "listener {}: `{key}` is only for type = \"ws\" listeners",
                    raw.bind
                ));
            }
        }
        Ok(Listener {
            kind: raw.kind,
            bind: raw.bind,
            path: raw.path,
            allowed_origins: raw.allowed_origins,
        })
    }
}

impl Listener {
    /// A listener of `kind` on `bind` with every other key at its default.
    pub fn new(kind: ListenerKind, bind: SocketAddr) -> Listener {
        Listener {
            kind,
            bind,
            path: None,
            allowed_origins: Vec::new(),
        }
    }

    /// The path a ws listener serves besides `/`.
    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_WS_PATH)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// Seconds a new connection has to send its CONNECT.
    #[serde(deserialize_with = "positive_u64")]
    pub connect_timeout: u64,
    /// Largest packet accepted, in bytes (fixed header included).
    #[serde(deserialize_with = "packet_size")]
    pub max_packet_size: usize,
    /// Clients sending an empty client id with clean session get one assigned.
    pub allow_zero_length_clientid: bool,
    /// Whether retained messages are stored (a retained PUBLISH is refused otherwise).
    pub retain_available: bool,
    /// Highest QoS accepted and granted.
    #[serde(deserialize_with = "qos")]
    pub max_qos: u8,
    pub wildcard_subscription_available: bool,
    pub subscription_identifiers_available: bool,
    pub shared_subscription_available: bool,
    /// 5.0: a client asking for a longer keep-alive (or none) is told to use this one.
    #[serde(deserialize_with = "u16_value")]
    pub max_keepalive: u16,
    /// 5.0: upper bound on the Session Expiry Interval a client may ask for, seconds.
    #[serde(deserialize_with = "u32_value")]
    pub max_session_expiry_interval: u32,
    /// 5.0: how many topic aliases a client may set on this connection (0 = none).
    #[serde(deserialize_with = "u16_value")]
    pub topic_alias_maximum: u16,
    /// 5.0: how many QoS 2 publishes a client may have unreleased at once.
    #[serde(deserialize_with = "receive_maximum")]
    pub receive_maximum: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
    /// Outbound QoS 1/2 messages sent but not yet acknowledged, per client.
    #[serde(deserialize_with = "pkid_window")]
    pub max_inflight_messages: usize,
    /// Messages waiting behind the in-flight window, per client, online or offline.
    #[serde(deserialize_with = "positive_usize")]
    pub max_queued_messages: usize,
    /// Queue QoS 0 messages for offline persistent sessions too.
    pub queue_qos0_messages: bool,
}

/// `[persistence]`: the store of retained messages and persistent sessions
/// (docs/persistence.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Keep state on disk; false keeps it in memory only (lost on restart).
    pub enabled: bool,
    /// The data directory, created if missing; relative paths are from the working directory.
    pub dir: PathBuf,
    /// When a batch counts as durable.
    pub sync: SyncMode,
    /// `interval`: milliseconds between fsyncs (the most a power cut can lose).
    #[serde(deserialize_with = "sync_interval")]
    pub sync_interval_ms: u64,
    /// What to do with a store too damaged to open as it is.
    pub on_corruption: OnCorruption,
    /// Disk budget, bytes: past it the broker refuses messages it would have to store.
    #[serde(deserialize_with = "disk_budget")]
    pub max_disk_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync before a batch counts as durable (before PUBACK/PUBREC).
    Always,
    /// fsync every `sync_interval_ms`; a batch counts as durable once submitted.
    Interval,
    /// Never fsync: the OS writes when it likes (a process crash loses nothing, a power cut may).
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorruption {
    /// Move the damaged store aside and start with what could be read from it.
    Recover,
    /// Refuse to start, naming the damaged store.
    Stop,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            enabled: true,
            dir: PathBuf::from("data"),
            sync: SyncMode::Interval,
            sync_interval_ms: 100,
            on_corruption: OnCorruption::Recover,
            max_disk_bytes: 1 << 30,
        }
    }
}

impl PersistenceConfig {
    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "info".into(),
            listeners: vec![Listener::new(
                ListenerKind::Tcp,
                SocketAddr::from(([0, 0, 0, 0], 1883)),
            )],
            mqtt: Mqtt::default(),
            session: SessionLimits::default(),
        }
    }
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            connect_timeout: 10,
            max_packet_size: crate::protocol::MAX_REMAINING_LENGTH + 5,
            allow_zero_length_clientid: true,
            retain_available: true,
            max_qos: 2,
            wildcard_subscription_available: true,
            subscription_identifiers_available: true,
            shared_subscription_available: true,
            max_keepalive: 65_535,
            max_session_expiry_interval: u32::MAX,
            topic_alias_maximum: 10,
            receive_maximum: 20,
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_inflight_messages: 20,
            max_queued_messages: 1000,
            queue_qos0_messages: false,
        }
    }
}

impl Mqtt {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }
}

/// A config file that could not be used; the message names the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: display,
            message,
        })
    }

    /// Parses a config; the error carries toml's line/column and the offending key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.listeners.is_empty() {
            return Err("`listeners` is empty: at least one [[listeners]] entry is needed".into());
        }
        Ok(config)
    }
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        _ => Err(serde::de::Error::custom(format!(
            "log_level must be one of error, warn, info, debug, trace (got {level:?})"
        ))),
    }
}

fn ranged<'de, D: Deserializer<'de>>(
    d: D,
    min: u64,
    max: u64,
    what: &str,
) -> Result<u64, D::Error> {
    let v = i64::deserialize(d)?;
    match u64::try_from(v) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(serde::de::Error::custom(format!(
            "{what} must be between {min} and {max} (got {v})"
        ))),
    }
}

fn positive_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 1, 86_400, "value")
}

fn positive_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 10_000_000, "value").map(|v| v as usize)
}

fn pkid_window<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 65_535, "value").map(|v| v as usize)
}

fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    ranged(d, 0, 2, "value").map(|v| v as u8)
}

fn u16_value<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 0, u64::from(u16::MAX), "value").map(|v| v as u16)
}

fn receive_maximum<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 1, u64::from(u16::MAX), "value").map(|v| v as u16)
}

fn u32_value<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 0, u64::from(u32::MAX), "value").map(|v| v as u32)
}

fn ws_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let path = String::deserialize(d)?;
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err(serde::de::Error::custom(format!(
            "path must start with '/' and hold no '?', '#' or space (got {path:?})"
        )));
    }
    Ok(Some(path))
}

/// Browsers send `scheme://host[:port]`, without a path or a trailing slash.
fn origins<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let origins = Vec::<String>::deserialize(d)?;
    match origins.iter().find(|o| !o.contains("://") || o.ends_with('/')) {
        Some(bad) => Err(serde::de::Error::custom(format!(
            "allowed_origins entries look like \"https://example.com\" or \"http://host:8080\", with no trailing '/' (got {bad:?})"
        ))),
        None => Ok(origins),
    }
}

fn sync_interval<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 1, 60_000, "value")
}

fn disk_budget<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 1 << 20, 1 << 50, "value")
}

fn packet_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    // The smallest useful limit still admits a CONNECT with a short client id.
    let max = crate::protocol::MAX_REMAINING_LENGTH as u64 + 5;
    ranged(d, 64, max, "value").map(|v| v as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_matches_defaults() {
        let text = include_str!("../broker.toml");
        let c = Config::parse(text).expect("broker.toml parses");
        let d = Config::default();
        assert_eq!(c.mqtt.connect_timeout, d.mqtt.connect_timeout);
        assert_eq!(c.mqtt.max_packet_size, d.mqtt.max_packet_size);
        assert_eq!(
            c.session.max_inflight_messages,
            d.session.max_inflight_messages
        );
        assert_eq!(c.session.max_queued_messages, d.session.max_queued_messages);
        assert_eq!(c.session.queue_qos0_messages, d.session.queue_qos0_messages);
        assert_eq!(c.mqtt.retain_available, d.mqtt.retain_available);
        assert_eq!(c.mqtt.max_qos, d.mqtt.max_qos);
        assert_eq!(c.mqtt.max_keepalive, d.mqtt.max_keepalive);
        assert_eq!(
            c.mqtt.max_session_expiry_interval,
            d.mqtt.max_session_expiry_interval
        );
        assert_eq!(c.mqtt.topic_alias_maximum, d.mqtt.topic_alias_maximum);
        assert_eq!(c.mqtt.receive_maximum, d.mqtt.receive_maximum);
        assert_eq!(c.log_level, d.log_level);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("log_level = \"info\"\n[mqtt]\nconect_timeout = 5\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("conect_timeout"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_named_with_its_line() {
        let err = Config::parse("[session]\n\nmax_inflight_messages = 0\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("max_inflight_messages"), "{err}");
        let err = Config::parse("log_level = \"loud\"\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("log_level"), "{err}");
    }

    #[test]
    fn persistence_keys() {
        let parse = |t: &str| toml::from_str::<PersistenceConfig>(t).map_err(|e| e.to_string());
        assert_eq!(parse("").unwrap(), PersistenceConfig::default());
        let c = parse(
            "enabled = false\ndir = \"/var/lib/ternmq\"\nsync = \"always\"\nsync_interval_ms = 5\non_corruption = \"stop\"\nmax_disk_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(
            c,
            PersistenceConfig {
                enabled: false,
                dir: "/var/lib/ternmq".into(),
                sync: SyncMode::Always,
                sync_interval_ms: 5,
                on_corruption: OnCorruption::Stop,
                max_disk_bytes: 1 << 20,
            }
        );
        for (text, key) in [
            ("\nsync_interval_ms = 0\n", "sync_interval_ms"),
            ("\nmax_disk_bytes = 1000\n", "max_disk_bytes"),
            ("\nsync = \"sometimes\"\n", "sync"),
            ("\non_corruption = \"ignore\"\n", "on_corruption"),
            ("\nsink = \"always\"\n", "sink"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains("line 2") && err.contains(key), "{err}");
        }
    }

    #[test]
    fn bad_bind_address_is_refused() {
        let err = Config::parse("[[listeners]]\ntype = \"tcp\"\nbind = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("bind"), "{err}");
    }

    #[test]
    fn ws_listener_keys() {
        let sample = Config::parse(include_str!("../broker.toml")).unwrap();
        let ws = sample
            .listeners
            .iter()
            .find(|l| l.kind == ListenerKind::Ws)
            .unwrap();
        assert_eq!((ws.bind.port(), ws.ws_path()), (8083, "/mqtt"));

        let ok = "[[listeners]]\ntype = \"ws\"\nbind = \"127.0.0.1:8083\"\n";
        let c = Config::parse(ok).unwrap();
        assert_eq!(c.listeners[0].kind, ListenerKind::Ws);
        assert_eq!(c.listeners[0].ws_path(), "/mqtt");
        assert!(c.listeners[0].allowed_origins.is_empty());

        let c = Config::parse(&format!(
            "{ok}path = \"/ws\"\nallowed_origins = [\"https://app.example.com\"]\n"
        ))
        .unwrap();
        assert_eq!(c.listeners[0].ws_path(), "/ws");
        assert_eq!(c.listeners[0].allowed_origins, ["https://app.example.com"]);

        let err = Config::parse(&format!("{ok}path = \"mqtt\"\n")).unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("path") && err.contains("'/'"),
            "{err}"
        );
        let err = Config::parse(&format!("{ok}allowed_origins = [\"https://a.example/\"]\n"))
            .unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("allowed_origins"),
            "{err}"
        );

        // A ws-only key on a tcp listener names the key and the listener.
        let tcp = "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:1883\"\n";
        let err = Config::parse(&format!("{ok}\n{tcp}path = \"/mqtt\"\n")).unwrap_err();
        assert!(
            err.contains("127.0.0.1:1883") && err.contains("`path`"),
            "{err}"
        );
        let err =
            Config::parse(&format!("{tcp}allowed_origins = [\"http://a.example\"]\n")).unwrap_err();
        assert!(err.contains("`allowed_origins`"), "{err}");
    }
}
