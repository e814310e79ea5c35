//! Persistence seen from the clients: what a broker with a store on disk keeps.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use common::client::{connect_expiry, plain, Client};
use common::TestBroker;
use ternmq::protocol::{QoS, ReasonCode};

/// Queues spill to disk rather than fill the memory budget: an offline persistent
/// subscriber is sent three times the broker's message memory at QoS 1; every publish is
/// accepted, the memory in use stays under the budget, and the subscriber gets every
/// message, in order, when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_past_the_memory_budget_spill_to_disk() {
    const BUDGET: usize = 1 << 20;
    const MESSAGES: usize = 3 * 1024;
    let dir = tempfile::tempdir().expect("temporary directory");
    let b = TestBroker::with(|cfg| {
        cfg.persistence.enabled = true;
        cfg.persistence.dir = dir.path().join("data");
        cfg.limits.max_queued_memory = BUDGET;
        cfg.session.max_queued_messages = 10 * MESSAGES;
    })
    .await;
    let (mut sub, _) = Client::accepted(b.addr, connect_expiry("away", true, 3600)).await;
    sub.subscribe("spill/t", QoS::AtLeastOnce).await;
    sub.disconnect_with(ReasonCode::Success, Default::default())
        .await;

    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    let payload = vec![0xA5u8; 1024];
    let mut peak = 0;
    for i in 0..MESSAGES {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let code = publisher
            .publish(plain("spill/t", &p, QoS::AtLeastOnce))
            .await;
        assert_eq!(code, ReasonCode::Success, "publish #{i}");
        peak = peak.max(b.broker().memory.used());
    }
    assert!(
        peak < BUDGET,
        "message memory reached {peak} bytes of a {BUDGET} budget"
    );
    let spilled = b
        .broker()
        .session("away")
        .expect("stored session")
        .inspect(|s| s.spilled());
    assert!(spilled > MESSAGES / 2, "only {spilled} messages spilled");

    let (mut sub, ack) = Client::accepted(b.addr, connect_expiry("away", false, 3600)).await;
    assert!(ack.session_present);
    for i in 0..MESSAGES {
        let p = sub.receive().await;
        let n = u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
        assert_eq!(n, i as u64, "every message, in order");
    }
    sub.expect_quiet("after every message").await;
    let left = b
        .broker()
        .session("away")
        .expect("session")
        .inspect(|s| (s.queued(), s.spilled()));
    assert_eq!(left, (0, 0));
    b.stop().await;
}
