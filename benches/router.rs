//! Routing through `ternmq::router::Router`, without sockets: topic matching among
//! 100,000 subscriptions, and one message fanned out to 1,000 sessions.
//!
//!     cargo bench --bench router

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ternmq::message::Message;
use ternmq::protocol::{QoS, SubOptions};
use ternmq::router::Router;
use ternmq::session::{Env, Link, QueueLimits, Session, Wire};

fn options(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        ..SubOptions::default()
    }
}

fn session(id: u64, limits: QueueLimits) -> Arc<Session> {
    Arc::new(Session::new(
        id,
        format!("c{id}").as_str().into(),
        Arc::new(Env::new(limits)),
    ))
}

fn message(topic: &str, qos: QoS) -> Arc<Message> {
    Arc::new(Message::new(
        topic.into(),
        Bytes::from_static(&[0xA5; 64]),
        qos,
        false,
        None,
        0,
        Instant::now(),
    ))
}

/// 100,000 subscriptions, one session each, over 10,000 devices (topics
/// `s{site}/d{device}/{metric}`, 100 sites of 100 devices), ten per device: 70% exact
/// (`s3/d17/temp`), 20% with `+` (`s3/d17/+`, `s3/+/temp`, `+/d17/hum`), 10% with `#`
/// (`s3/d17/#`, `s3/#`). Sessions are offline and get QoS 0: each match is handed to its
/// session, which refuses it cheaply (nothing is queued), so what is measured is finding
/// the subscribers.
fn populated_router() -> (Router<Session>, Vec<String>) {
    let router = Router::default();
    let mut filters = Vec::with_capacity(100_000);
    let limits = QueueLimits {
        max_inflight: 20,
        max_queued: 1000,
        max_queued_bytes: 0,
        queue_qos0: false,
    };
    let metrics = ["temp", "hum", "volt", "load"];
    for i in 0..100_000usize {
        let (site, device, kind) = (i % 100, (i / 100) % 100, i / 10_000);
        let every_tenth = device % 10 == 0;
        let filter = match kind {
            0..=6 => format!("s{site}/d{device}/{}", metrics[kind % 4]),
            7 => format!("s{site}/d{device}/+"),
            8 if every_tenth => format!("s{site}/+/{}", metrics[device % 4]),
            8 => format!("+/d{device}/{}", metrics[site % 4]),
            _ if every_tenth => format!("s{site}/#"),
            _ => format!("s{site}/d{device}/#"),
        };
        router.subscribe(
            &filter,
            &session(i as u64, limits),
            options(QoS::AtMostOnce),
            None,
        );
        filters.push(filter);
    }
    (router, filters)
}

/// How many of `filters` match `topic` (a plain reference matcher, to describe the load).
fn count_matches(filters: &[String], topic: &str) -> usize {
    let matches = |filter: &str| {
        let mut t = topic.split('/');
        for level in filter.split('/') {
            match (level, t.next()) {
                ("#", _) => return true,
                ("+", Some(_)) => {}
                (l, Some(x)) if l == x => {}
                _ => return false,
            }
        }
        t.next().is_none()
    };
    filters.iter().filter(|f| matches(f)).count()
}

fn matching(c: &mut Criterion) {
    let (router, filters) = populated_router();
    let mut group = c.benchmark_group("match_100k_subscriptions");
    group.throughput(Throughput::Elements(1));
    // A device topic: its exact, `+` and `#` subscribers.
    let hit = message("s42/d21/temp", QoS::AtMostOnce);
    for topic in ["s42/d21/temp", "s42/d999/temp", "other/tree/entirely"] {
        let n = count_matches(&filters, topic);
        eprintln!("{topic}: {n} matching subscriptions of {}", filters.len());
    }
    assert_eq!(router.publish(&hit), 0, "offline sessions refuse QoS 0");
    group.bench_function("publish_device_topic", |b| {
        b.iter(|| router.publish(black_box(&hit)))
    });
    // An unknown device: only the site-wide `+` and `#` subscriptions match.
    let miss = message("s42/d999/temp", QoS::AtMostOnce);
    group.bench_function("publish_unmatched_device", |b| {
        b.iter(|| router.publish(black_box(&miss)))
    });
    let nowhere = message("other/tree/entirely", QoS::AtMostOnce);
    group.bench_function("publish_no_subscriber", |b| {
        b.iter(|| router.publish(black_box(&nowhere)))
    });
    group.finish();

    let mut group = c.benchmark_group("subscribe");
    group.throughput(Throughput::Elements(1));
    let limits = QueueLimits {
        max_inflight: 20,
        max_queued: 1000,
        max_queued_bytes: 0,
        queue_qos0: false,
    };
    let extra = session(1_000_000, limits);
    let mut n = 0u64;
    group.bench_function("subscribe_unsubscribe_into_100k", |b| {
        b.iter(|| {
            n += 1;
            let filter = format!("s{}/d{}/new{}", n % 100, n % 1000, n % 7);
            router.subscribe(&filter, &extra, options(QoS::AtLeastOnce), None);
            router.unsubscribe(&filter, extra.id);
        })
    });
    group.finish();
}

/// One message to 1,000 online sessions subscribed to its topic: the router's share of
/// a fan-out (finding them, one `Delivery` each, queueing, waking the connection).
/// Queues are emptied between batches, outside the measured time.
fn fan_out(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 1000;
    const PER_BATCH: u64 = 100;
    let mut group = c.benchmark_group("fan_out_1000");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for (name, qos) in [("qos0", QoS::AtMostOnce), ("qos1", QoS::AtLeastOnce)] {
        let router = Router::default();
        let limits = QueueLimits {
            max_inflight: 20,
            max_queued: PER_BATCH as usize + 1,
            max_queued_bytes: 0,
            queue_qos0: false,
        };
        let sessions: Vec<(Arc<Session>, Link)> = (0..SUBSCRIBERS as u64)
            .map(|id| {
                let s = session(id, limits);
                let link = Link::new(id, Arc::new(Wire::default()));
                s.attach_new(link.clone(), 0);
                router.subscribe("fan/out", &s, options(qos), None);
                (s, link)
            })
            .collect();
        let msg = message("fan/out", qos);
        assert_eq!(router.publish(&msg), SUBSCRIBERS, "every session queues it");
        let drain = || {
            for (s, link) in &sessions {
                let _ = s.with_state(link.conn_id, |st| st.clear_queue());
            }
        };
        drain();
        group.bench_function(format!("publish_{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(PER_BATCH);
                    let start = Instant::now();
                    for _ in 0..n {
                        black_box(router.publish(black_box(&msg)));
                    }
                    total += start.elapsed();
                    left -= n;
                    drain();
                }
                total
            })
        });
    }
    // For scale: cloning the `Arc<Message>` 1,000 times, the floor of any fan-out.
    let msg = message("fan/out", QoS::AtLeastOnce);
    group.bench_function("arc_clone_floor", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(SUBSCRIBERS),
            |v| {
                for _ in 0..SUBSCRIBERS {
                    v.push(black_box(&msg).clone());
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = matching, fan_out
}
criterion_main!(benches);
