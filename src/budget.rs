//! Memory budgets shared by every connection and session: a limit and what is in use,
//! kept with relaxed atomics so that charging costs one add on the hot path.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

/// How full a budget is, for what is refused first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Normal,
    /// Past 90%: what can be refused cheaply (QoS 0 queueing) is.
    High,
    /// Past the limit.
    Exhausted,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Applies a change in what some holder keeps (positive or negative).
    pub fn adjust(&self, delta: isize) {
        if delta >= 0 {
            self.used.fetch_add(delta.unsigned_abs(), Relaxed);
        } else {
            self.used.fetch_sub(delta.unsigned_abs(), Relaxed);
        }
    }

    pub fn level(&self) -> Level {
        let used = self.used();
        if used >= self.limit {
            Level::Exhausted
        } else if used >= self.limit / 10 * 9 {
            Level::High
        } else {
            Level::Normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let b = Budget::new(1000);
        assert_eq!(b.level(), Level::Normal);
        b.adjust(900);
        assert_eq!(b.level(), Level::High);
        b.adjust(100);
        assert_eq!(b.level(), Level::Exhausted);
        b.adjust(-1000);
        assert_eq!((b.used(), b.level()), (0, Level::Normal));
    }
}
