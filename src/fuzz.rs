//! The bodies of the fuzz targets (`fuzz/`, cargo-fuzz on nightly), here so that the
//! same code also runs on stable: the unit tests below drive each with a fixed number of
//! proptest cases and the committed seeds, within `cargo test`. docs/fuzzing.md says how
//! to fuzz for hours.
//!
//! Each target panics when it finds a fault: a panic in the broker, a decoded packet
//! that does not survive encode → decode, or a connection that does not end.

use crate::broker::Broker;
use crate::config::Config;
use crate::protocol::{self, Packet, Protocol};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The packet decoder on arbitrary bytes. The first byte picks the protocol (3.1, 3.1.1,
/// 5.0) and the maximum packet size; the rest is a stream of packets. Every packet
/// decoded must encode and decode back to itself, and splitting the stream anywhere
/// must not change what is decoded.
pub fn decode(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let protocol = [Protocol::V31, Protocol::V311, Protocol::V5][usize::from(control % 3)];
    let max = match control / 3 % 4 {
        0 => usize::MAX,
        1 => 64,
        2 => 1024,
        _ => 65_536,
    };
    let whole = decode_all(&mut BytesMut::from(stream), protocol, max);
    for packet in whole.iter().filter_map(|r| r.as_ref().ok()) {
        round_trip(packet, protocol);
    }
    // The same bytes arriving in two reads.
    let at = usize::from(control).min(stream.len());
    let mut buf = BytesMut::from(&stream[..at]);
    let mut split = decode_all(&mut buf, protocol, max);
    if !matches!(split.last(), Some(Err(_))) {
        buf.extend_from_slice(&stream[at..]);
        split.extend(decode_all(&mut buf, protocol, max));
    }
    assert_eq!(whole, split, "decoding depends on where reads end");
}

/// Decodes until the buffer holds no complete packet or an error; an error ends the list.
fn decode_all(
    buf: &mut BytesMut,
    protocol: Protocol,
    max: usize,
) -> Vec<Result<Packet, protocol::Error>> {
    let mut out = Vec::new();
    loop {
        match protocol::decode(buf, protocol, max) {
            Ok(Some(p)) => out.push(Ok(p)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// decode → encode → decode gives the packet back.
fn round_trip(packet: &Packet, protocol: Protocol) {
    let mut bytes = BytesMut::new();
    if let Err(e) = protocol::encode(packet, protocol, &mut bytes) {
        panic!("a decoded packet does not encode ({e}): {packet:?}");
    }
    let len = bytes.len();
    match protocol::decode(&mut bytes, protocol, usize::MAX) {
        Ok(Some(again)) => {
            assert_eq!(&again, packet, "decode(encode(p)) != p");
            assert!(
                bytes.is_empty(),
                "encode wrote {len} bytes, decode used fewer"
            );
        }
        other => panic!("an encoded packet does not decode ({other:?}): {packet:?}"),
    }
}

/// A whole connection fed arbitrary bytes: an in-memory broker (no sockets) serves the
/// fuzzed client over `tokio::io::duplex`, next to a subscriber (`#` and a shared
/// subscription, with topic aliases, a small Receive Maximum and Maximum Packet Size)
/// that receives what the fuzzed client publishes. The first byte chooses a CONNECT put
/// before the bytes (none, 3.1.1 or 5.0, so that the fuzzer starts connected) and the
/// size of the chunks the bytes are written in. The connection must end once the
/// client's side closes.
pub fn connection(data: &[u8]) {
    run_connection(data);
}

/// What a `connection` run delivered: PUBLISH packets the subscriber received.
fn run_connection(data: &[u8]) -> usize {
    let Some((&control, stream)) = data.split_first() else {
        return 0;
    };
    let mut input = match control % 3 {
        0 => Vec::new(),
        1 => encoded(&connect_packet(Protocol::V311, "fuzz"), Protocol::V311),
        _ => encoded(&connect_packet(Protocol::V5, "fuzz"), Protocol::V5),
    };
    input.extend_from_slice(stream);
    let chunk = usize::from(control / 3) * 8 + 1;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let broker = Broker::new(fuzz_config(), Vec::new()).expect("the fuzz config loads");
        let done = Arc::new(tokio::sync::Notify::new());
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        let sub = tokio::spawn(subscriber(serve(&broker), ready, done.clone()));
        // Subscribed before the fuzzed client starts, so that every run is the same.
        let _ = subscribed.await;
        within(
            "the fuzzed connection to end",
            feed(serve(&broker), input, chunk),
        )
        .await;
        done.notify_one();
        let delivered = within("the subscriber to end", sub).await;
        broker.begin_shutdown();
        broker.tasks.close();
        within("the broker's tasks to end", broker.tasks.wait()).await;
        delivered.unwrap_or(0)
    })
}

/// Awaits `f`; a hang is a fault.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(t) => t,
        Err(_) => panic!("waited 10 s for {what}"),
    }
}

/// Writes `input` in chunks while reading what the broker answers, closes the write
/// side, and reads until the broker closes.
async fn feed(stream: DuplexStream, input: Vec<u8>, chunk: usize) {
    let (mut r, mut w) = tokio::io::split(stream);
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(1..) = r.read(&mut buf).await {}
    };
    let writer = async move {
        for part in input.chunks(chunk) {
            if w.write_all(part).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Connects and subscribes, says so on `ready` once the SUBACK is in, then reads until
/// the broker closes (after `done`, it closes its side). Returns the PUBLISH packets
/// received.
async fn subscriber(
    stream: DuplexStream,
    ready: tokio::sync::oneshot::Sender<()>,
    done: Arc<tokio::sync::Notify>,
) -> usize {
    let mut connect = connect(Protocol::V5, "sub");
    connect.username = Some("watcher".into());
    connect.properties.topic_alias_maximum = Some(5);
    connect.properties.receive_maximum = Some(3);
    connect.properties.maximum_packet_size = Some(512);
    let mut bytes = encoded(&Packet::Connect(Box::new(connect)), Protocol::V5);
    let qos = protocol::QoS::ExactlyOnce;
    bytes.extend(encoded(
        &subscribe(&[("#", qos), ("$share/g/#", qos)], 1),
        Protocol::V5,
    ));
    let (mut r, mut w) = tokio::io::split(stream);
    if w.write_all(&bytes).await.is_err() {
        return 0;
    }
    let reader = async move {
        let (mut ready, mut publishes) = (Some(ready), 0);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        while let Ok(1..) = r.read_buf(&mut buf).await {
            while let Ok(Some(packet)) = protocol::decode(&mut buf, Protocol::V5, usize::MAX) {
                match packet {
                    Packet::SubAck(_) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Packet::Publish(_) => publishes += 1,
                    _ => {}
                }
            }
            buf.reserve(16 * 1024);
        }
        publishes
    };
    let closer = async move {
        done.notified().await;
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, closer).0
}

/// A new in-memory connection to `broker`; returns the client's end.
fn serve(broker: &Arc<Broker>) -> DuplexStream {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let b = broker.clone();
    broker.tasks.spawn(async move {
        let (r, w) = tokio::io::split(server);
        let peer = crate::conn::Peer::new(SocketAddr::from(([127, 0, 0, 1], 1883)));
        crate::conn::serve(&b, r, w, peer, false).await;
    });
    client
}

fn connect(protocol: Protocol, client_id: &str) -> protocol::Connect {
    protocol::Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: Some("fuzz".into()),
        password: None,
        properties: protocol::Properties {
            topic_alias_maximum: Some(10),
            ..protocol::Properties::default()
        },
    }
}

fn encoded(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    protocol::encode(packet, protocol, &mut out).expect("a valid packet encodes");
    out.to_vec()
}

fn connect_packet(protocol: Protocol, client_id: &str) -> Packet {
    Packet::Connect(Box::new(connect(protocol, client_id)))
}

/// Limits small enough that fuzzed input reaches them: queues, sizes, subscriptions, the
/// memory budgets; an ACL so that refusals are taken too.
fn fuzz_config() -> Config {
    let mut config = Config::default();
    config.mqtt.max_packet_size = 64 * 1024;
    config.limits.message_size_limit = 4096;
    config.limits.max_subscriptions = 16;
    config.limits.max_client_id_length = 64;
    config.limits.max_queued_memory = 1 << 20;
    config.limits.max_buffered_memory = 1 << 20;
    config.session.max_queued_messages = 16;
    config.session.max_inflight_messages = 4;
    config.session.max_queued_bytes = 64 * 1024;
    config.auth.acl_file = acl_file();
    config
}

/// The fuzz targets' acl_file, written once per process to the temporary directory.
fn acl_file() -> Option<std::path::PathBuf> {
    static PATH: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ternmq-fuzz-{}.acl", std::process::id()));
        let acl = "topic read #\nuser fuzz\ntopic readwrite #\ntopic deny secret/#\n\
                   topic subscribe a/#\ntopic subscribe +/b\nuser watcher\ntopic read #\n\
                   topic subscribe #\npattern readwrite c/%c/#\n";
        std::fs::write(&path, acl).ok().map(|()| path)
    })
    .clone()
}

/// Valid inputs for each target (the seed corpus, `fuzz/seeds/`): sessions of packets of
/// every kind a client sends, in 3.1.1 and 5.0.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for session in seed_sessions() {
        for (control, protocol) in [(1u8, Protocol::V311), (2, Protocol::V5)] {
            let mut stream = Vec::new();
            for p in &session {
                // A topic alias is 5.0 only.
                let aliased = matches!(p, Packet::Publish(p) if p.properties.is_some());
                if protocol.is_v5() || !aliased {
                    stream.extend(encoded(p, protocol));
                }
            }
            // As the connection target's input (CONNECT put first by the control byte,
            // chunks of 1 and of 481 bytes), and as the decoder's (the CONNECT included).
            for chunks in [0u8, 60] {
                let mut input = vec![control + 3 * chunks];
                input.extend(&stream);
                out.push(("connection", input));
            }
            let mut input = vec![u8::from(protocol.is_v5()) + 1];
            input.extend(encoded(&connect_packet(protocol, "fuzz"), protocol));
            input.extend(&stream);
            out.push(("decode", input));
        }
    }
    out
}

fn seed_sessions() -> Vec<Vec<Packet>> {
    use protocol::{Properties, QoS};
    let mut aliased = publish("a/alias", QoS::AtLeastOnce, 7);
    if let Packet::Publish(p) = &mut aliased {
        p.properties = Some(Box::new(Properties {
            topic_alias: Some(1),
            message_expiry_interval: Some(30),
            ..Properties::default()
        }));
    }
    let mut retained = publish("r/1", QoS::AtLeastOnce, 1);
    if let Packet::Publish(p) = &mut retained {
        p.retain = true;
    }
    vec![
        vec![
            subscribe(&[("a/#", QoS::AtLeastOnce), ("+/b", QoS::ExactlyOnce)], 1),
            publish("a/1", QoS::AtMostOnce, 0),
            publish("a/2", QoS::AtLeastOnce, 2),
            publish("x/b", QoS::ExactlyOnce, 3),
            Packet::PubRel(ack(3)),
            Packet::PingReq,
            aliased,
        ],
        vec![
            retained,
            subscribe(&[("r/#", QoS::ExactlyOnce)], 2),
            Packet::PubAck(ack(1)),
            Packet::PubRec(ack(2)),
            Packet::PubComp(ack(2)),
            Packet::Unsubscribe(protocol::Unsubscribe {
                pkid: 3,
                filters: vec!["r/#".into()],
                properties: Properties::default(),
            }),
        ],
        vec![
            publish("secret/x", QoS::AtLeastOnce, 1),
            publish("c/fuzz/x", QoS::ExactlyOnce, 2),
            subscribe(
                &[
                    ("secret/#", QoS::AtLeastOnce),
                    ("$share/g/a/#", QoS::AtMostOnce),
                ],
                3,
            ),
            Packet::Disconnect(protocol::Disconnect::default()),
        ],
    ]
}

fn publish(topic: &str, qos: protocol::QoS, pkid: u16) -> Packet {
    Packet::Publish(protocol::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid,
        payload: bytes::Bytes::from_static(b"payload"),
        properties: None,
    })
}

fn subscribe(filters: &[(&str, protocol::QoS)], pkid: u16) -> Packet {
    let filters = filters
        .iter()
        .map(|&(f, qos)| protocol::SubscribeFilter {
            filter: f.into(),
            options: protocol::SubOptions {
                qos,
                ..protocol::SubOptions::default()
            },
        })
        .collect();
    Packet::Subscribe(protocol::Subscribe {
        pkid,
        filters,
        properties: protocol::Properties::default(),
    })
}

fn ack(pkid: u16) -> protocol::Ack {
    protocol::Ack {
        pkid,
        ..protocol::Ack::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The seeds pass, and the connection harness works: each seed's client publishes
    /// something the subscriber receives.
    #[test]
    fn seeds_pass_both_targets() {
        for (target, input) in seeds() {
            match target {
                "decode" => decode(&input),
                _ => assert!(run_connection(&input) > 0, "nothing delivered: {input:?}"),
            }
        }
    }

    /// Writes the seed corpus into fuzz/seeds/ (run by hand after changing `seeds`):
    /// `cargo test --lib fuzz::tests::write_seed_corpus -- --ignored`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (i, (target, input)) in seeds().into_iter().enumerate() {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{i:02}")), input).unwrap();
        }
    }

    /// Seeds with a few bytes changed, dropped or duplicated: closer to what a fuzzer
    /// tries than random bytes.
    fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let seeds: Vec<Vec<u8>> = seeds()
            .into_iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, s)| s)
            .collect();
        (
            proptest::sample::select(seeds),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 0..6),
        )
            .prop_map(|(mut input, edits)| {
                for (at, byte, kind) in edits {
                    let i = at.index(input.len());
                    match kind {
                        0 => input[i] = byte,
                        1 => {
                            input.remove(i);
                        }
                        _ => input.insert(i, byte),
                    }
                }
                input
            })
    }

    fn any_input(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            mutated(target),
            proptest::collection::vec(any::<u8>(), 0..256),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn decode_target(input in any_input("decode")) {
            decode(&input);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn connection_target(input in any_input("connection")) {
            connection(&input);
        }
    }
}
