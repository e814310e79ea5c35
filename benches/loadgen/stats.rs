//! Counting: the stamp every payload starts with, exact loss/duplicate tracking per
//! publisher→subscriber pair, latency percentiles, and the JSON output line.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Bytes at the front of every payload: run id, publisher, sequence, send time.
pub const STAMP_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Distinguishes this run's messages from anything else on the broker.
    pub run: u32,
    pub publisher: u32,
    /// 0, 1, 2, ... per publisher.
    pub seq: u32,
    /// Nanoseconds since the run's time base (a monotonic clock shared by all threads).
    pub sent_ns: u64,
}

impl Stamp {
    pub fn to_bytes(self) -> [u8; STAMP_LEN] {
        let mut b = [0u8; STAMP_LEN];
        b[0..4].copy_from_slice(&self.run.to_be_bytes());
        b[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..20].copy_from_slice(&self.sent_ns.to_be_bytes());
        b
    }

    /// `None` if the payload is too short to carry a stamp.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let b: &[u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&b[12..20]);
        Some(Stamp {
            run: u32_at(0),
            publisher: u32_at(4),
            seq: u32_at(8),
            sent_ns: u64::from_be_bytes(ns),
        })
    }
}

/// What one subscriber saw of one publisher: exact even when messages are lost,
/// reordered or repeated, and cheap when they arrive in order (the usual case).
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// Every sequence number below this was received or is recorded as a gap.
    next: u32,
    /// Missing ranges below `next`: start → end (exclusive).
    gaps: BTreeMap<u32, u32>,
    pub unique: u64,
    pub duplicates: u64,
    /// Arrived after a later message from the same publisher.
    pub reordered: u64,
}

impl SeqTracker {
    pub fn record(&mut self, seq: u32) {
        if seq >= self.next {
            if seq > self.next {
                self.gaps.insert(self.next, seq);
            }
            self.next = seq + 1;
            self.unique += 1;
            return;
        }
        // Below `next`: either it fills a gap (late) or we have seen it (duplicate).
        let Some((&start, &end)) = self.gaps.range(..=seq).next_back() else {
            self.duplicates += 1;
            return;
        };
        if seq >= end {
            self.duplicates += 1;
            return;
        }
        self.gaps.remove(&start);
        if start < seq {
            self.gaps.insert(start, seq);
        }
        if seq + 1 < end {
            self.gaps.insert(seq + 1, end);
        }
        self.unique += 1;
        self.reordered += 1;
    }

    /// Sequence numbers settled so far (received or known missing): the publisher's
    /// end-to-end window counts from here.
    pub fn progress(&self) -> u32 {
        self.next
    }

    /// Messages of the `sent` published that never arrived.
    pub fn lost(&self, sent: u32) -> u64 {
        u64::from(sent).saturating_sub(self.unique)
    }
}

/// Latencies in microseconds, 1 µs to 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Records a latency given in nanoseconds (clamped to the histogram's range).
pub fn record_latency(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// The percentiles reported, in microseconds (0 when nothing was recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Microseconds as a short human string: "87 µs", "1.25 ms", "2.0 s".
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// One flat JSON object, written in insertion order.
#[derive(Default)]
pub struct Json(String);

impl Json {
    fn key(&mut self, key: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push_str(&quote(key));
        self.0.push(':');
    }

    pub fn str(mut self, key: &str, value: &str) -> Json {
        self.key(key);
        self.0.push_str(&quote(value));
        self
    }

    pub fn int(mut self, key: &str, value: u64) -> Json {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    /// Non-finite numbers (no data) are written as null.
    pub fn num(mut self, key: &str, value: f64) -> Json {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.0, "{}", (value * 1000.0).round() / 1000.0);
        } else {
            self.0.push_str("null");
        }
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Json {
        self.key(key);
        self.0.push_str(if value { "true" } else { "false" });
        self
    }

    pub fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        self.0
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_ignores_the_filler() {
        let s = Stamp {
            run: 0xDEAD_BEEF,
            publisher: 7,
            seq: u32::MAX,
            sent_ns: 123_456_789_012,
        };
        let mut payload = s.to_bytes().to_vec();
        payload.extend_from_slice(&[0xAA; 44]);
        assert_eq!(Stamp::read(&payload), Some(s));
        assert_eq!(Stamp::read(&payload[..STAMP_LEN]), Some(s));
        assert_eq!(Stamp::read(&payload[..STAMP_LEN - 1]), None);
        assert_eq!(Stamp::read(&[]), None);
    }

    #[test]
    fn in_order_delivery_counts_every_message_once() {
        let mut t = SeqTracker::default();
        for seq in 0..1000 {
            t.record(seq);
        }
        assert_eq!((t.unique, t.duplicates, t.reordered), (1000, 0, 0));
        assert_eq!(t.progress(), 1000);
        assert_eq!(t.lost(1000), 0);
        assert_eq!(t.lost(1010), 10, "sent but never received");
    }

    #[test]
    fn gaps_are_loss_until_filled() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 5, 6, 9] {
            t.record(seq);
        }
        assert_eq!(t.unique, 5);
        assert_eq!(t.lost(10), 5, "2, 3, 4, 7, 8 missing");
        assert_eq!(t.progress(), 10, "gaps count as settled for the window");
        // Late arrivals fill the gaps, at either edge and in the middle.
        for seq in [3, 2, 4, 8] {
            t.record(seq);
        }
        assert_eq!((t.unique, t.reordered, t.duplicates), (9, 4, 0));
        assert_eq!(t.lost(10), 1, "only 7 missing");
        t.record(7);
        assert_eq!((t.lost(10), t.reordered), (0, 5));
        assert!(t.gaps.is_empty());
    }

    #[test]
    fn repeats_are_duplicates_not_receipts() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 1, 0, 4, 4, 2, 2, 3] {
            t.record(seq);
        }
        assert_eq!((t.unique, t.duplicates, t.reordered), (5, 4, 2));
        assert_eq!(t.lost(5), 0);
        assert_eq!(t.lost(3), 0, "never negative");
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = new_histogram();
        // 1..=1000 µs, once each: p50 = 500, p99 = 990, p999 = 999, max = 1000.
        for us in 1..=1000u64 {
            record_latency(&mut h, us * 1000 + 999);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert_eq!((l.p50, l.p99, l.p999, l.max), (500, 990, 999, 1000));
        // Merging adds counts; out-of-range values are clamped, not lost.
        let mut other = new_histogram();
        record_latency(&mut other, 0);
        record_latency(&mut other, u64::MAX);
        h.add(&other).expect("same bounds");
        let l = Latency::of(&h);
        assert_eq!(l.count, 1002);
        assert!(l.max >= 60_000_000 && l.max <= 60_100_000, "{}", l.max);
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
    }

    #[test]
    fn json_is_flat_escaped_and_ordered() {
        let line = Json::default()
            .str("scenario", "fan-in \"x\"\\\n")
            .int("sent", 42)
            .num("rate", 1234.56789)
            .num("none", f64::NAN)
            .bool("ok", true)
            .finish();
        assert_eq!(
            line,
            r#"{"scenario":"fan-in \"x\"\\\u000a","sent":42,"rate":1234.568,"none":null,"ok":true}"#
        );
        assert_eq!(Json::default().finish(), "{}");
    }

    #[test]
    fn durations_print_in_readable_units() {
        assert_eq!(fmt_us(87), "87 µs");
        assert_eq!(fmt_us(1250), "1.25 ms");
        assert_eq!(fmt_us(2_000_000), "2.00 s");
    }
}
