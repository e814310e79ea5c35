//! Slowing down repeated authentication failures from one address.
//!
//! After `threshold` failures from an address (each less than `window` after the
//! previous one), its next attempt waits until `base × 2^(failures − threshold)` (at most
//! `cap`) has passed since its last failure. A success forgets the address; so does a
//! `window` without failures. IPv6 addresses count per /64 (one host usually has a whole
//! /64); IPv4-mapped IPv6 addresses count as their IPv4 address.
//!
//! Memory is bounded: at most `max_tracked` addresses; when full, quiet entries go first,
//! then the one whose last failure is oldest. Time is passed in (`now`), never read, so
//! the behaviour is tested without sleeping.
//!
//! The connection core calls `delay_for` before checking credentials and sleeps the
//! returned time (holding the connection, not a worker), then `failure` or `success`.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Failures before attempts are delayed.
    pub threshold: u32,
    /// Failures further apart than this start the count again.
    pub window: Duration,
    /// Delay after `threshold` failures; doubles with each further failure.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// Most addresses remembered.
    pub max_tracked: usize,
}

impl Default for BackoffConfig {
    /// 5 failures within a minute of each other, then 1 s, 2 s, 4 s … up to 30 s.
    fn default() -> BackoffConfig {
        BackoffConfig {
            threshold: 5,
            window: Duration::from_secs(60),
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            max_tracked: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
}

/// Failure counts per address. `Send + Sync`: one per broker, shared by connections.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(BackoffConfig::default())
    }
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long an attempt from `ip` must wait now; `None` when it may go ahead.
    pub fn delay_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock();
        let entry = entries.get(&key(ip))?;
        if self.is_quiet(entry, now) || entry.failures < self.config.threshold {
            return None;
        }
        let ready = entry.last_failure + self.delay_after(entry.failures);
        ready.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Records a failed attempt from `ip`.
    pub fn failure(&self, ip: IpAddr, now: Instant) {
        let mut entries = self.entries.lock();
        let key = key(ip);
        if !entries.contains_key(&key) && entries.len() >= self.config.max_tracked {
            self.make_room(&mut entries, now);
        }
        let entry = entries.entry(key).or_insert(Entry {
            failures: 0,
            last_failure: now,
        });
        if self.is_quiet(entry, now) {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
    }

    /// Records a successful attempt: the address starts afresh.
    pub fn success(&self, ip: IpAddr) {
        self.entries.lock().remove(&key(ip));
    }

    /// Addresses currently remembered.
    pub fn tracked(&self) -> usize {
        self.entries.lock().len()
    }

    fn is_quiet(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last_failure) > self.config.window
    }

    fn delay_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(self.config.threshold).min(31);
        self.config
            .base
            .saturating_mul(1 << doublings)
            .min(self.config.cap)
    }

    fn make_room(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        entries.retain(|_, e| !self.is_quiet(e, now));
        while entries.len() >= self.config.max_tracked.max(1) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(ip, _)| *ip);
            match oldest {
                Some(ip) => entries.remove(&ip),
                None => break,
            };
        }
    }
}

/// The unit failures are counted per: the IPv4 address, or the IPv6 /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delays_start_at_the_threshold_and_double_up_to_the_cap() {
        let b = Backoff::default();
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..4 {
            b.failure(a, t0 + SEC * i);
            assert_eq!(
                b.delay_for(a, t0 + SEC * i),
                None,
                "after {} failures",
                i + 1
            );
        }
        // 5th failure at t0+4s: the next attempt waits 1 s from then.
        let t = t0 + SEC * 4;
        b.failure(a, t);
        assert_eq!(b.delay_for(a, t), Some(SEC));
        assert_eq!(b.delay_for(a, t + SEC / 2), Some(SEC / 2));
        assert_eq!(b.delay_for(a, t + SEC), None);
        // Then 2 s, 4 s, 8 s, 16 s, 30 s (cap), 30 s.
        let mut t = t + SEC;
        for expected in [2, 4, 8, 16, 30, 30] {
            b.failure(a, t);
            assert_eq!(b.delay_for(a, t), Some(SEC * expected));
            t += SEC * expected;
            assert_eq!(b.delay_for(a, t), None);
        }
        // Other addresses are not affected.
        assert_eq!(b.delay_for(ip("192.0.2.2"), t), None);
    }

    #[test]
    fn success_resets() {
        let b = Backoff::default();
        let a = ip("198.51.100.7");
        let t = Instant::now();
        for _ in 0..6 {
            b.failure(a, t);
        }
        assert!(b.delay_for(a, t).is_some());
        b.success(a);
        assert_eq!(b.delay_for(a, t), None);
        assert_eq!(b.tracked(), 0);
        b.failure(a, t);
        assert_eq!(b.delay_for(a, t), None);
    }

    #[test]
    fn a_quiet_window_resets() {
        let b = Backoff::default();
        let a = ip("203.0.113.9");
        let t = Instant::now();
        for _ in 0..8 {
            b.failure(a, t);
        }
        assert_eq!(b.delay_for(a, t), Some(SEC * 8));
        let later = t + Duration::from_secs(61);
        assert_eq!(b.delay_for(a, later), None);
        // The count starts again: one failure is no longer enough to be delayed.
        b.failure(a, later);
        assert_eq!(b.delay_for(a, later), None);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let b = Backoff::default();
        let t = Instant::now();
        for i in 1..=5 {
            b.failure(ip(&format!("2001:db8:1:2::{i}")), t);
        }
        assert_eq!(b.delay_for(ip("2001:db8:1:2:ffff::1"), t), Some(SEC));
        assert_eq!(b.delay_for(ip("2001:db8:1:3::1"), t), None);
        for _ in 0..5 {
            b.failure(ip("::ffff:192.0.2.5"), t);
        }
        assert_eq!(b.delay_for(ip("192.0.2.5"), t), Some(SEC));
    }

    #[test]
    fn memory_is_bounded_oldest_evicted_first() {
        let b = Backoff::new(BackoffConfig {
            max_tracked: 3,
            ..BackoffConfig::default()
        });
        let t = Instant::now();
        let addrs: Vec<IpAddr> = (1..=4).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        for (i, a) in addrs.iter().take(3).enumerate() {
            for _ in 0..5 {
                b.failure(*a, t + SEC * i as u32);
            }
        }
        // A fourth address evicts the one whose last failure is oldest (.1).
        b.failure(addrs[3], t + SEC * 3);
        assert_eq!(b.tracked(), 3);
        let now = t + SEC * 2 + SEC / 2;
        assert_eq!(b.delay_for(addrs[0], now), None, "forgotten");
        assert_eq!(b.delay_for(addrs[2], now), Some(SEC / 2), "kept");
        // Quiet entries go before active ones.
        let late = t + Duration::from_secs(64);
        b.failure(addrs[2], late);
        b.failure(addrs[0], late);
        assert_eq!(b.tracked(), 2, "quiet .2 and .4 dropped to make room");
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Backoff>();
    }
}
