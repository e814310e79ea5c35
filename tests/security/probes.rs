//! The hostile probes of issue 10, rerun against the `ternmq` binary (a process of its
//! own, so that its memory and descriptors are its own), each now bounded. The figures
//! printed (run with `--nocapture`) are those of docs/security.md, "Measured".

use crate::common::binary::BrokerProcess;
use crate::common::client::{connect_expiry, plain, publish_packet, Client};
use crate::support::*;
use std::net::SocketAddr;
use std::time::Duration;
use ternmq::protocol::{Packet, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a probe waits for the broker to answer or close.
const ANSWER: Duration = Duration::from_secs(5);
const MIB: u64 = 1024 * 1024;

/// A config on a free port, with anonymous clients, and `more` (e.g. a [limits] table).
fn config(more: &str) -> String {
    format!(
        "log_level = \"info\"\n[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n{more}\n"
    )
}

/// A fixed header of packet type `byte1` declaring `remaining` bytes.
fn fixed_header(byte1: u8, mut remaining: usize) -> Vec<u8> {
    let mut out = vec![byte1];
    loop {
        let low = (remaining & 0x7F) as u8;
        remaining >>= 7;
        out.push(if remaining > 0 { low | 0x80 } else { low });
        if remaining == 0 {
            return out;
        }
    }
}

/// Writes `head`, then zeros, until the broker closes the connection (the end of its
/// stream, or an error) or `max` bytes went out. Returns the bytes written after `head`
/// (socket buffers included) and whether the broker closed; a write blocked for `ANSWER`
/// (the broker stopped reading and kept the connection) counts as not closed.
async fn stream_until_closed(s: TcpStream, head: Vec<u8>, max: usize) -> (usize, bool) {
    stream_chunks_until_closed(s, head, vec![0u8; 64 * 1024], max).await
}

/// `stream_until_closed`, writing `chunk` over and over after `head`.
async fn stream_chunks_until_closed(
    s: TcpStream,
    head: Vec<u8>,
    chunk: Vec<u8>,
    max: usize,
) -> (usize, bool) {
    let (mut r, mut w) = s.into_split();
    // The broker sends nothing to these clients: a read ends only when it closes.
    let closed = async move {
        let mut buf = [0u8; 64];
        while let Ok(1..) = r.read(&mut buf).await {}
    };
    tokio::pin!(closed);
    if w.write_all(&head).await.is_err() {
        return (0, true);
    }
    let mut sent = 0;
    while sent < max {
        let rest = &chunk[sent % chunk.len()..];
        tokio::select! {
            () = &mut closed => return (sent, true),
            written = timeout(ANSWER, w.write(rest)) => match written {
                Ok(Ok(n)) => sent += n,
                Ok(Err(_)) => return (sent, true),
                Err(_) => return (sent, false),
            },
        }
    }
    (sent, false)
}

fn rss_report(probe: &str, broker: &BrokerProcess, before_kib: u64) -> u64 {
    let peak = broker.status_kib("VmHWM");
    let now = broker.status_kib("VmRSS");
    let growth = peak.saturating_sub(before_kib);
    eprintln!(
        "probe {probe}: RSS before {before_kib} KiB, peak (VmHWM) {peak} KiB, after {now} KiB: grew by at most {growth} KiB"
    );
    growth * 1024
}

/// Probe (a): 4 connections send a CONNECT header declaring 268 MB, then stream. Each is
/// closed as soon as the header is read (over `max_connect_size`, 64 KiB), before any
/// authentication; the broker's memory does not move.
#[tokio::test]
async fn probe_a_huge_connect_headers_are_refused_before_their_body() {
    let broker = BrokerProcess::start(&config(""));
    let before = broker.status_kib("VmRSS");
    let header = fixed_header(0x10, ternmq::protocol::MAX_REMAINING_LENGTH);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = TcpStream::connect(broker.addr).await.unwrap();
        tasks.push(tokio::spawn(stream_until_closed(
            s,
            header.clone(),
            250 << 20,
        )));
    }
    for t in tasks {
        let (sent, closed) = t.await.unwrap();
        eprintln!(
            "probe a: a client wrote {sent} bytes (socket buffers included) before the close"
        );
        assert!(
            closed && sent < 64 << 20,
            "closed {closed} after {sent} bytes"
        );
    }
    let growth = rss_report("a", &broker, before);
    assert!(growth < 16 * MIB, "RSS grew by {growth} bytes");
}

/// Connects with a 3.1.1 CONNECT (keep-alive 0) and reads the CONNACK.
async fn connected(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_bytes(id, 0)).await.unwrap();
    let mut ack = [0u8; 4];
    timeout(ANSWER, s.read_exact(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "{id}: CONNACK");
    s
}

/// Probe (b): after CONNECT, 4 clients each send a PUBLISH declaring 128 MB and stream its
/// payload without ever completing it. What they make the broker buffer counts against
/// `max_buffered_memory` (8 MiB here); a connection over its share while the budget is
/// exceeded is closed, so the broker holds about the budget, not 4 × 128 MB.
#[tokio::test]
async fn probe_b_partial_publishes_are_bounded_by_max_buffered_memory() {
    let budget = 8 * MIB;
    let mut broker = BrokerProcess::start(&config(&format!(
        "[limits]\nmax_buffered_memory = {budget}"
    )));
    let before = broker.status_kib("VmRSS");
    let topic = b"big";
    let mut head = fixed_header(0x30, 2 + topic.len() + (128 << 20));
    head.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    head.extend_from_slice(topic);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = connected(broker.addr, &format!("partial-{i}")).await;
        tasks.push(tokio::spawn(stream_until_closed(
            s,
            head.clone(),
            128 << 20,
        )));
    }
    for t in tasks {
        let (sent, closed) = t.await.unwrap();
        eprintln!("probe b: a client wrote {sent} bytes of its PUBLISH before the close");
        assert!(
            closed && sent < 64 << 20,
            "closed {closed} after {sent} bytes"
        );
    }
    let growth = rss_report("b", &broker, before);
    assert!(growth < 4 * budget, "RSS grew by {growth} bytes");
    broker.wait_for_log("why the connections were closed", |log| {
        log.contains("max_buffered_memory").then_some(())
    });
}

enum Answer {
    Accepted(TcpStream),
    /// CONNACK 3, or the connection closed (the reason).
    Refused(String),
    /// Nothing within `ANSWER`.
    Hung,
}

async fn try_connect(addr: SocketAddr, id: &str) -> Answer {
    let mut s = match timeout(ANSWER, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Answer::Refused(format!("connect: {e}")),
        Err(_) => return Answer::Hung,
    };
    if let Err(e) = s.write_all(&connect_bytes(id, 0)).await {
        return Answer::Refused(format!("write: {e}"));
    }
    let mut ack = [0u8; 4];
    match timeout(ANSWER, s.read_exact(&mut ack)).await {
        Err(_) => Answer::Hung,
        Ok(Err(e)) => Answer::Refused(format!("closed: {e}")),
        Ok(Ok(_)) if ack == [0x20, 2, 0, 0] => Answer::Accepted(s),
        Ok(Ok(_)) if ack == [0x20, 2, 0, 3] => Answer::Refused("CONNACK 3".into()),
        Ok(Ok(_)) => panic!("{id}: unexpected answer {ack:?}"),
    }
}

/// Probe (c): the process may open 64 files. Idle clients (keep-alive 0) take them all;
/// the next clients are answered at once (a 3.1.1 CONNACK 3, "server unavailable", from
/// a descriptor kept in reserve, or a close) instead of waiting in the listen queue; the
/// log line about it is rate limited; once descriptors are freed, clients get in again.
#[tokio::test]
async fn probe_c_out_of_descriptors_newcomers_are_answered_and_the_broker_recovers() {
    if !tools_available(&["prlimit"]) {
        return;
    }
    let mut broker = BrokerProcess::start_with_open_files(&config(""), 64);
    let base = broker.open_files();
    let mut idle = Vec::new();
    let started = std::time::Instant::now();
    let first_refusal = loop {
        match try_connect(broker.addr, &format!("idle-{}", idle.len())).await {
            Answer::Accepted(s) => idle.push(s),
            Answer::Refused(how) => break how,
            Answer::Hung => panic!("client {} hung: no answer within {ANSWER:?}", idle.len()),
        }
        assert!(idle.len() < 64, "64 descriptors and still accepting");
    };
    let mut answers = vec![first_refusal];
    for i in 0..8 {
        match try_connect(broker.addr, &format!("late-{i}")).await {
            Answer::Refused(how) => answers.push(how),
            Answer::Accepted(_) => panic!("late-{i} accepted with every descriptor in use"),
            Answer::Hung => panic!("late-{i} hung: no answer within {ANSWER:?}"),
        }
    }
    eprintln!(
        "probe c: {} descriptors at start, {} idle clients accepted, then {} refused: {answers:?}",
        base,
        idle.len(),
        answers.len()
    );
    // The log arrives through a pipe: wait for the line rather than race it.
    broker.wait_for_log("the out-of-descriptors warning", |log| {
        log.contains("out of file descriptors").then_some(())
    });
    let warnings = broker
        .log()
        .lines()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    // One line per 10 s at most.
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        (1..=allowed).contains(&warnings) && warnings < answers.len(),
        "{warnings} log lines for {} refusals after {} clients ({answers:?}):\n{}",
        answers.len(),
        idle.len(),
        broker.log()
    );

    // Four clients leave: newcomers get in again.
    idle.truncate(idle.len() - 4);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut again = 0;
    while again < 3 {
        match try_connect(broker.addr, &format!("again-{again}")).await {
            Answer::Accepted(s) => {
                idle.push(s);
                again += 1;
            }
            Answer::Refused(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the broker does not recover"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Answer::Hung => panic!("hung after descriptors were freed"),
        }
    }
}

/// Probe (d): two offline persistent sessions and 1 MiB QoS 1 messages. Past
/// `max_queued_memory` (32 MiB here) a 5.0 publisher gets PUBACK 0x97 and a 3.1.1 one is
/// disconnected without a PUBACK; every message acknowledged reaches both sessions; the
/// broker's memory stays near the budget however long the flood.
#[tokio::test]
async fn probe_d_queued_flood_is_refused_past_max_queued_memory_and_nothing_acked_is_lost() {
    let budget = 32 * MIB;
    let broker = BrokerProcess::start(&config(&format!("[limits]\nmax_queued_memory = {budget}")));
    let addr = broker.addr;
    for id in ["offline-1", "offline-2"] {
        let (mut c, _) = Client::accepted(addr, connect_expiry(id, true, 3600)).await;
        c.subscribe("flood/#", QoS::AtLeastOnce).await;
        c.disconnect().await;
    }
    let before = broker.status_kib("VmRSS");
    let payload = vec![b'm'; MIB as usize];
    let (mut publisher, _) = Client::accepted(addr, connect_expiry("flooder", true, 0)).await;
    let (mut acked, mut refused) = (0usize, 0usize);
    for i in 0..200 {
        let code = publisher
            .publish(plain(&format!("flood/{i}"), &payload, QoS::AtLeastOnce))
            .await;
        match code {
            ReasonCode::Success if refused == 0 => acked += 1,
            ReasonCode::QuotaExceeded => refused += 1,
            other => panic!("message {i}: {other:?} after {acked} acknowledged, {refused} refused"),
        }
    }
    eprintln!("probe d: 5.0 publisher: {acked} messages of 1 MiB acknowledged, then {refused} refused with 0x97");
    assert!(acked > 0 && refused > 0);
    assert!(
        (acked as u64) * 2 * MIB <= budget + 2 * MIB,
        "{acked} acknowledged"
    );

    // 3.1.1 cannot be told "quota exceeded": it is disconnected, without a PUBACK.
    let mut v3 = Client::connect_v311(addr, "flooder-3").await;
    v3.send(Packet::Publish(publish_packet(
        "flood/v3",
        &payload,
        QoS::AtLeastOnce,
        false,
        1,
    )))
    .await;
    let (packets, _) = v3.read_to_end().await;
    assert!(packets.is_empty(), "no PUBACK: {packets:?}");
    let growth = rss_report("d", &broker, before);
    assert!(growth < 3 * budget, "RSS grew by {growth} bytes");

    // Nothing acknowledged is lost: both sessions get every acknowledged message.
    for id in ["offline-1", "offline-2"] {
        let (mut c, ack) = Client::accepted(addr, connect_expiry(id, false, 3600)).await;
        assert!(ack.session_present);
        let mut got = Vec::new();
        while got.len() < acked {
            let p = c.expect_publish().await;
            c.acknowledge(&p).await;
            got.push(p.topic.to_string());
        }
        let expected: Vec<String> = (0..acked).map(|i| format!("flood/{i}")).collect();
        assert_eq!(got, expected, "{id}");
        c.expect_quiet("after the acknowledged messages").await;
        c.disconnect().await;
    }
    // Drained: the budget has room again.
    publisher
        .publish_expect(
            plain("flood/again", &payload, QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
}

/// Probe (e): many clients at once with a wrong password for an argon2id user. Each
/// check holds argon2id's 19 MiB: they run a few at a time (one per core, at most 4) in
/// memory reused from check to check, so the broker holds a few times 19 MiB however
/// many clients try (before: 19 MiB more per check, 3.3 GB after 200). Each client is
/// from its own loopback address, so that the per-address backoff does not space them.
#[tokio::test]
async fn probe_e_concurrent_password_checks_are_bounded() {
    let files = Files::new();
    let passwd = files.path("passwd");
    ternmq_passwd(&passwd, "alice", "right", false);
    let broker = BrokerProcess::start(&format!(
        "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\n[auth]\npassword_file = \"{}\"\n",
        passwd.display()
    ));
    let before = broker.status_kib("VmRSS");
    let attempts = 24u8;
    let mut tasks = Vec::new();
    for i in 0..attempts {
        let addr = broker.addr;
        tasks.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(SocketAddr::from(([127, 0, 1, i + 2], 0)))
                .unwrap();
            let mut s = socket.connect(addr).await.unwrap();
            let connect = login(
                ternmq::protocol::Protocol::V311,
                &format!("guess-{i}"),
                Some("alice"),
                Some("wrong"),
            );
            let bytes = crate::common::client::encode(
                &Packet::Connect(Box::new(connect)),
                ternmq::protocol::Protocol::V311,
            );
            s.write_all(&bytes).await.unwrap();
            let mut ack = [0u8; 4];
            timeout(Duration::from_secs(60), s.read_exact(&mut ack))
                .await
                .unwrap()
                .unwrap();
            ack
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            [0x20, 2, 0, 4],
            "CONNACK 4, bad user name or password"
        );
    }
    let growth = rss_report("e", &broker, before);
    assert!(
        growth < 96 * MIB,
        "RSS grew by {growth} bytes for {attempts} password checks"
    );
    // The right password still gets in.
    let connect = login(
        ternmq::protocol::Protocol::V5,
        "alice",
        Some("alice"),
        Some("right"),
    );
    Client::accepted(broker.addr, connect).await;
}

/// Upgrades a new connection to `addr` to a WebSocket on `/mqtt`; the client's send
/// buffer is small, so that what it has written is close to what the broker took.
async fn ws_upgraded(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(32 * 1024).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    s
}

/// A masked (zero mask) client frame header: `byte1` (FIN, opcode), a 64-bit length.
fn ws_frame_header(byte1: u8, len: u64) -> Vec<u8> {
    let mut head = vec![byte1, 0x80 | 127];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&[0; 4]);
    head
}

/// Probe (f): WebSocket clients send, before any CONNECT, with the default
/// `max_packet_size` (256 MiB): a binary frame declaring 200 MB, then 20 MB of it; or a
/// message in 16 KiB fragments that never ends, 20 MB of them. On a ws listener and
/// through an http listener's upgrade. The WebSocket layer reads a message whole before
/// MQTT sees it; until the CONNECT is accepted its limit is `max_connect_size` (64 KiB,
/// and 4 KiB): the frame is refused at its header, the fragments past 68 KiB. Each
/// client has written little more than its socket buffers when it is closed, and the
/// broker's memory does not move (before: +205 MB RSS per connection).
#[tokio::test]
async fn probe_f_websocket_messages_before_connect_are_bounded_by_max_connect_size() {
    let mut broker = BrokerProcess::start(
        "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\ntype = \"ws\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\
         [[listeners]]\ntype = \"http\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n",
    );
    let listener = |kind| {
        *broker
            .addrs(kind)
            .first()
            .unwrap_or_else(|| panic!("no {kind:?} listener in the log:\n{}", broker.log()))
    };
    let ws = listener(ternmq::config::ListenerKind::Ws);
    let http = listener(ternmq::config::ListenerKind::Http);
    let before = broker.status_kib("VmRSS");
    // FIN + binary, 200 MB: then its payload, zeros.
    let huge = (ws_frame_header(0x82, 200 << 20), vec![0u8; 64 * 1024]);
    // Binary without FIN, then continuation frames without FIN, 16 KiB each.
    let mut fragment = ws_frame_header(0x00, 16 * 1024);
    fragment.resize(fragment.len() + 16 * 1024, 0);
    let fragments = (
        [ws_frame_header(0x02, 16 * 1024), vec![0u8; 16 * 1024]].concat(),
        fragment,
    );
    let mut tasks = Vec::new();
    for (name, addr) in [("ws", ws), ("http", http)] {
        for (what, (head, chunk)) in [("frame", &huge), ("fragments", &fragments)] {
            let s = ws_upgraded(addr).await;
            let (head, chunk) = (head.clone(), chunk.clone());
            let streaming = stream_chunks_until_closed(s, head, chunk, 20 << 20);
            tasks.push((name, what, tokio::spawn(streaming)));
        }
    }
    for (name, what, t) in tasks {
        let (sent, closed) = t.await.unwrap();
        eprintln!("probe f: a client of the {name} listener wrote {sent} bytes of {what} before the close");
        assert!(
            closed && sent < 2 << 20,
            "{name} listener, {what}: closed {closed} after {sent} bytes"
        );
    }
    let growth = rss_report("f", &broker, before);
    assert!(growth < 16 * MIB, "RSS grew by {growth} bytes");
    broker.wait_for_log("why the connections were closed", |log| {
        log.contains("over limits.max_connect_size before the CONNECT")
            .then_some(())
    });
}
