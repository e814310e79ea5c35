//! The JSON admin API under `/api/v1/`: the broker's summary, clients (list, look up,
//! disconnect), subscriptions, retained messages (list, delete) and publishing.
//! docs/observability.md has a request and response example for each.

use super::{Query, Reply};
use crate::broker::Broker;
use crate::config::ListenerKind;
use crate::listener::ListenerRules;
use crate::message::Message;
use crate::metrics::{self, Counter, Dropped};
use crate::observe::clients::{protocol_name, LiveClient};
use crate::observe::process;
use crate::protocol::{topic, ByteStr, QoS};
use crate::router::within_levels;
use crate::session::{Session, Wire};
use base64::Engine;
use bytes::Bytes;
use hyper::StatusCode;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Pages hold `limit` items: 100 unless asked, at most 1000.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Retained payloads are shown up to this many bytes.
const MAX_PAYLOAD_SHOWN: usize = 4096;

pub(super) struct Api<'a> {
    pub(super) broker: &'a Arc<Broker>,
    pub(super) listeners: &'a [Arc<ListenerRules>],
    pub(super) addrs: &'a [(ListenerKind, SocketAddr)],
}

impl Api<'_> {
    /// `GET /api/v1/summary`: the figures of the console's cards and charts.
    pub(super) fn summary(&self) -> Reply {
        let b = self.broker;
        let c = metrics::snapshot();
        let sessions = b.session_count();
        let online = b.clients.len().min(sessions);
        let uptime = crate::clock::now().saturating_duration_since(b.started);
        let process = process::usage().map(
            |u| json!({ "rss_bytes": u.rss, "cpu_seconds": u.cpu_seconds, "open_fds": u.open_fds }),
        );
        let dropped: u64 = Dropped::ALL.iter().map(|d| c.dropped(*d)).sum();
        Reply::ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": uptime.as_secs(),
            "started_at": unix_seconds(b.started_at),
            "connections": b.connection_count(),
            "clients_connected": online,
            "sessions": { "total": sessions, "online": online, "offline": sessions - online },
            "subscriptions": b.router.subscription_count(),
            "retained": { "count": b.router.retained_count(), "bytes": b.router.retained_bytes() },
            "messages": {
                "received": c.publish_received(),
                "sent": c.publish_sent(),
                "dropped": dropped,
            },
            "bytes": { "received": c.get(Counter::BytesReceived), "sent": c.get(Counter::BytesSent) },
            "memory": {
                "queued": { "used": b.memory.used(), "limit": b.memory.limit() },
                "buffers": { "used": b.buffers.used(), "limit": b.buffers.limit() },
            },
            "process": process,
            "listeners": self.listener_list(),
        }))
    }

    fn listener_list(&self) -> Vec<Value> {
        let mqtt_configs = self
            .broker
            .config
            .listeners
            .iter()
            .filter(|l| l.kind != ListenerKind::Admin);
        self.listeners
            .iter()
            .zip(self.addrs)
            .zip(mqtt_configs)
            .map(|((rules, (kind, addr)), config)| {
                json!({
                    "name": rules.name,
                    "type": match kind { ListenerKind::Ws => "ws", _ => "tcp" },
                    "address": addr.to_string(),
                    "tls": config.tls.is_some(),
                    "path": (*kind == ListenerKind::Ws).then(|| config.ws_path()),
                    "connections": rules.open_connections(),
                })
            })
            .collect()
    }

    /// `GET /api/v1/clients?search=&offset=&limit=`: every session, connected or not,
    /// sorted by client id; `search` keeps those whose client id, address or username
    /// contains it.
    pub(super) fn clients(&self, q: &Query) -> Reply {
        let (offset, limit) = match page(q) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let search = q.get("search").unwrap_or("");
        let mut rows: Vec<(Arc<Session>, Option<Arc<Wire>>)> = self
            .broker
            .all_sessions()
            .into_iter()
            .map(|s| {
                let wire = s.wire();
                (s, wire)
            })
            .filter(|(s, wire)| search.is_empty() || matches_search(s, live(wire), search))
            .collect();
        rows.sort_by(|a, b| a.0.client_id.cmp(&b.0.client_id));
        let total = rows.len();
        let clients: Vec<Value> = rows
            .iter()
            .skip(offset)
            .take(limit)
            .map(|(s, wire)| client_json(s, live(wire), false))
            .collect();
        Reply::ok(json!({ "total": total, "offset": offset, "limit": limit, "clients": clients }))
    }

    /// `GET /api/v1/clients/{id}`: one client, with its subscriptions.
    pub(super) fn client(&self, id: &str) -> Reply {
        let Some(session) = self.broker.session(id) else {
            return Reply::error(StatusCode::NOT_FOUND, &format!("no client {id:?}"));
        };
        let wire = session.wire();
        Reply::ok(client_json(&session, live(&wire), true))
    }

    /// `DELETE /api/v1/clients/{id}`: closes the client's connection (5.0: DISCONNECT
    /// 0x98 Administrative action); its session stays as its expiry says.
    pub(super) fn disconnect(&self, id: &str) -> Reply {
        let wire = self.broker.session(id).and_then(|s| s.wire());
        if wire.is_some_and(|w| w.kick()) {
            tracing::info!(client_id = id, "disconnecting on the admin API's request");
            Reply::ok(json!({ "disconnected": id }))
        } else {
            Reply::error(
                StatusCode::NOT_FOUND,
                &format!("client {id:?} is not connected"),
            )
        }
    }

    /// `GET /api/v1/subscriptions?client_id=&offset=&limit=`: sorted by client id, then
    /// filter.
    pub(super) fn subscriptions(&self, q: &Query) -> Reply {
        let (offset, limit) = match page(q) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let only = q.get("client_id");
        let mut rows: Vec<(ByteStr, Value)> = Vec::new();
        for s in self.broker.all_sessions() {
            if only.is_some_and(|c| c != &*s.client_id) {
                continue;
            }
            s.inspect(|st| {
                for (filter, sub) in st.subscriptions() {
                    let mut row = subscription_json(filter, sub);
                    row["client_id"] = json!(&*s.client_id);
                    rows.push((s.client_id.clone(), row));
                }
            });
        }
        rows.sort_by(|a, b| (&a.0, a.1["filter"].as_str()).cmp(&(&b.0, b.1["filter"].as_str())));
        let total = rows.len();
        let page: Vec<Value> = rows
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|r| r.1)
            .collect();
        Reply::ok(
            json!({ "total": total, "offset": offset, "limit": limit, "subscriptions": page }),
        )
    }

    /// `GET /api/v1/retained?filter=&after=&limit=`: retained messages matching `filter`
    /// (default `#`, which as for any subscriber leaves out `$SYS`), in topic order, after
    /// the topic `after`; `next` is the `after` of the next page (null at the end).
    pub(super) fn retained(&self, q: &Query) -> Reply {
        let limit = match q.number("limit", DEFAULT_LIMIT) {
            Ok(l) => l.clamp(1, MAX_LIMIT),
            Err(e) => return e,
        };
        let filter = q.get("filter").filter(|f| !f.is_empty()).unwrap_or("#");
        if !topic::valid_filter(filter) || !within_levels(filter) {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                &format!("{filter:?} is not a valid topic filter"),
            );
        }
        let after = q.get("after").filter(|a| !a.is_empty());
        let mut found = Vec::new();
        let now = crate::clock::now();
        let next = self
            .broker
            .router
            .retained_page(filter, after, limit, now, &mut found)
            .map(|t| t.to_string());
        let messages: Vec<Value> = found.iter().map(|m| retained_json(m)).collect();
        Reply::ok(json!({ "filter": filter, "messages": messages, "next": next }))
    }

    /// `DELETE /api/v1/retained?topic=`: clears the retained message of a topic.
    pub(super) fn delete_retained(&self, q: &Query) -> Reply {
        let Some(t) = q.get("topic").filter(|t| valid_topic(t)) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "`topic` must be a topic name (no wildcards)",
            );
        };
        let mut found = Vec::new();
        let now = crate::clock::now();
        self.broker
            .router
            .retained_page(t, None, 1, now, &mut found);
        let existed = found.first().is_some_and(|m| &*m.topic == t);
        let clear = Message::new(
            ByteStr::from(t),
            Bytes::new(),
            QoS::AtMostOnce,
            true,
            None,
            0,
            now,
        );
        self.broker.router.retain(&clear);
        Reply::ok(json!({ "topic": t, "deleted": existed }))
    }

    /// `POST /api/v1/publish` with `{"topic", "payload", "qos", "retain"}`: publishes as
    /// the broker (no ACL applies to the sender; each receiver's still does).
    pub(super) fn publish(&self, body: &[u8]) -> Reply {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Publish {
            topic: String,
            #[serde(default)]
            payload: String,
            #[serde(default)]
            qos: u8,
            #[serde(default)]
            retain: bool,
        }
        let p: Publish = match serde_json::from_slice(body) {
            Ok(p) => p,
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    &format!("expected {{\"topic\", \"payload\", \"qos\", \"retain\"}}: {e}"),
                )
            }
        };
        let Some(qos) = QoS::from_u8(p.qos) else {
            return Reply::error(StatusCode::BAD_REQUEST, "`qos` must be 0, 1 or 2");
        };
        if !valid_topic(&p.topic) || p.topic.starts_with('$') {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "`topic` must be a topic name: no wildcards, not starting with '$'",
            );
        }
        let message = Message::new(
            ByteStr::from(p.topic),
            Bytes::from(p.payload),
            qos,
            p.retain,
            None,
            0,
            crate::clock::now(),
        );
        let receivers = self.broker.publish(&Arc::new(message));
        Reply::ok(json!({ "receivers": receivers }))
    }
}

/// `offset` and `limit` of a list.
fn page(q: &Query) -> Result<(usize, usize), Reply> {
    let offset = q.number("offset", 0)?;
    let limit = q.number("limit", DEFAULT_LIMIT)?.clamp(1, MAX_LIMIT);
    Ok((offset, limit))
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#']) && within_levels(t) && !t.contains('\0')
}

/// The MQTT connection's record, from its session's wire (HTTP streams have none).
fn live(wire: &Option<Arc<Wire>>) -> Option<&LiveClient> {
    wire.as_deref().and_then(Wire::client)
}

fn matches_search(s: &Session, live: Option<&LiveClient>, search: &str) -> bool {
    s.client_id.contains(search)
        || live.is_some_and(|l| {
            l.addr.to_string().contains(search)
                || l.username.as_deref().is_some_and(|u| u.contains(search))
        })
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn client_json(s: &Session, live: Option<&LiveClient>, with_subscriptions: bool) -> Value {
    let (queued, inflight, subs, expiry, list) = s.inspect(|st| {
        let list: Vec<Value> = if with_subscriptions {
            let mut l: Vec<_> = st.subscriptions().iter().collect();
            l.sort_by(|a, b| a.0.cmp(b.0));
            l.into_iter()
                .map(|(f, sub)| subscription_json(f, sub))
                .collect()
        } else {
            Vec::new()
        };
        (
            st.queued(),
            st.inflight.len(),
            st.subscriptions().len(),
            st.expiry,
            list,
        )
    });
    let mut v = json!({
        "client_id": &*s.client_id,
        "connected": live.is_some(),
        "address": live.map(|l| l.addr.to_string()),
        "listener": live.map(|l| l.listener.name.clone()),
        "protocol": live.map(|l| protocol_name(l.protocol)),
        "keep_alive": live.map(|l| l.keep_alive),
        "connected_since": live.map(|l| l.since),
        "username": live.and_then(|l| l.username.as_deref()),
        "session_expiry_interval": expiry,
        "queued": queued,
        "inflight": inflight,
        "subscription_count": subs,
        "dropped": s.dropped(),
    });
    if with_subscriptions {
        v["subscriptions"] = Value::Array(list);
    }
    v
}

fn subscription_json(filter: &str, sub: &crate::session::Subscription) -> Value {
    json!({
        "filter": filter,
        "qos": sub.options.qos as u8,
        "no_local": sub.options.no_local,
        "retain_as_published": sub.options.retain_as_published,
        "retain_handling": sub.options.retain_handling,
        "identifier": sub.id,
    })
}

fn retained_json(m: &Message) -> Value {
    let shown = &m.payload[..m.payload.len().min(MAX_PAYLOAD_SHOWN)];
    let (payload, encoding) = match std::str::from_utf8(shown) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(shown),
            "base64",
        ),
    };
    json!({
        "topic": &*m.topic,
        "payload": payload,
        "encoding": encoding,
        "truncated": m.payload.len() > shown.len(),
        "size": m.payload.len(),
        "qos": m.qos as u8,
    })
}
