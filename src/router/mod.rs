//! Routing: which mailboxes receive a published message, and the retained store.
//!
//! The router knows sessions only as `Mailbox`es, so that it can be tested and measured
//! with anything that takes deliveries. Publishing takes the trie's read lock only to find
//! subscribers and hand each one a `Delivery` (an `Arc` of the message, no copy); sockets
//! are written later by each subscriber's own connection task, with no router lock held.

mod retained;
mod trie;

pub use trie::{SharedGroup, Subscriber};

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
}

impl<M> Default for Router<M> {
    fn default() -> Self {
        Router {
            subscriptions: RwLock::new(Trie::default()),
            retained: RwLock::new(Retained::default()),
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
        let trie = self.subscriptions.read();
        let mut matches: Vec<&Subscriber<M>> = Vec::new();
        let mut groups: Vec<&SharedGroup<M>> = Vec::new();
        let nodes = trie.for_each_match(
            &message.topic,
            &mut |s| {
                // No Local: not back to the publisher's own session [MQTT-3.8.3-3].
                if !(s.options.no_local && s.mailbox.id() == message.origin) {
                    matches.push(s)
                }
            },
            &mut |g| groups.push(g),
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
        self.retained.write().set(&message.topic, stored);
    }

    /// The next (at most `limit`) retained messages matching `filter` after the topic
    /// `after`, for a new subscription, appended to `out`; expired ones are removed from
    /// the store instead. The read lock is held for this one step only. Returns where the
    /// walk stands: the last topic it passed (to resume after), and whether it is done.
    pub fn retained_step(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
        out: &mut Vec<Arc<Message>>,
    ) -> (Option<ByteStr>, bool) {
        let start = out.len();
        let done = self.retained.read().walk(filter, after, limit, out);
        let last = out[start..].last().map(|m| m.topic.clone());
        if out[start..].iter().any(|m| m.is_expired(now)) {
            let mut store = self.retained.write();
            for m in out[start..].iter().filter(|m| m.is_expired(now)) {
                store.clear_if_same(&m.topic, m);
            }
            let mut i = 0;
            out.retain(|m| {
                i += 1;
                i <= start || !m.is_expired(now)
            });
        }
        (last, done)
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }
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
    use crate::protocol::QoS;
    use bytes::Bytes;
    use parking_lot::Mutex;

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
