//! PUBLISH decode and encode, the per-message work of every connection.
//!
//!     cargo bench --bench codec

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use ternmq::message::{DeliveryHeader, Message};
use ternmq::protocol::{self, Packet, Protocol, PublishHeader, QoS};

const TOPIC: &str = "site/17/device/4242/temperature";

fn header(qos: QoS) -> PublishHeader<'static> {
    PublishHeader {
        dup: false,
        qos,
        retain: false,
        topic: TOPIC,
        pkid: if qos == QoS::AtMostOnce { 0 } else { 7 },
    }
}

/// `n` PUBLISH packets of `payload` bytes back to back, as a socket read delivers them.
fn wire(n: usize, qos: QoS, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    for _ in 0..n {
        protocol::encode_publish(&mut out, Protocol::V311, &header(qos), None, payload)
            .expect("encodes");
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in [64usize, 1024] {
        let payload = vec![0xA5; size];
        for (name, qos) in [("qos0", QoS::AtMostOnce), ("qos1", QoS::AtLeastOnce)] {
            // 100 packets per buffer: the fixed cost of a read is shared as in practice.
            let buf = wire(100, qos, &payload);
            group.throughput(Throughput::Elements(100));
            group.bench_function(format!("publish_{name}_{size}B_x100"), |b| {
                b.iter_batched(
                    || buf.clone(),
                    |mut buf| {
                        while let Some(p) =
                            protocol::decode(&mut buf, Protocol::V311, usize::MAX).expect("valid")
                        {
                            black_box(&p);
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    let payload = vec![0xA5; 64];
    let buf = wire(100, QoS::AtLeastOnce, &payload);
    group.throughput(Throughput::Elements(100));
    group.bench_function("publish_qos1_64B_x100_v5", |b| {
        let mut v5 = BytesMut::new();
        for _ in 0..100 {
            protocol::encode_publish(
                &mut v5,
                Protocol::V5,
                &header(QoS::AtLeastOnce),
                None,
                &payload,
            )
            .expect("encodes");
        }
        b.iter_batched(
            || v5.clone(),
            |mut buf| {
                while let Some(p) =
                    protocol::decode(&mut buf, Protocol::V5, usize::MAX).expect("valid")
                {
                    black_box(&p);
                }
            },
            BatchSize::SmallInput,
        )
    });
    drop(buf);
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 1024] {
        let payload = vec![0xA5; size];
        group.bench_function(format!("publish_qos1_{size}B"), |b| {
            let mut out = BytesMut::with_capacity(64 * 1024);
            b.iter(|| {
                if out.len() > 60 * 1024 {
                    out.clear();
                }
                protocol::encode_publish(
                    &mut out,
                    Protocol::V311,
                    &header(QoS::AtLeastOnce),
                    None,
                    black_box(&payload),
                )
                .expect("encodes");
            })
        });
    }
    // The generic encoder, for comparison with the PUBLISH fast path.
    let packet = Packet::Publish(protocol::Publish {
        qos: QoS::AtLeastOnce,
        topic: TOPIC.into(),
        pkid: 7,
        payload: Bytes::from(vec![0xA5; 64]),
        ..Default::default()
    });
    group.bench_function("packet_publish_qos1_64B", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            if out.len() > 60 * 1024 {
                out.clear();
            }
            protocol::encode(black_box(&packet), Protocol::V311, &mut out).expect("encodes");
        })
    });
    // What a subscriber's connection does per delivery: the router's Message encoded
    // with that subscriber's header (QoS 0 3.x encodings are cached per message).
    for (name, qos, pkid) in [("qos0", QoS::AtMostOnce, 0), ("qos1", QoS::AtLeastOnce, 9)] {
        let message = Arc::new(Message::new(
            TOPIC.into(),
            Bytes::from(vec![0xA5; 64]),
            qos,
            false,
            None,
            1,
            std::time::Instant::now(),
        ));
        group.bench_function(format!("message_delivery_{name}_64B"), |b| {
            let mut out = BytesMut::with_capacity(64 * 1024);
            let delivery = DeliveryHeader {
                dup: false,
                qos,
                retain: false,
                pkid,
                ..DeliveryHeader::default()
            };
            let now = std::time::Instant::now();
            b.iter(|| {
                if out.len() > 60 * 1024 {
                    out.clear();
                }
                message
                    .encode(&mut out, Protocol::V311, black_box(&delivery), now)
                    .expect("encodes");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
