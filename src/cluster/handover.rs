//! A session moving between nodes without a message lost or doubled on the way. No I/O
//! here: the cluster calls in with the time.
//!
//! A publishing node sends a message to the nodes its mirror of the interest bucket names,
//! and that mirror lags the bucket (milliseconds; seconds when a watch stalls). While a
//! session moves from node A to node B, some messages still go to A, some already to B,
//! some to both. One rule makes each reach the session once: **a message that went
//! through A reaches the session through A**.
//!
//! - A keeps a *departed* entry for a while after it let the session go: its filters and
//!   where it went. What reaches A (sent there or published there) and matches them is
//!   forwarded to B, for that one session. A keeps its interest entries for those filters
//!   the first `HOLD` of that time, so that no publisher's mirror is left with neither
//!   A's entries nor B's.
//! - B keeps an *arrived* entry: the nodes the session came from and its filters then.
//!   A message that was also sent to one of those nodes (a message names the nodes its
//!   publisher sent it to) and matches those filters is not delivered to the session
//!   directly: it comes through the forward.
//!
//! Both sides decide from the message itself, not from when it arrives, so the outcome is
//! the same whichever node sees it first. A session that moves again within the grace
//! (A, then B, then C, maybe back to A) is reached through the first of its *hops* the
//! message went to: each hop is numbered, a node knows the hops before its own (their
//! `Link`s come with the hand-over), B does not forward what also went to A's earlier
//! hop, and a forward names the hop it is for, to be passed along the chain.
//!
//! An adopter (liveness.rs) keeps arrived entries for the sessions of a dead node, whose
//! messages it takes from that node's stream. Forwards that reach B while it is still
//! loading the session wait in `pending` until the session is in.

use super::interest::{all_qos, Interest};
use super::wire::Envelope;
use crate::message::{Delivery, Message, SharedKey};
use crate::protocol::{topic, ByteStr};
use crate::router::{is_shared, Mailbox, Router};
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a node that let a session go keeps its interest entries for the session's
/// filters: well past the time the other nodes' watchers take to see the new node's.
pub(super) const HOLD: Duration = Duration::from_secs(5);
/// How long departed and arrived entries last: past `HOLD` by as much again, for
/// publishers whose mirror still names the old node after it deleted its entries.
pub(super) const GRACE: Duration = Duration::from_secs(10);
/// Forwards held for one session being loaded; past this they are dropped (and counted).
const PENDING_MAX: usize = 64 * 1024;

/// One earlier hop of a session: the node it was on, the hop's number, and until when
/// that node forwards for it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Link {
    pub node: Arc<str>,
    pub hop: u64,
    pub until: Instant,
}

/// Which nodes a message went to (sent there, or published there).
pub(super) type Went<'a> = &'a dyn Fn(&str) -> bool;

/// Whether one of `chain`'s hops, still forwarding at `now`, was on a node the message
/// went to.
fn went_earlier(chain: &[Link], went: Went<'_>, now: Instant) -> bool {
    chain.iter().any(|l| l.until > now && went(&l.node))
}

/// A session that left this node: its hop here, where it went, what it subscribed to.
pub(super) struct Departed {
    id: u64,
    client_id: ByteStr,
    hop: u64,
    to: Arc<str>,
    /// The hops before this one, still within their grace.
    chain: Arc<[Link]>,
    filters: Vec<String>,
    /// Until when this node keeps its interest entries for `filters`; None once let go.
    hold: Mutex<Option<Instant>>,
    until: Instant,
}

/// Where a message for a departed session goes.
pub(super) struct Forward {
    pub client_id: ByteStr,
    pub to: Arc<str>,
    /// The hop the forward is for (the next one).
    pub hop: u64,
    pub chain: Arc<[Link]>,
}

thread_local! {
    /// The departed sessions matched by the message being routed on this thread.
    static MATCHED: RefCell<Vec<Forward>> = const { RefCell::new(Vec::new()) };
}

impl Mailbox for Departed {
    fn id(&self) -> u64 {
        self.id
    }

    fn deliver(&self, _: Delivery) -> bool {
        MATCHED.with(|m| {
            m.borrow_mut().push(Forward {
                client_id: self.client_id.clone(),
                to: self.to.clone(),
                hop: self.hop + 1,
                chain: self.chain.clone(),
            })
        });
        true
    }

    fn is_online(&self) -> bool {
        true
    }
}

struct Arrived {
    hop: u64,
    chain: Vec<Link>,
    filters: Vec<String>,
    until: Instant,
}

#[derive(Default)]
pub(super) struct Handover {
    /// Held (shared) while a message is routed here and forwarded, and (exclusively) while
    /// a session leaves: a message sees it either in the router or departed, never both
    /// nor neither.
    gate: Gate,
    arrived: RwLock<FxHashMap<ByteStr, Arrived>>,
    /// `arrived.len()`, read without a lock on every message.
    arrivals: AtomicUsize,
    departed: Router<Departed>,
    by_client: Mutex<FxHashMap<ByteStr, Vec<Arc<Departed>>>>,
    /// How many departed entries there are, read without a lock on every message.
    departures: AtomicUsize,
    pending: Mutex<FxHashMap<ByteStr, Vec<Envelope>>>,
    next_id: AtomicU64,
}

/// A read-write lock taken shared on every routed message and exclusively on a session's
/// rare departure: one lock per worker thread slot, so that readers on different threads
/// do not write one cache line (a writer takes them all).
struct Gate {
    slots: Box<[CachePadded<RwLock<()>>]>,
}

#[repr(align(128))]
#[derive(Default)]
struct CachePadded<T>(T);

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            slots: (0..GATE_SLOTS).map(|_| CachePadded::default()).collect(),
        }
    }
}

const GATE_SLOTS: usize = 16;

thread_local! {
    /// This thread's slot of every `Gate`.
    static SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % GATE_SLOTS
    };
}

impl Handover {
    /// Held while a message is routed to this node's sessions and forwarded.
    pub(super) fn routing(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        let slot = SLOT.with(|s| *s);
        self.gate.slots[slot].0.read_recursive()
    }

    /// Held while a session leaves: from its `depart` until it is out of the router.
    pub(super) fn leaving(&self) -> Vec<parking_lot::RwLockWriteGuard<'_, ()>> {
        self.gate.slots.iter().map(|s| s.0.write()).collect()
    }

    /// Whether any session arrived lately (else `skips` is always false). Read while
    /// the router's lock is held, after the arrived session was found there: its entry,
    /// made before it was put in the router, is seen.
    pub(super) fn has_arrivals(&self) -> bool {
        self.arrivals.load(Ordering::Acquire) > 0
    }

    /// Whether any session departed lately (else `forwards` is always empty).
    pub(super) fn has_departures(&self) -> bool {
        self.departures.load(Ordering::Acquire) > 0
    }

    /// Whether the session of `client_id` must not take directly a message on `topic`
    /// that `went` to some nodes: one of its earlier hops was there, and forwards it.
    pub(super) fn skips(&self, client_id: &str, went: Went<'_>, topic: &str, now: Instant) -> bool {
        let arrived = self.arrived.read();
        let Some(a) = arrived.get(client_id) else {
            return false;
        };
        a.until > now
            && went_earlier(&a.chain, went, now)
            && a.filters.iter().any(|f| topic::matches(f, topic))
    }

    /// The session of `client_id` came here as hop `hop`, after the hops `chain`, with
    /// `filters`.
    pub(super) fn arrive(
        &self,
        client_id: &ByteStr,
        hop: u64,
        chain: Vec<Link>,
        filters: Vec<String>,
        now: Instant,
    ) {
        let arrived = Arrived {
            hop,
            chain,
            filters,
            until: now + GRACE,
        };
        let mut all = self.arrived.write();
        all.insert(client_id.clone(), arrived);
        self.arrivals.store(all.len(), Ordering::Release);
    }

    /// The session of `client_id` on node `me`, with `filters`, leaves for `to`: this
    /// node's interest entries are held (`interest.subscribed` once more for each filter,
    /// before the session lets go of them) and what reaches it for the session is
    /// forwarded. Returns the hops so far, this one last, for the new node.
    pub(super) fn depart(
        &self,
        client_id: &ByteStr,
        me: &str,
        to: &str,
        filters: Vec<String>,
        interest: &Interest,
        now: Instant,
    ) -> Vec<Link> {
        let mut arrived = self.arrived.write();
        let (hop, mut chain) = match arrived.remove(client_id) {
            Some(a) if a.until > now => (a.hop, a.chain),
            _ => (0, Vec::new()),
        };
        self.arrivals.store(arrived.len(), Ordering::Release);
        drop(arrived);
        chain.retain(|l| l.until > now);
        for f in &filters {
            interest.subscribed(f);
        }
        let until = now + GRACE;
        let departed = Arc::new(Departed {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client_id: client_id.clone(),
            hop,
            to: Arc::from(to),
            chain: chain.clone().into(),
            filters,
            hold: Mutex::new(Some(now + HOLD)),
            until,
        });
        for f in departed.filters.iter().filter(|f| !is_shared(f)) {
            self.departed.subscribe(f, &departed, all_qos(), None);
        }
        let mut by_client = self.by_client.lock();
        let entries = by_client.entry(client_id.clone()).or_default();
        if let Some(i) = entries.iter().position(|d| d.hop == hop) {
            self.forget(&entries.swap_remove(i), interest);
        }
        self.departures.fetch_add(1, Ordering::Release);
        entries.push(departed);
        chain.push(Link {
            node: Arc::from(me),
            hop,
            until,
        });
        chain
    }

    /// The departed sessions `message` must be forwarded to, given the nodes it `went`
    /// to (this one among them): those none of whose earlier hops it also went to.
    pub(super) fn forwards(
        &self,
        message: &Arc<Message>,
        went: Went<'_>,
        now: Instant,
    ) -> Vec<Forward> {
        if !self.has_departures() {
            return Vec::new();
        }
        MATCHED.with(|m| m.borrow_mut().clear());
        self.departed.publish_plain(message);
        let mut matched = MATCHED.with(|m| std::mem::take(&mut *m.borrow_mut()));
        matched.retain(|f| !went_earlier(&f.chain, went, now));
        matched
    }

    /// Where the session of `client_id` went from its hop `hop` here, if it did lately.
    pub(super) fn next(&self, client_id: &str, hop: u64) -> Option<Arc<str>> {
        let by_client = self.by_client.lock();
        let d = by_client.get(client_id)?.iter().find(|d| d.hop == hop)?;
        Some(d.to.clone())
    }

    /// A departed member of the shared subscription `key`: (client id, node, hop).
    pub(super) fn departed_member(&self, key: &SharedKey) -> Option<(ByteStr, Arc<str>, u64)> {
        let filter = format!("$share/{}/{}", key.group, key.filter);
        let by_client = self.by_client.lock();
        let d = by_client
            .values()
            .flatten()
            .find(|d| d.filters.contains(&filter))?;
        Some((d.client_id.clone(), d.to.clone(), d.hop + 1))
    }

    /// This node starts claiming `client_id`: forwards for it wait until `end_pending`.
    pub(super) fn begin_pending(&self, client_id: &ByteStr) {
        self.pending.lock().entry(client_id.clone()).or_default();
    }

    /// Keeps a forward for a session being claimed here; gives it back if none is.
    pub(super) fn hold(&self, client_id: &str, envelope: Envelope) -> Option<Envelope> {
        let mut pending = self.pending.lock();
        match pending.get_mut(client_id) {
            None => Some(envelope),
            Some(held) if held.len() >= PENDING_MAX => {
                crate::metrics::dropped(crate::metrics::Dropped::QueueFull);
                None
            }
            Some(held) => {
                held.push(envelope);
                None
            }
        }
    }

    /// The claim of `client_id` is over: what was held for it goes to `deliver`, in
    /// order, before any forward that comes after.
    pub(super) fn end_pending(&self, client_id: &str, mut deliver: impl FnMut(Envelope)) {
        let mut pending = self.pending.lock();
        for envelope in pending.remove(client_id).unwrap_or_default() {
            deliver(envelope);
        }
    }

    /// Lets go of what has outlived its time: interest holds after `HOLD`, entries after
    /// `GRACE`.
    pub(super) fn sweep(&self, interest: &Interest, now: Instant) {
        let mut arrived = self.arrived.write();
        arrived.retain(|_, a| a.until > now);
        self.arrivals.store(arrived.len(), Ordering::Release);
        drop(arrived);
        let mut gone = Vec::new();
        self.by_client.lock().retain(|_, entries| {
            entries.retain(|d| {
                if d.until <= now {
                    gone.push(d.clone());
                    return false;
                }
                if d.hold.lock().is_some_and(|t| t <= now) {
                    release_hold(d, interest);
                }
                true
            });
            !entries.is_empty()
        });
        for d in gone {
            self.forget(&d, interest);
        }
    }

    fn forget(&self, d: &Departed, interest: &Interest) {
        self.departures.fetch_sub(1, Ordering::Release);
        release_hold(d, interest);
        for f in d.filters.iter().filter(|f| !is_shared(f)) {
            self.departed.unsubscribe(f, d.id);
        }
    }
}

fn release_hold(d: &Departed, interest: &Interest) {
    if d.hold.lock().take().is_some() {
        for f in &d.filters {
            interest.unsubscribed(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(topic: &str) -> Arc<Message> {
        Arc::new(Message::new(
            ByteStr::from(topic),
            Bytes::new(),
            crate::protocol::QoS::AtLeastOnce,
            false,
            None,
            0,
            Instant::now(),
        ))
    }

    /// Nodes with their hand-over state, and where session `m` is.
    struct Nodes {
        names: Vec<&'static str>,
        handovers: Vec<Handover>,
        interests: Vec<Interest>,
        at: usize,
        /// Nodes `m` has been on: those a publisher's mirror can name for it.
        visited: Vec<bool>,
        hop: u64,
        now: Instant,
    }

    impl Nodes {
        fn new(names: &[&'static str]) -> Nodes {
            let interests = names.iter().map(|n| Interest::new(n).0).collect();
            Nodes {
                names: names.to_vec(),
                handovers: names.iter().map(|_| Handover::default()).collect(),
                interests,
                at: 0,
                visited: names.iter().enumerate().map(|(i, _)| i == 0).collect(),
                hop: 0,
                now: Instant::now(),
            }
        }

        /// `m` moves to node `to`, as ownership.rs does it.
        fn move_to(&mut self, to: usize) {
            let (from, m) = (self.at, ByteStr::from("m"));
            let chain = self.handovers[from].depart(
                &m,
                self.names[from],
                self.names[to],
                vec!["t/#".into()],
                &self.interests[from],
                self.now,
            );
            self.hop += 1;
            self.handovers[to].arrive(&m, self.hop, chain, vec!["t/#".into()], self.now);
            self.at = to;
            self.visited[to] = true;
        }

        /// How many times a message on `topic` that went to the nodes `via` reaches `m`.
        fn deliveries(&self, via: &[&str], topic: &str) -> usize {
            let message = message(topic);
            let mut n = 0;
            for (i, name) in self.names.iter().enumerate() {
                if !via.contains(name) {
                    continue;
                }
                let h = &self.handovers[i];
                let went = |n: &str| via.contains(&n);
                let here = i == self.at && topic::matches("t/#", topic);
                if here && !h.skips("m", &went, topic, self.now) {
                    n += 1;
                }
                for f in h.forwards(&message, &went, self.now) {
                    n += self.follow(&f.to, f.hop);
                }
            }
            n
        }

        /// A forward for hop `hop` reaching `node`, as inbox::forwarded takes it.
        fn follow(&self, node: &str, hop: u64) -> usize {
            let i = self.names.iter().position(|n| *n == node).unwrap();
            if i == self.at {
                return 1;
            }
            match self.handovers[i].next("m", hop) {
                Some(next) => self.follow(&next, hop + 1),
                None => 0,
            }
        }

        fn every_via(&self) -> Vec<Vec<&'static str>> {
            (1..1u32 << self.names.len())
                .map(|bits| {
                    let set = self.names.iter().enumerate();
                    set.filter(|(i, _)| bits & (1 << i) != 0)
                        .map(|(_, n)| *n)
                        .collect()
                })
                .collect()
        }
    }

    /// Whatever nodes a message went to, it reaches a session that moved, once: after one
    /// move, along a chain of moves, and when it comes back to a node it left.
    #[test]
    fn a_message_reaches_a_moving_session_once_whichever_nodes_it_went_to() {
        let mut nodes = Nodes::new(&["a", "b", "c", "d"]);
        for to in [1, 2, 0, 1, 3, 2] {
            nodes.move_to(to);
            for via in nodes.every_via() {
                // A message sent to none of its nodes was published before the
                // subscription was seen there: not this module's business.
                let mut seen = nodes.names.iter().zip(&nodes.visited);
                let expected = usize::from(seen.any(|(n, v)| *v && via.contains(n)));
                assert_eq!(
                    nodes.deliveries(&via, "t/1"),
                    expected,
                    "hop {}: sent to {via:?}",
                    nodes.hop
                );
                assert_eq!(nodes.deliveries(&via, "u"), 0, "another topic");
            }
        }
    }

    #[test]
    fn entries_hold_interest_then_go() {
        let now = Instant::now();
        let (interest, mut rx) = Interest::new("a");
        interest.subscribed("t/#");
        let h = Handover::default();
        let m = ByteStr::from("m");
        h.depart(&m, "a", "b", vec!["t/#".into()], &interest, now);
        // The session lets go of its filter: the hold keeps the entry.
        interest.unsubscribed("t/#");
        assert_eq!(interest.local_count(), 1);
        h.sweep(&interest, now + HOLD);
        assert_eq!(interest.local_count(), 0, "the hold ends after HOLD");
        assert_eq!(
            h.forwards(&message("t/1"), &|n: &str| n == "a", now).len(),
            1,
            "forwarding goes on"
        );
        h.sweep(&interest, now + GRACE);
        assert!(
            h.forwards(&message("t/1"), &|n: &str| n == "a", now)
                .is_empty(),
            "and ends after GRACE"
        );
        let changes: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(changes.len(), 2, "one put, one delete: {changes:?}");
    }

    #[test]
    fn arrived_entries_end_with_their_grace() {
        let now = Instant::now();
        let h = Handover::default();
        let link = Link {
            node: Arc::from("a"),
            hop: 0,
            until: now + GRACE,
        };
        h.arrive(&"m".into(), 1, vec![link], vec!["t/#".into()], now);
        let (a, b) = (|n: &str| n == "a", |n: &str| n == "b");
        assert!(h.skips("m", &a, "t/1", now));
        assert!(!h.skips("m", &b, "t/1", now));
        assert!(!h.skips("other", &a, "t/1", now));
        assert!(!h.skips("m", &a, "t/1", now + GRACE));
    }

    #[test]
    fn forwards_wait_while_the_session_is_claimed() {
        let h = Handover::default();
        let envelope = |n: u8| Envelope {
            origin: "a".into(),
            shared: None,
            via: Vec::new(),
            to: Some(("m".into(), 1)),
            message: crate::store::StoredMessage {
                payload: Bytes::from(vec![n]),
                ..Default::default()
            },
        };
        assert!(h.hold("m", envelope(0)).is_some(), "no claim: not held");
        h.begin_pending(&"m".into());
        assert!(h.hold("m", envelope(1)).is_none());
        assert!(h.hold("m", envelope(2)).is_none());
        let mut got = Vec::new();
        h.end_pending("m", |e| got.push(e.message.payload[0]));
        assert_eq!(got, [1, 2], "in order");
        assert!(h.hold("m", envelope(3)).is_some());
    }
}
