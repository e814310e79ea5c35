//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), every family
//! with its HELP and TYPE lines. docs/observability.md lists the families.

use crate::broker::Broker;
use crate::listener::ListenerRules;
use crate::metrics::{self, Counter, Dropped, Snapshot};
use crate::observe::process;
use std::fmt::{Display, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

const QOS: [&str; 3] = ["0", "1", "2"];
const PROTOCOLS: [&str; 3] = ["3.1", "3.1.1", "5.0"];

/// The text of `/metrics` for `broker` and its MQTT `listeners`.
pub fn render(broker: &Broker, listeners: &[Arc<ListenerRules>]) -> String {
    let c = metrics::snapshot();
    let mut e = Exposition::default();
    e.family("ternmq_info", "gauge", "The broker's version (always 1).");
    e.sample("ternmq_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    connections(&mut e, listeners);
    sessions(&mut e, broker, &c);
    messages(&mut e, &c);
    e.family(
        "ternmq_messages_dropped_total",
        "counter",
        "Messages not delivered, by reason: queue_full (a session queue at its limit), memory (max_queued_memory used up), expired, too_large (over message_size_limit or the client's Maximum Packet Size), not_authorized (by the ACL).",
    );
    for why in Dropped::ALL {
        e.sample(
            "ternmq_messages_dropped_total",
            &[("reason", why.name())],
            c.dropped(why),
        );
    }
    for (name, help, counter) in [
        (
            "ternmq_auth_failures_total",
            "Clients refused for their credentials.",
            Counter::AuthFailures,
        ),
        (
            "ternmq_subscribe_denied_total",
            "SUBSCRIBE filters the ACL refused.",
            Counter::SubscribeDenied,
        ),
        (
            "ternmq_store_records_skipped_total",
            "Store records skipped at start: a failed checksum, or naming lost data.",
            Counter::StoreRecordsSkipped,
        ),
        (
            "ternmq_store_bytes_cut_total",
            "Journal bytes the store cut at start: a torn write after a crash, or damage.",
            Counter::StoreBytesCut,
        ),
        (
            "ternmq_stores_moved_aside_total",
            "Damaged stores moved aside at start (db.corrupt-<time>).",
            Counter::StoresMovedAside,
        ),
    ] {
        e.counter(name, help, c.get(counter));
    }
    memory(&mut e, broker);
    process_usage(&mut e, broker);
    e.out
}

fn connections(e: &mut Exposition, listeners: &[Arc<ListenerRules>]) {
    e.family(
        "ternmq_connections",
        "gauge",
        "Network connections open now, by listener (including those not past CONNECT yet).",
    );
    for l in listeners {
        e.sample(
            "ternmq_connections",
            &[("listener", &l.name)],
            l.open_connections(),
        );
    }
    e.family(
        "ternmq_connections_parked",
        "gauge",
        "Idle connections held without a task of their own, by listener (docs/architecture.md).",
    );
    for l in listeners {
        e.sample(
            "ternmq_connections_parked",
            &[("listener", &l.name)],
            l.parked.load(Relaxed),
        );
    }
    e.family(
        "ternmq_clients_connected",
        "gauge",
        "MQTT clients connected now (past CONNECT), by listener and protocol version.",
    );
    for l in listeners {
        for (p, name) in PROTOCOLS.iter().enumerate() {
            let n = l.clients[p].load(Relaxed);
            e.sample(
                "ternmq_clients_connected",
                &[("listener", &l.name), ("protocol", name)],
                n,
            );
        }
    }
    e.family(
        "ternmq_connections_accepted_total",
        "counter",
        "Network connections accepted, by listener.",
    );
    for l in listeners {
        e.sample(
            "ternmq_connections_accepted_total",
            &[("listener", &l.name)],
            l.accepted.load(Relaxed),
        );
    }
    e.family(
        "ternmq_accept_errors_total",
        "counter",
        "Failed accept calls (e.g. out of file descriptors), by listener.",
    );
    for l in listeners {
        e.sample(
            "ternmq_accept_errors_total",
            &[("listener", &l.name)],
            l.accept_errors.load(Relaxed),
        );
    }
}

fn sessions(e: &mut Exposition, broker: &Broker, c: &Snapshot) {
    let total = broker.session_count();
    let online = broker.clients.len().min(total);
    e.family(
        "ternmq_sessions",
        "gauge",
        "Sessions, by state: online (a client is connected) or offline (kept for a client that is away).",
    );
    e.sample("ternmq_sessions", &[("state", "online")], online);
    e.sample("ternmq_sessions", &[("state", "offline")], total - online);
    e.counter(
        "ternmq_sessions_expired_total",
        "Sessions that expired while their client was away.",
        c.get(Counter::SessionsExpired),
    );
    e.gauge(
        "ternmq_subscriptions",
        "Subscriptions, all sessions together (shared ones included).",
        broker.router.subscription_count(),
    );
    e.gauge(
        "ternmq_retained_messages",
        "Retained messages stored.",
        broker.router.retained_count(),
    );
    e.gauge(
        "ternmq_retained_bytes",
        "Topic and payload bytes of the retained messages.",
        broker.router.retained_bytes(),
    );
}

fn messages(e: &mut Exposition, c: &Snapshot) {
    let by_qos = [
        (
            "ternmq_messages_received_total",
            "PUBLISH packets received from clients, by QoS.",
            Counter::PublishReceived0,
        ),
        (
            "ternmq_messages_sent_total",
            "PUBLISH packets sent to clients, by QoS (resends included).",
            Counter::PublishSent0,
        ),
        (
            "ternmq_message_bytes_received_total",
            "Payload bytes of the PUBLISH packets received, by QoS.",
            Counter::PublishBytesReceived0,
        ),
        (
            "ternmq_message_bytes_sent_total",
            "Payload bytes of the PUBLISH packets sent, by QoS.",
            Counter::PublishBytesSent0,
        ),
    ];
    for (name, help, first) in by_qos {
        e.family(name, "counter", help);
        for (q, n) in c.by_qos(first).iter().enumerate() {
            e.sample(name, &[("qos", QOS[q])], *n);
        }
    }
    for (name, help, counter) in [
        (
            "ternmq_packets_received_total",
            "MQTT packets of any type received.",
            Counter::PacketsReceived,
        ),
        (
            "ternmq_packets_sent_total",
            "MQTT packets of any type sent.",
            Counter::PacketsSent,
        ),
        (
            "ternmq_bytes_received_total",
            "Bytes read from client connections (MQTT, after TLS and WebSocket framing).",
            Counter::BytesReceived,
        ),
        (
            "ternmq_bytes_sent_total",
            "Bytes written to client connections.",
            Counter::BytesSent,
        ),
        (
            "ternmq_connects_total",
            "CONNECT packets received.",
            Counter::Connects,
        ),
    ] {
        e.counter(name, help, c.get(counter));
    }
}

fn memory(e: &mut Exposition, broker: &Broker) {
    e.family(
        "ternmq_memory_used_bytes",
        "gauge",
        "Memory charged to a budget: queued (messages held for clients and retained, limits.max_queued_memory) and buffers (connection buffers, limits.max_buffered_memory).",
    );
    e.sample(
        "ternmq_memory_used_bytes",
        &[("budget", "queued")],
        broker.memory.used(),
    );
    e.sample(
        "ternmq_memory_used_bytes",
        &[("budget", "buffers")],
        broker.buffers.used(),
    );
    e.family(
        "ternmq_memory_limit_bytes",
        "gauge",
        "The limit of each memory budget.",
    );
    e.sample(
        "ternmq_memory_limit_bytes",
        &[("budget", "queued")],
        broker.memory.limit(),
    );
    e.sample(
        "ternmq_memory_limit_bytes",
        &[("budget", "buffers")],
        broker.buffers.limit(),
    );
}

fn process_usage(e: &mut Exposition, broker: &Broker) {
    let started = broker
        .started_at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    e.gauge(
        "process_start_time_seconds",
        "When the broker started, seconds since the Unix epoch.",
        started,
    );
    let Some(u) = process::usage() else {
        return;
    };
    e.gauge(
        "process_resident_memory_bytes",
        "Resident memory of the broker process.",
        u.rss,
    );
    e.counter(
        "process_cpu_seconds_total",
        "User and system CPU time of the broker process.",
        u.cpu_seconds,
    );
    e.gauge(
        "process_open_fds",
        "Open file descriptors of the broker process.",
        u.open_fds,
    );
    if let Some(max) = u.max_fds {
        e.gauge(
            "process_max_fds",
            "The limit on open file descriptors.",
            max,
        );
    }
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.family("x", "gauge", "a \\ b");
        e.sample("x", &[("l", "a\"b\\c\nd"), ("m", "n")], 1.5);
        assert_eq!(
            e.out,
            "# HELP x a \\\\ b\n# TYPE x gauge\nx{l=\"a\\\"b\\\\c\\nd\",m=\"n\"} 1.5\n"
        );
    }
}
