//! Routing: which sessions receive a published message, and the retained store.
//!
//! Publishing takes the trie's read lock only to find subscribers and hand each one a
//! `Delivery` (an `Arc` of the message, no copy); sockets are written later by each
//! subscriber's own connection task, with no router lock held.

mod retained;
mod trie;

pub use trie::{SharedKey, Subscriber};

use crate::protocol::{self, topic, ByteStr, Properties, Protocol, PublishHeader, QoS, SubOptions};
use crate::session::Session;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use retained::Retained;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use trie::Trie;

/// mosquitto's limit too: it bounds the depth of every walk through the trees.
pub const MAX_TOPIC_LEVELS: usize = 200;

/// A published application message, shared by every session it is delivered to.
#[derive(Debug)]
pub struct Message {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties to forward (never a topic alias or subscription identifier:
    /// those belong to one connection and are set per delivery).
    pub properties: Option<Box<Properties>>,
    /// Id of the publishing session (0 for the broker itself), for MQTT 5 No Local.
    pub origin: u64,
    /// From the Message Expiry Interval: not delivered after this.
    pub expires_at: Option<Instant>,
    /// The QoS 0, non-retained, 3.x encoding: identical for every such subscriber, so
    /// a fan-out encodes it once.
    encoded_v3_qos0: OnceLock<Bytes>,
}

impl Message {
    pub fn new(
        topic: ByteStr,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<Box<Properties>>,
        origin: u64,
    ) -> Message {
        let expires_at = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            origin,
            expires_at,
            encoded_v3_qos0: OnceLock::new(),
        }
    }

    /// A copy that owns its bytes, for messages kept long (retained): a slice of a read
    /// buffer would pin the whole buffer for as long as it is kept.
    pub fn compacted(&self) -> Message {
        Message {
            topic: ByteStr::from(self.topic.as_str()),
            payload: Bytes::copy_from_slice(&self.payload),
            properties: self.properties.clone(),
            encoded_v3_qos0: OnceLock::new(),
            ..*self
        }
    }

    pub fn is_expired(&self) -> bool {
        self.expires_at.is_some_and(|t| t <= Instant::now())
    }

    /// Appends this message as a PUBLISH for one subscriber.
    pub fn encode(
        &self,
        out: &mut BytesMut,
        protocol: Protocol,
        delivery: &DeliveryHeader,
    ) -> Result<(), protocol::Error> {
        let header = PublishHeader {
            dup: delivery.dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: &self.topic,
            pkid: delivery.pkid,
        };
        if !protocol.is_v5() {
            if delivery.qos != QoS::AtMostOnce || delivery.retain {
                return protocol::encode_publish(out, protocol, &header, None, &self.payload);
            }
            if let Some(bytes) = self.encoded_v3_qos0.get() {
                out.extend_from_slice(bytes);
                return Ok(());
            }
            let mut once = BytesMut::new();
            protocol::encode_publish(&mut once, protocol, &header, None, &self.payload)?;
            out.extend_from_slice(&once);
            // Another subscriber's task may have raced us here: both encodings are equal.
            let _ = self.encoded_v3_qos0.set(once.freeze());
            return Ok(());
        }
        // 5.0: the expiry forwarded is what is left of it [MQTT-3.3.2-6], and the
        // subscription identifiers are the receiver's own.
        let remaining = self.expires_at.map(|t| {
            let left = t.saturating_duration_since(Instant::now());
            u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX)
        });
        if delivery.sub_ids.is_empty() && remaining.is_none() {
            let props = self.properties.as_deref();
            return protocol::encode_publish(out, protocol, &header, props, &self.payload);
        }
        let mut props = self.properties.as_deref().cloned().unwrap_or_default();
        props.subscription_identifiers = delivery.sub_ids.to_vec();
        props.message_expiry_interval = remaining;
        protocol::encode_publish(out, protocol, &header, Some(&props), &self.payload)
    }
}

/// The per-subscriber parts of an outgoing PUBLISH.
pub struct DeliveryHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
    pub sub_ids: &'a [u32],
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// The minimum of the publish QoS and the subscription QoS.
    pub qos: QoS,
    pub retain: bool,
    /// Identifiers of the receiver's subscriptions that matched (MQTT 5).
    pub sub_ids: Vec<u32>,
    /// Set when delivered through a shared subscription, so that the message can go to
    /// another member if this one leaves before acknowledging it.
    pub shared: Option<Arc<SharedKey>>,
}

impl Delivery {
    pub fn new(message: Arc<Message>, qos: QoS, retain: bool) -> Delivery {
        Delivery {
            message,
            qos,
            retain,
            sub_ids: Vec::new(),
            shared: None,
        }
    }

    fn to(message: &Arc<Message>, sub: &Subscriber) -> Delivery {
        Delivery {
            message: message.clone(),
            qos: message.qos.min(sub.options.qos),
            // Normal delivery clears the retain flag [MQTT-3.3.1-9] unless the 5.0
            // subscription asked for Retain As Published.
            retain: message.retain && sub.options.retain_as_published,
            sub_ids: sub.id.into_iter().collect(),
            shared: sub.shared.clone(),
        }
    }
}

#[derive(Default)]
pub struct Router {
    subscriptions: RwLock<Trie>,
    retained: RwLock<Retained>,
}

impl Router {
    /// Subscribes `session` to `filter` (already validated; may be `$share/{g}/{f}`).
    /// Returns true if the session already had this subscription, which is replaced.
    pub fn subscribe(
        &self,
        filter: &str,
        session: &Arc<Session>,
        options: SubOptions,
        id: Option<u32>,
    ) -> bool {
        let (group, filter) = split_shared(filter);
        let sub = Subscriber {
            session: session.clone(),
            options,
            id,
            shared: group.map(|g| {
                Arc::new(SharedKey {
                    group: g.into(),
                    filter: filter.into(),
                })
            }),
        };
        self.subscriptions.write().insert(filter, group, sub)
    }

    pub fn unsubscribe(&self, filter: &str, session_id: u64) -> bool {
        let (group, filter) = split_shared(filter);
        self.subscriptions.write().remove(filter, group, session_id)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.read().len()
    }

    /// Hands `message` to every session subscribed to its topic; returns how many.
    ///
    /// A session with several matching plain subscriptions gets one copy at the highest
    /// of their QoS, carrying all their identifiers (mosquitto's choice, which the
    /// standard allows). Each matching shared group gives one more copy to one member.
    pub fn publish(&self, message: &Arc<Message>) -> usize {
        let trie = self.subscriptions.read();
        let mut matches: Vec<&Subscriber> = Vec::new();
        let mut picks: Vec<&Subscriber> = Vec::new();
        let nodes = trie.for_each_match(
            &message.topic,
            &mut |s| {
                // No Local: not back to the publisher's own session [MQTT-3.8.3-3].
                if !(s.options.no_local && s.session.id == message.origin) {
                    matches.push(s)
                }
            },
            &mut |g| picks.extend(g.pick(0)),
        );
        if nodes > 1 {
            // Only matches from different filters can name the same session twice.
            matches.sort_unstable_by_key(|s| s.session.id);
        }
        let mut delivered = 0;
        let mut rest = &matches[..];
        while let Some((first, _)) = rest.split_first() {
            let same = rest
                .iter()
                .take_while(|s| s.session.id == first.session.id)
                .count();
            let mut delivery = Delivery::to(message, first);
            for s in &rest[1..same] {
                delivery.qos = delivery.qos.max(message.qos.min(s.options.qos));
                delivery.retain |= message.retain && s.options.retain_as_published;
                delivery.sub_ids.extend(s.id);
            }
            rest = &rest[same..];
            if first.session.deliver(delivery) {
                delivered += 1;
            }
        }
        for sub in picks {
            if sub.session.deliver(Delivery::to(message, sub)) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Gives a shared-subscription delivery that `from` will not acknowledge to another
    /// member of its group. Returns false if there is none.
    pub fn redeliver_shared(&self, delivery: Delivery, from: u64) -> bool {
        let Some(key) = delivery.shared.clone() else {
            return false;
        };
        let trie = self.subscriptions.read();
        let Some(sub) = trie.group(&key).and_then(|g| g.pick(from)) else {
            return false;
        };
        let mut d = Delivery::to(&delivery.message, sub);
        d.qos = delivery.qos.min(sub.options.qos);
        sub.session.deliver(d)
    }

    /// Stores (or, with an empty payload, clears) the retained message of its topic.
    pub fn retain(&self, message: &Message) {
        let stored = (!message.payload.is_empty()).then(|| Arc::new(message.compacted()));
        self.retained.write().set(&message.topic, stored);
    }

    /// The retained messages matching `filter`, for a new subscription. Expired ones
    /// are removed instead.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().matching(filter, &mut out);
        if out.iter().any(|m| m.is_expired()) {
            let mut store = self.retained.write();
            for m in out.iter().filter(|m| m.is_expired()) {
                store.clear_if_same(&m.topic, m);
            }
            out.retain(|m| !m.is_expired());
        }
        out
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
