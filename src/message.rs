//! A published message and its deliveries: what flows from a publisher through the router
//! into the sessions' queues. Depends on the codec, and on the store's plain record of a
//! message (kept with it, so that a fan-out stores it once).
//!
//! Time is passed in (`now`), never read here, so that expiry follows whatever clock the
//! caller runs on (tokio's, paused in tests).

use crate::protocol::{
    self, ByteStr, Properties, Protocol, PublishExtra, PublishHeader, QoS, SubOptions,
};
use crate::store::StoredMessage;
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    /// The stored form, made once when the first persistent session keeps the message
    /// (`session::journal`).
    pub(crate) stored: OnceLock<Arc<StoredMessage>>,
}

impl Message {
    pub fn new(
        topic: ByteStr,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<Box<Properties>>,
        origin: u64,
        now: Instant,
    ) -> Message {
        let expires_at = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            origin,
            expires_at,
            encoded_v3_qos0: OnceLock::new(),
            stored: OnceLock::new(),
        }
    }

    /// A copy that owns its bytes, for messages kept long (retained, wills): a slice of a
    /// read buffer would pin the whole buffer for as long as it is kept.
    pub fn compacted(&self) -> Message {
        Message {
            topic: ByteStr::from(&*self.topic),
            payload: Bytes::copy_from_slice(&self.payload),
            properties: self.properties.clone(),
            encoded_v3_qos0: OnceLock::new(),
            stored: OnceLock::new(),
            ..*self
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Appends this message as a PUBLISH for one subscriber.
    pub fn encode(
        &self,
        out: &mut BytesMut,
        protocol: Protocol,
        delivery: &DeliveryHeader,
        now: Instant,
    ) -> Result<(), protocol::Error> {
        let header = PublishHeader {
            dup: delivery.dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: if delivery.alias.is_some_and(|a| !a.set) {
                ""
            } else {
                &self.topic
            },
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
        // 5.0: the expiry forwarded is what is left of it [MQTT-3.3.2-6]; the subscription
        // identifiers and the topic alias are the receiver's own.
        let extra = PublishExtra {
            message_expiry: self.expires_at.map(|t| {
                let left = t.saturating_duration_since(now);
                u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX)
            }),
            topic_alias: delivery.alias.map(|a| a.alias),
            subscription_identifiers: delivery.sub_ids,
        };
        let props = self.properties.as_deref();
        protocol::encode_publish_with(out, protocol, &header, props, &extra, &self.payload)
    }
}

/// The per-subscriber parts of an outgoing PUBLISH.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
    pub sub_ids: &'a [u32],
    /// A 5.0 server-to-client topic alias for this PUBLISH.
    pub alias: Option<Alias>,
}

/// A topic alias on an outgoing PUBLISH: `set` sends the topic with it (the client learns
/// the alias), otherwise the topic is left empty and the alias stands for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    pub alias: u16,
    pub set: bool,
}

/// Names a shared subscription group, so that a delivery can find its group again.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SharedKey {
    pub group: Box<str>,
    pub filter: Box<str>,
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
    /// another member if this one's session ends before acknowledging it.
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

    /// What holding this delivery costs, for the memory budget: the message's bytes
    /// (counted for each receiver that holds it, which errs on the safe side) and the
    /// bookkeeping around them.
    pub fn size(&self) -> usize {
        const OVERHEAD: usize = 128;
        self.message.topic.len() + self.message.payload.len() + OVERHEAD
    }

    /// The delivery of `message` through a subscription with these options.
    pub fn through(
        message: &Arc<Message>,
        options: &SubOptions,
        id: Option<u32>,
        shared: Option<&Arc<SharedKey>>,
    ) -> Delivery {
        Delivery {
            message: message.clone(),
            qos: message.qos.min(options.qos),
            // Normal delivery clears the retain flag [MQTT-3.3.1-9] unless the 5.0
            // subscription asked for Retain As Published.
            retain: message.retain && options.retain_as_published,
            sub_ids: id.into_iter().collect(),
            shared: shared.cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(props: Option<Properties>, now: Instant) -> Message {
        Message::new(
            ByteStr::from("a/b"),
            Bytes::from_static(b"hi"),
            QoS::AtLeastOnce,
            false,
            props.map(Box::new),
            0,
            now,
        )
    }

    fn decode_v5(buf: &mut BytesMut) -> protocol::Publish {
        match protocol::decode(buf, Protocol::V5, 1 << 20) {
            Ok(Some(protocol::Packet::Publish(p))) => p,
            other => panic!("not a PUBLISH: {other:?}"),
        }
    }

    #[test]
    fn receiver_properties_are_written_beside_the_message_ones() {
        let now = Instant::now();
        let props = Properties {
            message_expiry_interval: Some(60),
            content_type: Some(ByteStr::from("text/plain")),
            user_properties: vec![(ByteStr::from("k"), ByteStr::from("v"))],
            ..Properties::default()
        };
        let m = message(Some(props.clone()), now);
        let header = DeliveryHeader {
            qos: QoS::AtLeastOnce,
            pkid: 7,
            sub_ids: &[3, 9],
            alias: Some(Alias {
                alias: 2,
                set: true,
            }),
            ..DeliveryHeader::default()
        };
        let mut out = BytesMut::new();
        m.encode(
            &mut out,
            Protocol::V5,
            &header,
            now + Duration::from_secs(20),
        )
        .unwrap();
        let p = decode_v5(&mut out);
        assert!(out.is_empty());
        let got = p.properties.unwrap();
        let want = Properties {
            message_expiry_interval: Some(40),
            subscription_identifiers: vec![3, 9],
            topic_alias: Some(2),
            ..props
        };
        assert_eq!(*got, want);
        assert_eq!((&*p.topic, p.pkid), ("a/b", 7));

        // An alias already known to the client replaces the topic.
        let header = DeliveryHeader {
            alias: Some(Alias {
                alias: 2,
                set: false,
            }),
            ..header
        };
        m.encode(&mut out, Protocol::V5, &header, now).unwrap();
        let p = decode_v5(&mut out);
        assert_eq!(&*p.topic, "");
        assert_eq!(p.properties.unwrap().topic_alias, Some(2));
    }

    #[test]
    fn expiry_follows_the_clock_given() {
        let now = Instant::now();
        let props = Properties {
            message_expiry_interval: Some(5),
            ..Properties::default()
        };
        let m = message(Some(props), now);
        assert!(!m.is_expired(now + Duration::from_millis(4999)));
        assert!(m.is_expired(now + Duration::from_secs(5)));
        assert!(!message(None, now).is_expired(now + Duration::from_secs(1 << 30)));
    }
}
