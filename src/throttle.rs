//! The publish rate limit of one client (`limits.publish_rate`, `publish_bytes_rate`,
//! `publish_burst`): token buckets, with time passed in. MQTT connections pause reading
//! while paused; the http listener answers 429 meanwhile.

use std::time::{Duration, Instant};

/// Token buckets for the publish rate of one client: a burst of `publish_burst`
/// seconds' worth, refilled at the rates. Past them, reading pauses: TCP backpressure
/// slows the client, nothing is refused or lost. A message is read when the message
/// bucket holds one (N messages at once take (N − rate × burst) / rate seconds); its size
/// is known only once it is read, so the byte bucket may be overdrawn by one message, and
/// the next waits until the debt is paid back.
pub struct Throttle {
    /// Messages and bytes per second (0 = not limited).
    rates: [f64; 2],
    burst: f64,
    tokens: [f64; 2],
    last: Instant,
    pub paused_until: Option<Instant>,
}

impl Throttle {
    pub fn new(limits: &crate::config::Limits, now: Instant) -> Option<Throttle> {
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
    pub fn spend(&mut self, bytes: usize, now: Instant) {
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

    pub fn resume(&mut self) {
        self.paused_until = None;
    }
}
