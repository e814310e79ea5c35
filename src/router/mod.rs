//! Routing: which sessions receive a published message, and the retained store.
//!
//! Publishing takes the trie's read lock only to find subscribers and hand each one a
//! `Delivery` (an `Arc` of the message, no copy); sockets are written later by each
//! subscriber's own connection task, with no router lock held.

mod retained;
mod trie;

pub use trie::Subscriber;

use crate::protocol::{self, ByteStr, Properties, Protocol, PublishHeader, QoS, SubOptions};
use crate::session::Session;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use retained::Retained;
use std::sync::{Arc, OnceLock};
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
    pub properties: Option<Box<Properties>>,
    /// Id of the publishing session (0 for the broker itself), for MQTT 5 No Local.
    pub origin: u64,
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
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            origin,
            encoded_v3_qos0: OnceLock::new(),
        }
    }

    /// A copy that owns its bytes, for messages kept long (retained, wills): a slice of a
    /// read buffer would pin the whole buffer for as long as it is kept.
    pub fn compacted(&self) -> Message {
        Message::new(
            ByteStr::from(self.topic.as_str()),
            Bytes::copy_from_slice(&self.payload),
            self.qos,
            self.retain,
            self.properties.clone(),
            self.origin,
        )
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
        if delivery.qos == QoS::AtMostOnce && !delivery.retain && !protocol.is_v5() {
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
        let props = if protocol.is_v5() {
            self.properties.as_deref()
        } else {
            None
        };
        protocol::encode_publish(out, protocol, &header, props, &self.payload)
    }
}

/// The per-subscriber parts of an outgoing PUBLISH.
pub struct DeliveryHeader {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// The minimum of the publish QoS and the subscription QoS.
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Default)]
pub struct Router {
    subscriptions: RwLock<Trie>,
    retained: RwLock<Retained>,
}

impl Router {
    /// Subscribes `session` to `filter` (already validated); returns true if the session
    /// already had a subscription to it, which is replaced.
    pub fn subscribe(&self, filter: &str, session: &Arc<Session>, options: SubOptions) -> bool {
        let sub = Subscriber {
            session: session.clone(),
            options,
            id: None,
        };
        self.subscriptions.write().insert(filter, sub)
    }

    pub fn unsubscribe(&self, filter: &str, session_id: u64) -> bool {
        self.subscriptions.write().remove(filter, session_id)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.read().len()
    }

    /// Hands `message` to every session subscribed to its topic; returns how many.
    ///
    /// A session with several matching subscriptions gets one copy at the highest of
    /// their QoS (mosquitto's choice, which the standard allows).
    pub fn publish(&self, message: &Arc<Message>) -> usize {
        let trie = self.subscriptions.read();
        let mut matches: Vec<&Subscriber> = Vec::new();
        let nodes = trie.for_each_match(&message.topic, |s| matches.push(s));
        if nodes > 1 {
            // Only matches from different filters can name the same session twice.
            matches.sort_unstable_by_key(|s| s.session.id);
        }
        let mut delivered = 0;
        let mut i = 0;
        while i < matches.len() {
            let first = matches[i];
            let mut granted = first.options.qos;
            let mut j = i + 1;
            while j < matches.len() && matches[j].session.id == first.session.id {
                granted = granted.max(matches[j].options.qos);
                j += 1;
            }
            i = j;
            let delivery = Delivery {
                message: message.clone(),
                qos: message.qos.min(granted),
                // Normal delivery clears the retain flag [MQTT-3.3.1-9].
                retain: false,
            };
            if first.session.deliver(delivery) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Stores (or, with an empty payload, clears) the retained message of its topic.
    pub fn retain(&self, message: &Message) {
        let stored = (!message.payload.is_empty()).then(|| Arc::new(message.compacted()));
        self.retained.write().set(&message.topic, stored);
    }

    /// The retained messages matching `filter`, for a new subscription.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().matching(filter, &mut out);
        out
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }
}
