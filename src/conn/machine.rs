//! One connection after its CONNECT was accepted, as a state machine: bytes in
//! (`handle_bytes`), bytes out (`poll_transmit`), time in (`handle_timeout`,
//! `poll_timeout`), and its end (`close`). It does no I/O and reads no clock: the driver
//! passes `now` and carries the bytes. It acts on the shared broker directly (routing a
//! PUBLISH delivers into the subscribers' sessions), which is the broker's performance
//! design.
//!
//! Call order, from the driver: `handle_bytes` whenever bytes arrived; `poll_transmit`
//! after that, after a wake-up and whenever the write buffer has room; `handle_timeout`
//! when `poll_timeout` passed; `close` once, with the first `Exit` any of them returned.

use super::exit::{limit, violation, Exit};
use super::handshake::Negotiated;
use super::login::Login;
use crate::broker::Broker;
use crate::budget::Level;
use crate::message::{Alias, Delivery, DeliveryHeader, Message};
use crate::metrics;
use crate::protocol::{
    self, Ack, ByteStr, Disconnect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, SubAck,
    Subscribe, UnsubAck, Unsubscribe,
};
use crate::router::{is_shared, valid_subscription, within_levels};
use crate::security::acl::{Access as Acl, Authorizer};
use crate::session::{RetainedWalk, Session, SessionState, MAX_ACTIVE_WALKS};
use bytes::BytesMut;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Stop moving messages from the session queue into the write buffer past this: the
/// rest waits in the (bounded) queue until the socket drains.
pub(super) const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Messages taken from the session queue per lock.
const BATCH: usize = 64;

pub struct Connection<'a> {
    broker: &'a Arc<Broker>,
    session: Arc<Session>,
    conn_id: u64,
    protocol: Protocol,
    /// 1.5 × the keep-alive [MQTT-3.1.2-22]; None without one.
    keep_alive: Option<Duration>,
    /// When the last complete packet arrived: bytes of a packet still incomplete do not
    /// keep a connection alive.
    last_packet: Instant,
    /// Kept behind a pointer: most connections have none, and this struct lives as long.
    will: Option<Arc<Message>>,
    /// 5.0 Will Delay Interval, seconds.
    will_delay: u32,
    /// The session expiry asked for at CONNECT (a DISCONNECT may not raise it from 0).
    connect_expiry: u32,
    /// Outbound window: our limit, lowered to the client's Receive Maximum (5.0).
    max_inflight: usize,
    /// The client's Maximum Packet Size (5.0): larger messages are not sent to it.
    client_max_packet: usize,
    /// The client wants reason strings (5.0 Request Problem Information).
    problem_info: bool,
    /// 5.0 topic aliases, made on first use.
    aliases: Option<Box<Aliases>>,
    /// How many topic aliases this connection may set towards the client (5.0).
    outgoing_aliases: u16,
    /// While a retained-message walk is under way, whether the queue (live messages) or
    /// the walk takes the window first next time: they take turns, so that neither
    /// starves the other.
    queue_first: bool,
    wake: Arc<Notify>,
    /// The publish rate limit, when configured.
    throttle: Option<Box<Throttle>>,
    /// Who the client is and what it may do.
    access: Box<Access>,
    /// Reused between drains of the session queue.
    batch: Vec<(Delivery, u16)>,
}

impl<'a> Connection<'a> {
    pub fn new(
        broker: &'a Arc<Broker>,
        negotiated: &Negotiated,
        login: Login,
        session: Arc<Session>,
        conn_id: u64,
        wake: Arc<Notify>,
        now: Instant,
    ) -> Connection<'a> {
        let cfg = &broker.config;
        let window = cfg.session.max_inflight_messages;
        Connection {
            broker,
            session,
            conn_id,
            protocol: negotiated.protocol,
            keep_alive: (negotiated.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(negotiated.keep_alive) * 1500)),
            last_packet: now,
            will: negotiated.will.clone(),
            will_delay: negotiated.will_delay,
            connect_expiry: negotiated.asked_expiry,
            max_inflight: negotiated
                .client_receive_maximum
                .map_or(window, |r| window.min(usize::from(r))),
            client_max_packet: negotiated
                .client_max_packet
                .map_or(usize::MAX, |m| m as usize),
            problem_info: negotiated.problem_info,
            aliases: None,
            outgoing_aliases: negotiated
                .client_topic_alias_max
                .min(cfg.mqtt.max_outgoing_topic_aliases),
            queue_first: false,
            wake,
            throttle: Throttle::new(&cfg.limits, now).map(Box::new),
            access: Box::new(Access {
                username: login.username,
                authorizer: login.authorizer,
                from_token: login.from_token,
                generation: broker.security_generation(),
            }),
            batch: Vec::new(),
        }
    }

    pub fn wake(&self) -> &Arc<Notify> {
        &self.wake
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Decodes and handles every complete packet in `rbuf`, writing answers to `out`;
    /// while the publish rate limit pauses the client, the rest stays in `rbuf` (the
    /// driver calls again after `handle_timeout`).
    pub fn handle_bytes(
        &mut self,
        rbuf: &mut BytesMut,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        let max = self.broker.config.mqtt.max_packet_size;
        loop {
            // Past its publish rate, the client's next packets wait in `rbuf` (and the
            // socket) until the pause ends, however many one read brought.
            if self.paused_until().is_some() {
                return Ok(());
            }
            match protocol::decode(rbuf, self.protocol, max) {
                Ok(Some(packet)) => {
                    self.last_packet = now;
                    self.handle_packet(packet, now, out)?;
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(violation(e.reason_code(), e.to_string())),
            }
        }
    }

    /// When `handle_timeout` must be called next: the keep-alive deadline, or the end
    /// of a pause of the publish rate limit (during which the keep-alive does not run:
    /// the client's packets are waiting on the broker).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.paused_until() {
            Some(p) => Some(p),
            None => self.keep_alive.map(|k| self.last_packet + k),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Exit> {
        if let Some(until) = self.paused_until() {
            if now < until {
                return Ok(());
            }
            // The client's packets waited meanwhile: the pause must not count against
            // its keep-alive.
            self.last_packet = self.last_packet.max(now);
            if let Some(t) = self.throttle.as_deref_mut() {
                t.resume();
            }
        }
        match self.keep_alive.map(|k| self.last_packet + k) {
            Some(deadline) if now >= deadline => Err(Exit::KeepAliveTimeout),
            _ => Ok(()),
        }
    }

    /// Until when the driver must not read from the client: it is publishing faster
    /// than `limits.publish_rate` / `publish_bytes_rate` allow.
    pub fn paused_until(&self) -> Option<Instant> {
        self.throttle.as_deref().and_then(|t| t.paused_until)
    }

    /// After a wake-up: the session may have been taken by another connection.
    pub fn check_owner(&self) -> Result<(), Exit> {
        if self.session.is_owned_by(self.conn_id) {
            Ok(())
        } else {
            Err(Exit::TakenOver)
        }
    }

    fn handle_packet(
        &mut self,
        packet: Packet,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, now, out),
            Packet::PubAck(a) => self.owned(|s| s.inflight.complete(a.pkid, false)).map(drop),
            Packet::PubRec(a) => {
                let known = self.owned(|s| s.inflight.received(a.pkid))?;
                self.send(out, Packet::PubRel(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubRel(a) => {
                let known = self.owned(|s| s.inbound_qos2.remove(&a.pkid))?;
                self.send(out, Packet::PubComp(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubComp(a) => self.owned(|s| s.inflight.complete(a.pkid, true)).map(drop),
            Packet::Subscribe(s) => self.on_subscribe(s, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u, out),
            Packet::PingReq => {
                self.send(out, Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(violation(ReasonCode::ProtocolError, "second CONNECT")),
            Packet::Auth(_) => Err(violation(
                ReasonCode::ProtocolError,
                "AUTH without an authentication method",
            )),
            other => Err(violation(
                ReasonCode::ProtocolError,
                format!("{} is not sent by clients", other.name()),
            )),
        }
    }

    fn on_publish(&mut self, mut p: Publish, now: Instant, out: &mut BytesMut) -> Result<(), Exit> {
        metrics::received();
        // Every PUBLISH counts against the rate, refused ones too: refusing costs work.
        if let Some(throttle) = self.throttle.as_deref_mut() {
            throttle.spend(p.payload.len(), now);
        }
        if let Some(props) = p.properties.as_deref_mut() {
            self.resolve_alias(&mut p.topic, props)?;
            if !props.subscription_identifiers.is_empty() {
                return Err(violation(
                    ReasonCode::ProtocolError,
                    "PUBLISH from a client carries a subscription identifier",
                ));
            }
            if props.is_empty() {
                p.properties = None;
            }
        }
        self.check_publish(&p)?;
        if let Some(code) = self.refuse_payload(&p) {
            return self.refuse_publish(&p, code, "payload is not UTF-8", out);
        }
        if let Some(why) = self.over_limit(&p) {
            return self.refuse_for_limit(&p, why, out);
        }
        if !self.access.authorizer.check(&p.topic, Acl::Write) {
            return self.refuse_unauthorized(&p, out);
        }
        if p.qos == QoS::ExactlyOnce && !self.first_delivery(p.pkid)? {
            // A resent QoS 2 PUBLISH (same id, before PUBREL) is acknowledged, not routed
            // again: this is what makes it exactly once.
            self.send(out, Packet::PubRec(self.ack(p.pkid, true)));
            return Ok(());
        }
        let (qos, pkid) = (p.qos, p.pkid);
        let message = Arc::new(Message::new(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            p.properties,
            self.session.id,
            now,
        ));
        let receivers = self.broker.publish(&message);
        let reason = if receivers == 0 && self.protocol.is_v5() {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        };
        let ack = Ack {
            pkid,
            reason,
            ..Ack::default()
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(out, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(out, Packet::PubRec(ack)),
        }
        Ok(())
    }

    /// What closes the connection in a PUBLISH: a topic or a feature the server refuses.
    fn check_publish(&self, p: &Publish) -> Result<(), Exit> {
        let cfg = &self.broker.config.mqtt;
        if p.topic.is_empty() {
            return Err(violation(
                ReasonCode::ProtocolError,
                "PUBLISH without a topic",
            ));
        }
        if !within_levels(&p.topic) {
            return Err(violation(
                ReasonCode::TopicNameInvalid,
                "topic has too many levels",
            ));
        }
        if p.retain && !cfg.retain_available {
            return Err(violation(
                ReasonCode::RetainNotSupported,
                "retain is not available",
            ));
        }
        if p.qos > cfg.max_qos {
            return Err(violation(
                ReasonCode::QoSNotSupported,
                "QoS above the server maximum",
            ));
        }
        Ok(())
    }

    /// A payload that claims to be UTF-8 and is not may be refused [MQTT-3.3.2-4].
    fn refuse_payload(&self, p: &Publish) -> Option<ReasonCode> {
        let utf8_claimed = p
            .properties
            .as_ref()
            .is_some_and(|props| props.payload_format_indicator == Some(1));
        (utf8_claimed && std::str::from_utf8(&p.payload).is_err())
            .then_some(ReasonCode::PayloadFormatInvalid)
    }

    /// The limit a PUBLISH is over, if any: its payload size, or the broker's memory
    /// budget (refused before acknowledging, so nothing acknowledged is dropped).
    fn over_limit(&self, p: &Publish) -> Option<&'static str> {
        let size_limit = self.broker.config.limits.message_size_limit;
        if size_limit > 0 && p.payload.len() > size_limit {
            return Some("payload larger than message_size_limit");
        }
        let exhausted = self.broker.memory.level() == Level::Exhausted;
        (exhausted && (p.qos != QoS::AtMostOnce || p.retain))
            .then_some("the broker's message memory (max_queued_memory) is used up")
    }

    /// A PUBLISH the ACL does not allow is not routed: 5.0 QoS 1/2 get 0x87 (Not
    /// authorized); 3.x clients, which cannot be told, get their usual acknowledgement (as
    /// from mosquitto); QoS 0 is dropped.
    fn refuse_unauthorized(&self, p: &Publish, out: &mut BytesMut) -> Result<(), Exit> {
        info!(topic = %p.topic, "PUBLISH not authorized");
        metrics::not_authorized();
        if p.qos == QoS::AtMostOnce {
            return Ok(());
        }
        if self.protocol.is_v5() {
            return self.refuse_publish(p, ReasonCode::NotAuthorized, "not authorized", out);
        }
        let ack = self.ack(p.pkid, true);
        match p.qos {
            QoS::AtLeastOnce => self.send(out, Packet::PubAck(ack)),
            _ => self.send(out, Packet::PubRec(ack)),
        }
        Ok(())
    }

    /// A PUBLISH over a limit: a QoS 0 one is dropped; a QoS 1/2 one is refused with 0x97
    /// (Quota exceeded; 5.0 has no "too large" code for acknowledgements), and a 3.x
    /// client, which cannot be told, is disconnected without an acknowledgement.
    fn refuse_for_limit(
        &self,
        p: &Publish,
        why: &'static str,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        metrics::dropped();
        if p.qos == QoS::AtMostOnce {
            debug!(topic = %p.topic, "QoS 0 message dropped: {why}");
            return Ok(());
        }
        if !self.protocol.is_v5() {
            return Err(limit(ReasonCode::QuotaExceeded, why));
        }
        self.refuse_publish(p, ReasonCode::QuotaExceeded, why, out)
    }

    /// Refuses a PUBLISH without routing it: a reason code in the acknowledgement, or a
    /// DISCONNECT for QoS 0, which has none.
    fn refuse_publish(
        &self,
        p: &Publish,
        code: ReasonCode,
        why: &'static str,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        let ack = self.ack_with(p.pkid, code, why);
        match p.qos {
            QoS::AtMostOnce => return Err(violation(code, why)),
            QoS::AtLeastOnce => self.send(out, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(out, Packet::PubRec(ack)),
        }
        Ok(())
    }

    /// Records an inbound QoS 2 packet id; false if it is a resend. Receive Maximum is
    /// announced to 5.0 clients only; a 3.x client cannot know it, and its unreleased ids
    /// are bounded by the packet id space anyway.
    fn first_delivery(&self, pkid: u16) -> Result<bool, Exit> {
        let receive_max = if self.protocol.is_v5() {
            usize::from(self.broker.config.mqtt.receive_maximum)
        } else {
            usize::MAX
        };
        self.owned(|s| {
            if s.inbound_qos2.contains(&pkid) {
                Ok(false)
            } else if s.inbound_qos2.len() >= receive_max {
                Err(violation(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more unreleased QoS 2 publishes than Receive Maximum",
                ))
            } else {
                s.inbound_qos2.insert(pkid);
                Ok(true)
            }
        })?
    }

    /// 5.0 Topic Alias: a PUBLISH with a topic and an alias sets it; one with an empty
    /// topic uses it. The alias itself never leaves this connection.
    fn resolve_alias(&mut self, topic: &mut ByteStr, props: &mut Properties) -> Result<(), Exit> {
        let Some(alias) = props.topic_alias.take() else {
            return Ok(());
        };
        if alias == 0 || alias > self.broker.config.mqtt.topic_alias_maximum {
            return Err(violation(
                ReasonCode::TopicAliasInvalid,
                "topic alias out of range",
            ));
        }
        let incoming = &mut self.aliases.get_or_insert_default().incoming;
        if topic.is_empty() {
            match incoming.get(&alias) {
                Some(t) => *topic = t.clone(),
                None => return Err(violation(ReasonCode::ProtocolError, "unknown topic alias")),
            }
        } else {
            // A copy, so the alias does not pin this packet's read buffer.
            incoming.insert(alias, ByteStr::from(&**topic));
        }
        Ok(())
    }

    fn on_subscribe(&mut self, s: Subscribe, out: &mut BytesMut) -> Result<(), Exit> {
        let cfg = &self.broker.config.mqtt;
        let v5 = self.protocol.is_v5();
        let sub_id = s.properties.subscription_identifiers.first().copied();
        if sub_id.is_some() && !cfg.subscription_identifiers_available {
            return Err(violation(
                ReasonCode::SubscriptionIdentifiersNotSupported,
                "subscription identifiers are not available",
            ));
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut walks = Vec::new();
        for f in s.filters {
            let shared = is_shared(&f.filter);
            if shared && f.options.no_local {
                return Err(violation(
                    ReasonCode::ProtocolError,
                    "No Local on a shared subscription",
                ));
            }
            // A copy, so the subscription does not pin this packet's read buffer.
            let filter = ByteStr::from(&*f.filter);
            if let Some(code) = self.refuse_filter(&filter, shared)? {
                debug!(%filter, ?code, "refused topic filter");
                codes.push(if v5 {
                    code
                } else {
                    ReasonCode::UnspecifiedError
                });
                continue;
            }
            let mut options = f.options;
            options.qos = options.qos.min(cfg.max_qos);
            let existed = self
                .broker
                .subscribe(&self.session, self.conn_id, &filter, options, sub_id)
                .map_err(|_| Exit::TakenOver)?;
            debug!(%filter, qos = ?options.qos, "subscribed");
            codes.push(ReasonCode::granted(options.qos));
            // Retained messages are not sent for shared subscriptions (MQTT 5.0, 4.8.2).
            let wanted = match options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if !shared && wanted {
                walks.push((filter, options.qos));
            }
        }
        self.send(
            out,
            Packet::SubAck(SubAck {
                pkid: s.pkid,
                codes,
                ..SubAck::default()
            }),
        );
        // Retained messages follow the SUBACK: `poll_transmit` sends them, paced by the
        // client, after what this read wrote.
        if !walks.is_empty() {
            self.owned(|s| {
                for (filter, qos) in walks {
                    s.start_walk(filter, qos, sub_id);
                }
            })?;
        }
        Ok(())
    }

    /// Why a SUBSCRIBE to `filter` is refused (the 5.0 code), if it is: not a valid
    /// filter, not allowed by the ACL, a feature switched off, or past
    /// `limits.max_subscriptions` (a subscription the session has is only replaced).
    fn refuse_filter(&self, filter: &str, shared: bool) -> Result<Option<ReasonCode>, Exit> {
        let cfg = &self.broker.config;
        let code = if !valid_subscription(filter) {
            ReasonCode::TopicFilterInvalid
        } else if !self.access.authorizer.check(filter, Acl::Subscribe) {
            metrics::not_authorized();
            ReasonCode::NotAuthorized
        } else if shared && !cfg.mqtt.shared_subscription_available {
            ReasonCode::SharedSubscriptionsNotSupported
        } else if !cfg.mqtt.wildcard_subscription_available && filter.contains(['+', '#']) {
            ReasonCode::WildcardSubscriptionsNotSupported
        } else {
            let max = cfg.limits.max_subscriptions;
            let full = max > 0
                && self.owned(|s| {
                    s.subscriptions.len() >= max && !s.subscriptions.contains_key(filter)
                })?;
            if !full {
                return Ok(None);
            }
            ReasonCode::QuotaExceeded
        };
        Ok(Some(code))
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe, out: &mut BytesMut) -> Result<(), Exit> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self
                .broker
                .unsubscribe(&self.session, self.conn_id, f)
                .map_err(|_| Exit::TakenOver)?;
            codes.push(if existed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        if !self.protocol.is_v5() {
            codes.clear();
        }
        self.send(
            out,
            Packet::UnsubAck(UnsubAck {
                pkid: u.pkid,
                codes,
                ..UnsubAck::default()
            }),
        );
        Ok(())
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Exit> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            // A session that was to end with the connection cannot be kept now [MQTT-3.14.2-2].
            if self.connect_expiry == 0 && expiry != 0 {
                return Err(violation(
                    ReasonCode::ProtocolError,
                    "DISCONNECT sets a session expiry after CONNECT set none",
                ));
            }
            let expiry = expiry.min(self.broker.config.mqtt.max_session_expiry_interval);
            self.session.set_expiry(self.conn_id, expiry);
        }
        Err(Exit::Disconnect {
            will: d.reason == ReasonCode::DisconnectWithWill,
        })
    }

    /// Writes what the session has for the client into `out`: in-flight messages not yet
    /// sent on this connection (after a resume), retained messages of new subscriptions,
    /// then the queue, as far as the in-flight window and the write buffer allow.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), Exit> {
        self.refresh_access();
        let window = self.max_inflight;
        loop {
            if out.len() >= WRITE_HIGH_WATER {
                return Ok(());
            }
            let mut batch = std::mem::take(&mut self.batch);
            let mut resend = Vec::new();
            let queue_first = self.queue_first;
            let authorizer = &self.access.authorizer;
            let readable = |d: &Delivery| authorizer.check(&d.message.topic, Acl::Read);
            let mut unreadable = 0;
            let walk = self.owned(|s| {
                let room = window.saturating_sub(s.inflight.outstanding());
                s.inflight.resend(room, &mut resend);
                // After a resume, whoever resumed the session may not read all of what
                // was in flight: checked like any other delivery.
                resend.retain(|(pkid, d)| match d {
                    Some(d) if !readable(d) => {
                        s.inflight.forget(*pkid);
                        unreadable += 1;
                        false
                    }
                    _ => true,
                });
                let walk = s.walks.front().cloned();
                // The hot path: one lock per batch when no walk is under way. During a
                // walk, the queue and the walk take turns at the window: live messages
                // must not wait (and overflow the queue) behind a long walk, nor retained
                // ones behind a steady stream of live ones.
                if walk.is_none() || queue_first {
                    unreadable += s.take_sendable(window, BATCH, now, &readable, &mut batch);
                }
                walk.map(|w| (w, window.saturating_sub(s.inflight.outstanding())))
            })?;
            for (pkid, delivery) in &resend {
                match delivery {
                    Some(d) => {
                        self.write_delivery(d, *pkid, true, now, out);
                    }
                    None => self.send(out, Packet::PubRel(self.ack(*pkid, true))),
                }
            }
            let mut walked = false;
            if let Some((walk, room)) = walk {
                walked = self.walk_step(walk, room, now, out)?;
                if !queue_first {
                    let authorizer = &self.access.authorizer;
                    let readable = |d: &Delivery| authorizer.check(&d.message.topic, Acl::Read);
                    unreadable +=
                        self.owned(|s| s.take_sendable(window, BATCH, now, &readable, &mut batch))?;
                }
                self.queue_first = !queue_first;
            }
            if unreadable > 0 {
                debug!(
                    count = unreadable,
                    "messages the client may not read not sent"
                );
                (0..unreadable).for_each(|_| metrics::not_authorized());
            }
            let n = batch.len();
            let mut too_large = Vec::new();
            for (d, pkid) in batch.drain(..) {
                if !self.write_delivery(&d, pkid, false, now, out) && pkid != 0 {
                    too_large.push(pkid);
                }
            }
            self.batch = batch;
            self.forget(too_large)?;
            metrics::sent(n as u64);
            if n + unreadable < BATCH && !walked && resend.is_empty() {
                return Ok(());
            }
        }
    }

    /// Sends the next retained messages of the walk `walk`, as many as `room` in the
    /// window allows (any number at QoS 0). Returns whether the walk moved on.
    fn walk_step(
        &mut self,
        walk: RetainedWalk,
        room: usize,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<bool, Exit> {
        let limit = if walk.qos == QoS::AtMostOnce {
            BATCH
        } else {
            room.min(BATCH)
        };
        if limit == 0 {
            return Ok(false);
        }
        let mut found = Vec::new();
        let (last, done) = self.broker.router.retained_step(
            &walk.filter,
            walk.after.as_deref(),
            limit,
            now,
            &mut found,
        );
        // Retained messages are deliveries like any other: the client must be allowed to read them.
        let authorizer = &self.access.authorizer;
        let before = found.len();
        found.retain(|m| authorizer.check(&m.topic, Acl::Read));
        (found.len()..before).for_each(|_| metrics::not_authorized());
        let sends = self.owned(|s| {
            if done {
                s.walks.pop_front();
            } else if let Some(mut w) = s.walks.pop_front() {
                // Round robin over the first few walks, so a long one does not hold up
                // the retained messages of a later subscription.
                w.after = last;
                s.walks.insert((MAX_ACTIVE_WALKS - 1).min(s.walks.len()), w);
            }
            found
                .into_iter()
                .map(|m| {
                    let qos = m.qos.min(walk.qos);
                    let mut d = Delivery::new(m, qos, true);
                    d.sub_ids.extend(walk.sub_id);
                    let pkid = s.inflight.send(&d);
                    (d, pkid)
                })
                .collect::<Vec<_>>()
        })?;
        let mut too_large = Vec::new();
        for (d, pkid) in &sends {
            if !self.write_delivery(d, *pkid, false, now, out) && *pkid != 0 {
                too_large.push(*pkid);
            }
        }
        self.forget(too_large)?;
        metrics::sent(sends.len() as u64);
        Ok(true)
    }

    /// Drops messages that could not be sent from the window, as if acknowledged.
    fn forget(&self, pkids: Vec<u16>) -> Result<(), Exit> {
        if pkids.is_empty() {
            return Ok(());
        }
        debug!(
            count = pkids.len(),
            "messages larger than the client's maximum packet size not sent"
        );
        self.owned(|s| pkids.iter().for_each(|p| s.inflight.forget(*p)))
    }

    /// Appends one PUBLISH; false if it was larger than the client accepts and so left
    /// out [MQTT-3.1.2-25] (it then counts as delivered).
    fn write_delivery(
        &mut self,
        d: &Delivery,
        pkid: u16,
        dup: bool,
        now: Instant,
        out: &mut BytesMut,
    ) -> bool {
        let before = out.len();
        let alias = self.outgoing_alias(&d.message.topic);
        let header = DeliveryHeader {
            dup,
            qos: d.qos,
            retain: d.retain,
            pkid,
            sub_ids: &d.sub_ids,
            alias,
        };
        if let Err(e) = d.message.encode(out, self.protocol, &header, now) {
            warn!(topic = %d.message.topic, "cannot encode PUBLISH: {e}");
        }
        if out.len() - before <= self.client_max_packet {
            return true;
        }
        out.truncate(before);
        if let (Some(a), Some(aliases)) = (alias, &mut self.aliases) {
            if a.set {
                aliases.outgoing.forget(a.alias);
            }
        }
        false
    }

    /// The server-to-client topic alias for `topic`, if this connection uses them.
    fn outgoing_alias(&mut self, topic: &ByteStr) -> Option<Alias> {
        // An alias costs three bytes: shorter topics are cheaper sent whole.
        if self.outgoing_aliases == 0 || topic.len() <= 3 {
            return None;
        }
        let max = self.outgoing_aliases;
        Some(
            self.aliases
                .get_or_insert_default()
                .outgoing
                .alias_for(topic, max),
        )
    }

    /// Runs `f` on the session state, or ends the connection if the session was taken.
    fn owned<T>(&self, f: impl FnOnce(&mut SessionState) -> T) -> Result<T, Exit> {
        self.session
            .with_state(self.conn_id, f)
            .map_err(|_| Exit::TakenOver)
    }

    /// An acknowledgement; in 5.0 an unknown packet id is reported as such.
    fn ack(&self, pkid: u16, known: bool) -> Ack {
        if known || !self.protocol.is_v5() {
            Ack {
                pkid,
                ..Ack::default()
            }
        } else {
            self.ack_with(
                pkid,
                ReasonCode::PacketIdentifierNotFound,
                "unknown packet identifier",
            )
        }
    }

    /// A 5.0 acknowledgement with a reason code, and a reason string if the client wants
    /// them.
    fn ack_with(&self, pkid: u16, code: ReasonCode, why: &'static str) -> Ack {
        let mut ack = Ack {
            pkid,
            reason: code,
            ..Ack::default()
        };
        if self.problem_info {
            ack.properties.reason_string = Some(ByteStr::from_static(why));
        }
        ack
    }

    /// Appends `packet` to `out`. A packet over the client's Maximum Packet Size loses
    /// its reason string and user properties [MQTT-3.4.2-2 and alike]; if it is still
    /// too large, it is not sent [MQTT-3.1.2-24].
    pub fn send(&self, out: &mut BytesMut, packet: Packet) {
        send(out, packet, self.protocol, self.client_max_packet)
    }

    /// The client's ACL, rebuilt from the files if they were reloaded since.
    fn refresh_access(&mut self) {
        let generation = self.broker.security_generation();
        let a = &mut *self.access;
        if a.generation != generation && !a.from_token {
            let client_id = &self.session.client_id;
            a.authorizer = self
                .broker
                .security
                .authorizer(a.username.as_deref(), client_id, None);
        }
        a.generation = generation;
    }

    /// Ends the connection: the will, the session bookkeeping, and in 5.0 a last
    /// DISCONNECT with the reason, written to `out`.
    pub fn close(mut self, exit: &Exit, now: Instant, out: &mut BytesMut) {
        exit.log();
        let outcome = exit.outcome();
        let will = self.will.take().filter(|_| outcome.publish_will);
        // A delayed will waits in the session; it is cancelled if the session resumes.
        let (will_now, will_later) = if self.will_delay > 0 {
            (None, will)
        } else {
            (will, None)
        };
        if let Some(will) = &will_now {
            self.broker.publish_will(will, now);
        }
        match self.session.detach(self.conn_id, will_later.clone()) {
            Some(d) => self
                .broker
                .detached(&self.session, self.conn_id, d, self.will_delay, now),
            // Taken over. If the session ended with it (Clean Start), so does the delay
            // of the will; if it was resumed, the will is cancelled [MQTT-3.1.3-9].
            None if self.session.has_ended() => {
                if let Some(will) = &will_later {
                    self.broker.publish_will(will, now);
                }
            }
            None => {}
        }
        let dropped = self.session.dropped();
        if dropped > 0 {
            info!(
                dropped,
                "messages dropped for this session because its queue was full"
            );
        }
        if let (Some(code), true) = (outcome.disconnect, self.protocol.is_v5()) {
            let mut d = Disconnect {
                reason: code,
                ..Disconnect::default()
            };
            if self.problem_info {
                d.properties.reason_string = Some(ByteStr::from(exit.reason().into_owned()));
            }
            self.send(out, Packet::Disconnect(d));
        }
    }
}

/// `Connection::send`, for the handshake too.
pub(super) fn send(out: &mut BytesMut, mut packet: Packet, protocol: Protocol, max: usize) {
    let before = out.len();
    if let Err(e) = protocol::encode(&packet, protocol, out) {
        warn!("cannot encode {}: {e}", packet.name());
        return;
    }
    if out.len() - before <= max {
        return;
    }
    out.truncate(before);
    if let Some(props) = properties_mut(&mut packet) {
        props.reason_string = None;
        props.user_properties.clear();
        if protocol::encode(&packet, protocol, out).is_ok() && out.len() - before <= max {
            return;
        }
        out.truncate(before);
    }
    debug!(
        "{} larger than the client's maximum packet size; not sent",
        packet.name()
    );
}

/// The properties of a packet the server sends with a reason code.
fn properties_mut(packet: &mut Packet) -> Option<&mut Properties> {
    match packet {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            Some(&mut a.properties)
        }
        Packet::SubAck(a) => Some(&mut a.properties),
        Packet::UnsubAck(a) => Some(&mut a.properties),
        Packet::Disconnect(d) => Some(&mut d.properties),
        _ => None,
    }
}

/// Who the client is, for the ACL.
struct Access {
    username: Option<String>,
    authorizer: Authorizer,
    /// The rules came with a token, not from the ACL file.
    from_token: bool,
    /// `Broker::security_generation` when `authorizer` was built.
    generation: u64,
}

/// Token buckets for the publish rate of one client: a burst of `publish_burst`
/// seconds' worth, refilled at the rates. Past them, reading pauses: TCP backpressure
/// slows the client, nothing is refused or lost. A message is read when the message
/// bucket holds one; its size is known only once it is read, so the byte bucket may be
/// overdrawn by one message, and the next waits until the debt is paid back.
struct Throttle {
    /// Messages and bytes per second (0 = not limited).
    rates: [f64; 2],
    burst: f64,
    tokens: [f64; 2],
    last: Instant,
    paused_until: Option<Instant>,
}

impl Throttle {
    fn new(limits: &crate::config::Limits, now: Instant) -> Option<Throttle> {
        let rates = [limits.publish_rate as f64, limits.publish_bytes_rate as f64];
        if rates == [0.0, 0.0] {
            return None;
        }
        let burst = f64::from(limits.publish_burst);
        Some(Throttle {
            rates,
            burst,
            tokens: rates.map(|r| r * burst),
            last: now,
            paused_until: None,
        })
    }

    /// Takes one message of `bytes` from the buckets; pauses when one runs dry.
    fn spend(&mut self, bytes: usize, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut wait: f64 = 0.0;
        // What must be in each bucket before the next message is read: a whole message,
        // and no debt of bytes.
        let floor = [1.0, 0.0];
        for (i, cost) in [1.0, bytes as f64].into_iter().enumerate() {
            let rate = self.rates[i];
            if rate == 0.0 {
                continue;
            }
            self.tokens[i] = (self.tokens[i] + elapsed * rate).min(rate * self.burst) - cost;
            if self.tokens[i] < floor[i] {
                wait = wait.max((floor[i] - self.tokens[i]) / rate);
            }
        }
        if wait > 0.0 {
            self.paused_until = Some(now + Duration::from_secs_f64(wait));
        }
    }

    fn resume(&mut self) {
        self.paused_until = None;
    }
}

/// The topic aliases of one 5.0 connection.
#[derive(Default)]
struct Aliases {
    /// Set by the client.
    incoming: FxHashMap<u16, ByteStr>,
    /// Set by the server.
    outgoing: OutgoingAliases,
}

/// Server-to-client topic aliases: at most a fixed number per connection, the least
/// recently used one replaced by a new topic.
#[derive(Default)]
struct OutgoingAliases {
    by_topic: FxHashMap<ByteStr, u16>,
    /// Alias n is `slots[n - 1]`: its topic and when it was last used.
    slots: Vec<(ByteStr, u64)>,
    clock: u64,
}

impl OutgoingAliases {
    fn alias_for(&mut self, topic: &ByteStr, max: u16) -> Alias {
        self.clock += 1;
        if let Some(&alias) = self.by_topic.get(topic) {
            self.slots[usize::from(alias) - 1].1 = self.clock;
            return Alias { alias, set: false };
        }
        // A copy, so that the alias does not pin the publisher's read buffer.
        let topic = ByteStr::from(&**topic);
        let index = if self.slots.len() < usize::from(max) {
            self.slots.push((topic.clone(), self.clock));
            self.slots.len() - 1
        } else {
            let (index, _) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, used))| *used)
                .unwrap_or((0, &(ByteStr::new(), 0)));
            let old = std::mem::replace(&mut self.slots[index], (topic.clone(), self.clock));
            self.by_topic.remove(&old.0);
            index
        };
        let alias = index as u16 + 1;
        self.by_topic.insert(topic, alias);
        Alias { alias, set: true }
    }

    /// The client never saw `alias` set: free it.
    fn forget(&mut self, alias: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(alias) - 1) {
            self.by_topic.remove(&slot.0);
            *slot = (ByteStr::new(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_aliases_replace_the_least_recently_used() {
        let mut a = OutgoingAliases::default();
        let t = |s: &str| ByteStr::from(s);
        assert_eq!(
            a.alias_for(&t("one"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("two"), 2),
            Alias {
                alias: 2,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("one"), 2),
            Alias {
                alias: 1,
                set: false
            }
        );
        // "two" is the least recently used.
        assert_eq!(
            a.alias_for(&t("three"), 2),
            Alias {
                alias: 2,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("two"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        a.forget(1);
        assert_eq!(
            a.alias_for(&t("four"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("three"), 2),
            Alias {
                alias: 2,
                set: false
            }
        );
        assert!(a.slots.len() <= 2 && a.by_topic.len() <= 2);
    }
}
