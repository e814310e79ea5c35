//! broker.toml: every setting, its default, and the checks that name the key and line of
//! a bad value.
//!
//! Range checks run inside deserialization (the `deserialize_with` functions below), so
//! that toml reports them with the file position of the offending value, exactly like an
//! unknown key or a wrong type.

mod tls;

pub use tls::{IdentitySource, TlsConfig, TlsVersion};

use crate::protocol::QoS;
use crate::security::SecurityConfig;
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
    /// How log lines are written: plain text, or one JSON object per line.
    pub log_format: LogFormat,
    /// Seconds between updates of the `$SYS` topics (0 = none), as mosquitto's
    /// `sys_interval` (docs/observability.md).
    #[serde(deserialize_with = "sys_interval")]
    pub sys_interval: u64,
    pub listeners: Vec<Listener>,
    pub mqtt: Mqtt,
    pub session: SessionLimits,
    pub limits: Limits,
    /// Password file, ACL and tokens (docs/security.md).
    pub auth: SecurityConfig,
    /// The store of retained messages and persistent sessions (docs/persistence.md).
    pub persistence: PersistenceConfig,
    /// Several nodes as one broker, on NATS JetStream (docs/cluster.md). None: one node.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Tcp,
    /// MQTT over WebSocket (docs/websocket.md).
    Ws,
    /// Server-Sent Events, long polling and HTTP publish, and MQTT over WebSocket at
    /// `path` (docs/http.md).
    Http,
    /// HTTP for operators: `/metrics`, the admin API and the web console
    /// (docs/observability.md). Not MQTT.
    Admin,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, with the connection's peer and client id.
    Json,
}

/// The path a ws listener serves when none is configured (`/` is always served too).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawListener")]
pub struct Listener {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// ws and http: the HTTP path of MQTT over WebSocket (default `/mqtt`; a ws listener
    /// serves `/` too).
    pub path: Option<String>,
    /// ws and http: `Origin` values allowed to upgrade to WebSocket; empty allows any.
    pub allowed_origins: Vec<String>,
    /// TLS on this listener (mqtts on tcp, wss on ws): docs/security.md.
    pub tls: Option<TlsConfig>,
    /// Connections this listener serves at once (0 = no limit of its own).
    pub max_connections: usize,
    /// Clients without credentials may connect (false by default, as in mosquitto 2).
    pub allow_anonymous: bool,
    /// admin only: the bearer token every request but the console's files must carry.
    pub token: Option<String>,
    /// http only: SSE, long polling and HTTP publish.
    pub http: HttpSettings,
}

/// The keys of an http listener (docs/http.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Origins whose pages may call SSE, poll and publish (CORS); others are refused.
    /// Empty: none (requests without `Origin`, from servers and tools, are served).
    pub cors_origins: Vec<String>,
    /// Seconds between `: ping` comments on an idle SSE stream.
    pub heartbeat: u64,
    /// Milliseconds an EventSource waits before reconnecting (the `retry:` field).
    pub retry: u64,
    /// Seconds an SSE or poll session with a client id outlives its request.
    pub session_expiry: u32,
    /// Longest `timeout` of a long poll, seconds.
    pub max_poll_timeout: u64,
    /// Events sent and not yet acknowledged per persistent stream or poll session.
    pub max_unacked: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            cors_origins: Vec::new(),
            heartbeat: 15,
            retry: 2000,
            session_expiry: 300,
            max_poll_timeout: 60,
            max_unacked: 1000,
        }
    }
}

/// The shortest admin token accepted: a guessable token on an HTTP API that can
/// disconnect clients is worse than none.
pub const MIN_ADMIN_TOKEN: usize = 16;

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
    tls: Option<TlsConfig>,
    #[serde(default, deserialize_with = "count")]
    max_connections: usize,
    #[serde(default)]
    allow_anonymous: bool,
    #[serde(default, deserialize_with = "origins")]
    cors_origins: Vec<String>,
    #[serde(default, deserialize_with = "heartbeat")]
    heartbeat: Option<u64>,
    #[serde(default, deserialize_with = "retry")]
    retry: Option<u64>,
    #[serde(default, deserialize_with = "session_expiry")]
    session_expiry: Option<u32>,
    #[serde(default, deserialize_with = "poll_timeout")]
    max_poll_timeout: Option<u64>,
    #[serde(default, deserialize_with = "unacked")]
    max_unacked: Option<usize>,
    token: Option<String>,
}

impl TryFrom<RawListener> for Listener {
    type Error = String;

    fn try_from(raw: RawListener) -> Result<Listener, String> {
        // toml points at the first [[listeners]] here, so name the listener by its bind.
        let misplaced = |keys: &[(&str, bool)], kinds: &str| {
            keys.iter().find(|(_, set)| *set).map(|(key, _)| {
                format!(
                    "listener {}: `{key}` is only for {kinds} listeners",
                    raw.bind
                )
            })
        };
        if raw.kind == ListenerKind::Tcp {
            let web_only = [
                ("path", raw.path.is_some()),
                ("allowed_origins", !raw.allowed_origins.is_empty()),
            ];
            if let Some(e) = misplaced(&web_only, "type = \"ws\" and type = \"http\"") {
                return Err(e);
            }
        }
        if raw.kind != ListenerKind::Http {
            let http_only = [
                ("cors_origins", !raw.cors_origins.is_empty()),
                ("heartbeat", raw.heartbeat.is_some()),
                ("retry", raw.retry.is_some()),
                ("session_expiry", raw.session_expiry.is_some()),
                ("max_poll_timeout", raw.max_poll_timeout.is_some()),
                ("max_unacked", raw.max_unacked.is_some()),
            ];
            if let Some(e) = misplaced(&http_only, "type = \"http\"") {
                return Err(e);
            }
        }
        if raw.kind == ListenerKind::Http {
            if let Some(p) = raw
                .path
                .as_deref()
                .filter(|p| ["/sse", "/poll", "/publish"].contains(p))
            {
                return Err(format!(
                    "listener {}: `path` {p:?} is an endpoint of the http listener; choose another",
                    raw.bind
                ));
            }
        }
        check_admin(&raw)?;
        let d = HttpSettings::default();
        let http = HttpSettings {
            cors_origins: raw.cors_origins,
            heartbeat: raw.heartbeat.unwrap_or(d.heartbeat),
            retry: raw.retry.unwrap_or(d.retry),
            session_expiry: raw.session_expiry.unwrap_or(d.session_expiry),
            max_poll_timeout: raw.max_poll_timeout.unwrap_or(d.max_poll_timeout),
            max_unacked: raw.max_unacked.unwrap_or(d.max_unacked),
        };
        Ok(Listener {
            kind: raw.kind,
            bind: raw.bind,
            path: raw.path,
            allowed_origins: raw.allowed_origins,
            tls: raw.tls,
            max_connections: raw.max_connections,
            allow_anonymous: raw.allow_anonymous,
            http,
            token: raw.token,
        })
    }
}

/// An admin listener needs a token, and takes none of the MQTT listeners' keys; the
/// others take no token.
fn check_admin(raw: &RawListener) -> Result<(), String> {
    let bind = raw.bind;
    if raw.kind != ListenerKind::Admin {
        return match raw.token {
            Some(_) => Err(format!(
                "listener {bind}: `token` is only for type = \"admin\" listeners"
            )),
            None => Ok(()),
        };
    }
    if raw.allow_anonymous {
        return Err(format!(
            "listener {bind}: `allow_anonymous` is not for type = \"admin\" listeners (the token is required)"
        ));
    }
    match &raw.token {
        Some(t) if t.chars().count() >= MIN_ADMIN_TOKEN && !t.contains(char::is_whitespace) => {
            Ok(())
        }
        Some(_) => Err(format!(
            "listener {bind}: the admin `token` must be at least {MIN_ADMIN_TOKEN} characters, without spaces"
        )),
        None => Err(format!(
            "listener {bind}: an admin listener needs a `token` (e.g. the output of `openssl rand -hex 24`)"
        )),
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
            tls: None,
            max_connections: 0,
            allow_anonymous: false,
            http: HttpSettings::default(),
            token: None,
        }
    }

    /// The path of MQTT over WebSocket (a ws listener serves `/` too).
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
    pub max_qos: QoS,
    pub wildcard_subscription_available: bool,
    pub subscription_identifiers_available: bool,
    pub shared_subscription_available: bool,
    /// A 5.0 client asking for a longer keep-alive (or none) is told to use this one;
    /// below 65535, a 3.x client asking for more (or none) is refused (return code 2).
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
    /// 5.0: how many topic aliases the server sets per connection towards a client that
    /// accepts them (0 = never).
    #[serde(deserialize_with = "u16_value")]
    pub max_outgoing_topic_aliases: u16,
    /// 5.0: the Response Information for clients that ask for it; `{client_id}` is
    /// replaced by the client id. None = not given.
    #[serde(deserialize_with = "response_information")]
    pub response_information: Option<String>,
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
    /// Bytes of messages a client may have waiting (0 = bounded by the count only).
    #[serde(deserialize_with = "count")]
    pub max_queued_bytes: usize,
    /// Seconds a 3.x persistent session (Clean Session 0) is kept offline before it
    /// expires (0 = never, mosquitto's default). A week by default: 3.x clients cannot
    /// say how long, and abandoned sessions would otherwise hold their queues forever.
    #[serde(deserialize_with = "u32_value")]
    pub persistent_client_expiration: u32,
}

/// What one client, or all of them together, may hold of the broker: the bounds that a
/// slow, silent or hostile client cannot get past (docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections served at once, all listeners together (0 = no limit).
    #[serde(deserialize_with = "count")]
    pub max_connections: usize,
    /// Largest CONNECT accepted, in bytes: what an unauthenticated peer can make the
    /// broker buffer, whatever `mqtt.max_packet_size` says.
    #[serde(deserialize_with = "connect_size")]
    pub max_connect_size: usize,
    /// Largest payload of a PUBLISH or a will, in bytes (0 = no limit).
    #[serde(deserialize_with = "count")]
    pub message_size_limit: usize,
    #[serde(deserialize_with = "client_id_length")]
    pub max_client_id_length: usize,
    /// Subscriptions per client (0 = no limit).
    #[serde(deserialize_with = "count")]
    pub max_subscriptions: usize,
    /// PUBLISH packets per second a client may send, sustained (0 = no limit); past
    /// it, with `publish_burst` used up, the broker stops reading from the client until
    /// the rate allows.
    #[serde(deserialize_with = "u32_value")]
    pub publish_rate: u32,
    /// Payload bytes per second a client may publish, sustained (0 = no limit).
    #[serde(deserialize_with = "count")]
    pub publish_bytes_rate: usize,
    /// Seconds' worth of the rates a client may use at once.
    #[serde(deserialize_with = "burst")]
    pub publish_burst: u32,
    /// Bytes held in partly received packets and in write buffers, all connections
    /// together; a connection holding more than its share while this is exceeded is
    /// closed.
    #[serde(deserialize_with = "memory")]
    pub max_buffered_memory: usize,
    /// Bytes of messages held for clients (queued and in flight, all sessions) and in the
    /// retained store: past 90% QoS 0 messages are no longer queued, past 100% publishes
    /// are refused (5.0: 0x97 Quota exceeded).
    #[serde(deserialize_with = "memory")]
    pub max_queued_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 0,
            max_connect_size: 64 * 1024,
            message_size_limit: 0,
            max_client_id_length: 65_535,
            max_subscriptions: 10_000,
            publish_rate: 0,
            publish_bytes_rate: 0,
            publish_burst: 1,
            max_buffered_memory: 256 << 20,
            max_queued_memory: 512 << 20,
        }
    }
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
            // Off unless configured, as in mosquitto; the sample broker.toml turns it on.
            enabled: false,
            dir: PathBuf::from("data"),
            sync: SyncMode::Interval,
            sync_interval_ms: 100,
            on_corruption: OnCorruption::Recover,
            max_disk_bytes: 1 << 30,
        }
    }
}

/// `[cluster]`: this broker is one node of several, which share their clients' state
/// through NATS JetStream (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name: the prefix of its NATS subjects, streams and buckets, so that
    /// several clusters can share one NATS system.
    #[serde(deserialize_with = "cluster_token")]
    pub name: String,
    /// This node's name, unique in the cluster and kept across restarts.
    #[serde(deserialize_with = "cluster_token")]
    pub node: String,
    /// NATS server URLs (`nats://host:port`, `tls://host:port`); the client tries them all.
    #[serde(deserialize_with = "nats_urls")]
    pub nats: Vec<String>,
    /// NATS user and password (both or neither).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A NATS credentials file (JWT and NKey seed), instead of user and password.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the NATS servers' certificates: TLS to NATS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// JetStream replicas of every stream and bucket (1, or 3 to survive losing a server).
    #[serde(default = "default_replicas", deserialize_with = "replicas")]
    pub replicas: usize,
    /// How long a node waits for another to hand over a client's session before it takes
    /// the session from JetStream as it stands, milliseconds.
    #[serde(
        default = "default_takeover_timeout",
        deserialize_with = "cluster_millis"
    )]
    pub takeover_timeout_ms: u64,
    /// A node whose heartbeat is older than this is dead and its sessions are adopted,
    /// milliseconds.
    #[serde(default = "default_node_timeout", deserialize_with = "cluster_millis")]
    pub node_timeout_ms: u64,
}

fn default_replicas() -> usize {
    3
}

fn default_takeover_timeout() -> u64 {
    2000
}

fn default_node_timeout() -> u64 {
    // Above the 4 to 9 s nats-server 2.9 takes to elect a stream's new leader, so that a
    // node cut off that long by a lost NATS server is not taken for dead.
    10_000
}

impl ClusterConfig {
    /// A cluster `name` with this `node` on these NATS servers, the rest at defaults.
    pub fn new(name: &str, node: &str, nats: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            name: name.into(),
            node: node.into(),
            nats,
            user: None,
            password: None,
            creds_file: None,
            tls_ca_file: None,
            replicas: default_replicas(),
            takeover_timeout_ms: default_takeover_timeout(),
            node_timeout_ms: default_node_timeout(),
        }
    }

    pub fn takeover_timeout(&self) -> Duration {
        Duration::from_millis(self.takeover_timeout_ms)
    }

    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }
}

/// Cluster and node names are parts of NATS subjects and stream names.
fn cluster_token<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let ok = (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(serde::de::Error::custom(format!(
            "must be 1 to 32 characters of A-Z, a-z, 0-9, '-' and '_' (got {s:?})"
        )));
    }
    Ok(s)
}

fn nats_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let urls = Vec::<String>::deserialize(d)?;
    if urls.is_empty() {
        return Err(serde::de::Error::custom(
            "at least one NATS server is needed, e.g. [\"nats://127.0.0.1:4222\"]",
        ));
    }
    let schemes = ["nats://", "tls://"];
    match urls
        .iter()
        .find(|u| !schemes.iter().any(|s| u.starts_with(s)))
    {
        Some(bad) => Err(serde::de::Error::custom(format!(
            "NATS URLs start with nats:// or tls:// (got {bad:?})"
        ))),
        None => Ok(urls),
    }
}

fn replicas<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 5, "value").map(|v| v as usize)
}

fn cluster_millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 100, 600_000, "value (milliseconds)")
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
            log_format: LogFormat::Text,
            sys_interval: 10,
            // Without a config file, as mosquitto 2: local clients only, anonymous.
            listeners: vec![Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Tcp, SocketAddr::from(([127, 0, 0, 1], 1883)))
            }],
            mqtt: Mqtt::default(),
            session: SessionLimits::default(),
            limits: Limits::default(),
            auth: SecurityConfig::default(),
            persistence: PersistenceConfig::default(),
            cluster: None,
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
            max_qos: QoS::ExactlyOnce,
            wildcard_subscription_available: true,
            subscription_identifiers_available: true,
            shared_subscription_available: true,
            max_keepalive: 65_535,
            max_session_expiry_interval: u32::MAX,
            topic_alias_maximum: 10,
            receive_maximum: 20,
            max_outgoing_topic_aliases: 10,
            response_information: None,
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_inflight_messages: 20,
            max_queued_messages: 1000,
            queue_qos0_messages: false,
            max_queued_bytes: 0,
            persistent_client_expiration: 7 * 24 * 3600,
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
        if config.cluster.is_some() && config.persistence.enabled {
            return Err("[cluster] keeps the state in JetStream: remove [persistence] enabled = true (it is for a single node)".into());
        }
        if let Some(c) = &config.cluster {
            if c.user.is_some() != c.password.is_some() {
                return Err("[cluster]: `user` and `password` go together".into());
            }
            if c.user.is_some() && c.creds_file.is_some() {
                return Err("[cluster]: `creds_file` or `user` and `password`, not both".into());
            }
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

/// A count or size where 0 means no limit.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 0, 1 << 48, "value").map(|v| v as usize)
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1 << 20, 1 << 48, "value (bytes)").map(|v| v as usize)
}

fn connect_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let max = crate::protocol::MAX_REMAINING_LENGTH as u64 + 5;
    ranged(d, 128, max, "value (bytes)").map(|v| v as usize)
}

fn client_id_length<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 65_535, "value").map(|v| v as usize)
}

fn burst<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 1, 3600, "value (seconds)").map(|v| v as u32)
}

fn pkid_window<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    ranged(d, 1, 65_535, "value").map(|v| v as usize)
}

fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<QoS, D::Error> {
    ranged(d, 0, 2, "value").map(|v| QoS::from_u8(v as u8).unwrap_or_default())
}

fn response_information<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let prefix = String::deserialize(d)?;
    if prefix.is_empty() || prefix.contains(['+', '#']) {
        return Err(serde::de::Error::custom(format!(
            "response_information must be a topic prefix without wildcards (got {prefix:?})"
        )));
    }
    Ok(Some(prefix))
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
            "origins look like \"https://example.com\" or \"http://host:8080\", with no trailing '/' (got {bad:?})"
        ))),
        None => Ok(origins),
    }
}

fn heartbeat<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    ranged(d, 1, 3600, "heartbeat (seconds)").map(Some)
}

fn retry<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    ranged(d, 0, 3_600_000, "retry (milliseconds)").map(Some)
}

fn session_expiry<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ranged(d, 0, u64::from(u32::MAX), "session_expiry (seconds)").map(|v| Some(v as u32))
}

fn poll_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    ranged(d, 0, 3600, "max_poll_timeout (seconds)").map(Some)
}

fn unacked<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    ranged(d, 1, 65_535, "max_unacked").map(|v| Some(v as usize))
}

fn sys_interval<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 0, 86_400, "value (seconds)")
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
        assert_eq!(
            c.mqtt.max_outgoing_topic_aliases,
            d.mqtt.max_outgoing_topic_aliases
        );
        assert_eq!(c.mqtt.response_information, d.mqtt.response_information);
        assert_eq!(c.log_level, d.log_level);
        assert_eq!(c.log_format, d.log_format);
        assert_eq!(c.sys_interval, d.sys_interval);
        // The sample turns persistence on (into ./data); every other key at its default.
        assert_eq!(
            c.persistence,
            PersistenceConfig {
                enabled: true,
                ..d.persistence
            }
        );
        assert_eq!(c.session.max_queued_bytes, d.session.max_queued_bytes);
        assert_eq!(
            c.session.persistent_client_expiration,
            d.session.persistent_client_expiration
        );
        let (l, dl) = (&c.limits, &d.limits);
        assert_eq!(
            (l.max_connections, l.max_connect_size, l.message_size_limit),
            (
                dl.max_connections,
                dl.max_connect_size,
                dl.message_size_limit
            )
        );
        assert_eq!(
            (l.max_client_id_length, l.max_subscriptions, l.publish_rate),
            (
                dl.max_client_id_length,
                dl.max_subscriptions,
                dl.publish_rate
            )
        );
        assert_eq!(
            (l.publish_bytes_rate, l.publish_burst),
            (dl.publish_bytes_rate, dl.publish_burst)
        );
        assert_eq!(
            (l.max_buffered_memory, l.max_queued_memory),
            (dl.max_buffered_memory, dl.max_queued_memory)
        );
        assert_eq!(c.auth, d.auth, "[auth] has only commented-out keys");
    }

    #[test]
    fn response_information_is_a_topic_prefix() {
        let sample = include_str!("../broker.toml");
        let line = sample
            .lines()
            .find(|l| l.starts_with("# response_information = "))
            .expect("broker.toml shows response_information");
        let uncommented = sample.replace(line, &line[2..]);
        let c = Config::parse(&uncommented).expect("the sample value parses");
        assert_eq!(
            c.mqtt.response_information.as_deref(),
            Some("response/{client_id}/")
        );
        let err = Config::parse("[mqtt]\nresponse_information = \"r/+/\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("wildcards"), "{err}");
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
    fn cluster_keys() {
        let base =
            "[cluster]\nname = \"prod\"\nnode = \"n-1\"\nnats = [\"nats://127.0.0.1:4222\"]\n";
        let c = Config::parse(base).unwrap().cluster.unwrap();
        assert_eq!(
            c,
            ClusterConfig::new("prod", "n-1", vec!["nats://127.0.0.1:4222".into()])
        );
        assert!(Config::parse("").unwrap().cluster.is_none());
        for (extra, key) in [
            ("replicas = 7\n", "replicas"),
            ("takeover_timeout_ms = 5\n", "takeover_timeout_ms"),
            ("node_timeout_ms = 0\n", "node_timeout_ms"),
            ("nodes = 3\n", "nodes"),
        ] {
            let err = Config::parse(&format!("{base}{extra}")).unwrap_err();
            assert!(err.contains("line 5") && err.contains(key), "{err}");
        }
        let err =
            Config::parse("[cluster]\nname = \"a.b\"\nnode = \"n\"\nnats = [\"nats://h:1\"]\n")
                .unwrap_err();
        assert!(err.contains("line 2") && err.contains("name"), "{err}");
        let err = Config::parse("[cluster]\nname = \"a\"\nnode = \"n\"\nnats = [\"http://h:1\"]\n")
            .unwrap_err();
        assert!(err.contains("line 4") && err.contains("nats"), "{err}");
        let err = Config::parse(&format!("{base}[persistence]\nenabled = true\n")).unwrap_err();
        assert!(err.contains("JetStream"), "{err}");
        let err = Config::parse(&format!("{base}user = \"u\"\n")).unwrap_err();
        assert!(err.contains("`user` and `password`"), "{err}");
        let both = format!("{base}user = \"u\"\npassword = \"p\"\ncreds_file = \"c\"\n");
        assert!(Config::parse(&both).unwrap_err().contains("creds_file"));
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

    #[test]
    fn http_listener_keys() {
        let sample = Config::parse(include_str!("../broker.toml")).unwrap();
        let l = sample
            .listeners
            .iter()
            .find(|l| l.kind == ListenerKind::Http);
        let l = l.expect("broker.toml shows an http listener");
        assert_eq!((l.bind.port(), &l.http), (8080, &HttpSettings::default()));

        let http = "[[listeners]]\ntype = \"http\"\nbind = \"127.0.0.1:8080\"\n";
        let c = Config::parse(http).unwrap();
        let l = &c.listeners[0];
        assert_eq!((l.kind, l.ws_path()), (ListenerKind::Http, "/mqtt"));
        assert_eq!(l.http, HttpSettings::default());
        assert!(
            l.http.cors_origins.is_empty(),
            "no origin is allowed by default"
        );

        let c = Config::parse(&format!(
            "{http}cors_origins = [\"http://localhost:3000\"]\nheartbeat = 5\nretry = 500\n\
             session_expiry = 60\nmax_poll_timeout = 30\nmax_unacked = 10\npath = \"/ws\"\n"
        ))
        .unwrap();
        let h = &c.listeners[0].http;
        assert_eq!(h.cors_origins, ["http://localhost:3000"]);
        assert_eq!(
            (
                h.heartbeat,
                h.retry,
                h.session_expiry,
                h.max_poll_timeout,
                h.max_unacked
            ),
            (5, 500, 60, 30, 10)
        );
        assert_eq!(c.listeners[0].ws_path(), "/ws");

        for (text, key) in [
            ("heartbeat = 0", "heartbeat"),
            ("retry = -1", "retry"),
            ("max_poll_timeout = 3601", "max_poll_timeout"),
            ("max_unacked = 0", "max_unacked"),
            ("session_expiry = 4294967296", "session_expiry"),
            ("cors_origins = [\"localhost\"]", "cors_origins"),
        ] {
            let err = Config::parse(&format!("{http}{text}\n")).unwrap_err();
            assert!(err.contains("line 4") && err.contains(key), "{err}");
        }
        let err = Config::parse(&format!("{http}path = \"/sse\"\n")).unwrap_err();
        assert!(err.contains("`path`") && err.contains("/sse"), "{err}");
        let ws = "[[listeners]]\ntype = \"ws\"\nbind = \"127.0.0.1:8083\"\n";
        let err = Config::parse(&format!("{ws}heartbeat = 5\n")).unwrap_err();
        assert!(
            err.contains("127.0.0.1:8083") && err.contains("`heartbeat`"),
            "{err}"
        );
    }

    #[test]
    fn tls_listener_keys() {
        use super::{IdentitySource, TlsConfig};
        let tcp = "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:8883\"\n";
        assert_eq!(Config::parse(tcp).unwrap().listeners[0].tls, None);

        // An inline table and a [listeners.tls] sub-table read the same.
        let inline = format!("{tcp}tls = {{ cert_file = \"s.crt\", key_file = \"s.key\" }}\n");
        let table = format!("{tcp}[listeners.tls]\ncert_file = \"s.crt\"\nkey_file = \"s.key\"\n");
        for text in [inline, table] {
            let c = Config::parse(&text).unwrap();
            assert_eq!(c.listeners[0].tls, Some(TlsConfig::new("s.crt", "s.key")));
        }

        let ws = "[[listeners]]\ntype = \"ws\"\nbind = \"127.0.0.1:8084\"\n";
        let text = format!(
            "{ws}[listeners.tls]\ncert_file = \"s.crt\"\nkey_file = \"s.key\"\n\
             client_ca_file = \"ca.crt\"\nidentity_as_username = \"cn\"\n"
        );
        let tls = Config::parse(&text).unwrap().listeners[0]
            .tls
            .clone()
            .unwrap();
        assert!(tls.require_client_cert);
        assert_eq!(tls.identity_as_username, Some(IdentitySource::Cn));

        let err = Config::parse(&format!(
            "{tcp}[listeners.tls]\ncert_file = \"s.crt\"\nkeyfile = \"k\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("line 6") && err.contains("keyfile"), "{err}");
        let err = Config::parse(&format!(
            "{tcp}[listeners.tls]\ncert_file = \"s.crt\"\nkey_file = \"s.key\"\nrequire_client_cert = true\n"
        ))
        .unwrap_err();
        assert!(err.contains("client_ca_file"), "{err}");
    }

    #[test]
    fn persistent_client_expiration_defaults_to_a_week_and_0_is_never() {
        let week = 604_800;
        assert_eq!(Config::default().session.persistent_client_expiration, week);
        let omitted = Config::parse("[session]\nmax_queued_messages = 10\n").unwrap();
        assert_eq!(omitted.session.persistent_client_expiration, week);
        let never = Config::parse("[session]\npersistent_client_expiration = 0\n").unwrap();
        assert_eq!(never.session.persistent_client_expiration, 0);
    }
}
