//! The clock the broker runs on: tokio's, so that tests can pause it. Protocol code takes
//! the time as an argument; only the edges (drivers, timers, the admin side) read it here.

use std::time::Instant;

/// Now, on tokio's clock (paused in the timing tests).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
