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
    /// session), `NEVER_EXPIRE` = kept until discarded (3.x persistent session, with
    /// `persistent_client_expiration` 0).
    pub expiry: u32,
    /// The connection that last detached, so that a stale expiry timer does nothing.
    pub detached_by: Option<u64>,
    /// When the client went offline (None while a connection owns the session).
    pub offline_since: Option<Instant>,
    /// What few sessions use (a delayed will, inbound QoS 2 ids, retained walks), made
    /// on first use: an idle client's session holds the pointer. Dropped when a will or
    /// walk leaves it empty, and kept once the client published at QoS 2 (see
    /// `release_incoming`).
    rare: Option<Box<Rare>>,
    subscriptions: FxHashMap<ByteStr, Subscription>,
    /// Messages waiting for the in-flight window or for the client to come back, each
    /// with its sequence number.
    queue: VecDeque<(u64, Delivery)>,
    next_seq: u64,
    /// Queued messages kept on disk only, after those in `queue` (spilled while memory ran
    /// high, or beyond what was loaded at start-up).
    spilled: usize,
    /// The size of what `queue` holds (`Delivery::size`).
    queued_bytes: usize,
    /// Outbound QoS 1/2 messages sent and not yet fully acknowledged.
    pub inflight: Inflight,
    /// Changes not yet handed to the store, for a session that is stored (`persist`).
    log: Option<Vec<Change>>,
    /// Messages refused because the queue was full.
    pub dropped: u64,
    /// Discarded or expired: no connection will ever resume it.
    pub ended: bool,
    /// Over on this node because another node of the cluster took it (`release`).
    pub moved: bool,
}

/// The parts of a session that most sessions never use (see `SessionState::rare`).
#[derive(Debug, Default)]
struct Rare {
    /// A 5.0 will waiting out its Will Delay Interval; cancelled if the session resumes.
    pending_will: Option<Arc<Message>>,
    /// When `pending_will` is due.
    will_at: Option<Instant>,
    /// Inbound QoS 2 packet ids received and not yet released by PUBREL.
    inbound_qos2: FxHashSet<u16>,
    /// Retained messages still to send for new subscriptions, oldest first.
    walks: VecDeque<RetainedWalk>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.pending_will.is_none() && self.inbound_qos2.is_empty() && self.walks.is_empty()
    }
}

/// What `SessionState::walks` shows of a session without walks.
static NO_WALKS: VecDeque<RetainedWalk> = VecDeque::new();

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
    /// Where the last step stopped (a node of the retained tree, which may hold no
    /// message); None before the first step.
    pub after: Option<ByteStr>,
}

/// A session as the store kept it, in the broker's live types.
pub struct Restored {
    pub expiry: u32,
    pub offline_since: Instant,
    pub will: Option<(Arc<Message>, Instant)>,
    pub subscriptions: Vec<(ByteStr, Subscription)>,
    /// With their sequence numbers, in order.
    pub queue: Vec<(u64, Delivery)>,
    /// Above every sequence number stored.
    pub next_seq: u64,
    /// Queued entries stored but not loaded.
    pub spilled: usize,
    /// Packet id, send order, stage.
    pub inflight: Vec<(u16, u64, Stage)>,
    pub incoming: Vec<u16>,
}

/// A change to a stored session, for `session::journal` to turn into a store record.
/// QoS 0 messages are not stored.
#[derive(Debug, Clone)]
pub enum Change {
    /// The session's own record: expiry, when it went offline, its delayed will.
    Record,
    Subscribed(ByteStr, Subscription),
    Unsubscribed(ByteStr),
    Enqueued(u64, Delivery),
    Dequeued(u64),
    /// A PUBLISH in flight (sent or to be resent).
    Sent {
        pkid: u16,
        order: u64,
        delivery: Delivery,
    },
    /// PUBREC came: the exchange waits for PUBCOMP now.
    Released {
        pkid: u16,
        order: u64,
    },
    /// The exchange of this packet id is over.
    Completed(u16),
    /// An incoming QoS 2 packet id, until its PUBREL.
    Received(u16),
    ReleasedIncoming(u16),
    Ended,
}

/// What a session left behind when it ended.
#[derive(Default)]
pub struct Ended {
    /// Its subscriptions, to be removed from the router.
    pub filters: Vec<ByteStr>,
    /// A will still waiting for its delay: its session is over, so it goes now.
    pub will: Option<Arc<Message>>,
    /// Messages taken through shared subscriptions that another member of the group may
    /// have: those never sent to the client, and QoS 1 ones it never acknowledged.
    pub orphans: Vec<Delivery>,
}

impl SessionState {
    pub fn new() -> SessionState {
        SessionState::default()
    }

    /// A stored session, offline since the broker stopped (its connection is `detached_by`
    /// the id 0, which no connection has), recording its changes from now on.
    pub fn restore(r: Restored) -> SessionState {
        let (pending_will, will_at) = match r.will {
            Some((will, at)) => (Some(will), Some(at)),
            None => (None, None),
        };
        let rare = Rare {
            pending_will,
            will_at,
            inbound_qos2: r.incoming.into_iter().collect(),
            walks: VecDeque::new(),
        };
        let queued_bytes = r.queue.iter().map(|(_, d)| d.size()).sum();
        SessionState {
            expiry: r.expiry,
            detached_by: Some(0),
            offline_since: Some(r.offline_since),
            rare: (!rare.is_empty()).then(|| Box::new(rare)),
            subscriptions: r.subscriptions.into_iter().collect(),
            queue: r.queue.into(),
            next_seq: r.next_seq,
            spilled: r.spilled,
            queued_bytes,
            inflight: Inflight::restore(r.inflight),
            log: Some(Vec::new()),
            ..SessionState::default()
        }
    }

    /// From now on, changes are recorded for the store (a session that outlives its
    /// connection); its own record first.
    pub fn persist(&mut self) {
        self.log.get_or_insert_with(Vec::new).push(Change::Record);
    }

    pub fn is_persisted(&self) -> bool {
        self.log.is_some()
    }

    fn record(&mut self, change: Change) {
        if let Some(log) = &mut self.log {
            log.push(change);
        }
    }

    /// The session's own record changed (expiry, offline since, will).
    pub fn touch(&mut self) {
        self.record(Change::Record);
    }

    /// The changes recorded since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        match &mut self.log {
            Some(log) => std::mem::take(log),
            None => Vec::new(),
        }
    }

    /// Appends to the queue.
    pub fn push(&mut self, delivery: Delivery) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued_bytes += delivery.size();
        if delivery.qos != QoS::AtMostOnce {
            self.record(Change::Enqueued(seq, delivery.clone()));
        }
        self.queue.push_back((seq, delivery));
    }

    pub fn subscriptions(&self) -> &FxHashMap<ByteStr, Subscription> {
        &self.subscriptions
    }

    pub fn subscribe(&mut self, filter: ByteStr, sub: Subscription) {
        self.record(Change::Subscribed(filter.clone(), sub));
        self.subscriptions.insert(filter, sub);
    }

    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        let Some((filter, _)) = self.subscriptions.remove_entry(filter) else {
            return false;
        };
        self.record(Change::Unsubscribed(filter));
        true
    }

    /// An incoming QoS 2 PUBLISH: true the first time its packet id is seen (until its
    /// PUBREL), false for a resend.
    pub fn receive_incoming(&mut self, pkid: u16) -> bool {
        let first = self.rare().inbound_qos2.insert(pkid);
        if first {
            self.record(Change::Received(pkid));
        }
        first
    }

    pub fn incoming_count(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.inbound_qos2.len())
    }

    pub fn has_incoming(&self, pkid: u16) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| r.inbound_qos2.contains(&pkid))
    }

    /// PUBREL: true if the packet id was waiting for it.
    pub fn release_incoming(&mut self, pkid: u16) -> bool {
        let known = self
            .rare
            .as_mut()
            .is_some_and(|r| r.inbound_qos2.remove(&pkid));
        // Not tidied: a client that publishes at QoS 2 keeps the box (and the set its
        // capacity), or every message would allocate both again.
        if known {
            self.record(Change::ReleasedIncoming(pkid));
        }
        known
    }

    /// PUBACK (QoS 1) or PUBCOMP (`released`): see `Inflight::complete`.
    pub fn acknowledge(&mut self, pkid: u16, released: bool) -> bool {
        let done = self.inflight.complete(pkid, released);
        if done {
            self.record(Change::Completed(pkid));
        }
        done
    }

    /// PUBREC: see `Inflight::received`.
    pub fn pubrec(&mut self, pkid: u16) -> bool {
        match self.inflight.received(pkid) {
            Some(order) => {
                self.record(Change::Released { pkid, order });
                true
            }
            None => false,
        }
    }

    /// Ends every exchange sent up to send order `seq` (see `Inflight::complete_through`);
    /// returns how many ended.
    pub fn acknowledge_through(&mut self, seq: u64) -> usize {
        let done = self.inflight.complete_through(seq);
        for pkid in &done {
            self.record(Change::Completed(*pkid));
        }
        done.len()
    }

    /// Drops `pkid` from the window, as if acknowledged.
    pub fn forget(&mut self, pkid: u16) {
        if self.inflight.contains(pkid) {
            self.inflight.forget(pkid);
            self.record(Change::Completed(pkid));
        }
    }

    /// Records `delivery` (a retained message for a new subscription) as sent.
    pub fn send_direct(&mut self, delivery: &Delivery) -> u16 {
        let pkid = self.inflight.send(delivery);
        if pkid != 0 {
            self.record_sent(pkid, delivery);
        }
        pkid
    }

    fn record_sent(&mut self, pkid: u16, delivery: &Delivery) {
        if self.log.is_some() {
            let order = self.inflight.seq(pkid).unwrap_or(0);
            self.record(Change::Sent {
                pkid,
                order,
                delivery: delivery.clone(),
            });
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queued messages kept on disk only (read back with `refill`).
    pub fn spilled(&self) -> usize {
        self.spilled
    }

    /// Queues `delivery` on disk only (a stored session, QoS 1/2): it costs no memory
    /// until read back.
    pub fn spill(&mut self, delivery: Delivery) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.spilled += 1;
        self.record(Change::Enqueued(seq, delivery));
    }

    /// Whether the queue must be read back from the store: it is empty in memory and
    /// messages wait on disk. Everything the store then holds for the session's queue
    /// was spilled, oldest first.
    pub fn wants_refill(&self) -> bool {
        self.queue.is_empty() && self.spilled > 0
    }

    /// The oldest spilled messages, read back from the store (in order, with their
    /// sequence numbers).
    pub fn refill(&mut self, entries: Vec<(u64, Delivery)>) {
        for (seq, d) in entries {
            if self.queue.back().is_some_and(|(last, _)| *last >= seq) {
                continue;
            }
            self.spilled = self.spilled.saturating_sub(1);
            self.queued_bytes += d.size();
            self.queue.push_back((seq, d));
        }
    }

    /// The queued deliveries, in order.
    pub fn queue(&self) -> impl Iterator<Item = &Delivery> {
        self.queue.iter().map(|(_, d)| d)
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// What the session holds for its client, queued and in flight, in bytes: what it
    /// is charged for in the broker's memory budget.
    pub fn held_bytes(&self) -> usize {
        self.queued_bytes + self.inflight.held_bytes()
    }

    /// Drops everything queued (the in-flight window stays).
    pub fn clear_queue(&mut self) {
        while self.pop().is_some() {}
    }

    fn pop(&mut self) -> Option<Delivery> {
        let (seq, d) = self.queue.pop_front()?;
        self.queued_bytes -= d.size();
        if d.qos != QoS::AtMostOnce {
            self.record(Change::Dequeued(seq));
        }
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
            let Some((_, front)) = self.queue.front() else {
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
            let pkid = self.send_direct(&delivery);
            out.push((delivery, pkid));
        }
        unreadable
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the rare parts once nothing is left in them.
    fn tidy(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    /// The 5.0 will waiting out its Will Delay Interval, if any.
    pub fn pending_will(&self) -> Option<&Arc<Message>> {
        self.rare.as_ref()?.pending_will.as_ref()
    }

    /// When the pending will is due.
    pub fn will_at(&self) -> Option<Instant> {
        self.rare.as_ref()?.will_at
    }

    /// Holds `will` until `at` (or cancels the pending will, given None).
    pub fn set_will(&mut self, will: Option<Arc<Message>>, at: Option<Instant>) {
        if will.is_none() && self.rare.is_none() {
            return;
        }
        let rare = self.rare();
        rare.will_at = will.as_ref().and(at);
        rare.pending_will = will;
        self.tidy();
    }

    /// Takes the pending will (it is due or the session ends).
    pub fn take_will(&mut self) -> Option<Arc<Message>> {
        let rare = self.rare.as_mut()?;
        rare.will_at = None;
        let will = rare.pending_will.take();
        self.tidy();
        will
    }

    /// Retained walks still to run, oldest first.
    pub fn walks(&self) -> &VecDeque<RetainedWalk> {
        self.rare.as_ref().map_or(&NO_WALKS, |r| &r.walks)
    }

    /// The first walk made a step: it finished (`next` None) and goes, or takes its turn
    /// behind the next few to resume after `next` (round robin, so that a long walk does
    /// not hold up the retained messages of a later subscription).
    pub fn walk_stepped(&mut self, next: Option<ByteStr>) {
        let Some(rare) = self.rare.as_mut() else {
            return;
        };
        let walks = &mut rare.walks;
        if let (Some(mut w), Some(next)) = (walks.pop_front(), next) {
            w.after = Some(next);
            walks.insert((MAX_ACTIVE_WALKS - 1).min(walks.len()), w);
        }
        self.tidy();
    }

    /// Starts (or restarts, for a filter subscribed again) the walk of the retained
    /// messages matching a new subscription.
    pub fn start_walk(&mut self, filter: ByteStr, qos: QoS, sub_id: Option<u32>) {
        let walks = &mut self.rare().walks;
        walks.retain(|w| w.filter != filter);
        walks.push_back(RetainedWalk {
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
        if let Some(log) = &mut self.log {
            // Removes everything of the session from the store at once.
            log.clear();
            log.push(Change::Ended);
        }
        self.spilled = 0;
        let mut orphans: Vec<Delivery> = self
            .queue
            .drain(..)
            .map(|(_, d)| d)
            .filter(is_shared)
            .collect();
        orphans.extend(self.inflight.take_unreceived_shared());
        self.inflight = Inflight::default();
        let rare = self.rare.take();
        Ended {
            filters: self.subscriptions.drain().map(|(f, _)| f).collect(),
            will: rare.and_then(|r| r.pending_will),
            orphans,
        }
    }

    /// The session moved to another node of a cluster, which loads it from the store:
    /// here it is over (nothing more is recorded, its timers do nothing), but not ended
    /// for the client. Returns its filters, to leave this node's router.
    pub fn release(&mut self) -> Vec<ByteStr> {
        self.log = None;
        self.ended = true;
        self.moved = true;
        self.detached_by = None;
        self.rare = None;
        self.queue.clear();
        self.queued_bytes = 0;
        self.spilled = 0;
        self.inflight = Inflight::default();
        self.subscriptions.drain().map(|(f, _)| f).collect()
    }

    /// The connection went away and the session stays: what was in flight is resent
    /// from the start on the next connection; queued QoS 0 messages go unless kept.
    pub fn park(&mut self, keep_qos0: bool) {
        self.inflight.mark_unsent();
        if !keep_qos0 {
            self.queue.retain(|(_, d)| d.qos != QoS::AtMostOnce);
            self.queued_bytes = self.queue.iter().map(|(_, d)| d.size()).sum();
        }
    }
}

fn is_shared(d: &Delivery) -> bool {
    d.shared.is_some()
}

/// The outbound QoS 1/2 window, by packet id: made on first use (a session that has
/// never been sent a QoS 1 or 2 message, such as an idle device's, holds a pointer).
#[derive(Debug, Default)]
pub struct Inflight(Option<Box<Window>>);

#[derive(Debug, Default)]
struct Window {
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
    fn window(&mut self) -> &mut Window {
        self.0.get_or_insert_with(Box::default)
    }

    /// Entries held, sent or not.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |w| w.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sent on this connection and not yet acknowledged: what Receive Maximum counts.
    pub fn outstanding(&self) -> usize {
        self.0.as_ref().map_or(0, |w| w.outstanding())
    }

    /// Entries waiting to be resent on this connection.
    pub fn unsent(&self) -> usize {
        self.0.as_ref().map_or(0, |w| w.unsent)
    }

    /// The size of the messages held.
    fn held_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |w| w.held_bytes)
    }

    /// Entries kept by the store (packet id, send order, stage), all to be resent.
    fn restore(entries: Vec<(u16, u64, Stage)>) -> Inflight {
        match entries.is_empty() {
            true => Inflight::default(),
            false => Inflight(Some(Box::new(Window::restore(entries)))),
        }
    }

    pub fn contains(&self, pkid: u16) -> bool {
        self.0.as_ref().is_some_and(|w| w.contains(pkid))
    }

    /// Records `delivery` as sent; returns its packet id (0 for QoS 0, not recorded).
    pub fn send(&mut self, delivery: &Delivery) -> u16 {
        if delivery.qos == QoS::AtMostOnce {
            return 0;
        }
        self.window().send(delivery)
    }

    /// PUBACK (QoS 1) or PUBCOMP (`released`): the exchange for `pkid` is over. False if
    /// no such exchange was waiting for it.
    pub fn complete(&mut self, pkid: u16, released: bool) -> bool {
        self.0.as_mut().is_some_and(|w| w.complete(pkid, released))
    }

    /// PUBREC: see `Window::received`.
    pub fn received(&mut self, pkid: u16) -> Option<u64> {
        self.0.as_mut()?.received(pkid)
    }

    /// The send order of `pkid`'s entry (see `Window::seq`).
    pub fn seq(&self, pkid: u16) -> Option<u64> {
        self.0.as_ref()?.seq(pkid)
    }

    /// Ends every exchange sent up to and including send order `seq`.
    pub fn complete_through(&mut self, seq: u64) -> Vec<u16> {
        self.0
            .as_mut()
            .map_or_else(Vec::new, |w| w.complete_through(seq))
    }

    /// Drops `pkid`, as if acknowledged.
    pub fn forget(&mut self, pkid: u16) {
        if let Some(w) = self.0.as_mut() {
            w.forget(pkid);
        }
    }

    /// The connection ended: every entry is to be resent on the next one.
    pub fn mark_unsent(&mut self) {
        if let Some(w) = self.0.as_mut() {
            w.mark_unsent();
        }
    }

    /// Up to `max` entries to resend, oldest first (see `Window::resend`).
    pub fn resend(&mut self, max: usize, out: &mut Vec<(u16, Option<Delivery>)>) {
        if let Some(w) = self.0.as_mut() {
            w.resend(max, out);
        }
    }

    fn take_unreceived_shared(&mut self) -> Vec<Delivery> {
        self.0
            .as_mut()
            .map_or_else(Vec::new, |w| w.take_unreceived_shared())
    }
}

impl Window {
    /// Entries held, sent or not.
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sent on this connection and not yet acknowledged: what Receive Maximum counts.
    fn outstanding(&self) -> usize {
        self.entries.len() - self.unsent
    }

    /// Entries kept by the store (packet id, send order, stage), all to be resent.
    fn restore(entries: Vec<(u16, u64, Stage)>) -> Window {
        let mut w = Window::default();
        for (pkid, seq, stage) in entries {
            if let Stage::Publish(d) = &stage {
                w.held_bytes += d.size();
            }
            w.next_seq = w.next_seq.max(seq + 1);
            w.next_pkid = w.next_pkid.max(pkid);
            let entry = Entry {
                seq,
                stage,
                sent: false,
            };
            w.entries.insert(pkid, entry);
        }
        w.unsent = w.entries.len();
        w
    }

    fn contains(&self, pkid: u16) -> bool {
        self.entries.contains_key(&pkid)
    }

    /// Records `delivery` as sent; returns its packet id (0 for QoS 0, not recorded).
    fn send(&mut self, delivery: &Delivery) -> u16 {
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
    fn complete(&mut self, pkid: u16, released: bool) -> bool {
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
    /// caller sends now. The entry's send order if a PUBREL is due (also for a repeated
    /// PUBREC).
    fn received(&mut self, pkid: u16) -> Option<u64> {
        let e = self.entries.get_mut(&pkid)?;
        match &e.stage {
            Stage::Publish(d) if d.qos == QoS::ExactlyOnce => {
                self.held_bytes -= d.size();
                e.stage = Stage::Release;
                if !e.sent {
                    e.sent = true;
                    self.unsent -= 1;
                }
                Some(e.seq)
            }
            Stage::Release => Some(e.seq),
            Stage::Publish(_) => None,
        }
    }

    /// The send order of `pkid`'s entry (increasing over the session's life, kept across
    /// resends): the event id an HTTP stream shows for it.
    fn seq(&self, pkid: u16) -> Option<u64> {
        self.entries.get(&pkid).map(|e| e.seq)
    }

    /// Ends every exchange sent up to and including send order `seq`: an HTTP client
    /// confirms at once everything it received up to there. Returns the packet ids ended.
    fn complete_through(&mut self, seq: u64) -> Vec<u16> {
        let done: Vec<u16> = self
            .entries
            .iter()
            .filter(|(_, e)| e.seq <= seq)
            .map(|(pkid, _)| *pkid)
            .collect();
        done.iter().for_each(|pkid| self.forget(*pkid));
        done
    }

    /// Drops `pkid`, as if acknowledged.
    fn forget(&mut self, pkid: u16) {
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
    fn mark_unsent(&mut self) {
        for e in self.entries.values_mut() {
            e.sent = false;
        }
        self.unsent = self.entries.len();
    }

    /// Up to `max` entries to resend, oldest first, now counted as sent: a PUBLISH (with
    /// DUP set by the caller) or a PUBREL (None).
    fn resend(&mut self, max: usize, out: &mut Vec<(u16, Option<Delivery>)>) {
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

    /// Shared-subscription QoS 1 messages whose PUBLISH the client never acknowledged:
    /// another member may have them. A QoS 2 one, once sent, goes to no other member
    /// [MQTT-4.8.2-5]: the client may have passed it on before its PUBREC got through.
    fn take_unreceived_shared(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        self.entries.retain(|_, e| match &e.stage {
            Stage::Publish(d) if d.shared.is_some() && d.qos == QoS::AtLeastOnce => {
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

    /// Steps the first walk as `Outbox::take` does, ending it if `done`; its filter.
    fn step(s: &mut SessionState, done: bool) -> String {
        let filter = s.walks().front().expect("a walk").filter.to_string();
        let next = (!done).then(|| ByteStr::from(format!("{filter}/at")));
        s.walk_stepped(next);
        filter
    }

    #[test]
    fn at_most_max_active_walks_advance_in_turns() {
        let mut s = SessionState::new();
        for i in 0..6 {
            s.start_walk(ByteStr::from(format!("f{i}")), QoS::AtMostOnce, None);
        }
        // The first four take turns; f4 and f5 wait.
        let turns: Vec<String> = (0..9).map(|_| step(&mut s, false)).collect();
        assert_eq!(
            turns,
            ["f0", "f1", "f2", "f3", "f0", "f1", "f2", "f3", "f0"]
        );
        // Each resumes where its last step stopped.
        let f1 = s.walks().front().unwrap();
        assert_eq!((&*f1.filter, f1.after.as_deref()), ("f1", Some("f1/at")));
        // f1 finishes: f4 takes its place in the turns, f5 still waits.
        assert_eq!(step(&mut s, true), "f1");
        let turns: Vec<String> = (0..8).map(|_| step(&mut s, false)).collect();
        assert_eq!(turns, ["f2", "f3", "f0", "f4", "f2", "f3", "f0", "f4"]);
        assert_eq!(s.walks().len(), 5);
        assert_eq!(s.walks()[MAX_ACTIVE_WALKS].filter, "f5");
        // Once every walk is done, nothing of them is left.
        while !s.walks().is_empty() {
            step(&mut s, true);
        }
        assert!(s.rare.is_none());
    }

    #[test]
    fn subscribing_again_restarts_the_walk_of_the_filter() {
        let mut s = SessionState::new();
        s.start_walk(ByteStr::from("a/#"), QoS::AtMostOnce, None);
        s.start_walk(ByteStr::from("b/#"), QoS::AtMostOnce, None);
        assert_eq!(step(&mut s, false), "a/#");
        assert_eq!(s.walks()[1].after.as_deref(), Some("a/#/at"));
        // A client re-subscribing in a loop costs one walk per filter, from the start,
        // with the latest options.
        for _ in 0..3 {
            s.start_walk(ByteStr::from("a/#"), QoS::AtLeastOnce, Some(7));
        }
        let walks: Vec<(&str, QoS, Option<u32>, Option<&str>)> = s
            .walks()
            .iter()
            .map(|w| (&*w.filter, w.qos, w.sub_id, w.after.as_deref()))
            .collect();
        assert_eq!(
            walks,
            [
                ("b/#", QoS::AtMostOnce, None, None),
                ("a/#", QoS::AtLeastOnce, Some(7), None)
            ]
        );
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut w = Inflight::default();
        let a = w.send(&delivery(QoS::AtLeastOnce));
        assert_eq!(a, 1);
        w.window().next_pkid = u16::MAX - 1;
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
        assert!(w.received(q1).is_none(), "PUBREC does not apply to QoS 1");
        assert!(!w.complete(q2, true), "PUBCOMP before PUBREC");
        assert!(w.received(q2).is_some());
        assert!(
            w.received(q2).is_some(),
            "a repeated PUBREC gets PUBREL again"
        );
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
        assert!(w.received(ids[3]).is_some());
        w.mark_unsent();
        assert_eq!((w.outstanding(), w.unsent()), (0, 20));
        let mut out = Vec::new();
        w.resend(5, &mut out);
        let got: Vec<u16> = out.iter().map(|(p, _)| *p).collect();
        assert_eq!(got, ids[..5]);
        assert!(out[3].1.is_none(), "the released one is resent as PUBREL");
        assert_eq!(w.outstanding(), 5);
        // The client may acknowledge what it got on the earlier connection.
        assert!(w.received(ids[10]).is_some());
        assert_eq!((w.outstanding(), w.unsent()), (6, 14));
        assert!(w.received(ids[0]).is_some());
        assert!(w.complete(ids[0], true));
        out.clear();
        w.resend(1, &mut out);
        assert_eq!(out[0].0, ids[5]);
    }

    #[test]
    fn complete_through_ends_what_was_sent_up_to_a_send_order() {
        let mut w = Inflight::default();
        let ids: Vec<u16> = (0..5)
            .map(|_| w.send(&delivery(QoS::AtLeastOnce)))
            .collect();
        let seqs: Vec<u64> = ids.iter().map(|p| w.seq(*p).unwrap()).collect();
        assert!(seqs.windows(2).all(|s| s[0] < s[1]));
        w.mark_unsent();
        assert_eq!(w.complete_through(seqs[2]).len(), 3);
        assert_eq!((w.len(), w.unsent()), (2, 2));
        assert_eq!(w.seq(ids[0]), None);
        assert!(w.complete_through(seqs[2]).is_empty());
        let mut out = Vec::new();
        w.resend(10, &mut out);
        assert_eq!(out.iter().map(|(p, _)| *p).collect::<Vec<_>>(), ids[3..]);
        assert_eq!(
            w.seq(ids[3]),
            Some(seqs[3]),
            "a resend keeps its send order"
        );
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
        s.push(shared(QoS::ExactlyOnce));
        s.push(delivery(QoS::AtLeastOnce));
        s.inflight.send(&shared(QoS::AtLeastOnce));
        // A QoS 2 one sent stays with the member, acknowledged or not [MQTT-4.8.2-5].
        let received = s.inflight.send(&shared(QoS::ExactlyOnce));
        assert!(s.inflight.received(received).is_some());
        s.inflight.send(&shared(QoS::ExactlyOnce));
        s.inflight.send(&delivery(QoS::ExactlyOnce));
        let ended = s.end();
        let qos: Vec<QoS> = ended.orphans.iter().map(|d| d.qos).collect();
        assert_eq!(
            qos,
            [QoS::ExactlyOnce, QoS::AtLeastOnce],
            "queued, then in flight"
        );
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
                                if s.inflight.received(pkid).is_some() {
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
                        live.retain(|(p, _, _)| s.inflight.contains(*p));
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
