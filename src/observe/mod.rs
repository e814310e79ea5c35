//! Seeing inside the broker: the registry of connected clients (`clients`), the `$SYS`
//! topics (`sys`), the process's own figures (`process`) and rate-limited warnings
//! (`ratelimit`). The counters themselves live in `crate::metrics`; the HTTP side
//! (`/metrics`, the admin API, the console) in `crate::admin`. docs/observability.md
//! lists every name.

pub mod clients;
pub mod process;
pub mod ratelimit;
pub mod sys;
