//! Persistence through the broker binary (docs/persistence.md, "Measured through the
//! broker"): start-up recovery of a full store, disk bytes per queued message, and write
//! amplification, for each durability mode.
//!
//!     cargo bench --bench persistence       # 100,000 retained + 10,000 sessions x 10 queued
//!     cargo test --bench persistence        # small sizes: a smoke test of the same code
//!
//! Each mode gets a fresh data directory and a `ternmq` process (the binary cargo built for
//! this target: release under `cargo bench`). One MQTT 3.1.1 client fills it: retained
//! messages on distinct topics, persistent sessions (Clean Session 0) each subscribed to
//! its own topic and offline, then QoS 1 messages queued for them, all pipelined. What the
//! broker wrote is read from `/proc/<pid>/io` (`write_bytes`: what the process sent to the
//! storage layer) and what the store occupies from the blocks allocated under the data
//! directory. Recovery is timed from process start to the listener's log line, after a
//! clean shutdown (SIGTERM) and after `kill -9`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ternmq::protocol::{
    self, ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, SubOptions, Subscribe,
    SubscribeFilter,
};
use ternmq::store::allocated_bytes;

struct Sizes {
    retained: u64,
    sessions: u64,
    queued_per_session: u64,
    /// Starts timed per case; kills per mode.
    restarts: usize,
    publish_before_kill: Duration,
}

const FULL: Sizes = Sizes {
    retained: 100_000,
    sessions: 10_000,
    queued_per_session: 10,
    restarts: 3,
    publish_before_kill: Duration::from_millis(1000),
};

const SMOKE: Sizes = Sizes {
    retained: 200,
    sessions: 20,
    queued_per_session: 5,
    restarts: 1,
    publish_before_kill: Duration::from_millis(200),
};

const PAYLOAD: usize = 100;
/// PUBLISHes written before their PUBACKs are read.
const WINDOW: usize = 500;
const WAIT: Duration = Duration::from_secs(120);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full { &FULL } else { &SMOKE };
    let modes: Vec<String> = match std::env::var("PERSISTENCE_BENCH_SYNC") {
        Ok(m) if !m.is_empty() => m.split(',').map(str::to_owned).collect(),
        _ if full => vec!["always".into(), "interval".into(), "never".into()],
        _ => vec!["interval".into()],
    };
    let root = tempfile::tempdir().expect("tempdir");
    println!(
        "persistence bench (through the broker): {} retained + {} sessions x {} queued, \
         {PAYLOAD} B payloads, QoS 1",
        sizes.retained, sizes.sessions, sizes.queued_per_session
    );
    let mut losses = Vec::new();
    println!(
        "| sync | retained: fill | written per message | queue: fill | written per message | \
         write amplification | disk per message | store after shutdown | start after SIGTERM | \
         start after kill -9 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for mode in &modes {
        let r = run(root.path(), mode, sizes);
        println!(
            "| {mode} | {:.0} msg/s | {} B | {:.0} msg/s | {} B | {:.1}x | {} B | {:.1} MiB | {} | {} |",
            r.retained_rate,
            r.written_per_retained,
            r.queue_rate,
            r.written_per_queued,
            r.write_amplification,
            r.disk_per_queued,
            r.store_mib,
            fmt_ms(&r.clean_starts),
            fmt_ms(&r.crash_starts),
        );
        losses.push((mode, crash_loss(root.path(), mode, sizes)));
    }
    println!(
        "\nkill -9 while a publisher sends QoS 1 messages to an offline persistent session as \
         fast as PUBACKs come (window {WINDOW}), {} ms in:\n",
        sizes.publish_before_kill.as_millis()
    );
    println!("| sync | acknowledged before the kill | of them lost |");
    println!("|---|---|---|");
    for (mode, runs) in losses {
        let acked: Vec<String> = runs.iter().map(|(a, _)| a.to_string()).collect();
        let lost: Vec<String> = runs.iter().map(|(_, l)| l.to_string()).collect();
        println!("| {mode} | {} | {} |", acked.join(", "), lost.join(", "));
    }
}

/// Acknowledged messages, and how many of them a `kill -9` lost, for each of
/// `sizes.restarts` kills.
fn crash_loss(root: &Path, sync: &str, sizes: &Sizes) -> Vec<(usize, usize)> {
    let dir = root.join(format!("crash-{sync}"));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let config = write_config(&dir, sync);
    let mut out = Vec::new();
    for round in 0..sizes.restarts {
        let broker = Broker::start(&config);
        let client_id = format!("crash-{round}");
        subscribe_offline(broker.addr, &client_id, &client_id);
        let addr = broker.addr;
        let topic = client_id.clone();
        let publisher = std::thread::spawn(move || publish_until_broken(addr, &topic));
        std::thread::sleep(sizes.publish_before_kill);
        broker.kill_9();
        let acked = publisher.join().expect("publisher");
        let broker = Broker::start(&config);
        let got = drain_numbers(broker.addr, &client_id);
        let lost = acked.iter().filter(|n| !got.contains(n)).count();
        out.push((acked.len(), lost));
        broker.terminate();
    }
    out
}

fn write_config(dir: &Path, sync: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "log_level = \"info\"\n\
             [[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\
             [session]\nmax_queued_messages = 10000000\n\
             [limits]\nmax_queued_memory = 4294967296\n\
             [persistence]\nenabled = true\ndir = {data:?}\nsync = \"{sync}\"\n"
        ),
    )
    .expect("write the config");
    config
}

fn fmt_ms(times: &[Duration]) -> String {
    let mut ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
    ms.sort_unstable();
    match ms.as_slice() {
        [] => "–".into(),
        [one] => format!("{one} ms"),
        _ => format!("{} ms (of {ms:?})", ms[ms.len() / 2]),
    }
}

struct Measured {
    retained_rate: f64,
    queue_rate: f64,
    written_per_retained: u64,
    disk_per_queued: u64,
    written_per_queued: u64,
    write_amplification: f64,
    store_mib: f64,
    clean_starts: Vec<Duration>,
    crash_starts: Vec<Duration>,
}

fn run(root: &Path, sync: &str, sizes: &Sizes) -> Measured {
    let dir = root.join(sync);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let data = dir.join("data");
    let config = write_config(&dir, sync);

    // Retained messages and sessions, then a restart, then the queue: each phase's writes
    // are those of a fresh process, and its disk space is measured after a clean shutdown.
    let broker = Broker::start(&config);
    let t = Instant::now();
    let topics: Vec<String> = (0..sizes.retained).map(|i| format!("r/{i}")).collect();
    publish_all(
        broker.addr,
        "filler-r",
        topics.iter().map(String::as_str),
        true,
    );
    let retained_rate = sizes.retained as f64 / t.elapsed().as_secs_f64();
    for s in 0..sizes.sessions {
        subscribe_offline(broker.addr, &format!("s{s}"), &format!("q/{s}"));
    }
    settle(&broker);
    let written_retained = broker.written();
    broker.terminate();
    let disk_retained = allocated_bytes(&data);

    let broker = Broker::start(&config);
    let queued = sizes.sessions * sizes.queued_per_session;
    let topics: Vec<String> = (0..queued)
        .map(|i| format!("q/{}", i % sizes.sessions))
        .collect();
    let t = Instant::now();
    publish_all(
        broker.addr,
        "filler-q",
        topics.iter().map(String::as_str),
        false,
    );
    let queue_rate = queued as f64 / t.elapsed().as_secs_f64();
    settle(&broker);
    let written_queue = broker.written();
    broker.terminate();
    let store = allocated_bytes(&data);

    // What a client asked the broker to keep of each queued message: topic and payload.
    let kept = queued as f64 * (PAYLOAD + "q/0000".len()) as f64;
    let mut result = Measured {
        retained_rate,
        queue_rate,
        written_per_retained: written_retained / sizes.retained.max(1),
        disk_per_queued: store.saturating_sub(disk_retained) / queued.max(1),
        written_per_queued: written_queue / queued.max(1),
        write_amplification: written_queue as f64 / kept,
        store_mib: store as f64 / f64::from(1 << 20),
        clean_starts: Vec::new(),
        crash_starts: Vec::new(),
    };

    let expected = format!(
        "retained={} sessions={} queued={queued}",
        sizes.retained, sizes.sessions
    );
    for round in 0..sizes.restarts {
        let b = Broker::start(&config);
        b.expect_restored(&expected);
        if round == 0 {
            if let Some(line) = b
                .lines
                .borrow()
                .iter()
                .find(|l| l.contains("state restored"))
            {
                eprintln!("{sync}: {line}");
            }
        }
        result.clean_starts.push(b.started_in);
        b.kill_9();
        let b = Broker::start(&config);
        b.expect_restored(&expected);
        result.crash_starts.push(b.started_in);
        b.terminate();
    }
    result
}

/// Lets the store thread finish what it was given (the disk usage is read next).
fn settle(broker: &Broker) {
    let mut last = broker.written();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = broker.written();
        if now == last {
            return;
        }
        last = now;
    }
}

/// The `ternmq` binary, started and listening.
struct Broker {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
    lines: std::cell::RefCell<Vec<String>>,
    started_in: Duration,
}

impl Broker {
    fn start(config: &Path) -> Broker {
        let t = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ternmq"))
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the ternmq binary");
        let (tx, log) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut lines = Vec::new();
        let addr = loop {
            let line = log
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("ternmq did not start: {lines:#?}"));
            let addr = (line.contains("listening") && line.contains("kind=Tcp"))
                .then(|| {
                    line.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .flatten();
            lines.push(line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        Broker {
            child,
            addr,
            log,
            lines: std::cell::RefCell::new(lines),
            started_in: t.elapsed(),
        }
    }

    /// Asserts that start-up restored what was stored (`expected`: `key=value` pairs of the
    /// "state restored" log line).
    fn expect_restored(&self, expected: &str) {
        let lines = self.lines.borrow();
        let line = lines
            .iter()
            .find(|l| l.contains("state restored from the store"))
            .unwrap_or_else(|| panic!("no recovery line: {lines:#?}"));
        for pair in expected.split_whitespace() {
            assert!(line.contains(pair), "{pair} in: {line}");
        }
    }

    /// Bytes the process has caused to be sent to the storage layer.
    fn written(&self) -> u64 {
        let io =
            std::fs::read_to_string(format!("/proc/{}/io", self.child.id())).unwrap_or_default();
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn terminate(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        let status = self.child.wait().expect("wait");
        while self.log.try_recv().is_ok() {}
        assert!(status.success(), "ternmq exit after SIGTERM: {status}");
    }

    fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- a small pipelined MQTT 3.1.1 client on the crate's codec ----

struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
}

impl Client {
    fn connect(addr: SocketAddr, client_id: &str, clean: bool) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut c = Client {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
        };
        c.send(&[Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start: clean,
            keep_alive: 600,
            client_id: ByteStr::from(client_id),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }))]);
        match c.next() {
            Packet::ConnAck(ack) if !ack.code.is_error() => c,
            other => panic!("{client_id}: expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, packets: &[Packet]) {
        let mut buf = BytesMut::new();
        for p in packets {
            protocol::encode(p, Protocol::V311, &mut buf).expect("encode");
        }
        self.stream.write_all(&buf).expect("write");
    }

    fn next(&mut self) -> Packet {
        loop {
            if let Some(p) =
                protocol::decode(&mut self.rbuf, Protocol::V311, usize::MAX).expect("decode")
            {
                return p;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "the broker closed the connection");
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `send`; false if the connection is gone.
    fn try_send(&mut self, packets: &[Packet]) -> bool {
        let mut buf = BytesMut::new();
        for p in packets {
            protocol::encode(p, Protocol::V311, &mut buf).expect("encode");
        }
        self.stream.write_all(&buf).is_ok()
    }

    /// `next`; None once the connection is gone (or quiet past its read timeout).
    fn try_next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = protocol::decode(&mut self.rbuf, Protocol::V311, usize::MAX).ok()? {
                return Some(p);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn disconnect(mut self) {
        self.send(&[Packet::Disconnect(Default::default())]);
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
    }
}

/// A persistent session subscribed to `topic` at QoS 1, left offline.
fn subscribe_offline(addr: SocketAddr, client_id: &str, topic: &str) {
    let mut c = Client::connect(addr, client_id, false);
    c.send(&[Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![SubscribeFilter {
            filter: ByteStr::from(topic),
            options: SubOptions {
                qos: QoS::AtLeastOnce,
                ..SubOptions::default()
            },
        }],
        properties: Properties::default(),
    })]);
    match c.next() {
        Packet::SubAck(_) => c.disconnect(),
        other => panic!("{client_id}: expected SUBACK, got {other:?}"),
    }
}

/// One QoS 1 message of `PAYLOAD` bytes to each topic, `WINDOW` at a time, every PUBACK
/// awaited.
fn publish_all<'a>(
    addr: SocketAddr,
    client_id: &str,
    topics: impl Iterator<Item = &'a str>,
    retain: bool,
) {
    let mut c = Client::connect(addr, client_id, true);
    let payload = Bytes::from(vec![0x5A; PAYLOAD]);
    let topics: Vec<&str> = topics.collect();
    for chunk in topics.chunks(WINDOW) {
        let packets: Vec<Packet> = chunk
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain,
                    topic: ByteStr::from(*t),
                    pkid: i as u16 + 1,
                    payload: payload.clone(),
                    properties: None,
                })
            })
            .collect();
        c.send(&packets);
        for _ in chunk {
            match c.next() {
                Packet::PubAck(a) if !a.reason.is_error() => {}
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
    c.disconnect();
}

/// Numbered QoS 1 messages to `topic`, `WINDOW` unacknowledged at most, until the
/// connection breaks; returns the numbers acknowledged.
fn publish_until_broken(addr: SocketAddr, topic: &str) -> Vec<u64> {
    let mut c = Client::connect(addr, "numbered", true);
    let mut acked = Vec::new();
    let mut pending = std::collections::HashMap::new();
    let mut next = 0u64;
    let mut pkid = 0u16;
    loop {
        let mut batch = Vec::new();
        while pending.len() < WINDOW {
            pkid = pkid.wrapping_add(1).max(1);
            pending.insert(pkid, next);
            batch.push(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: ByteStr::from(topic),
                pkid,
                payload: Bytes::from(format!("{next:0>width$}", width = PAYLOAD)),
                properties: None,
            }));
            next += 1;
        }
        if !c.try_send(&batch) {
            return acked;
        }
        match c.try_next() {
            Some(Packet::PubAck(a)) => acked.extend(pending.remove(&a.pkid)),
            Some(other) => panic!("expected PUBACK, got {other:?}"),
            None => return acked,
        }
    }
}

/// Every number queued for the persistent session `client_id`, each PUBLISH acknowledged,
/// until none comes for a second.
fn drain_numbers(addr: SocketAddr, client_id: &str) -> std::collections::HashSet<u64> {
    let mut c = Client::connect(addr, client_id, false);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut got = std::collections::HashSet::new();
    while let Some(p) = c.try_next() {
        if let Packet::Publish(p) = p {
            let n: u64 = std::str::from_utf8(&p.payload)
                .ok()
                .and_then(|s| s.trim_start_matches('0').parse().ok())
                .unwrap_or(0);
            got.insert(n);
            c.send(&[Packet::PubAck(protocol::Ack {
                pkid: p.pkid,
                ..Default::default()
            })]);
        }
    }
    got
}
