//! The MQTT state of one session as plain data: subscriptions, the outgoing queue, the
//! in-flight window, inbound QoS 2 packet ids, retained-message walks. No locks, no
//! sockets, no clock reads: `Session` guards it, the connection drives it.

use crate::message::{Delivery, Message};
use crate::protocol::{ByteStr, QoS, SubOptions};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Seconds a session outlives its connection: kept until discarded.
pub const NEVER_EXPIRE: u32 = u32::MAX;

/// How many retained-message walks of one session advance at once; later subscriptions
/// wait their turn, so a client re-subscribing in a loop costs one walk per filter.
pub const MAX_ACTIVE_WALKS: usize = 4;

#[derive(Debug, Default)]
pub struct SessionState {
    /// Seconds the session outlives its connection: 0 = it ends with it (3.x clean
    /// session), `NEVER_EXPIRE` = kept until discarded (3.x persistent session).
    pub expiry: u32,
    /// The connection that last detached, so that a stale expiry timer does nothing.
    pub detached_by: Option<u64>,
    /// A 5.0 will waiting out its Will Delay Interval; cancelled if the session resumes.
    pub pending_will: Option<Arc<Message>>,
    pub subscriptions: FxHashMap<ByteStr, Subscription>,
    /// Messages waiting for the in-flight window or for the client to come back.
    queue: VecDeque<Delivery>,
    /// The size of what `queue` holds (`Delivery::size`).
    queued_bytes: usize,
    /// Outbound QoS 1/2 messages sent and not yet fully acknowledged.
    pub inflight: Inflight,
    /// Inbound QoS 2 packet ids received and not yet released by PUBREL.
    pub inbound_qos2: FxHashSet<u16>,
    /// Retained messages still to send for new subscriptions, oldest first.
    pub walks: VecDeque<RetainedWalk>,
    /// Messages refused because the queue was full.
    pub dropped: u64,
    /// Discarded or expired: no connection will ever resume it.
    pub ended: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubOptions,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<u32>,
}

/// The retained messages matching a new subscription, sent a batch at a time as the
/// client drains them (see `router::Router::retained_step`).
#[derive(Debug, Clone)]
pub struct RetainedWalk {
    pub filter: ByteStr,
    pub qos: QoS,
    pub sub_id: Option<u32>,
    /// The last topic passed; None before the first step.
    pub after: Option<ByteStr>,
}

/// What a session left behind when it ended.
#[derive(Default)]
pub struct Ended {
    /// Its subscriptions, to be removed from the router.
    pub filters: Vec<ByteStr>,
    /// A will still waiting for its delay: its session is over, so it goes now.
    pub will: Option<Arc<Message>>,
    /// Messages taken through shared subscriptions that the client never received, for
    /// another member of the group.
    pub orphans: Vec<Delivery>,
}

impl SessionState {
    pub fn new() -> SessionState {
        SessionState::default()
    }

    /// Appends to the queue.
    pub fn push(&mut self, delivery: Delivery) {
        self.queued_bytes += delivery.size();
        self.queue.push_back(delivery);
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// What the session holds for its client, queued and in flight, in bytes: what it
    /// is charged for in the broker's memory budget.
    pub fn held_bytes(&self) -> usize {
        self.queued_bytes + self.inflight.held_bytes
    }

    /// Drops everything queued (the in-flight window stays).
    pub fn clear_queue(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
    }

    fn pop(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes -= d.size();
        Some(d)
    }

    /// Moves queued messages into `out` for sending, as far as the in-flight window
    /// (`max_inflight` sent and unacknowledged) allows: QoS 1/2 ones get a packet id and
    /// are recorded as in flight. Expired messages, and those the client may not read
    /// (`readable` says), are dropped on the way; returns how many were not readable.
    pub fn take_sendable(
        &mut self,
        max_inflight: usize,
        limit: usize,
        now: Instant,
        readable: &dyn Fn(&Delivery) -> bool,
        out: &mut Vec<(Delivery, u16)>,
    ) -> usize {
        let mut unreadable = 0;
        while out.len() < limit {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && self.inflight.outstanding() >= max_inflight {
                break;
            }
            let Some(delivery) = self.pop() else {
                break;
            };
            if delivery.message.is_expired(now) {
                crate::metrics::dropped(crate::metrics::Dropped::Expired);
                continue;
            }
            if !readable(&delivery) {
                unreadable += 1;
                continue;
            }
            let pkid = self.inflight.send(&delivery);
            out.push((delivery, pkid));
        }
        unreadable
    }

    /// Starts (or restarts, for a filter subscribed again) the walk of the retained
    /// messages matching a new subscription.
    pub fn start_walk(&mut self, filter: ByteStr, qos: QoS, sub_id: Option<u32>) {
        self.walks.retain(|w| w.filter != filter);
        self.walks.push_back(RetainedWalk {
            filter,
            qos,
            sub_id,
            after: None,
        });
    }

    /// Ends the session: everything goes but what others must still act on.
    pub fn end(&mut self) -> Ended {
        self.ended = true;
        self.detached_by = None;
        self.queued_bytes = 0;
        let mut orphans: Vec<Delivery> = self.queue.drain(..).filter(is_shared).collect();
        orphans.extend(self.inflight.take_unreceived_shared());
        self.inflight = Inflight::default();
        self.inbound_qos2.clear();
        self.walks.clear();
        Ended {
            filters: self.subscriptions.drain().map(|(f, _)| f).collect(),
            will: self.pending_will.take(),
            orphans,
        }
    }

    /// The connection went away and the session stays: what was in flight is resent
    /// from the start on the next connection; queued QoS 0 messages go unless kept.
    pub fn park(&mut self, keep_qos0: bool) {
        self.inflight.mark_unsent();
        if !keep_qos0 {
            self.queue.retain(|d| d.qos != QoS::AtMostOnce);
            self.queued_bytes = self.queue.iter().map(Delivery::size).sum();
        }
    }
}

fn is_shared(d: &Delivery) -> bool {
    d.shared.is_some()
}

/// The outbound QoS 1/2 window, by packet id.
#[derive(Debug, Default)]
pub struct Inflight {
    entries: FxHashMap<u16, Entry>,
    next_pkid: u16,
    next_seq: u64,
    /// Entries not yet (re)sent on the current connection.
    unsent: usize,
    /// The size of the messages held (`Delivery::size`; a released QoS 2 one holds none).
    held_bytes: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Send order, for resending in order.
    seq: u64,
    stage: Stage,
    sent: bool,
}

#[derive(Debug, Clone)]
pub enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREL sent, waiting for PUBCOMP.
    Release,
}

impl Inflight {
    /// Entries held, sent or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sent on this connection and not yet acknowledged: what Receive Maximum counts.
    pub fn outstanding(&self) -> usize {
        self.entries.len() - self.unsent
    }

    /// Entries waiting to be resent on this connection.
    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Records `delivery` as sent; returns its packet id (0 for QoS 0, not recorded).
    pub fn send(&mut self, delivery: &Delivery) -> u16 {
        if delivery.qos == QoS::AtMostOnce {
            return 0;
        }
        let pkid = self.allocate_pkid();
        self.held_bytes += delivery.size();
        let seq = self.next_seq;
        self.next_seq += 1;
        let stage = Stage::Publish(delivery.clone());
        let entry = Entry {
            seq,
            stage,
            sent: true,
        };
        self.entries.insert(pkid, entry);
        pkid
    }

    /// The next packet id not in use. Ids are handed out in a cycle, so one is reused
    /// only after the 65,534 others.
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.entries.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (`released`): the exchange for `pkid` is over. False if
    /// no such exchange was waiting for it. An entry not yet resent on this connection
    /// counts too: the client got it on an earlier one.
    pub fn complete(&mut self, pkid: u16, released: bool) -> bool {
        let expected = self.entries.get(&pkid).is_some_and(|e| match &e.stage {
            Stage::Publish(d) => !released && d.qos == QoS::AtLeastOnce,
            Stage::Release => released,
        });
        if expected {
            self.forget(pkid);
        }
        expected
    }

    /// PUBREC: the QoS 2 message is received; the exchange moves on to PUBREL, which the
    /// caller sends now. True if a PUBREL is due (also for a repeated PUBREC).
    pub fn received(&mut self, pkid: u16) -> bool {
        let Some(e) = self.entries.get_mut(&pkid) else {
            return false;
        };
        match &e.stage {
            Stage::Publish(d) if d.qos == QoS::ExactlyOnce => {
                self.held_bytes -= d.size();
                e.stage = Stage::Release;
                if !e.sent {
                    e.sent = true;
                    self.unsent -= 1;
                }
                true
            }
            Stage::Release => true,
            Stage::Publish(_) => false,
        }
    }

    /// Drops `pkid`, as if acknowledged.
    pub fn forget(&mut self, pkid: u16) {
        if let Some(e) = self.entries.remove(&pkid) {
            if !e.sent {
                self.unsent -= 1;
            }
            if let Stage::Publish(d) = &e.stage {
                self.held_bytes -= d.size();
            }
        }
    }

    /// The connection ended: every entry is to be resent on the next one.
    pub fn mark_unsent(&mut self) {
        for e in self.entries.values_mut() {
            e.sent = false;
        }
        self.unsent = self.entries.len();
    }

    /// Up to `max` entries to resend, oldest first, now counted as sent: a PUBLISH (with
    /// DUP set by the caller) or a PUBREL (None).
    pub fn resend(&mut self, max: usize, out: &mut Vec<(u16, Option<Delivery>)>) {
        if self.unsent == 0 || max == 0 {
            return;
        }
        let mut waiting: Vec<(u64, u16)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.sent)
            .map(|(pkid, e)| (e.seq, *pkid))
            .collect();
        waiting.sort_unstable();
        for (_, pkid) in waiting.into_iter().take(max) {
            if let Some(e) = self.entries.get_mut(&pkid) {
                e.sent = true;
                self.unsent -= 1;
                let d = match &e.stage {
                    Stage::Publish(d) => Some(d.clone()),
                    Stage::Release => None,
                };
                out.push((pkid, d));
            }
        }
    }

    /// Shared-subscription messages whose PUBLISH the client never acknowledged: another
    /// member may have them (a QoS 2 one past PUBREC has been received, and stays).
    fn take_unreceived_shared(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        self.entries.retain(|_, e| match &e.stage {
            Stage::Publish(d) if d.shared.is_some() => {
                out.push(d.clone());
                false
            }
            _ => true,
        });
        self.held_bytes -= out.iter().map(Delivery::size).sum::<usize>();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SharedKey;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn delivery(qos: QoS) -> Delivery {
        let m = Message::new(
            ByteStr::from("t"),
            Bytes::from_static(b"x"),
            qos,
            false,
            None,
            0,
            Instant::now(),
        );
        Delivery::new(Arc::new(m), qos, false)
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut w = Inflight::default();
        let a = w.send(&delivery(QoS::AtLeastOnce));
        assert_eq!(a, 1);
        w.next_pkid = u16::MAX - 1;
        assert_eq!(w.send(&delivery(QoS::AtLeastOnce)), u16::MAX);
        // Wraps past 0 and skips 1, still in flight.
        assert_eq!(w.send(&delivery(QoS::AtLeastOnce)), 2);
        assert!(w.complete(1, false));
        assert_eq!(w.send(&delivery(QoS::AtMostOnce)), 0);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn acknowledgements_must_match_the_stage() {
        let mut w = Inflight::default();
        let q1 = w.send(&delivery(QoS::AtLeastOnce));
        let q2 = w.send(&delivery(QoS::ExactlyOnce));
        assert!(
            !w.complete(q2, false),
            "PUBACK does not end a QoS 2 exchange"
        );
        assert!(!w.received(q1), "PUBREC does not apply to QoS 1");
        assert!(!w.complete(q2, true), "PUBCOMP before PUBREC");
        assert!(w.received(q2));
        assert!(w.received(q2), "a repeated PUBREC gets PUBREL again");
        assert!(w.complete(q2, true));
        assert!(!w.complete(q2, true));
        assert!(w.complete(q1, false));
        assert!(w.is_empty());
    }

    #[test]
    fn resend_after_reconnect_respects_the_new_window_and_order() {
        let mut w = Inflight::default();
        let ids: Vec<u16> = (0..20)
            .map(|_| w.send(&delivery(QoS::ExactlyOnce)))
            .collect();
        assert!(w.received(ids[3]));
        w.mark_unsent();
        assert_eq!((w.outstanding(), w.unsent()), (0, 20));
        let mut out = Vec::new();
        w.resend(5, &mut out);
        let got: Vec<u16> = out.iter().map(|(p, _)| *p).collect();
        assert_eq!(got, ids[..5]);
        assert!(out[3].1.is_none(), "the released one is resent as PUBREL");
        assert_eq!(w.outstanding(), 5);
        // The client may acknowledge what it got on the earlier connection.
        assert!(w.received(ids[10]));
        assert_eq!((w.outstanding(), w.unsent()), (6, 14));
        assert!(w.received(ids[0]));
        assert!(w.complete(ids[0], true));
        out.clear();
        w.resend(1, &mut out);
        assert_eq!(out[0].0, ids[5]);
    }

    #[test]
    fn ending_hands_over_unreceived_shared_messages_only() {
        let mut s = SessionState::new();
        let key = Arc::new(SharedKey {
            group: "g".into(),
            filter: "t".into(),
        });
        let shared = |qos| Delivery {
            shared: Some(key.clone()),
            ..delivery(qos)
        };
        s.push(shared(QoS::AtLeastOnce));
        s.push(delivery(QoS::AtLeastOnce));
        s.inflight.send(&shared(QoS::AtLeastOnce));
        let received = s.inflight.send(&shared(QoS::ExactlyOnce));
        assert!(s.inflight.received(received));
        s.inflight.send(&delivery(QoS::ExactlyOnce));
        let ended = s.end();
        assert_eq!(ended.orphans.len(), 2);
        assert!(s.ended && s.queue.is_empty() && s.inflight.is_empty());
        assert_eq!(s.held_bytes(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(u8),
        Ack(usize),
        Rec(usize),
        Comp(usize),
        Reconnect(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Send),
            (0usize..64).prop_map(Op::Ack),
            (0usize..64).prop_map(Op::Rec),
            (0usize..64).prop_map(Op::Comp),
            (1usize..8).prop_map(Op::Reconnect),
        ]
    }

    proptest! {
        /// The window never exceeds what is allowed, packet ids in use are unique, and
        /// every exchange ends exactly once.
        #[test]
        fn window_model(ops in proptest::collection::vec(op(), 0..200), window in 1usize..8) {
            let mut s = SessionState::new();
            let mut window = window;
            let mut live: Vec<(u16, QoS, bool)> = Vec::new(); // pkid, qos, released
            let mut completed = 0usize;
            let mut sent = 0usize;
            for op in ops {
                match op {
                    Op::Send(q) => {
                        let qos = QoS::from_u8(q).unwrap();
                        s.push(delivery(qos));
                    }
                    Op::Ack(i) | Op::Rec(i) | Op::Comp(i) if !live.is_empty() => {
                        let i = i % live.len();
                        let (pkid, qos, released) = live[i];
                        match op {
                            Op::Ack(_) => {
                                let ok = s.inflight.complete(pkid, false);
                                if ok { prop_assert_eq!(qos, QoS::AtLeastOnce); }
                            }
                            Op::Rec(_) => {
                                if s.inflight.received(pkid) {
                                    prop_assert_eq!(qos, QoS::ExactlyOnce);
                                    live[i].2 = true;
                                }
                            }
                            _ => {
                                if s.inflight.complete(pkid, true) {
                                    prop_assert!(released);
                                }
                            }
                        }
                        let before = live.len();
                        live.retain(|(p, _, _)| s.inflight.entries.contains_key(p));
                        completed += before - live.len();
                    }
                    Op::Reconnect(w) => {
                        s.park(false);
                        window = w;
                        let mut out = Vec::new();
                        s.inflight.resend(window, &mut out);
                    }
                    _ => {}
                }
                let mut out = Vec::new();
                s.inflight.resend(window.saturating_sub(s.inflight.outstanding()), &mut out);
                let mut batch = Vec::new();
                s.take_sendable(window, 64, Instant::now(), &|_| true, &mut batch);
                // Only the client's own acknowledgements of unsent entries may take the
                // window past its size; the broker never sends past it.
                let sent_now = out.len() + batch.iter().filter(|(d, _)| d.qos != QoS::AtMostOnce).count();
                prop_assert!(sent_now == 0 || s.inflight.outstanding() <= window);
                for (d, pkid) in batch {
                    if d.qos != QoS::AtMostOnce {
                        prop_assert!(!live.iter().any(|(p, _, _)| *p == pkid), "pkid {} reused", pkid);
                        live.push((pkid, d.qos, false));
                        sent += 1;
                    }
                }
                prop_assert_eq!(s.inflight.len(), live.len());
            }
            prop_assert_eq!(sent, completed + live.len());
        }
    }
}
