//! What sessions and the retained store tell the persistent store: their changes, turned
//! from the broker's live types into the store's plain records (`store::Op`), and the
//! clocks matched so that deadlines survive a restart.
//!
//! Without persistence there is no store and nothing is recorded: the broker keeps its
//! state in memory only.

use super::Session;
use crate::message::{Delivery, Message};
use crate::store::{self, Durable, Op, Store, StoreError, StoredMessage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Journal {
    store: Option<Arc<dyn Store>>,
    clock: WallClock,
    next_message_id: AtomicU64,
    /// `sync = "always"`: acknowledgements wait for the disk.
    always: bool,
}

impl Journal {
    /// A journal writing to `store` (None: persistence off), on the broker's clock as it
    /// reads at `now`, continuing message ids above `max_message_id`.
    pub fn new(
        store: Option<Arc<dyn Store>>,
        always: bool,
        now: Instant,
        max_message_id: u64,
    ) -> Journal {
        Journal {
            store,
            clock: WallClock::new(now),
            next_message_id: AtomicU64::new(max_message_id + 1),
            always,
        }
    }

    /// Persistence is off: nothing to record.
    pub fn off() -> Journal {
        Journal::new(None, false, Instant::now(), 0)
    }

    pub fn is_on(&self) -> bool {
        self.store.is_some()
    }

    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.store.as_ref()
    }

    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// Whether an acknowledgement must wait for what its message changed to be on disk:
    /// always under `sync = "always"`; in the other modes only while the store is behind
    /// by more than its memory bound (then its clients slow down to the disk's pace).
    pub fn acks_wait(&self) -> bool {
        self.store
            .as_ref()
            .is_some_and(|s| self.always || s.is_behind())
    }

    /// Whether the store can take more: past its disk budget, or once it failed, the
    /// broker refuses what it would have to store, before acknowledging it. A store that
    /// is only behind takes more, and the acknowledgements wait (`acks_wait`).
    pub fn has_room(&self) -> bool {
        self.store
            .as_ref()
            .is_none_or(|s| s.has_room() || s.is_behind())
    }

    pub fn submit(&self, ops: Vec<Op>) {
        if let (Some(store), false) = (&self.store, ops.is_empty()) {
            // The result is in the store's own error handling: a failed write makes
            // `has_room` false, which refuses new messages, and is logged there.
            drop(store.submit(ops));
        }
    }

    /// Resolves once everything submitted so far is as durable as the mode promises.
    pub fn barrier(&self) -> Durable {
        match &self.store {
            Some(store) => store.submit(Vec::new()),
            None => Durable::ready(Ok(())),
        }
    }

    /// The stored form of `message`, made once per message however many sessions store
    /// it (they share its id).
    pub fn message(&self, message: &Message) -> Arc<StoredMessage> {
        message
            .stored
            .get_or_init(|| {
                Arc::new(StoredMessage {
                    id: self.next_message_id.fetch_add(1, Ordering::Relaxed),
                    topic: message.topic.clone(),
                    payload: message.payload.clone(),
                    qos: message.qos,
                    retain: message.retain,
                    properties: message.properties.as_deref().cloned().unwrap_or_default(),
                    expires_at: message.expires_at.map(|t| self.clock.to_unix(t)),
                })
            })
            .clone()
    }

    pub fn delivery(&self, d: &Delivery) -> store::Delivery {
        store::Delivery {
            message: self.message(&d.message),
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.sub_ids.clone(),
        }
    }

    /// Reads the oldest messages of `session`'s queue back from the store, where they
    /// were spilled while memory ran high (a disk read, off the caller's lock), and puts
    /// them back in its queue. For the connection `conn_id` that owns the session.
    pub async fn refill(
        &self,
        session: &Session,
        conn_id: u64,
        now: Instant,
    ) -> Result<(), StoreError> {
        const REFILL: usize = 256;
        let Some(store) = &self.store else {
            return Ok(());
        };
        let entries = store.read_queue(&session.client_id, 0, REFILL).await?;
        let deliveries = entries
            .into_iter()
            .map(|e| {
                let message = Arc::new(self.restore_message(&e.delivery.message, now));
                let mut d = Delivery::new(message, e.delivery.qos, e.delivery.retain);
                d.sub_ids = e.delivery.subscription_ids;
                (e.seq, d)
            })
            .collect();
        // A connection that lost the session meanwhile leaves it to its new owner.
        let _ = session.with_state(conn_id, |s| s.refill(deliveries));
        Ok(())
    }

    /// A stored message back as a live one (its expiry on this run's clock).
    pub fn restore_message(&self, m: &StoredMessage, now: Instant) -> Message {
        let properties = (!m.properties.is_empty()).then(|| Box::new(m.properties.clone()));
        let mut message = Message::new(
            m.topic.clone(),
            m.payload.clone(),
            m.qos,
            m.retain,
            properties,
            0,
            now,
        );
        // The stored deadline, not the interval counted again from now.
        message.expires_at = m.expires_at.map(|at| self.clock.to_instant(at));
        let _ = message.stored.set(Arc::new(m.clone()));
        message
    }
}

/// The broker's clock (an `Instant`, tokio's) matched to the wall clock once, at start:
/// deadlines are stored as unix milliseconds and read back as instants of the new run.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    unix_ms: u64,
}

impl WallClock {
    pub fn new(now: Instant) -> WallClock {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            instant: now,
            unix_ms,
        }
    }

    pub fn to_unix(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.instant) {
            Some(after) => self.unix_ms + after.as_millis() as u64,
            None => self
                .unix_ms
                .saturating_sub(self.instant.duration_since(t).as_millis() as u64),
        }
    }

    pub fn to_instant(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_ms {
            self.instant + Duration::from_millis(unix_ms - self.unix_ms)
        } else {
            let before = Duration::from_millis(self.unix_ms - unix_ms);
            self.instant.checked_sub(before).unwrap_or(self.instant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_round_trips() {
        let now = Instant::now();
        let clock = WallClock::new(now);
        for offset in [0u64, 1, 999, 3_600_000] {
            let later = now + Duration::from_millis(offset);
            assert_eq!(clock.to_instant(clock.to_unix(later)), later);
        }
        let ms = clock.to_unix(now);
        assert_eq!(clock.to_unix(now + Duration::from_secs(2)), ms + 2000);
    }
}
