//! The `$SYS` topics, with mosquitto's names and meanings (its `sys_tree.c`), so that
//! `mosquitto_sub -t '$SYS/#' -v` and the dashboards built on it work unchanged.
//!
//! Every `sys_interval` seconds a task samples the broker and publishes, as retained
//! QoS 2 messages through `Broker::publish` (so the ACL decides who reads them, as for
//! any message), the values that changed since the last update; `$SYS/broker/version`
//! once at the start. `SysTree` decides what to publish and does no I/O, so that it is
//! tested on exact values. docs/observability.md lists the topics.

use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::{Counter, Dropped, Snapshot};
use crate::protocol::{ByteStr, QoS};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one update looks at.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub counters: Snapshot,
    /// Sessions, connected or not (mosquitto: clients with an id).
    pub clients_total: u64,
    pub clients_connected: u64,
    pub subscriptions: u64,
    pub retained: u64,
    /// Messages held: retained, queued and in flight.
    pub stored: u64,
    /// Bytes the broker's message budget is charged (`limits.max_queued_memory`).
    pub stored_bytes: u64,
    /// Resident memory now and at its peak, where known.
    pub heap: Option<(u64, u64)>,
}

/// The counters the load averages follow, with their topic under `$SYS/broker/load/`.
const LOADS: [&str; 9] = [
    "messages/received",
    "messages/sent",
    "publish/dropped",
    "publish/received",
    "publish/sent",
    "bytes/received",
    "bytes/sent",
    "sockets",
    "connections",
];

/// The three averaging windows, seconds, and their topic suffix.
const WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

fn load_counts(c: &Snapshot) -> [u64; 9] {
    [
        c.get(Counter::PacketsReceived),
        c.get(Counter::PacketsSent),
        dropped(c),
        c.publish_received(),
        c.publish_sent(),
        c.get(Counter::BytesReceived),
        c.get(Counter::BytesSent),
        c.get(Counter::SocketsAccepted),
        c.get(Counter::Connects),
    ]
}

/// mosquitto's publish/messages/dropped: messages refused for want of queue room.
fn dropped(c: &Snapshot) -> u64 {
    c.dropped(Dropped::QueueFull) + c.dropped(Dropped::Memory)
}

/// The state of the `$SYS` tree between updates.
#[derive(Default)]
pub struct SysTree {
    /// What was last published on each topic (retained, so never sent again unchanged).
    published: HashMap<String, String>,
    /// The load averages (per minute), by `LOADS` then `WINDOWS`.
    loads: [[f64; 3]; 9],
    /// The counts at the last update, and when it was (since the start).
    last: Option<([u64; 9], Duration)>,
    max_clients: u64,
}

impl SysTree {
    /// The messages for the update at `uptime`: topic and payload.
    pub fn update(&mut self, s: &Sample, uptime: Duration) -> Vec<(String, String)> {
        let mut values: Vec<(String, String)> = Vec::new();
        let mut put = |topic: &str, value: String| values.push((topic.to_owned(), value));
        let c = &s.counters;
        put(
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        );
        self.max_clients = self.max_clients.max(s.clients_total);
        let disconnected = s.clients_total.saturating_sub(s.clients_connected);
        for (topic, v) in [
            ("clients/total", s.clients_total),
            ("clients/maximum", self.max_clients),
            ("clients/inactive", disconnected),
            ("clients/disconnected", disconnected),
            ("clients/active", s.clients_connected),
            ("clients/connected", s.clients_connected),
            ("clients/expired", c.get(Counter::SessionsExpired)),
        ] {
            put(&format!("$SYS/broker/{topic}"), v.to_string());
        }
        let loads = self.update_loads(c, uptime);
        values.extend(loads);
        let mut put = |topic: &str, value: String| values.push((topic.to_owned(), value));
        let mut gauges = vec![
            ("messages/stored", s.stored),
            ("store/messages/count", s.stored),
            ("store/messages/bytes", s.stored_bytes),
            ("subscriptions/count", s.subscriptions),
            ("retained messages/count", s.retained),
        ];
        if let Some((current, peak)) = s.heap {
            gauges.extend([("heap/current", current), ("heap/maximum", peak)]);
        }
        gauges.extend([
            ("messages/received", c.get(Counter::PacketsReceived)),
            ("messages/sent", c.get(Counter::PacketsSent)),
            ("publish/messages/dropped", dropped(c)),
            ("publish/messages/received", c.publish_received()),
            ("publish/messages/sent", c.publish_sent()),
            ("bytes/received", c.get(Counter::BytesReceived)),
            ("bytes/sent", c.get(Counter::BytesSent)),
            ("publish/bytes/received", c.publish_bytes_received()),
            ("publish/bytes/sent", c.publish_bytes_sent()),
        ]);
        for (topic, v) in gauges {
            put(&format!("$SYS/broker/{topic}"), v.to_string());
        }
        // Retained: a value that did not change is not sent again.
        values.retain(|(topic, value)| {
            let changed = self.published.get(topic) != Some(value);
            if changed {
                self.published.insert(topic.clone(), value.clone());
            }
            changed
        });
        values
    }

    /// mosquitto's load averages: each update turns what a counter grew by into a rate
    /// per minute, and moves an exponentially decaying average towards it over 1, 5 and
    /// 15 minutes. The first update publishes 0.00; later ones publish a value when it
    /// moved by 0.01 or more.
    fn update_loads(&mut self, c: &Snapshot, uptime: Duration) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut put = |topic: &str, value: String| out.push((topic.to_owned(), value));
        let counts = load_counts(c);
        let topic = |i: usize, w: usize| format!("$SYS/broker/load/{}/{}", LOADS[i], WINDOWS[w].1);
        match self.last {
            None => {
                for i in 0..LOADS.len() {
                    for w in 0..WINDOWS.len() {
                        put(&topic(i, w), "0.00".to_owned());
                    }
                }
            }
            Some((before, at)) if uptime > at => {
                let dt = (uptime - at).as_secs_f64();
                for i in 0..LOADS.len() {
                    let per_minute = counts[i].saturating_sub(before[i]) as f64 * 60.0 / dt;
                    for (w, (window, _)) in WINDOWS.iter().enumerate() {
                        let current = self.loads[i][w];
                        let next = per_minute + (-dt / window).exp() * (current - per_minute);
                        if (next - current).abs() >= 0.01 {
                            put(&topic(i, w), format!("{next:.2}"));
                        }
                        self.loads[i][w] = next;
                    }
                }
            }
            Some(_) => return out,
        }
        self.last = Some((counts, uptime));
        out
    }
}

/// Samples `broker` for an update: visits every session (for the messages it holds).
pub fn sample(broker: &Broker) -> Sample {
    let sessions = broker.all_sessions();
    let held: usize = sessions
        .iter()
        .map(|s| s.inspect(|st| st.queued() + st.inflight.len()))
        .sum();
    let retained = broker.router.retained_count() as u64;
    Sample {
        counters: crate::metrics::snapshot(),
        clients_total: sessions.len() as u64,
        clients_connected: broker.clients.len() as u64,
        subscriptions: broker.router.subscription_count() as u64,
        retained,
        stored: retained + held as u64,
        stored_bytes: broker.memory.used() as u64,
        heap: crate::observe::process::usage().map(|u| (u.rss, u.peak_rss)),
    }
}

/// The version line of `$SYS/broker/version`.
pub fn version() -> String {
    format!("ternmq version {}", env!("CARGO_PKG_VERSION"))
}

/// Starts the task that keeps `$SYS` up to date, unless `sys_interval` is 0.
pub fn spawn(broker: &Arc<Broker>) {
    let every = broker.config.sys_interval;
    if every == 0 {
        return;
    }
    let broker = broker.clone();
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        publish(&broker, "$SYS/broker/version".to_owned(), version());
        let mut tree = SysTree::default();
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = crate::clock::now();
            let uptime = now.saturating_duration_since(broker.started);
            for (topic, payload) in tree.update(&sample(&broker), uptime) {
                publish(&broker, topic, payload);
            }
        }
    });
}

fn publish(broker: &Broker, topic: String, payload: String) {
    let now: Instant = crate::clock::now();
    broker.publish(&Arc::new(Message::new(
        ByteStr::from(topic),
        Bytes::from(payload),
        QoS::ExactlyOnce,
        // Not kept where the broker keeps no retained messages.
        broker.config.mqtt.retain_available,
        None,
        0,
        now,
    )));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            counters: crate::metrics::snapshot(),
            clients_total: 3,
            clients_connected: 2,
            subscriptions: 4,
            retained: 5,
            stored: 7,
            stored_bytes: 900,
            heap: Some((1000, 2000)),
        }
    }

    fn find<'a>(out: &'a [(String, String)], topic: &str) -> Option<&'a str> {
        out.iter()
            .find(|(t, _)| t == &format!("$SYS/broker/{topic}"))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_first_update_publishes_everything_then_only_changes() {
        let mut tree = SysTree::default();
        let s = sample();
        let first = tree.update(&s, Duration::ZERO);
        assert_eq!(find(&first, "uptime"), Some("0 seconds"));
        assert_eq!(find(&first, "clients/total"), Some("3"));
        assert_eq!(find(&first, "clients/connected"), Some("2"));
        assert_eq!(find(&first, "clients/active"), Some("2"));
        assert_eq!(find(&first, "clients/disconnected"), Some("1"));
        assert_eq!(find(&first, "clients/maximum"), Some("3"));
        assert_eq!(find(&first, "subscriptions/count"), Some("4"));
        assert_eq!(find(&first, "retained messages/count"), Some("5"));
        assert_eq!(find(&first, "messages/stored"), Some("7"));
        assert_eq!(find(&first, "heap/current"), Some("1000"));
        assert_eq!(find(&first, "load/connections/15min"), Some("0.00"));
        assert_eq!(
            first.iter().filter(|(t, _)| t.contains("/load/")).count(),
            27
        );

        // Nothing changed but the time: only the uptime goes out.
        let second = tree.update(&s, Duration::from_secs(10));
        let topics: Vec<&str> = second.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(topics, ["$SYS/broker/uptime"]);

        // Fewer clients: the maximum stays where it was, unsent.
        let fewer = Sample {
            clients_total: 1,
            clients_connected: 1,
            ..s
        };
        let third = tree.update(&fewer, Duration::from_secs(20));
        assert_eq!(find(&third, "clients/total"), Some("1"));
        assert_eq!(find(&third, "clients/maximum"), None);
        assert_eq!(find(&third, "clients/disconnected"), Some("0"));
    }

    #[test]
    fn loads_are_mosquittos_decaying_averages_per_minute() {
        let mut tree = SysTree::default();
        let mut s = sample();
        tree.update(&s, Duration::ZERO);
        // 600 CONNECTs in 10 s: 3600 per minute; the 1 min average moves to
        // 3600 * (1 - e^(-10/60)) = 552.67.
        s.counters = s.counters.plus(Counter::Connects, 600);
        let out = tree.update(&s, Duration::from_secs(10));
        assert_eq!(find(&out, "load/connections/1min"), Some("552.67"));
        assert_eq!(find(&out, "load/connections/5min"), Some("118.02"));
        assert_eq!(find(&out, "load/connections/15min"), Some("39.78"));
        assert_eq!(find(&out, "load/sockets/1min"), None, "unchanged: not sent");
        // No more: the averages decay, 552.67 * e^(-10/60) = 467.82.
        let out = tree.update(&s, Duration::from_secs(20));
        assert_eq!(find(&out, "load/connections/1min"), Some("467.82"));
    }
}
