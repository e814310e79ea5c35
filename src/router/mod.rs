//! Routing: which mailboxes receive a published message, and the retained store.
//!
//! The router knows sessions only as `Mailbox`es, so that it can be tested and measured
//! with anything that takes deliveries. Publishing takes the trie's read lock only to find
//! subscribers and hand each one a `Delivery` (an `Arc` of the message, no copy); sockets
//! are written later by each subscriber's own connection task, with no router lock held.

mod retained;
mod trie;

pub use trie::{SharedGroup, Subscriber};

use crate::budget::Budget;
use crate::message::{Delivery, Message, SharedKey};
use crate::protocol::{topic, ByteStr, SubOptions};
use parking_lot::RwLock;
use retained::Retained;
use std::sync::Arc;
use std::time::Instant;
use trie::Trie;

/// mosquitto's limit: a topic or filter may have 200 `/` (201 levels). It bounds the
/// depth of every walk through the trees.
pub const MAX_TOPIC_LEVELS: usize = 201;

/// Tree nodes one step of a retained walk may visit under the read lock, however sparse
/// the filter's matches: about 1/200 of the ~33 ms a walk of 200,000 topics cost in one go.
pub const NODES_PER_STEP: usize = 1024;

/// What the router delivers into: a session, or a test double.
pub trait Mailbox: Send + Sync {
    /// Unique for the broker's life.
    fn id(&self) -> u64;
    /// Takes a message for the client; false if refused (e.g. its queue is full).
    fn deliver(&self, delivery: Delivery) -> bool;
    /// Whether a client is connected to take deliveries now.
    fn is_online(&self) -> bool;
}

pub struct Router<M> {
    subscriptions: RwLock<Trie<M>>,
    retained: RwLock<Retained>,
    /// Charged with the retained store's size.
    budget: Arc<Budget>,
}

impl<M> Default for Router<M> {
    fn default() -> Self {
        Router::new(Arc::new(Budget::new(usize::MAX)))
    }
}

impl<M> Router<M> {
    /// A router whose retained store is charged to `budget`.
    pub fn new(budget: Arc<Budget>) -> Router<M> {
        Router {
            subscriptions: RwLock::new(Trie::default()),
            retained: RwLock::new(Retained::default()),
            budget,
        }
    }
}

impl<M: Mailbox> Router<M> {
    /// Subscribes `mailbox` to `filter` (already validated; may be `$share/{g}/{f}`).
    /// Returns true if the mailbox already had this subscription, which is replaced.
    /// A member joining a shared group takes the messages waiting there for one.
    pub fn subscribe(
        &self,
        filter: &str,
        mailbox: &Arc<M>,
        options: SubOptions,
        id: Option<u32>,
    ) -> bool {
        let (group, filter) = split_shared(filter);
        let sub = Subscriber {
            mailbox: mailbox.clone(),
            options,
            id,
            shared: group.map(|g| {
                Arc::new(SharedKey {
                    group: g.into(),
                    filter: filter.into(),
                })
            }),
        };
        let shared = sub.shared.clone();
        let mut trie = self.subscriptions.write();
        let (existed, group) = trie.insert(filter, group, sub);
        if let Some(group) = group {
            for waiting in group.waiting.drain(..) {
                let mut d = Delivery::through(&waiting.message, &options, id, shared.as_ref());
                d.qos = waiting.qos.min(options.qos);
                mailbox.deliver(d);
            }
        }
        existed
    }

    pub fn unsubscribe(&self, filter: &str, mailbox: u64) -> bool {
        let (group, filter) = split_shared(filter);
        self.subscriptions.write().remove(filter, group, mailbox)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.read().len()
    }

    /// Hands `message` to every mailbox subscribed to its topic; returns how many took it.
    ///
    /// A mailbox with several matching plain subscriptions gets one copy at the highest
    /// of their QoS, carrying all their identifiers (mosquitto's choice, which the
    /// standard allows). Each matching shared group gives one more copy to one member.
    pub fn publish(&self, message: &Arc<Message>) -> usize {
        self.publish_with(message, true, |_| true)
    }

    /// `publish` to plain subscriptions only: in a cluster, the member of a shared
    /// subscription is picked cluster-wide (src/cluster), not here.
    pub fn publish_plain(&self, message: &Arc<Message>) -> usize {
        self.publish_with(message, false, |_| true)
    }

    /// `publish_plain` to the mailboxes `keep` accepts only: in a cluster, a session
    /// that moved lately gets some messages through the node it left (src/cluster).
    pub fn publish_plain_if(&self, message: &Arc<Message>, keep: impl Fn(&M) -> bool) -> usize {
        self.publish_with(message, false, keep)
    }

    fn publish_with(
        &self,
        message: &Arc<Message>,
        shared: bool,
        keep: impl Fn(&M) -> bool,
    ) -> usize {
        let trie = self.subscriptions.read();
        let mut matches: Vec<&Subscriber<M>> = Vec::new();
        let mut groups: Vec<&SharedGroup<M>> = Vec::new();
        let nodes = trie.for_each_match(
            &message.topic,
            &mut |s| {
                // No Local: not back to the publisher's own session [MQTT-3.8.3-3].
                if !(s.options.no_local && s.mailbox.id() == message.origin) && keep(&s.mailbox) {
                    matches.push(s)
                }
            },
            &mut |g| {
                if shared {
                    groups.push(g)
                }
            },
        );
        if nodes > 1 {
            // Only matches from different filters can name the same mailbox twice.
            matches.sort_unstable_by_key(|s| s.mailbox.id());
        }
        let mut delivered = 0;
        let mut rest = &matches[..];
        while let Some((first, _)) = rest.split_first() {
            let id = first.mailbox.id();
            let same = rest.iter().take_while(|s| s.mailbox.id() == id).count();
            let mut delivery = Delivery::through(message, &first.options, first.id, None);
            for s in &rest[1..same] {
                delivery.qos = delivery.qos.max(message.qos.min(s.options.qos));
                delivery.retain |= message.retain && s.options.retain_as_published;
                delivery.sub_ids.extend(s.id);
            }
            rest = &rest[same..];
            if first.mailbox.deliver(delivery) {
                delivered += 1;
            }
        }
        for group in groups {
            let through = |sub: &Subscriber<M>| {
                Delivery::through(message, &sub.options, sub.id, sub.shared.as_ref())
            };
            if group.deliver(0, through) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Whether the shared subscription `key` has a member here.
    pub fn has_shared_members(&self, key: &SharedKey) -> bool {
        let trie = self.subscriptions.read();
        trie.group(key).is_some_and(|g| g.has_members())
    }

    /// Gives a shared-subscription delivery whose member's session ended before
    /// acknowledging it to another member of its group (never back to `from`). With no
    /// member left it waits in the group, up to `max_waiting` messages, for the next
    /// member. Returns false if it had to be dropped.
    pub fn redeliver_shared(&self, delivery: Delivery, from: u64, max_waiting: usize) -> bool {
        let Some(key) = delivery.shared.clone() else {
            return false;
        };
        let mut trie = self.subscriptions.write();
        let Some(group) = trie.group_mut(&key, true) else {
            return false;
        };
        let through = |sub: &Subscriber<M>| {
            let mut d = Delivery::through(&delivery.message, &sub.options, sub.id, Some(&key));
            d.qos = delivery.qos.min(sub.options.qos);
            d
        };
        if group.deliver(from, through) {
            return true;
        }
        // Members that refuse it (full queues) drop it, as they would a new message.
        if group.has_members() || group.waiting.len() >= max_waiting {
            return false;
        }
        group.waiting.push_back(delivery);
        true
    }

    /// Stores (or, with an empty payload, clears) the retained message of its topic.
    pub fn retain(&self, message: &Message) {
        let stored = (!message.payload.is_empty()).then(|| Arc::new(message.compacted()));
        let added = stored.as_deref().map_or(0, retained_size) as isize;
        let old = self.retained.write().set(&message.topic, stored);
        self.budget
            .adjust(added - old.as_deref().map_or(0, retained_size) as isize);
    }

    /// The next (at most `limit`) retained messages matching `filter` after the tree node
    /// `after`, for a new subscription, appended to `out`; expired ones are removed from
    /// the store instead. The read lock is held for this one step only, which visits at
    /// most `NODES_PER_STEP` nodes of the tree whatever the filter, so it may find none.
    /// Returns where to resume (`after` of the next step), None once the walk is done.
    pub fn retained_step(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
        out: &mut Vec<Arc<Message>>,
    ) -> Option<ByteStr> {
        let start = out.len();
        let mut nodes = NODES_PER_STEP;
        let next = self
            .retained
            .read()
            .walk(filter, after, limit, &mut nodes, out);
        if out[start..].iter().any(|m| m.is_expired(now)) {
            let mut store = self.retained.write();
            for m in out[start..].iter().filter(|m| m.is_expired(now)) {
                if store.clear_if_same(&m.topic, m) {
                    self.budget.adjust(-(retained_size(m) as isize));
                }
            }
            let mut i = 0;
            out.retain(|m| {
                i += 1;
                i <= start || !m.is_expired(now)
            });
        }
        next.map(ByteStr::from)
    }

    /// Up to `limit` retained messages matching `filter` after `after`, in as many steps
    /// as it takes (the read lock taken for each); for the admin API and tests, not for
    /// clients, whose walks go a step at a time as they drain. Returns where to resume.
    pub fn retained_page(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
        out: &mut Vec<Arc<Message>>,
    ) -> Option<ByteStr> {
        let start = out.len();
        let mut next = self.retained_step(filter, after, limit, now, out);
        while let Some(at) = next {
            let taken = out.len() - start;
            if taken >= limit {
                return Some(at);
            }
            next = self.retained_step(filter, Some(&at), limit - taken, now, out);
        }
        None
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Topic and payload bytes of the retained messages.
    pub fn retained_bytes(&self) -> usize {
        self.retained.read().bytes()
    }
}

/// What a retained message costs in the memory budget.
fn retained_size(m: &Message) -> usize {
    const OVERHEAD: usize = 128;
    m.topic.len() + m.payload.len() + OVERHEAD
}

/// `$share/{group}/{filter}` → (Some(group), filter); anything else → (None, filter).
/// The filter was validated by the caller (see `valid_subscription`).
fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Ok(Some((group, f))) => (Some(group), f),
        _ => (None, filter),
    }
}

/// Whether `filter` can be subscribed to: a valid filter or a well-formed shared one,
/// within the level limit.
pub fn valid_subscription(filter: &str) -> bool {
    let inner = match topic::parse_shared(filter) {
        Ok(Some((_, f))) => f,
        Ok(None) => filter,
        Err(_) => return false,
    };
    topic::valid_filter(inner) && within_levels(inner)
}

pub fn within_levels(topic: &str) -> bool {
    topic.split('/').nth(MAX_TOPIC_LEVELS).is_none()
}

pub fn is_shared(filter: &str) -> bool {
    matches!(topic::parse_shared(filter), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ByteStr, QoS};
    use bytes::Bytes;
    use parking_lot::Mutex;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A mailbox that records what it takes, or refuses everything (as a session that
    /// has just ended does until its subscriptions leave the router).
    struct Inbox {
        id: u64,
        online: bool,
        refuses: bool,
        got: Mutex<Vec<Delivery>>,
    }

    impl Inbox {
        fn new(id: u64, online: bool, refuses: bool) -> Arc<Inbox> {
            Arc::new(Inbox {
                id,
                online,
                refuses,
                got: Mutex::new(Vec::new()),
            })
        }

        fn count(&self) -> usize {
            self.got.lock().len()
        }
    }

    impl Mailbox for Inbox {
        fn id(&self) -> u64 {
            self.id
        }
        fn deliver(&self, delivery: Delivery) -> bool {
            if !self.refuses {
                self.got.lock().push(delivery);
            }
            !self.refuses
        }
        fn is_online(&self) -> bool {
            self.online
        }
    }

    #[derive(Debug, Clone)]
    struct Sub {
        mailbox: usize,
        filter: String,
        group: Option<u8>,
        qos: u8,
        id: Option<u32>,
        no_local: bool,
        retain_as_published: bool,
    }

    impl Sub {
        /// The filter as subscribed: `$share/{group}/{filter}` for a shared one.
        fn full(&self) -> String {
            match self.group {
                Some(g) => format!("$share/g{g}/{}", self.filter),
                None => self.filter.clone(),
            }
        }

        fn options(&self) -> SubOptions {
            SubOptions {
                qos: QoS::from_u8(self.qos).unwrap(),
                no_local: self.no_local,
                retain_as_published: self.retain_as_published,
                retain_handling: 0,
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Subscribe(Sub),
        /// Unsubscribes the subscription of this index among those in place, if any.
        Unsubscribe(usize),
    }

    #[derive(Debug, Clone)]
    struct Publication {
        topic: String,
        qos: u8,
        retain: bool,
        /// The publishing mailbox (index), or the broker.
        origin: Option<usize>,
    }

    const MAILBOXES: usize = 4;

    fn filter() -> impl Strategy<Value = String> {
        // `$x` levels make `$` topics; `#` only last; empty levels too.
        "(a|b|\\$x|\\+|)(/(a|b|\\$x|\\+|)){0,3}(/#)?|#"
    }

    fn sub() -> impl Strategy<Value = Sub> {
        (
            0..MAILBOXES,
            filter(),
            prop::option::weighted(0.3, 0u8..2),
            0u8..3,
            prop::option::of(1u32..50),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(mailbox, filter, group, qos, id, no_local, rap)| Sub {
                mailbox,
                filter,
                group,
                qos,
                id,
                // No Local on a shared subscription is a protocol error, refused before
                // the router [MQTT-3.8.3-4].
                no_local: no_local && group.is_none(),
                retain_as_published: rap,
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => sub().prop_map(Op::Subscribe),
            1 => (0usize..20).prop_map(Op::Unsubscribe),
        ]
    }

    fn publication() -> impl Strategy<Value = Publication> {
        (
            "(a|b|\\$x|\\$SYS|)(/(a|b|\\$x|)){0,3}",
            0u8..3,
            any::<bool>(),
            prop::option::of(0..MAILBOXES),
        )
            .prop_map(|(topic, qos, retain, origin)| Publication {
                topic,
                qos,
                retain,
                origin,
            })
    }

    fn sorted(mut ids: Vec<u32>) -> Vec<u32> {
        ids.sort_unstable();
        ids
    }

    proptest! {
        /// The router against a model built on `topic::matches`: each mailbox gets one
        /// delivery for all its matching plain subscriptions (at the highest of their QoS,
        /// with every identifier, none back to its publisher through No Local), and each
        /// matching shared group gives one more to exactly one of its members (a
        /// connected one if any).
        #[test]
        fn router_matches_the_model(
            ops in prop::collection::vec(op(), 0..24),
            online in prop::collection::vec(any::<bool>(), MAILBOXES),
            publications in prop::collection::vec(publication(), 1..6),
        ) {
            let router: Router<Inbox> = Router::default();
            let boxes: Vec<Arc<Inbox>> = (0..MAILBOXES)
                .map(|i| Inbox::new(i as u64 + 1, online[i], false))
                .collect();
            // The model: the subscription in place per (mailbox, filter as subscribed).
            let mut model: BTreeMap<(usize, String), Sub> = BTreeMap::new();
            for op in ops {
                match op {
                    // Invalid filters are refused before the router (SUBACK 0x80).
                    Op::Subscribe(s) if !valid_subscription(&s.full()) => {}
                    Op::Subscribe(s) => {
                        let existed = router.subscribe(&s.full(), &boxes[s.mailbox], s.options(), s.id);
                        let was = model.insert((s.mailbox, s.full()), s);
                        prop_assert_eq!(existed, was.is_some());
                    }
                    Op::Unsubscribe(i) => {
                        let Some(key) = model.keys().nth(i).cloned() else { continue };
                        prop_assert!(router.unsubscribe(&key.1, boxes[key.0].id));
                        model.remove(&key);
                    }
                }
            }
            prop_assert_eq!(router.subscription_count(), model.len());

            for p in publications.iter().filter(|p| topic::valid_topic_name(&p.topic)) {
                let origin = p.origin.map_or(0, |i| boxes[i].id);
                let qos = QoS::from_u8(p.qos).unwrap();
                let message = Arc::new(Message::new(
                    ByteStr::from(p.topic.as_str()), Bytes::from_static(b"m"), qos, p.retain,
                    None, origin, Instant::now(),
                ));
                let delivered = router.publish(&message);
                let got: Vec<Vec<Delivery>> =
                    boxes.iter().map(|b| std::mem::take(&mut *b.got.lock())).collect();
                prop_assert_eq!(delivered, got.iter().map(Vec::len).sum::<usize>());
                let matching: Vec<&Sub> = model
                    .values()
                    .filter(|s| topic::matches(&s.filter, &p.topic))
                    .collect();

                // Plain subscriptions: one delivery per mailbox.
                for (i, b) in boxes.iter().enumerate() {
                    let mine: Vec<&&Sub> = matching
                        .iter()
                        .filter(|s| s.mailbox == i && s.group.is_none())
                        .filter(|s| !(s.no_local && b.id == origin))
                        .collect();
                    let plain: Vec<&Delivery> = got[i].iter().filter(|d| d.shared.is_none()).collect();
                    if mine.is_empty() {
                        prop_assert!(plain.is_empty(), "mailbox {} got {:?}", i, plain);
                        continue;
                    }
                    prop_assert_eq!(plain.len(), 1, "mailbox {}: {:?}", i, plain);
                    let d = plain[0];
                    let want_qos = mine.iter().map(|s| qos.min(s.options().qos)).max().unwrap();
                    prop_assert_eq!(d.qos, want_qos);
                    prop_assert_eq!(d.retain, p.retain && mine.iter().any(|s| s.retain_as_published));
                    prop_assert_eq!(sorted(d.sub_ids.clone()), sorted(mine.iter().filter_map(|s| s.id).collect()));
                }

                // Shared groups: one delivery per matching group, to one of its members.
                let mut groups: BTreeMap<(u8, &str), Vec<&Sub>> = BTreeMap::new();
                for s in matching.iter().filter(|s| s.group.is_some()) {
                    groups.entry((s.group.unwrap_or(0), s.filter.as_str())).or_default().push(s);
                }
                let shared: Vec<(usize, &Delivery)> = got
                    .iter()
                    .enumerate()
                    .flat_map(|(i, ds)| ds.iter().filter(|d| d.shared.is_some()).map(move |d| (i, d)))
                    .collect();
                prop_assert_eq!(shared.len(), groups.len(), "one per matching group: {:?}", shared);
                for ((g, f), members) in &groups {
                    let name = format!("g{g}");
                    let to: Vec<&(usize, &Delivery)> = shared
                        .iter()
                        .filter(|(_, d)| d.shared.as_ref().is_some_and(|k| *k.group == *name && &*k.filter == *f))
                        .collect();
                    prop_assert_eq!(to.len(), 1, "group {} on {}", name, f);
                    let (i, d) = to[0];
                    let member = members.iter().find(|s| s.mailbox == *i);
                    prop_assert!(member.is_some(), "{} is not a member of {} on {}", i, name, f);
                    let member = member.unwrap();
                    if members.iter().any(|s| boxes[s.mailbox].online) {
                        prop_assert!(boxes[*i].online, "a connected member is preferred");
                    }
                    prop_assert_eq!(d.qos, qos.min(member.options().qos));
                    prop_assert_eq!(&d.sub_ids, &member.id.into_iter().collect::<Vec<_>>());
                }
            }
        }
    }

    fn message(qos: QoS) -> Arc<Message> {
        let topic = ByteStr::from("t");
        let payload = Bytes::from_static(b"m");
        Arc::new(Message::new(
            topic,
            payload,
            qos,
            false,
            None,
            0,
            Instant::now(),
        ))
    }

    fn qos1() -> SubOptions {
        SubOptions {
            qos: QoS::AtLeastOnce,
            ..SubOptions::default()
        }
    }

    #[test]
    fn shared_messages_prefer_connected_members_in_turn() {
        let router = Router::default();
        let (a, b) = (Inbox::new(1, true, false), Inbox::new(2, true, false));
        let away = Inbox::new(3, false, false);
        for m in [&a, &away, &b] {
            router.subscribe("$share/g/t", m, qos1(), None);
        }
        for _ in 0..6 {
            assert_eq!(router.publish(&message(QoS::AtLeastOnce)), 1);
        }
        assert_eq!(a.count() + b.count(), 6);
        assert!(a.count() > 0 && b.count() > 0 && away.count() == 0);
    }

    /// A member whose session has ended refuses deliveries until its subscriptions are
    /// gone: the message goes to another member, connected or not, rather than nowhere.
    #[test]
    fn a_shared_message_a_member_refuses_goes_to_the_next() {
        let router = Router::default();
        let ended = Inbox::new(1, false, true);
        let away = Inbox::new(2, false, false);
        router.subscribe("$share/g/t", &ended, qos1(), None);
        router.subscribe("$share/g/t", &away, qos1(), None);
        for _ in 0..4 {
            assert_eq!(router.publish(&message(QoS::AtLeastOnce)), 1, "taken");
        }
        assert_eq!(away.count(), 4);

        // Handed over from a member whose session ended: the same.
        let d = Delivery::through(&message(QoS::AtLeastOnce), &qos1(), None, None);
        let key = Arc::new(SharedKey {
            group: "g".into(),
            filter: "t".into(),
        });
        let d = Delivery {
            shared: Some(key),
            ..d
        };
        assert!(router.redeliver_shared(d.clone(), 9, 10));
        assert_eq!(away.count(), 5);

        // With no member left it waits for the next one.
        router.unsubscribe("$share/g/t", 1);
        router.unsubscribe("$share/g/t", 2);
        assert!(router.redeliver_shared(d.clone(), 9, 10));
        let next = Inbox::new(3, true, false);
        router.subscribe("$share/g/t", &next, qos1(), None);
        assert_eq!(next.count(), 1);
        // Members that all refuse it (full queues) drop it, as they would a new message.
        router.unsubscribe("$share/g/t", 3);
        router.subscribe("$share/g/t", &ended, qos1(), None);
        assert!(!router.redeliver_shared(d, 9, 10));
    }
}
