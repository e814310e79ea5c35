//! What the broker measures besides its counters: the registry of connected clients
//! (`clients`), the process's own figures (`process`) and rate-limited warnings
//! (`ratelimit`). It sits below `broker`, which feeds it. The counters live in
//! `crate::metrics`; their readers (`/metrics`, the admin API, the console, the `$SYS`
//! topics) in `crate::admin`. docs/observability.md lists every name.

pub mod clients;
pub mod process;
pub mod ratelimit;
