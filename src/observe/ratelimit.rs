//! Warnings a hostile client can trigger at will (garbage instead of CONNECT, protocol
//! violations, failed logins) are written at most once per interval per call site and
//! reason, with how many were held back since the last line: 500 garbage connections
//! write one line, and the next line of that kind says `repeated=499`.
//!
//! Use `warn_limited!` exactly like `tracing::warn!`; `warn_limited!(reason = code; ...)`
//! limits each value of `code` (a `u8`, e.g. the MQTT reason code) on its own, so that
//! a flood of one malformation does not hide another. The count of lines held back is
//! reported with the next line of the same site (as the kernel's "callbacks suppressed"),
//! so a burst that stops for good leaves its count unwritten; `/metrics` counts every
//! event anyway.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// How often one call site of `warn_limited!` may write.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// The state of one call site.
pub struct RateLimit {
    interval: Duration,
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            state: Mutex::new(State {
                last: None,
                held_back: 0,
            }),
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` with the number of lines held
    /// back since the last one written, or `None` (this one is held back and counted).
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match s.last {
            Some(last) if now < last + self.interval => {
                s.held_back += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.held_back))
            }
        }
    }
}

/// `tracing::warn!`, at most once per `REPEAT_INTERVAL` for this call site (and reason,
/// when one is given); the line after a quiet spell carries `repeated = <lines held back>`.
#[macro_export]
macro_rules! warn_limited {
    (reason = $reason:expr; $($arg:tt)+) => {{
        static LIMITS: [$crate::observe::ratelimit::RateLimit; 256] = [const {
            $crate::observe::ratelimit::RateLimit::new($crate::observe::ratelimit::REPEAT_INTERVAL)
        }; 256];
        let reason: u8 = $reason;
        match LIMITS[usize::from(reason)].check($crate::clock::now()) {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(repeated) => ::tracing::warn!(repeated, $($arg)+),
            None => {}
        }
    }};
    ($($arg:tt)+) => {{
        static LIMIT: $crate::observe::ratelimit::RateLimit =
            $crate::observe::ratelimit::RateLimit::new($crate::observe::ratelimit::REPEAT_INTERVAL);
        match LIMIT.check($crate::clock::now()) {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(repeated) => ::tracing::warn!(repeated, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(limit.check(t0), Some(0));
        let held = (1..500)
            .filter(|i| limit.check(t0 + s(*i % 10)).is_some())
            .count();
        assert_eq!(held, 0, "nothing more within the interval");
        assert_eq!(limit.check(t0 + s(10)), Some(499));
        assert_eq!(limit.check(t0 + s(19)), None);
        assert_eq!(limit.check(t0 + s(30)), Some(1));
        assert_eq!(limit.check(t0 + s(45)), Some(0));
    }
}
