//! Security as users meet it (docs/security.md), end to end with real clients where users
//! have them: authentication with password files, tokens and SCRAM, TLS with
//! certificates made at test time, the ACL on every path a message takes (and the same
//! acl_file in a real mosquitto), the limits at their edges, and the hostile probes of
//! issue 10 against the binary.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;
#[path = "security/support.rs"]
mod support;

#[path = "security/acl.rs"]
mod acl;
#[path = "security/auth.rs"]
mod auth;
#[path = "security/limits.rs"]
mod limits;
#[path = "security/probes.rs"]
mod probes;

use std::time::Duration;

/// Polls `ready` until it holds; panics after 15 s.
async fn wait_for(what: &str, ready: impl FnMut() -> bool) {
    common::client::eventually(what, Duration::from_secs(15), ready).await;
}

/// On tokio's paused clock: sleeps until `t`, then lets the tasks woken at `t` run.
async fn at(t: tokio::time::Instant) {
    tokio::time::sleep_until(t).await;
    tokio::task::yield_now().await;
}
