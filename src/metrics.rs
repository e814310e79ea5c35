//! Process-wide counters, cheap enough for the hot path.
//!
//! Each thread adds into a shard of its own (claimed on first use, handed to the next
//! thread when it exits), so that adding is a plain load and store on a cache line no
//! other core writes: no lock, no contended atomic. Readers (`snapshot`, for `$SYS` and
//! `/metrics`) sum the shards with relaxed loads; a total may lag an event by a moment,
//! never lose one.
//!
//! Counters only grow. Gauges (connections, sessions, memory) are read where they live
//! (`Broker`, `Router`, `Budget`, the client registry), not kept here.

use crate::protocol::QoS;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What is counted. The names of `/metrics` and `$SYS` are given in
/// docs/observability.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// MQTT packets of any type received from clients (mosquitto's messages/received).
    PacketsReceived,
    /// MQTT packets of any type sent to clients.
    PacketsSent,
    /// Bytes read from client connections (after TLS and WebSocket framing).
    BytesReceived,
    BytesSent,
    /// PUBLISH packets received, by QoS (0, 1, 2).
    PublishReceived0,
    PublishReceived1,
    PublishReceived2,
    /// PUBLISH packets sent, by QoS.
    PublishSent0,
    PublishSent1,
    PublishSent2,
    /// Payload bytes of the PUBLISH packets received, by QoS.
    PublishBytesReceived0,
    PublishBytesReceived1,
    PublishBytesReceived2,
    /// Payload bytes of the PUBLISH packets sent, by QoS.
    PublishBytesSent0,
    PublishBytesSent1,
    PublishBytesSent2,
    /// Messages not delivered, by reason (see `Dropped`).
    DroppedQueueFull,
    DroppedMemory,
    DroppedExpired,
    DroppedTooLarge,
    DroppedNotAuthorized,
    /// Clients refused for their credentials.
    AuthFailures,
    /// SUBSCRIBE filters the ACL refused.
    SubscribeDenied,
    /// CONNECT packets received.
    Connects,
    /// Connections accepted on the MQTT listeners.
    SocketsAccepted,
    /// Sessions that expired while their client was away.
    SessionsExpired,
    /// Damage the store found at start: records skipped (a failed checksum, lost data),
    /// journal bytes cut (a torn write, or damage), damaged stores moved aside.
    StoreRecordsSkipped,
    StoreBytesCut,
    StoresMovedAside,
}

/// How many counters there are.
pub const COUNTERS: usize = Counter::StoresMovedAside as usize + 1;

/// Why a message was not delivered (`ternmq_messages_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A session queue was at `max_queued_messages` / `max_queued_bytes`.
    QueueFull,
    /// The broker's message memory (`max_queued_memory`) was (nearly) used up.
    Memory,
    /// Its Message Expiry Interval passed while it waited.
    Expired,
    /// Over `message_size_limit`, or over the receiving client's Maximum Packet Size.
    TooLarge,
    /// The ACL refused the publish, or the delivery to a subscriber.
    NotAuthorized,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::QueueFull,
        Dropped::Memory,
        Dropped::Expired,
        Dropped::TooLarge,
        Dropped::NotAuthorized,
    ];

    pub fn counter(self) -> Counter {
        match self {
            Dropped::QueueFull => Counter::DroppedQueueFull,
            Dropped::Memory => Counter::DroppedMemory,
            Dropped::Expired => Counter::DroppedExpired,
            Dropped::TooLarge => Counter::DroppedTooLarge,
            Dropped::NotAuthorized => Counter::DroppedNotAuthorized,
        }
    }

    /// The label value in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Memory => "memory",
            Dropped::Expired => "expired",
            Dropped::TooLarge => "too_large",
            Dropped::NotAuthorized => "not_authorized",
        }
    }
}

/// One thread's counters, alone on their cache lines.
#[repr(align(128))]
struct Shard([AtomicU64; COUNTERS]);

impl Shard {
    /// Only the thread holding the shard writes it: load and store, no read-modify-write.
    fn add(&self, i: usize, n: u64) {
        let cell = &self.0[i];
        cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

/// Every shard ever made (readers sum them), and those whose thread has exited.
static SHARDS: Mutex<Vec<&'static Shard>> = Mutex::new(Vec::new());
static FREE: Mutex<Vec<&'static Shard>> = Mutex::new(Vec::new());
/// For the rare add from a thread whose shard is already gone (during its exit).
static SHARED: [AtomicU64; COUNTERS] = [const { AtomicU64::new(0) }; COUNTERS];

/// A thread's claim on its shard; the shard goes back to `FREE` when the thread exits,
/// with its counts, for the next thread to add to.
struct Local(&'static Shard);

impl Local {
    fn claim() -> Local {
        if let Some(shard) = FREE.lock().pop() {
            return Local(shard);
        }
        let shard: &'static Shard =
            Box::leak(Box::new(Shard([const { AtomicU64::new(0) }; COUNTERS])));
        SHARDS.lock().push(shard);
        Local(shard)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        FREE.lock().push(self.0);
    }
}

thread_local! {
    static LOCAL: Local = Local::claim();
}

/// Adds each `(counter index, n)`, with one look-up of this thread's shard.
fn add_all(adds: &[(usize, u64)]) {
    let local = LOCAL.try_with(|l| adds.iter().for_each(|&(i, n)| l.0.add(i, n)));
    if local.is_err() {
        for &(i, n) in adds {
            SHARED[i].fetch_add(n, Relaxed);
        }
    }
}

/// Adds `n` to counter `c`.
pub fn add(c: Counter, n: u64) {
    if n > 0 {
        add_all(&[(c as usize, n)]);
    }
}

/// Counts a message not delivered.
pub fn dropped(why: Dropped) {
    add(why.counter(), 1);
}

/// A client refused for its credentials.
pub fn auth_failure() {
    add(Counter::AuthFailures, 1);
}

/// PUBLISH packets and their payload bytes, by QoS, gathered over a read or a batch so
/// that the shared counters are touched once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub packets: u64,
    pub publishes: [u64; 3],
    pub payload: [u64; 3],
}

impl Tally {
    pub fn publish(&mut self, qos: QoS, payload: usize) {
        self.publishes[qos as usize] += 1;
        self.payload[qos as usize] += payload as u64;
    }

    /// Adds what was received.
    pub fn received(&self) {
        self.add(
            Counter::PacketsReceived,
            Counter::PublishReceived0,
            Counter::PublishBytesReceived0,
        );
    }

    /// Adds what was sent.
    pub fn sent(&self) {
        self.add(
            Counter::PacketsSent,
            Counter::PublishSent0,
            Counter::PublishBytesSent0,
        );
    }

    /// The QoS families are three consecutive counters from their QoS 0 one.
    fn add(&self, packets: Counter, publishes: Counter, payload: Counter) {
        let (p, b) = (publishes as usize, payload as usize);
        add_all(&[
            (packets as usize, self.packets),
            (p, self.publishes[0]),
            (p + 1, self.publishes[1]),
            (p + 2, self.publishes[2]),
            (b, self.payload[0]),
            (b + 1, self.payload[1]),
            (b + 2, self.payload[2]),
        ]);
    }
}

/// Every counter's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot([u64; COUNTERS]);

impl Snapshot {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// This snapshot with `n` more on `c` (for tests of what reads snapshots).
    pub fn plus(mut self, c: Counter, n: u64) -> Snapshot {
        self.0[c as usize] += n;
        self
    }

    /// The three QoS counters of a family starting at `first` (e.g. `PublishReceived0`).
    pub fn by_qos(&self, first: Counter) -> [u64; 3] {
        [0, 1, 2].map(|q| self.0[first as usize + q])
    }

    /// PUBLISH packets received, all QoS.
    pub fn publish_received(&self) -> u64 {
        self.by_qos(Counter::PublishReceived0).iter().sum()
    }

    pub fn publish_sent(&self) -> u64 {
        self.by_qos(Counter::PublishSent0).iter().sum()
    }

    pub fn publish_bytes_received(&self) -> u64 {
        self.by_qos(Counter::PublishBytesReceived0).iter().sum()
    }

    pub fn publish_bytes_sent(&self) -> u64 {
        self.by_qos(Counter::PublishBytesSent0).iter().sum()
    }

    pub fn dropped(&self, why: Dropped) -> u64 {
        self.get(why.counter())
    }
}

pub fn snapshot() -> Snapshot {
    let mut totals = [0u64; COUNTERS];
    for (t, shared) in totals.iter_mut().zip(&SHARED) {
        *t = shared.load(Relaxed);
    }
    for shard in SHARDS.lock().iter() {
        for (t, cell) in totals.iter_mut().zip(&shard.0) {
            *t = t.wrapping_add(cell.load(Relaxed));
        }
    }
    Snapshot(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_are_all_counted() {
        let before = snapshot().get(Counter::SessionsExpired);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        add(Counter::SessionsExpired, 1);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        // Other tests of this binary may count too: at least ours are there.
        let after = snapshot().get(Counter::SessionsExpired);
        assert!(after - before >= 8000, "{before} -> {after}");
    }

    #[test]
    fn a_tally_lands_in_its_qos_families() {
        let before = snapshot();
        let mut t = Tally {
            packets: 3,
            ..Tally::default()
        };
        t.publish(QoS::AtLeastOnce, 10);
        t.publish(QoS::ExactlyOnce, 5);
        t.publish(QoS::ExactlyOnce, 5);
        t.sent();
        let after = snapshot();
        let diff = |c| after.get(c) - before.get(c);
        assert!(diff(Counter::PacketsSent) >= 3);
        assert!(diff(Counter::PublishSent1) >= 1);
        assert!(diff(Counter::PublishSent2) >= 2);
        assert!(diff(Counter::PublishBytesSent2) >= 10);
    }

    #[test]
    fn qos_families_are_consecutive() {
        use Counter::*;
        for [q0, q1, q2] in [
            [PublishReceived0, PublishReceived1, PublishReceived2],
            [PublishSent0, PublishSent1, PublishSent2],
            [
                PublishBytesReceived0,
                PublishBytesReceived1,
                PublishBytesReceived2,
            ],
            [PublishBytesSent0, PublishBytesSent1, PublishBytesSent2],
        ] {
            let (q0, q1, q2) = (q0 as usize, q1 as usize, q2 as usize);
            assert_eq!((q1, q2), (q0 + 1, q0 + 2));
        }
    }
}
