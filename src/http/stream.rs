//! `Subscriber`: a session drained by an HTTP stream (SSE) or by one poll, the HTTP
//! counterpart of `conn::Connection`. It opens (or resumes, or takes over) the session
//! like a CONNECT, makes its subscriptions the requested set, takes acknowledgements and
//! writes what is due as events. No I/O and no clock: the service passes `now` and carries
//! the bytes. Dropping it leaves the session, as a connection's end does.
//!
//! Event ids: a QoS 1 event's id is the send order of its in-flight entry in the session
//! (`Inflight::seq`) plus one, which only grows over the session's life and is kept when the entry
//! is sent again. An acknowledgement of id N (`Last-Event-ID`, `ack=N`) ends every entry
//! sent up to N; what stays in flight is sent again, with its id, on the next stream or
//! poll: at least once.

use super::event;
use super::reply::HttpError;
use crate::broker::Broker;
use crate::clock::now;
use crate::conn::login::Login;
use crate::conn::subscribe;
use crate::message::Delivery;
use crate::metrics::Tally;
use crate::protocol::{ByteStr, QoS, ReasonCode, SubOptions};
use crate::router::is_shared;
use crate::security::acl::{Access, Authorizer};
use crate::session::outbox::{Due, Outbox, Progress};
use crate::session::{Link, NotOwner, Session, SessionState, Wire};
use bytes::{BufMut, BytesMut};
use hyper::StatusCode;
use std::sync::Arc;
use std::time::Instant;

/// The session was taken over by another connection or stream (or ended): this one ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl From<NotOwner> for Gone {
    fn from(_: NotOwner) -> Gone {
        Gone
    }
}

/// How events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One Server-Sent Event each.
    Sse,
    /// Elements of a JSON array (the caller writes the brackets), each with its `seq`.
    Poll,
}

pub struct Subscriber {
    broker: Arc<Broker>,
    session: Arc<Session>,
    conn_id: u64,
    wire: Arc<Wire>,
    username: Option<String>,
    authorizer: Authorizer,
    /// Logged in with a token: the stream ends when it expires, and its rules are not
    /// the ACL file's.
    token_deadline: Option<Instant>,
    /// `Broker::security_generation` when `authorizer` was built.
    generation: u64,
    /// The session outlives the request: events stay in flight until acknowledged.
    /// Otherwise each is done once written: nobody could ask for it again.
    persistent: bool,
    /// Events in flight at most (persistent sessions).
    window: usize,
    resumed: bool,
    outbox: Outbox,
    /// Queued messages wait on disk: the service reads them back (`take_refill`).
    refill_due: bool,
    /// A retained walk found nothing for a while: the service yields (`take_yield`).
    yield_due: bool,
}

impl Subscriber {
    /// Opens `client_id`'s session for this request: resumed when `persistent` (and kept
    /// `expiry` seconds after it), new and ending with the request otherwise. A stream or
    /// connection that had it is told to go, as in an MQTT takeover.
    pub fn open(
        broker: &Arc<Broker>,
        login: Login,
        client_id: &ByteStr,
        persistent: bool,
        expiry: u32,
        window: usize,
        now: Instant,
    ) -> Subscriber {
        let conn_id = broker.next_id();
        // No client record: the admin API lists the session, not the stream.
        let wire = Arc::new(Wire::default());
        let link = Link::new(conn_id, wire.clone());
        let expiry = if persistent { expiry } else { 0 };
        let (session, resumed) = broker.open_session(client_id, !persistent, expiry, link, now);
        if resumed {
            // What a stream or connection taken over had sent is sent again on this one
            // (a session left earlier had it marked so when it was left).
            let _ = session.with_state(conn_id, |s| s.inflight.mark_unsent());
        }
        Subscriber {
            broker: broker.clone(),
            session,
            conn_id,
            wire,
            username: login.username,
            authorizer: login.authorizer,
            token_deadline: login.token_valid_for.map(|d| now + d),
            generation: broker.security_generation(),
            persistent,
            window: if persistent { window } else { usize::MAX },
            resumed,
            outbox: Outbox::default(),
            refill_due: false,
            yield_due: false,
        }
    }

    /// When the token the stream was opened with expires.
    pub fn token_deadline(&self) -> Option<Instant> {
        self.token_deadline
    }

    /// Whether a stored session was resumed (its queue and in-flight events with it).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    pub fn client_id(&self) -> &ByteStr {
        &self.session.client_id
    }

    /// Notified when messages arrive for the session, and when it is taken over.
    pub fn wire(&self) -> &Arc<Wire> {
        &self.wire
    }

    pub fn check_owner(&self) -> Result<(), Gone> {
        match self.session.is_owned_by(self.conn_id) {
            true => Ok(()),
            false => Err(Gone),
        }
    }

    fn owned<T>(&self, f: impl FnOnce(&mut SessionState) -> T) -> Result<T, Gone> {
        Ok(self.session.with_state(self.conn_id, f)?)
    }

    /// The client has every event up to id `id`: they leave the session. Returns how
    /// many did. (Ids are send orders plus one, so that 0 acknowledges nothing.)
    pub fn acknowledge(&self, id: u64) -> Result<usize, Gone> {
        match id.checked_sub(1) {
            Some(seq) => self.owned(|s| s.acknowledge_through(seq)),
            None => Ok(0),
        }
    }

    /// Makes the session's subscriptions `filters` at `qos`: others are removed, new ones
    /// get their retained messages first (a filter the session had already does not get
    /// them again). Nothing changes if one filter is refused (400: not a filter, 403: the
    /// ACL, 400: past `max_subscriptions` or a feature off).
    pub fn subscribe(
        &mut self,
        filters: &[ByteStr],
        qos: QoS,
    ) -> Result<Result<(), HttpError>, Gone> {
        let qos = qos
            .min(self.broker.config.mqtt.max_qos)
            .min(QoS::AtLeastOnce);
        for f in filters {
            let shared = is_shared(f);
            let refusal = subscribe::refusal(
                &self.broker,
                &self.authorizer,
                &self.session,
                self.conn_id,
                f,
                shared,
            )?;
            if let Some(code) = refusal {
                return Ok(Err(refused(f, code)));
            }
        }
        let had: Vec<ByteStr> = self.owned(|s| s.subscriptions().keys().cloned().collect())?;
        for old in had.iter().filter(|h| !filters.contains(h)) {
            self.broker.unsubscribe(&self.session, self.conn_id, old)?;
        }
        let options = SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 1,
        };
        for f in filters {
            // A copy, so that the subscription does not pin the request's memory.
            let filter = ByteStr::from(&**f);
            let existed =
                self.broker
                    .subscribe(&self.session, self.conn_id, &filter, options, None)?;
            if subscribe::wants_retained(options.retain_handling, existed, is_shared(f)) {
                self.owned(|s| s.start_walk(filter, qos, None))?;
            }
        }
        Ok(Ok(()))
    }

    /// The ACL, rebuilt from the files if they were reloaded since.
    fn refresh_access(&mut self) {
        let generation = self.broker.security_generation();
        if self.generation != generation && self.token_deadline.is_none() {
            self.authorizer = self.broker.security.authorizer(
                self.username.as_deref(),
                &self.session.client_id,
                None,
            );
        }
        self.generation = generation;
    }

    /// Writes the events due into `out` until it holds `max_bytes` or nothing more is
    /// due (the window is full, the session empty). Returns how many were written.
    pub fn fill(
        &mut self,
        format: Format,
        now: Instant,
        out: &mut BytesMut,
        max_bytes: usize,
    ) -> Result<usize, Gone> {
        self.refresh_access();
        let mut written = 0;
        let mut tally = Tally::default();
        while out.len() < max_bytes {
            let mut due = std::mem::take(&mut self.outbox.due);
            let authorizer = &self.authorizer;
            let readable = |d: &Delivery| authorizer.check(&d.message.topic, Access::Read);
            let progress = self.outbox.take(
                &self.broker.router,
                &self.session,
                self.conn_id,
                self.window,
                &readable,
                now,
                &mut due,
            )?;
            let persistent = self.persistent;
            // One lock for the batch: the ids, and the end of what nobody can ask for
            // again (a session ending with its request, and QoS 2 past PUBREC taken over
            // from an MQTT client).
            let ids = self.owned(|s| {
                due.iter()
                    .map(|item| match item {
                        Due::Message { pkid: 0, .. } => None,
                        Due::Message { pkid, .. } => {
                            let seq = s.inflight.seq(*pkid).map(|seq| seq + 1);
                            if !persistent {
                                s.forget(*pkid);
                            }
                            seq
                        }
                        Due::Release(pkid) => {
                            s.forget(*pkid);
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })?;
            for (item, seq) in due.drain(..).zip(ids) {
                if let Due::Message { delivery, .. } = item {
                    match format {
                        Format::Sse => event::write_sse(&delivery, seq, now, out),
                        Format::Poll => {
                            if out.len() > 1 {
                                out.put_u8(b',');
                            }
                            event::write_json(&delivery, seq, now, out);
                        }
                    }
                    tally.packets += 1;
                    tally.publish(delivery.qos, delivery.message.payload.len());
                    written += 1;
                }
            }
            self.outbox.due = due;
            match progress {
                Progress::More => {}
                Progress::Idle => break,
                Progress::Refill => {
                    self.refill_due = true;
                    break;
                }
                Progress::Yield => {
                    self.yield_due = true;
                    break;
                }
            }
        }
        tally.sent();
        Ok(written)
    }

    /// Whether queued messages must be read back from the store (and clears it): then
    /// `Journal::refill` with `session()`, and `fill` again.
    pub fn take_refill(&mut self) -> bool {
        std::mem::take(&mut self.refill_due)
    }

    /// Whether `fill` stopped to let other tasks run, with more to do (and clears it):
    /// yield, then `fill` again.
    pub fn take_yield(&mut self) -> bool {
        std::mem::take(&mut self.yield_due)
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The session drained, and its id as the owner.
    pub fn session(&self) -> (&Session, u64) {
        (&self.session, self.conn_id)
    }

    /// A persistent stream's window is full while more waits: it must be acknowledged
    /// (the SSE stream ends so that the browser reconnects with `Last-Event-ID`).
    pub fn window_full(&self) -> Result<bool, Gone> {
        let window = self.window;
        self.owned(|s| {
            s.inflight.outstanding() >= window && (s.queued() > 0 || !s.walks().is_empty())
        })
    }
}

impl Drop for Subscriber {
    /// The request is over: the session stays (persistent) or ends, as when an MQTT
    /// connection closes without a will.
    fn drop(&mut self) {
        let now = now();
        let Some(detached) = self.session.detach(self.conn_id, None, None, now) else {
            return;
        };
        // Its expiry timer is a task: none can be started while the runtime goes away.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.broker
                .detached(&self.session, self.conn_id, detached, 0, now);
        }
    }
}

fn refused(filter: &str, code: ReasonCode) -> HttpError {
    let (status, code, why) = match code {
        ReasonCode::NotAuthorized => (
            StatusCode::FORBIDDEN,
            "not_authorized",
            "not allowed by the ACL",
        ),
        ReasonCode::TopicFilterInvalid => {
            (StatusCode::BAD_REQUEST, "bad_topic", "not a topic filter")
        }
        ReasonCode::QuotaExceeded => (
            StatusCode::BAD_REQUEST,
            "too_many_subscriptions",
            "past limits.max_subscriptions",
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            "not_supported",
            "not available on this broker",
        ),
    };
    HttpError::new(status, code, format!("topic filter {filter:?}: {why}"))
}
