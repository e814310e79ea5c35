//! Process-wide counters, cheap enough for the hot path (relaxed atomics).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static RECEIVED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static AUTH_FAILURES: AtomicU64 = AtomicU64::new(0);
static NOT_AUTHORIZED: AtomicU64 = AtomicU64::new(0);

pub fn received() {
    RECEIVED.fetch_add(1, Relaxed);
}

pub fn sent(n: u64) {
    SENT.fetch_add(n, Relaxed);
}

/// A message refused by a full session queue.
pub fn dropped() {
    DROPPED.fetch_add(1, Relaxed);
}

/// A client refused for its credentials.
pub fn auth_failure() {
    AUTH_FAILURES.fetch_add(1, Relaxed);
}

/// A PUBLISH, SUBSCRIBE or delivery the ACL refused.
pub fn not_authorized() {
    NOT_AUTHORIZED.fetch_add(1, Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub auth_failures: u64,
    pub not_authorized: u64,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        received: RECEIVED.load(Relaxed),
        sent: SENT.load(Relaxed),
        dropped: DROPPED.load(Relaxed),
        auth_failures: AUTH_FAILURES.load(Relaxed),
        not_authorized: NOT_AUTHORIZED.load(Relaxed),
    }
}
