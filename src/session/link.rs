//! The `Link` between a session and the connection (or HTTP stream) serving it, and the
//! `Wire` they share: how publishers wake the connection's task, an administrator's
//! request to close it, and what the admin API shows of an MQTT connection.
//!
//! One allocation per connection, found through the sessions registry: every idle
//! connection pays for each byte here (docs/benchmarks.md), so the admin API's record
//! is not kept in a map of its own.

use crate::observe::clients::LiveClient;
use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The connection currently serving a session.
#[derive(Clone)]
pub struct Link {
    pub conn_id: u64,
    pub wire: Arc<Wire>,
}

impl Link {
    pub fn new(conn_id: u64, wire: Arc<Wire>) -> Link {
        Link { conn_id, wire }
    }
}

/// What a session, its connection and the admin API share about that connection.
pub struct Wire {
    /// Set by `wake`, cleared by the wait it ends: like `Notify`'s permit, a wake-up
    /// before the wait is not lost. A flag and a waker rather than a `Notify`: the
    /// connection's future, which every idle connection pays for, holds a `Woken` (a
    /// pointer) while it waits instead of a `Notified` (64 bytes).
    woken: AtomicBool,
    /// The task waiting (one: the connection's or the stream's).
    waker: AtomicWaker,
    /// An administrator asked for this connection to close.
    kicked: AtomicBool,
    /// What the admin API shows of an MQTT connection (None: an HTTP stream).
    client: Option<LiveClient>,
}

impl Wire {
    pub fn new(client: Option<LiveClient>) -> Wire {
        Wire {
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            kicked: AtomicBool::new(false),
            client,
        }
    }

    /// Wakes the connection's task; a wake-up before it waits is kept for its next wait.
    pub fn wake(&self) {
        self.woken.store(true, Release);
        self.waker.wake();
    }

    /// Completes once woken (at once if woken since the last wait completed). One task
    /// waits on a wire at a time.
    pub fn woken(&self) -> Woken<'_> {
        Woken(self)
    }

    /// Makes `waker` (a parked connection's) the one woken, and tells whether a wake-up
    /// came before it (which it then missed).
    pub fn watch(&self, waker: &Waker) -> bool {
        self.waker.register(waker);
        self.woken.load(Acquire)
    }

    /// Forgets a wake-up not waited for (its cause was seen to otherwise).
    pub fn clear_woken(&self) {
        self.woken.store(false, Release);
    }

    pub fn client(&self) -> Option<&LiveClient> {
        self.client.as_ref()
    }

    /// Asks the MQTT connection to close (5.0: DISCONNECT 0x98 Administrative action).
    /// False for an HTTP stream, which the admin API does not close.
    pub fn kick(&self) -> bool {
        if self.client.is_none() {
            return false;
        }
        self.kicked.store(true, Relaxed);
        self.wake();
        true
    }

    /// Whether an administrator asked for this connection to close.
    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Relaxed)
    }
}

impl Default for Wire {
    /// A wire without a client record (HTTP streams, tests, tools).
    fn default() -> Wire {
        Wire::new(None)
    }
}

/// The wait for a wire's wake-up (`Wire::woken`).
pub struct Woken<'a>(&'a Wire);

impl Future for Woken<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let wire = self.0;
        // Registered before the flag is checked: a wake-up in between is seen by one or
        // the other.
        wire.waker.register(cx.waker());
        match wire.woken.swap(false, AcqRel) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::ListenerRules;
    use crate::protocol::Protocol;
    use futures_util::FutureExt;
    use std::task::Wake;

    /// A waker that records being woken.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, SeqCst);
        }
    }

    #[test]
    fn a_wake_before_the_wait_is_kept_once() {
        let wire = Wire::default();
        assert_eq!(wire.woken().now_or_never(), None);
        wire.wake();
        wire.wake();
        // Wake-ups before a wait make one, as Notify's permit.
        assert_eq!(wire.woken().now_or_never(), Some(()));
        assert_eq!(wire.woken().now_or_never(), None);
    }

    #[test]
    fn a_wake_during_the_wait_wakes_the_task() {
        let wire = Wire::default();
        let flag = Arc::new(Flag::default());
        let waker = std::task::Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = wire.woken();
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        wire.wake();
        assert!(flag.0.load(SeqCst));
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
    }

    #[test]
    fn a_wait_dropped_unfinished_loses_no_wake() {
        let wire = Wire::default();
        let waker = std::task::Waker::from(Arc::new(Flag::default()));
        {
            let mut wait = wire.woken();
            assert!(Pin::new(&mut wait)
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            wire.wake();
            // Abandoned woken but unfinished, as in the driver's select! when another
            // branch won.
        }
        assert_eq!(wire.woken().now_or_never(), Some(()));
    }

    #[test]
    fn only_an_mqtt_connection_is_kicked() {
        let stream = Wire::default();
        assert!(!stream.kick());
        assert!(!stream.is_kicked());
        assert_eq!(stream.woken().now_or_never(), None);

        let addr = "127.0.0.1:1".parse().unwrap();
        let listener = Arc::new(ListenerRules::open());
        let client = LiveClient::new(addr, listener, Protocol::V5, 30, Some("ann"));
        let conn = Wire::new(Some(client));
        assert!(!conn.is_kicked());
        assert!(conn.kick());
        assert!(conn.is_kicked());
        assert_eq!(conn.woken().now_or_never(), Some(()));
        assert_eq!(
            conn.client().and_then(|c| c.username.as_deref()),
            Some("ann")
        );
    }
}
