//! broker.toml: every setting, its default, and the checks that name the key and line of
//! a bad value.
//!
//! Range checks run inside deserialization (the `deserialize_with` functions below), so
//! that toml reports them with the file position of the offending value, exactly like an
//! unknown key or a wrong type.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::Path;
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    #[serde(rename = "type")]
    pub kind: ListenerKind,
    pub bind: SocketAddr,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "info".into(),
            listeners: vec![Listener {
                kind: ListenerKind::Tcp,
                bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            }],
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

fn ranged<'de, D: Deserializer<'de>>(d: D, min: u64, max: u64, what: &str) -> Result<u64, D::Error> {
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
        assert_eq!(c.session.max_inflight_messages, d.session.max_inflight_messages);
        assert_eq!(c.session.max_queued_messages, d.session.max_queued_messages);
        assert_eq!(c.session.queue_qos0_messages, d.session.queue_qos0_messages);
        assert_eq!(c.mqtt.retain_available, d.mqtt.retain_available);
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
    fn bad_bind_address_is_refused() {
        let err = Config::parse("[[listeners]]\ntype = \"tcp\"\nbind = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("bind"), "{err}");
    }
}
