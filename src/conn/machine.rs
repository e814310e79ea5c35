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

use super::aliases::Aliases;
use super::auth::{Exchange, Next};
use super::exit::{limit, violation, Exit};
use super::handshake::Negotiated;
use super::login::Login;
use super::subscribe;
use crate::broker::Broker;
use crate::message::{Alias, Delivery, DeliveryHeader, Message};
use crate::metrics::{self, Counter, Dropped};
use crate::protocol::{
    self, Ack, Auth, ByteStr, Disconnect, Packet, Properties, Protocol, Publish, QoS, ReasonCode,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::router::{is_shared, within_levels};
use crate::security::acl::{Access as Acl, Authorizer};
use crate::session::link::Woken;
use crate::session::outbox::{Due, Outbox, Progress};
use crate::session::{Session, SessionState, Wire};
use crate::throttle::Throttle;
use bytes::BytesMut;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Stop moving messages from the session queue into the write buffer past this: the
/// rest waits in the (bounded) queue until the socket drains.
pub(super) const WRITE_HIGH_WATER: usize = 64 * 1024;

pub struct Connection {
    /// Owned, not borrowed: an idle connection is parked without its task
    /// (`transport::park`), and what it holds must outlive the task.
    broker: Arc<Broker>,
    session: Arc<Session>,
    conn_id: u64,
    protocol: Protocol,
    /// In seconds, as negotiated (0: none): 2 bytes rather than a 16-byte
    /// `Option<Duration>`, for a parked connection's box to fit a smaller allocation.
    keep_alive: u16,
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
    /// Shared with the session's `Link`: wake-ups, an administrator's kick, the admin
    /// API's record.
    wire: Arc<Wire>,
    /// The publish rate limit, when configured.
    throttle: Option<Box<Throttle>>,
    /// Who the client is and what the session has due for it, in one allocation: this
    /// struct lives as long as the connection.
    held: Box<Held>,
    /// Acknowledgements were written that must not reach the client before the store
    /// has what they promise (`sync = "always"`).
    awaits_disk: bool,
    /// Messages flowed (a PUBLISH or its acknowledgements, either way) since the driver
    /// last asked: a connection without them may be parked (`take_busy`).
    busy: bool,
}

impl Connection {
    pub fn new(
        broker: Arc<Broker>,
        negotiated: &Negotiated,
        login: Login,
        session: Arc<Session>,
        conn_id: u64,
        wire: Arc<Wire>,
        now: Instant,
    ) -> Connection {
        let cfg = &broker.config;
        let window = cfg.session.max_inflight_messages;
        let throttle = Throttle::new(&cfg.limits, now).map(Box::new);
        let generation = broker.security_generation();
        let outgoing_aliases = negotiated
            .client_topic_alias_max
            .min(cfg.mqtt.max_outgoing_topic_aliases);
        Connection {
            session,
            conn_id,
            protocol: negotiated.protocol,
            keep_alive: negotiated.keep_alive,
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
            outgoing_aliases,
            wire,
            throttle,
            held: Box::new(Held {
                access: Access {
                    username: login.username.map(Into::into),
                    authorizer: login.authorizer,
                    token_deadline: login.token_valid_for.map(|d| now + d),
                    generation,
                    method: login.method.map(Box::new),
                    reauth: None,
                },
                outbox: Outbox::default(),
            }),
            awaits_disk: false,
            busy: false,
            broker,
        }
    }

    /// 1.5 × the keep-alive after the last complete packet [MQTT-3.1.2-22]; None without one.
    fn keep_alive_deadline(&self) -> Option<Instant> {
        let k = u64::from(self.keep_alive);
        (k > 0).then(|| self.last_packet + Duration::from_millis(k * 1500))
    }

    /// Whether messages flowed since the last call (and clears it).
    pub fn take_busy(&mut self) -> bool {
        std::mem::take(&mut self.busy)
    }

    pub fn wire(&self) -> &Arc<Wire> {
        &self.wire
    }

    pub fn client_id(&self) -> &str {
        &self.session.client_id
    }

    /// Gives back what is reused between batches: the connection is being parked.
    pub fn release(&mut self) {
        self.held.outbox.release();
    }

    /// The broker this connection belongs to.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Whether the driver must wait for the store before writing (and clears it).
    pub fn take_awaits_disk(&mut self) -> bool {
        std::mem::take(&mut self.awaits_disk)
    }

    /// The session this connection owns, and its id as the owner (for `Journal::refill`).
    pub fn session(&self) -> (&Session, u64) {
        (&self.session, self.conn_id)
    }

    /// Completes once a publisher, a takeover, an administrator or the shutdown woke
    /// this connection (then `check_owner`).
    pub fn woken(&self) -> Woken<'_> {
        self.wire.woken()
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
        // Counted once per read, not per packet.
        let mut tally = metrics::Tally::default();
        let result = loop {
            // Past its publish rate, the client's next packets wait in `rbuf` (and the
            // socket) until the pause ends, however many one read brought.
            if self.paused_until().is_some() {
                break Ok(());
            }
            match protocol::decode(rbuf, self.protocol, max) {
                Ok(Some(packet)) => {
                    self.last_packet = now;
                    tally.packets += 1;
                    if let Packet::Publish(p) = &packet {
                        tally.publish(p.qos, p.payload.len());
                    }
                    self.busy |= !matches!(
                        packet,
                        Packet::PingReq | Packet::Subscribe(_) | Packet::Unsubscribe(_)
                    );
                    if let Err(exit) = self.handle_packet(packet, now, out) {
                        break Err(exit);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(violation(e.reason_code(), e.to_string())),
            }
        };
        tally.received();
        result
    }

    /// When `handle_timeout` must be called next: the keep-alive deadline, or the end
    /// of a pause of the publish rate limit (during which the keep-alive does not run:
    /// the client's packets are waiting on the broker), or the login token's expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = match self.paused_until() {
            Some(p) => Some(p),
            None => self.keep_alive_deadline(),
        };
        match (timer, self.held.access.token_deadline) {
            (Some(t), Some(d)) => Some(t.min(d)),
            (t, d) => t.or(d),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Exit> {
        if self.held.access.token_deadline.is_some_and(|d| now >= d) {
            return Err(Exit::TokenExpired);
        }
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
        match self.keep_alive_deadline() {
            Some(deadline) if now >= deadline => Err(Exit::KeepAliveTimeout),
            _ => Ok(()),
        }
    }

    /// Until when the driver must not read from the client: it is publishing faster
    /// than `limits.publish_rate` / `publish_bytes_rate` allow.
    pub fn paused_until(&self) -> Option<Instant> {
        self.throttle.as_deref().and_then(|t| t.paused_until)
    }

    /// After a wake-up: the session may have been taken by another connection, or an
    /// administrator may have closed this one.
    pub fn check_owner(&self) -> Result<(), Exit> {
        if !self.session.is_owned_by(self.conn_id) {
            return Err(Exit::TakenOver);
        }
        if self.wire.is_kicked() {
            return Err(Exit::Administrative);
        }
        Ok(())
    }

    fn handle_packet(
        &mut self,
        packet: Packet,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, now, out),
            Packet::PubAck(a) => self.owned(|s| s.acknowledge(a.pkid, false)).map(drop),
            Packet::PubRec(a) => {
                let known = self.owned(|s| s.pubrec(a.pkid))?;
                // Once the client has the PUBREL it may complete and forget the id: a
                // stored session must come back from a crash resending the PUBREL, not the
                // PUBLISH (which the client would take for a new message).
                self.wait_for_disk_if_stored();
                self.send(out, Packet::PubRel(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubRel(a) => {
                let known = self.owned(|s| s.release_incoming(a.pkid))?;
                // Once the client has the PUBCOMP it may reuse the id: a stored session
                // must not come back from a crash still holding it (the new message would
                // be taken for a resend and dropped).
                self.wait_for_disk_if_stored();
                self.send(out, Packet::PubComp(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubComp(a) => self.owned(|s| s.acknowledge(a.pkid, true)).map(drop),
            Packet::Subscribe(s) => self.on_subscribe(s, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u, out),
            Packet::PingReq => {
                self.send(out, Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(violation(ReasonCode::ProtocolError, "second CONNECT")),
            Packet::Auth(a) => self.on_auth(a, out),
            other => Err(violation(
                ReasonCode::ProtocolError,
                format!("{} is not sent by clients", other.name()),
            )),
        }
    }

    fn on_publish(&mut self, mut p: Publish, now: Instant, out: &mut BytesMut) -> Result<(), Exit> {
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
        if let Some((reason, why)) = self.over_limit(&p) {
            return self.refuse_for_limit(&p, reason, why, out);
        }
        if !self.held.access.authorizer.check(&p.topic, Acl::Write) {
            return self.refuse_unauthorized(&p, out);
        }
        if p.qos == QoS::ExactlyOnce && !self.first_delivery(p.pkid)? {
            // A resent QoS 2 PUBLISH (same id, before PUBREL) is acknowledged, not routed
            // again: this is what makes it exactly once. It promises what the first PUBREC
            // did, which may still be waiting for the disk (on a connection taken over).
            self.wait_for_disk();
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
        if qos != QoS::AtMostOnce {
            self.wait_for_disk();
        }
        Ok(())
    }

    /// Under `sync = "always"`, what this read wrote waits until the store has what it
    /// promises (the driver's `await_disk`).
    fn wait_for_disk(&mut self) {
        if self.broker.journal().acks_wait() {
            self.awaits_disk = true;
        }
    }

    /// `wait_for_disk`, for an answer that promises something of a stored session only
    /// (a SUBACK, an UNSUBACK, a PUBREL, a PUBCOMP).
    fn wait_for_disk_if_stored(&mut self) {
        if self.broker.journal().acks_wait() && self.session.inspect(SessionState::is_persisted) {
            self.awaits_disk = true;
        }
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

    /// The limit a PUBLISH is over, if any: its payload size, or no room for it in the
    /// broker's memory or the store (refused before acknowledging, so nothing acknowledged
    /// is dropped).
    fn over_limit(&self, p: &Publish) -> Option<(Dropped, &'static str)> {
        let size_limit = self.broker.config.limits.message_size_limit;
        if size_limit > 0 && p.payload.len() > size_limit {
            return Some((Dropped::TooLarge, "payload larger than message_size_limit"));
        }
        let full = self.broker.no_room(p.qos, p.retain)?;
        Some((Dropped::Memory, full.why()))
    }

    /// A PUBLISH the ACL does not allow is not routed: 5.0 QoS 1/2 get 0x87 (Not
    /// authorized); 3.x clients, which cannot be told, get their usual acknowledgement (as
    /// from mosquitto); QoS 0 is dropped.
    fn refuse_unauthorized(&self, p: &Publish, out: &mut BytesMut) -> Result<(), Exit> {
        info!(topic = %p.topic, "PUBLISH not authorized");
        metrics::dropped(Dropped::NotAuthorized);
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
        reason: Dropped,
        why: &'static str,
        out: &mut BytesMut,
    ) -> Result<(), Exit> {
        metrics::dropped(reason);
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
            if s.has_incoming(pkid) {
                Ok(false)
            } else if s.incoming_count() >= receive_max {
                Err(violation(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more unreleased QoS 2 publishes than Receive Maximum",
                ))
            } else {
                Ok(s.receive_incoming(pkid))
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
            if subscribe::wants_retained(options.retain_handling, existed, shared) {
                walks.push((filter, options.qos));
            }
        }
        self.wait_for_disk_if_stored();
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

    /// Why a SUBSCRIBE to `filter` is refused (the 5.0 code), if it is.
    fn refuse_filter(&self, filter: &str, shared: bool) -> Result<Option<ReasonCode>, Exit> {
        let authorizer = &self.held.access.authorizer;
        subscribe::refusal(
            &self.broker,
            authorizer,
            &self.session,
            self.conn_id,
            filter,
            shared,
        )
        .map_err(|_| Exit::TakenOver)
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
        self.wait_for_disk_if_stored();
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

    /// Re-authentication (MQTT 5.0, 4.12.1): AUTH 0x19 starts a new exchange with the
    /// method of the CONNECT, AUTH 0x18 continues it; success is answered with AUTH 0x00
    /// and the client's ACL rebuilt, failure ends the connection (DISCONNECT 0x87).
    fn on_auth(&mut self, a: Auth, out: &mut BytesMut) -> Result<(), Exit> {
        let Some(method) = self.held.access.method.as_deref().cloned() else {
            return Err(violation(
                ReasonCode::ProtocolError,
                "AUTH without an authentication method",
            ));
        };
        if a.properties.authentication_method.as_ref() != Some(&method) {
            return Err(violation(
                ReasonCode::ProtocolError,
                "AUTH with another authentication method than CONNECT's",
            ));
        }
        let next = match (a.reason, self.held.access.reauth.as_mut()) {
            (ReasonCode::Reauthenticate, None) => {
                let client_id = &self.session.client_id;
                let data = a.properties.authentication_data;
                let methods = &self.broker.auth_methods;
                let (exchange, next) = Exchange::start(methods, &method, client_id, data);
                self.held.access.reauth = exchange.map(Box::new);
                next
            }
            (ReasonCode::ContinueAuthentication, Some(exchange)) => {
                exchange.on_packet(Packet::Auth(a))
            }
            _ => {
                return Err(violation(
                    ReasonCode::ProtocolError,
                    "AUTH out of step with re-authentication",
                ))
            }
        };
        match next {
            Next::Challenge(auth) => self.send(out, Packet::Auth(*auth)),
            Next::Refuse(code) => {
                metrics::auth_failure();
                return Err(limit(code, "re-authentication failed"));
            }
            Next::Done { data, username } => {
                self.held.access.reauth = None;
                if username.is_some() && username.as_deref() != self.held.access.username.as_deref()
                {
                    return Err(limit(
                        ReasonCode::NotAuthorized,
                        "re-authentication as another user",
                    ));
                }
                let mut done = Auth::default();
                done.properties.authentication_method = Some(method);
                done.properties.authentication_data = data;
                self.send(out, Packet::Auth(done));
                self.rebuild_access(self.broker.security_generation());
            }
        }
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
    /// Returns `Idle` when done for now, else what the driver does before calling again:
    /// `Refill` (the rest of the queue is on disk: `Journal::refill`) or `Yield` (a
    /// retained walk found nothing for a while: let other tasks run).
    pub fn poll_transmit(&mut self, now: Instant, out: &mut BytesMut) -> Result<Progress, Exit> {
        self.refresh_access();
        loop {
            if out.len() >= WRITE_HIGH_WATER {
                return Ok(Progress::Idle);
            }
            let mut due = std::mem::take(&mut self.held.outbox.due);
            let authorizer = &self.held.access.authorizer;
            let readable = |d: &Delivery| authorizer.check(&d.message.topic, Acl::Read);
            let progress = self
                .held
                .outbox
                .take(
                    &self.broker.router,
                    &self.session,
                    self.conn_id,
                    self.max_inflight,
                    &readable,
                    now,
                    &mut due,
                )
                .map_err(|_| Exit::TakenOver)?;
            let mut tally = metrics::Tally::default();
            let mut too_large = Vec::new();
            self.busy |= !due.is_empty();
            for item in due.drain(..) {
                match item {
                    Due::Message {
                        delivery,
                        pkid,
                        dup,
                    } => {
                        if self.write_delivery(&delivery, pkid, dup, now, out) {
                            tally.packets += 1;
                            tally.publish(delivery.qos, delivery.message.payload.len());
                        } else {
                            metrics::dropped(Dropped::TooLarge);
                            if pkid != 0 && !dup {
                                too_large.push(pkid);
                            }
                        }
                    }
                    Due::Release(pkid) => self.send(out, Packet::PubRel(self.ack(pkid, true))),
                }
            }
            self.held.outbox.due = due;
            self.forget(too_large)?;
            tally.sent();
            if progress != Progress::More {
                return Ok(progress);
            }
        }
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
        self.owned(|s| pkids.iter().for_each(|p| s.forget(*p)))
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
        if self.held.access.generation != generation {
            self.rebuild_access(generation);
        }
    }

    /// Builds the client's ACL again from the current files (unless its rules came with
    /// a token).
    fn rebuild_access(&mut self, generation: u64) {
        let a = &mut self.held.access;
        if a.token_deadline.is_none() {
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
        if let Some(client) = self.wire.client() {
            self.broker.clients.disconnected(client);
        }
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
        let will_at = Some(now + Duration::from_secs(u64::from(self.will_delay)));
        match self
            .session
            .detach(self.conn_id, will_later.clone(), will_at, now)
        {
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
        metrics::add(Counter::PacketsSent, 1);
        return;
    }
    out.truncate(before);
    if let Some(props) = properties_mut(&mut packet) {
        props.reason_string = None;
        props.user_properties.clear();
        if protocol::encode(&packet, protocol, out).is_ok() && out.len() - before <= max {
            metrics::add(Counter::PacketsSent, 1);
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
/// The parts of a connection kept behind its one pointer (see `Connection::held`).
struct Held {
    access: Access,
    /// What the session has due for the client (shared with the HTTP streams), with its
    /// buffers.
    outbox: Outbox,
}

/// Who the client is and what it may do.
struct Access {
    username: Option<Box<str>>,
    authorizer: Authorizer,
    /// Logged in with a token, which expires then: the connection closes, and its rules
    /// came with it, not from the ACL file.
    token_deadline: Option<Instant>,
    /// `Broker::security_generation` when `authorizer` was built.
    generation: u64,
    /// The MQTT 5 enhanced authentication method of the CONNECT, if any (boxed: few
    /// clients have one).
    method: Option<Box<ByteStr>>,
    /// A re-authentication under way.
    reauth: Option<Box<Exchange>>,
}
