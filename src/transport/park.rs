//! The parking lot: idle MQTT-over-TCP connections held without a task.
//!
//! A connection's task and tokio's registration of its socket cost ~1 KB, more than the
//! rest of an idle connection together (docs/benchmarks.md). So a connection with
//! nothing to do (`conn::Idle`: nothing behind its CONNECT, or no message either way for
//! a while) ends its task and leaves its state and socket here. One task watches every
//! parked socket through an epoll set of its own (mio's `Poll`, itself registered with
//! tokio), together with their timers (keep-alive, token expiry) and their sessions'
//! wake-ups (a message to deliver, a takeover, an administrator's kick, shutdown). The
//! first of these that happens hands the connection to a new task (`tcp::resume`).

use super::tcp;
use crate::broker::Broker;
use crate::conn::Idle;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind};
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Parked connections, and how the lot's task learns that one must be served again.
pub struct Lot {
    /// The lot's epoll set, where parked sockets wait to be readable.
    registry: Registry,
    state: Mutex<State>,
    /// Parked connections whose sessions were woken, for the lot's task.
    woken: Mutex<Vec<Key>>,
    /// Wakes the lot's task: a session was woken, or a timer due earlier was added.
    notify: Notify,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// When parked connections must be served again, earliest first. Entries of
    /// connections served since are skipped when they come up (their generation).
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Connections parked now.
    parked: usize,
    /// False from shutdown on (or once the epoll set failed): nothing is parked any more.
    open: bool,
}

impl State {
    /// Takes the connection parked in `slot` (of that generation, if given).
    fn take(&mut self, slot: u32, generation: Option<u32>) -> Option<Parked> {
        let s = self.slots.get_mut(slot as usize)?;
        if generation.is_some_and(|g| g != s.generation) {
            return None;
        }
        let parked = s.parked.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        self.parked -= 1;
        Some(parked)
    }

    fn is_parked(&self, key: Key) -> bool {
        let slot = &self.slots[key.slot as usize];
        slot.generation == key.generation && slot.parked.is_some()
    }
}

/// A slot, and its generation: which of the connections parked in it over time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    slot: u32,
    generation: u32,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    parked: Option<Parked>,
}

/// 16 bytes: the connection's state is in one box (`Idle`).
struct Parked {
    stream: StdTcpStream,
    idle: Idle,
}

/// A parked connection's waker, given to its session's `Wire`.
struct Unpark {
    lot: Arc<Lot>,
    key: Key,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.lot.woken.lock().push(self.key);
        self.lot.notify.notify_one();
    }
}

impl Lot {
    /// Opens the lot and starts its task, which ends at shutdown after handing every
    /// parked connection to a task of its own (which closes it).
    pub fn start(broker: &Arc<Broker>) -> io::Result<Arc<Lot>> {
        let poll = Poll::new()?;
        let lot = Arc::new(Lot {
            registry: poll.registry().try_clone()?,
            state: Mutex::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                timers: BinaryHeap::new(),
                parked: 0,
                open: true,
            }),
            woken: Mutex::new(Vec::new()),
            notify: Notify::new(),
        });
        broker
            .tasks
            .spawn(watch(lot.clone(), register(poll)?, broker.clone()));
        Ok(lot)
    }

    /// Parks `idle` with its socket: the calling task may end. If the client has sent
    /// something meanwhile (or closed), or the lot is closed, a new task serves it at once.
    pub fn park(self: &Arc<Self>, stream: TcpStream, idle: Idle) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => return idle.end(Some(e), None),
        };
        match stream.peek(&mut [0]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => return self.resume(stream, idle),
        }
        let deadline = idle.deadline();
        let wire = idle.wire().clone();
        let mut state = self.state.lock();
        if !state.open {
            drop(state);
            return self.resume(stream, idle);
        }
        let slot = match state.free.pop() {
            Some(slot) => slot,
            None => {
                state.slots.push(Slot::default());
                // Slots are bounded by the connections, far below 2^32.
                (state.slots.len() - 1) as u32
            }
        };
        let fd = stream.as_raw_fd();
        let token = Token(slot as usize);
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            state.free.push(slot);
            drop(state);
            crate::warn_limited!("cannot park a connection: {e}");
            return self.resume(stream, idle);
        }
        idle.listener().parked.fetch_add(1, Relaxed);
        let key = Key {
            slot,
            generation: state.slots[slot as usize].generation,
        };
        state.slots[slot as usize].parked = Some(Parked { stream, idle });
        state.parked += 1;
        if let Some(at) = deadline {
            if state.timers.peek().is_none_or(|Reverse((t, _))| at < *t) {
                self.notify.notify_one();
            }
            state.timers.push(Reverse((at, key)));
            // Timers of connections resumed since stay until due: a client that pings
            // a thousand times a second must not grow the heap with them.
            if state.timers.len() > 2 * state.parked + 64 {
                let timers = std::mem::take(&mut state.timers);
                let kept = timers
                    .into_iter()
                    .filter(|Reverse((_, k))| state.is_parked(*k))
                    .collect();
                state.timers = kept;
            }
        }
        // Under the lock, which serving it again takes: the session's wake-ups come here
        // until the next task registers its own waker, never after.
        let waker = Waker::from(Arc::new(Unpark {
            lot: self.clone(),
            key,
        }));
        if wire.watch(&waker) {
            waker.wake();
        }
    }

    /// Takes the connection parked in `slot` (of that generation, if given).
    fn take(&self, slot: u32, generation: Option<u32>) -> Option<Parked> {
        self.state.lock().take(slot, generation)
    }

    /// Serves a connection taken from its slot again.
    fn unpark(self: &Arc<Self>, parked: Parked) {
        let Parked { stream, idle } = parked;
        // Closing the socket would remove it from the set too, but it stays open.
        let _ = self.registry.deregister(&mut SourceFd(&stream.as_raw_fd()));
        idle.listener().parked.fetch_sub(1, Relaxed);
        self.resume(stream, idle);
    }

    /// Whether connections can be parked (false from shutdown on, or if the lot failed).
    pub fn is_open(&self) -> bool {
        self.state.lock().open
    }

    fn resume(self: &Arc<Self>, stream: StdTcpStream, idle: Idle) {
        let broker = idle.broker().clone();
        broker.tasks.spawn(tcp::resume(self.clone(), stream, idle));
    }

    /// The connections whose timers are due at `now`, and when the next one is.
    fn due(&self, now: Instant) -> (Vec<Parked>, Option<Instant>) {
        let mut state = self.state.lock();
        let mut due = Vec::new();
        while let Some(&Reverse((at, key))) = state.timers.peek() {
            if at > now {
                return (due, Some(at));
            }
            state.timers.pop();
            due.extend(state.take(key.slot, Some(key.generation)));
        }
        (due, None)
    }

    /// Closes the lot: every connection still parked is served again (shutdown).
    fn close(self: &Arc<Self>) {
        let parked: Vec<_> = {
            let mut state = self.state.lock();
            state.open = false;
            state.timers.clear();
            state.parked = 0;
            state
                .slots
                .iter_mut()
                .filter_map(|s| s.parked.take())
                .collect()
        };
        for p in parked {
            self.unpark(p);
        }
    }
}

/// Registers the lot's epoll set with tokio (an epoll set is readable while it has events).
#[allow(unsafe_code)]
fn register(poll: Poll) -> io::Result<AsyncFd<Poll>> {
    // SAFETY: the fd registered is the `Poll`'s own, which the `AsyncFd` owns: it stays
    // open for as long as it is registered (what tokio asks of the caller).
    unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// The lot's task: serves parked connections again when their sockets turn readable,
/// their sessions are woken or their timers are due.
async fn watch(lot: Arc<Lot>, mut poll: AsyncFd<Poll>, broker: Arc<Broker>) {
    const BATCH: usize = 256;
    let mut events = Events::with_capacity(BATCH);
    loop {
        let (due, next) = lot.due(crate::clock::now());
        for p in due {
            lot.unpark(p);
        }
        let timer = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            ready = poll.readable_mut() => {
                let mut ready = match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::error!("the parking lot's epoll set failed: {e}");
                        break;
                    }
                };
                if let Err(e) = ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                    if e.kind() != ErrorKind::Interrupted {
                        tracing::error!("the parking lot's epoll set failed: {e}");
                        break;
                    }
                }
                let mut count = 0;
                for event in &events {
                    count += 1;
                    // Tokens are slots (below 2^32).
                    if let Some(p) = lot.take(event.token().0 as u32, None) {
                        lot.unpark(p);
                    }
                }
                // A full batch may leave more ready: look again before waiting.
                if count < BATCH {
                    ready.clear_ready();
                }
            }
            _ = lot.notify.notified() => {
                let woken = std::mem::take(&mut *lot.woken.lock());
                for key in woken {
                    if let Some(p) = lot.take(key.slot, Some(key.generation)) {
                        lot.unpark(p);
                    }
                }
            }
            _ = timer => {}
        }
    }
    lot.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::conn::Peer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Every PINGREQ resumes a parked connection and parks it again with a new timer;
    /// the old ones are dropped before they add up.
    #[tokio::test]
    async fn a_client_that_pings_without_pause_does_not_grow_the_timers() {
        let broker = Broker::new(Config::default(), Vec::new()).unwrap();
        let lot = Lot::start(&broker).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        tokio::spawn(tcp::serve(broker, stream, Peer::new(peer), lot.clone()));
        // CONNECT, 3.1.1, clean session, keep-alive 60 s, client id "p".
        let connect = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'p',
        ];
        client.write_all(&connect).await.unwrap();
        let mut answer = [0; 4];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [0x20, 2, 0, 0], "CONNACK");
        let parked = |lot: &Lot| {
            let state = lot.state.lock();
            (state.parked, state.timers.len())
        };
        for _ in 0..500 {
            client.write_all(&[0xC0, 0]).await.unwrap();
            let mut pong = [0; 2];
            client.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong, [0xD0, 0], "PINGRESP");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while parked(&lot).0 != 1 {
            assert!(tokio::time::Instant::now() < deadline, "parked again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, timers) = parked(&lot);
        assert!(
            timers <= 2 + 64,
            "{timers} timers for one parked connection"
        );
    }
}
