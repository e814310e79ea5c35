//! The message scenarios: fan-in, fan-out, p2p and latency.
//!
//! Every connection is one task. Tasks run on `--threads` OS threads, each a
//! current-thread runtime, so that the generator stays lean on a small machine; what
//! the threads share is atomics (progress, counts) and the start signal.
//!
//! Publishers stamp every payload (run, publisher, sequence, send time) and keep at most
//! `--window` messages outstanding: unacknowledged (QoS 1/2) and, unless `--open-loop`,
//! not yet seen by their subscribers, so that the broker is driven at its own pace
//! rather than overrun. Subscribers count every message exactly per publisher.

use crate::mqtt;
use crate::procfs::{self, RssSampler};
use crate::stats::{self, Latency, SeqTracker, Stamp, STAMP_LEN};
use crate::{Args, Scenario};
use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

/// A subscriber gives up waiting this long after the last message, once every
/// publisher is done: what has not arrived by then is lost.
const QUIET: Duration = Duration::from_secs(2);
/// A publisher waiting for acknowledgements gives up after this long without one.
const ACK_PATIENCE: Duration = Duration::from_secs(5);
/// How often waiting tasks look at the shared state.
const TICK: Duration = Duration::from_millis(50);
/// Connections get this long to CONNECT and SUBSCRIBE before the run is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Who publishes to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// N publishers, one subscriber on a `+` filter.
    FanIn,
    /// One publisher, N subscribers of its topic.
    FanOut,
    /// N publishers, each with its own subscriber on its own topic.
    Pairs,
    /// N devices publishing telemetry, dashboards on wildcards (see `Iot`).
    Iot(Iot),
}

/// The IoT shape: devices spread over `sites` publish on
/// `site/{s}/device/{d}/telemetry`, each subscribed to `device_subs` command topics of
/// its own (`site/{s}/device/{d}/cmd/{k}`, never published to: they fill the broker's
/// subscription tree); `dashboards` subscribers, the first `global` of them on
/// `site/+/device/+/telemetry`, the others on one site each (`site/{s}/#`, round robin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iot {
    pub sites: usize,
    pub dashboards: usize,
    pub global: usize,
    pub device_subs: usize,
}

impl Iot {
    /// The site of device `p` of `n`: devices are numbered site by site.
    fn site_of(&self, p: usize, n: usize) -> usize {
        p / n.div_ceil(self.sites)
    }

    /// The site dashboard `s` watches, None for a global one.
    fn watched(&self, s: usize) -> Option<usize> {
        s.checked_sub(self.global).map(|i| i % self.sites)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub shape: Shape,
    pub n: usize,
}

impl Topology {
    pub fn publishers(&self) -> usize {
        match self.shape {
            Shape::FanOut => 1,
            Shape::FanIn | Shape::Pairs | Shape::Iot(_) => self.n,
        }
    }

    pub fn subscribers(&self) -> usize {
        match self.shape {
            Shape::FanIn => 1,
            Shape::FanOut | Shape::Pairs => self.n,
            Shape::Iot(iot) => iot.dashboards,
        }
    }

    /// The subscribers that receive publisher `p`'s messages.
    pub fn subs_of(&self, p: usize) -> Vec<usize> {
        match self.shape {
            Shape::FanIn => vec![0],
            Shape::FanOut => (0..self.n).collect(),
            Shape::Pairs => vec![p],
            Shape::Iot(iot) => {
                let site = iot.site_of(p, self.n);
                (0..iot.dashboards)
                    .filter(|s| iot.watched(*s).is_none_or(|w| w == site))
                    .collect()
            }
        }
    }

    /// Where subscriber `s` is in `subs_of(p)` of every publisher `p` it hears from.
    pub fn slot(&self, s: usize) -> usize {
        match self.shape {
            Shape::FanIn | Shape::Pairs => 0,
            Shape::FanOut => s,
            Shape::Iot(iot) => match s.checked_sub(iot.global) {
                None => s,
                Some(i) => iot.global + i / iot.sites,
            },
        }
    }

    /// The publishers whose messages subscriber `s` receives.
    pub fn pubs_of(&self, s: usize) -> Range<usize> {
        match self.shape {
            Shape::FanIn => 0..self.n,
            Shape::FanOut => 0..1,
            Shape::Pairs => s..s + 1,
            Shape::Iot(iot) => match iot.watched(s) {
                None => 0..self.n,
                Some(site) => {
                    let per_site = self.n.div_ceil(iot.sites);
                    (site * per_site).min(self.n)..((site + 1) * per_site).min(self.n)
                }
            },
        }
    }

    pub fn topic(&self, prefix: &str, p: usize) -> String {
        match self.shape {
            Shape::FanIn => format!("{prefix}/in/{p}"),
            Shape::FanOut => format!("{prefix}/out"),
            Shape::Pairs => format!("{prefix}/p2p/{p}"),
            Shape::Iot(iot) => {
                let site = iot.site_of(p, self.n);
                format!("{}site/{site}/device/{p}/telemetry", iot_root(prefix))
            }
        }
    }

    pub fn filter(&self, prefix: &str, s: usize) -> String {
        match self.shape {
            Shape::FanIn => format!("{prefix}/in/+"),
            Shape::FanOut => format!("{prefix}/out"),
            Shape::Pairs => format!("{prefix}/p2p/{s}"),
            Shape::Iot(iot) => match iot.watched(s) {
                None => format!("{}site/+/device/+/telemetry", iot_root(prefix)),
                Some(site) => format!("{}site/{site}/#", iot_root(prefix)),
            },
        }
    }

    /// What publisher `p` subscribes to itself (an IoT device's command topics).
    pub fn own_filters(&self, prefix: &str, p: usize) -> Vec<String> {
        match self.shape {
            Shape::Iot(iot) => {
                let site = iot.site_of(p, self.n);
                let root = iot_root(prefix);
                (0..iot.device_subs)
                    .map(|k| format!("{root}site/{site}/device/{p}/cmd/{k}"))
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// IoT topics start at `site/` (the default prefix, "bench", is left out) or under
/// another prefix given, so that runs can be kept apart.
fn iot_root(prefix: &str) -> String {
    match prefix {
        crate::DEFAULT_PREFIX => String::new(),
        p => format!("{p}/"),
    }
}

/// Everything the threads share.
struct Shared {
    addr: SocketAddr,
    /// Where subscribers connect (`--sub-port`), else `addr`.
    sub_addr: SocketAddr,
    /// Subscribers read SSE from here (`--sse-port`).
    sse_addr: Option<SocketAddr>,
    topology: Topology,
    qos: u8,
    payload: usize,
    window: u32,
    /// Messages a publisher writes at once (`--batch`).
    batch: u32,
    /// An end-to-end window that does not move for this long is given up on (`--stall`):
    /// a message lost at QoS 0 would otherwise block the publisher for good.
    stall: Duration,
    open_loop: bool,
    /// Subscribers use persistent sessions.
    persistent: bool,
    /// Subscribers connect with MQTT 5 and take this many topic aliases (`--topic-aliases`).
    aliases: Option<u16>,
    /// Per publisher, messages per second (0: as fast as the window allows).
    rate: f64,
    count: u32,
    duration: Duration,
    keep_alive: u16,
    prefix: String,
    run: u32,
    /// Time base of the stamps.
    base: Instant,
    pubs: Vec<PubState>,
    ready: AtomicUsize,
    published: AtomicUsize,
    start: watch::Sender<Start>,
    errors: Mutex<Vec<String>>,
    /// Bounds the connections being set up at once (`--connect-concurrency`).
    connecting: Semaphore,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    Waiting,
    Go(Instant),
    Abort,
}

struct PubState {
    /// Messages written so far; final once `done`.
    sent: AtomicU32,
    done: AtomicBool,
    /// Per subscriber of this publisher: the sequence numbers it has settled.
    progress: Box<[AtomicU32]>,
    wake: Notify,
}

impl PubState {
    fn min_progress(&self) -> u32 {
        let min = self
            .progress
            .iter()
            .map(|p| p.load(Ordering::Acquire))
            .min();
        min.unwrap_or(u32::MAX)
    }
}

impl Shared {
    fn error(&self, e: String) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(e);
        }
    }

    fn all_published(&self) -> bool {
        self.published.load(Ordering::Acquire) == self.topology.publishers()
    }

    /// Waits for the controller's go; the instant the run starts.
    async fn wait_start(&self) -> anyhow::Result<Instant> {
        let mut rx = self.start.subscribe();
        let start = *rx
            .wait_for(|s| *s != Start::Waiting)
            .await
            .context("controller gone")?;
        match start {
            Start::Go(t0) => Ok(t0),
            _ => bail!("run abandoned"),
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// What one thread counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    /// Messages of this run received, repeats included.
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Messages not of this run (or not stamped).
    pub foreign: u64,
    /// Times a publisher gave up on its end-to-end window.
    pub stalls: u64,
    /// Time base offset of the last message received.
    pub last_receive_ns: u64,
    /// Time base offset of the last message published.
    pub last_send_ns: u64,
    /// Bytes subscribers read from their sockets (all packets, a run's whole).
    pub sub_bytes: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.unacked += o.unacked;
        self.received += o.received;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.foreign += o.foreign;
        self.stalls += o.stalls;
        self.sub_bytes += o.sub_bytes;
        self.last_receive_ns = self.last_receive_ns.max(o.last_receive_ns);
        self.last_send_ns = self.last_send_ns.max(o.last_send_ns);
    }
}

/// Per thread: what its tasks count.
struct Local {
    counters: RefCell<Counters>,
    latency: RefCell<Histogram<u64>>,
}

/// The broker's resources during the run (with `--pid`).
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerUsage {
    pub rss_before_kb: u64,
    pub rss_peak_kb: u64,
    /// After the clients left and a second passed.
    pub rss_after_kb: u64,
    pub hwm_kb: u64,
    pub cpu_s: f64,
}

pub struct Report {
    pub topology: Topology,
    pub counters: Counters,
    /// Messages that should have arrived: each publisher's sent times its subscribers.
    pub expected: u64,
    pub lost: u64,
    /// Seconds from the start to the last publish, and to the last receipt.
    pub publish_s: f64,
    pub receive_s: f64,
    pub latency: Latency,
    pub broker: Option<BrokerUsage>,
    pub loadgen_cpu_s: f64,
    pub errors: Vec<String>,
    /// Why the run failed; empty if it passed.
    pub failures: Vec<String>,
}

impl Report {
    pub fn publish_rate(&self) -> f64 {
        self.counters.sent as f64 / self.publish_s
    }

    pub fn receive_rate(&self) -> f64 {
        self.counters.unique as f64 / self.receive_s
    }
}

pub fn shape(args: &Args) -> Shape {
    match args.scenario {
        Scenario::FanIn => Shape::FanIn,
        Scenario::FanOut => Shape::FanOut,
        Scenario::P2p | Scenario::Latency | Scenario::Idle => Shape::Pairs,
        Scenario::Iot => Shape::Iot(Iot {
            sites: args.sites,
            dashboards: args.dashboards,
            global: args.global_dashboards.min(args.dashboards),
            device_subs: args.device_subs,
        }),
    }
}

/// Runs one scenario to the end and counts. Errors are for setup failures (nothing
/// measured); problems during the run are in the report's `failures`.
#[allow(clippy::too_many_lines)] // setup, run and report of a scenario, read in order
pub fn run(args: &Args, addr: SocketAddr) -> anyhow::Result<Report> {
    let topology = Topology {
        shape: shape(args),
        n: args.clients,
    };
    let (publishers, subscribers) = (topology.publishers(), topology.subscribers());
    let total_rate = match (args.scenario, args.rate) {
        (Scenario::Latency, 0) => 5000,
        (_, r) => r,
    };
    let pubs = (0..publishers)
        .map(|p| PubState {
            sent: AtomicU32::new(0),
            done: AtomicBool::new(false),
            progress: topology
                .subs_of(p)
                .iter()
                .map(|_| AtomicU32::new(0))
                .collect(),
            wake: Notify::new(),
        })
        .collect();
    let base = Instant::now();
    let shared = Arc::new(Shared {
        addr,
        sub_addr: args
            .sub_port
            .map_or(addr, |port| SocketAddr::new(addr.ip(), port)),
        sse_addr: args.sse_port.map(|port| SocketAddr::new(addr.ip(), port)),
        topology,
        qos: args.qos,
        payload: args.payload,
        window: args.window,
        batch: args.batch,
        stall: Duration::from_secs_f64(args.stall),
        open_loop: args.open_loop,
        persistent: args.persistent,
        aliases: args.topic_aliases,
        rate: total_rate as f64 / publishers as f64,
        count: args.count.unwrap_or(u32::MAX),
        duration: Duration::from_secs_f64(args.duration),
        keep_alive: keep_alive(args.duration),
        prefix: args.topic_prefix.clone(),
        run: run_id(),
        base,
        pubs,
        ready: AtomicUsize::new(0),
        published: AtomicUsize::new(0),
        start: watch::Sender::new(Start::Waiting),
        errors: Mutex::new(Vec::new()),
        connecting: Semaphore::new(args.connect_concurrency),
    });

    let threads = args.threads.max(1);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || worker(shared, t, threads))
        })
        .collect::<Result<_, _>>()
        .context("cannot start worker threads")?;

    // Setup: every connection connected and subscribed, or the run is abandoned.
    let setup_deadline = std::time::Instant::now() + SETUP_TIMEOUT;
    let abandon = |why: String| {
        shared.start.send_replace(Start::Abort);
        why
    };
    let setup = loop {
        if let Some(e) = shared.errors.lock().ok().and_then(|e| e.first().cloned()) {
            break Err(abandon(e));
        }
        if shared.ready.load(Ordering::Acquire) == publishers + subscribers {
            break Ok(());
        }
        if std::time::Instant::now() > setup_deadline {
            break Err(abandon(format!(
                "setup timed out: {} of {} connections ready",
                shared.ready.load(Ordering::Acquire),
                publishers + subscribers
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Err(why) = setup {
        for w in workers {
            let _ = w.join();
        }
        bail!("{why}");
    }
    std::thread::sleep(Duration::from_millis(args.settle_ms));

    let pid = args.pid;
    let rss_before = pid.and_then(procfs::memory);
    let broker_cpu_before = pid.and_then(procfs::cpu_seconds);
    let own_cpu_before = procfs::own_cpu_seconds();
    let sampler = pid.map(|p| RssSampler::start(p, Duration::from_millis(50)));

    let t0 = Instant::now();
    shared.start.send_replace(Start::Go(t0));

    let mut counters = Counters::default();
    let mut latency = stats::new_histogram();
    for w in workers {
        let (c, h) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?;
        counters.add(&c);
        latency.add(&h).context("merging latency histograms")?;
    }
    let loadgen_cpu_s = procfs::own_cpu_seconds() - own_cpu_before;
    let broker_cpu = pid.and_then(procfs::cpu_seconds);
    let rss_peak = sampler.map(|s| s.finish());
    let broker = pid.map(|pid| {
        // Let the broker finish closing the connections before looking again.
        std::thread::sleep(Duration::from_secs(1));
        let after = procfs::memory(pid).unwrap_or_default();
        BrokerUsage {
            rss_before_kb: rss_before.map_or(0, |m| m.rss_kb),
            rss_peak_kb: rss_peak.unwrap_or(0),
            rss_after_kb: after.rss_kb,
            hwm_kb: after.hwm_kb,
            cpu_s: broker_cpu
                .zip(broker_cpu_before)
                .map_or(f64::NAN, |(a, b)| a - b),
        }
    });

    let expected: u64 = (0..publishers)
        .map(|p| {
            let sent = u64::from(shared.pubs[p].sent.load(Ordering::Acquire));
            sent * topology.subs_of(p).len() as u64
        })
        .sum();
    let lost = expected.saturating_sub(counters.unique);
    let offset = t0.duration_since(base).as_nanos() as u64;
    let secs = |ns: u64| (ns.saturating_sub(offset) as f64 / 1e9).max(1e-9);
    let errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let mut report = Report {
        topology,
        counters,
        expected,
        lost,
        publish_s: secs(counters.last_send_ns),
        receive_s: secs(counters.last_receive_ns),
        latency: Latency::of(&latency),
        broker,
        loadgen_cpu_s,
        errors,
        failures: Vec::new(),
    };
    report.failures = failures(&report, args.qos);
    Ok(report)
}

/// The run's verdict: at QoS 1/2 nothing may be lost or left unacknowledged, and at
/// QoS 2 nothing may arrive twice. QoS 0 loss is reported, not failed.
fn failures(r: &Report, qos: u8) -> Vec<String> {
    let mut f: Vec<String> = r.errors.iter().map(|e| format!("error: {e}")).collect();
    let c = &r.counters;
    if c.unique == 0 {
        f.push("no message was received".into());
    }
    if qos > 0 && r.lost > 0 {
        f.push(format!(
            "QoS {qos}: {} of {} messages lost",
            r.lost, r.expected
        ));
    }
    if qos > 0 && c.unacked > 0 {
        f.push(format!(
            "QoS {qos}: {} of {} publishes never acknowledged",
            c.unacked, c.sent
        ));
    }
    if qos == 2 && c.duplicates > 0 {
        f.push(format!("QoS 2: {} duplicate deliveries", c.duplicates));
    }
    f
}

/// Long enough that no connection needs to ping during the run.
/// Subscribers over Server-Sent Events (ternmq's `GET /sse`, docs/http.md).
mod sse {
    use super::*;
    use base64::Engine;

    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        payload: std::borrow::Cow<'a, str>,
        encoding: &'a str,
    }

    pub(super) async fn subscriber(
        sh: &Shared,
        local: &Local,
        s: usize,
        addr: SocketAddr,
    ) -> anyhow::Result<()> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let filter = sh.topology.filter(&sh.prefix, s);
        let topic: String = filter
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let request = format!(
            "GET /sse?topic={topic}&qos={} HTTP/1.1\r\nHost: bench\r\n\r\n",
            sh.qos.min(1)
        );
        wr.write_all(request.as_bytes()).await?;
        let mut raw = BytesMut::with_capacity(64 * 1024);
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            read(&mut rd, &mut raw).await?;
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /sse refused: {}", head.lines().next().unwrap_or(""));
        }
        raw.advance(head_end + 4);
        // The subscription is in place before the answer's head is sent.
        sh.ready.fetch_add(1, Ordering::AcqRel);
        sh.wait_start().await?;

        let pubs = sh.topology.pubs_of(s);
        let mut inbox = Inbox::new(sh.run, pubs, false);
        let mut text = BytesMut::with_capacity(64 * 1024);
        let mut last_message = Instant::now();
        let timer = tokio::time::sleep(TICK);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                r = read(&mut rd, &mut raw) => {
                    r?;
                    let now_ns = sh.now_ns();
                    if dechunk(&mut raw, &mut text)? {
                        bail!("the stream ended");
                    }
                    let mut latency = local.latency.borrow_mut();
                    while let Some(i) = text.windows(2).position(|w| w == b"\n\n") {
                        let block = text.split_to(i + 2);
                        record(&block, &mut inbox, now_ns, &mut latency)?;
                    }
                    inbox.tell_publishers(sh, s, now_ns);
                    last_message = Instant::now();
                }
                _ = &mut timer => {
                    timer.as_mut().reset(Instant::now() + TICK);
                }
            }
            if inbox.finished(sh, last_message) {
                break;
            }
        }
        local.counters.borrow_mut().add(&inbox.totals());
        Ok(())
    }

    async fn read(rd: &mut OwnedReadHalf, raw: &mut BytesMut) -> anyhow::Result<()> {
        raw.reserve(64 * 1024);
        if rd.read_buf(raw).await? == 0 {
            bail!("the broker closed the stream");
        }
        Ok(())
    }

    /// Moves the complete chunks of `raw` into `out`; true once the last chunk came.
    fn dechunk(raw: &mut BytesMut, out: &mut BytesMut) -> anyhow::Result<bool> {
        loop {
            let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
                return Ok(false);
            };
            let size = std::str::from_utf8(&raw[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .context("bad chunk size")?;
            if raw.len() < eol + 2 + size + 2 {
                return Ok(false);
            }
            out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
            raw.advance(eol + 2 + size + 2);
            if size == 0 {
                return Ok(true);
            }
        }
    }

    /// One SSE block: a message event is counted; comments and `retry:` are not.
    fn record(
        block: &[u8],
        inbox: &mut Inbox,
        now_ns: u64,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<()> {
        for line in block.split(|b| *b == b'\n') {
            let Some(json) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let event: Event = serde_json::from_slice(json).context("event data")?;
            let payload = match event.encoding {
                "base64" => base64::engine::general_purpose::STANDARD
                    .decode(event.payload.as_bytes())
                    .context("base64 payload")?,
                _ => event.payload.as_bytes().to_vec(),
            };
            inbox.record(&payload, now_ns, latency);
        }
        Ok(())
    }
}

fn keep_alive(duration: f64) -> u16 {
    (duration * 2.0 + 120.0).min(65535.0) as u16
}

/// A run id that differs between runs and processes.
fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

/// One worker thread: the connections `t, t + threads, ...` of each role.
fn worker(shared: Arc<Shared>, t: usize, threads: usize) -> (Counters, Histogram<u64>) {
    let local = Rc::new(Local {
        counters: RefCell::new(Counters::default()),
        latency: RefCell::new(stats::new_histogram()),
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            shared.error(format!("cannot start a runtime: {e}"));
            return (Counters::default(), stats::new_histogram());
        }
    };
    let tasks = tokio::task::LocalSet::new();
    tasks.block_on(&runtime, async {
        let mut handles = Vec::new();
        let topology = shared.topology;
        for s in (t..topology.subscribers()).step_by(threads) {
            let (sh, l) = (shared.clone(), local.clone());
            handles.push(tokio::task::spawn_local(async move {
                if let Err(e) = subscriber(&sh, &l, s).await {
                    sh.error(format!("subscriber {s}: {e:#}"));
                }
            }));
        }
        for p in (t..topology.publishers()).step_by(threads) {
            let (sh, l) = (shared.clone(), local.clone());
            handles.push(tokio::task::spawn_local(async move {
                let result = publisher(&sh, &l, p).await;
                // Done even after an error, so that subscribers do not wait for more.
                sh.pubs[p].done.store(true, Ordering::Release);
                sh.published.fetch_add(1, Ordering::AcqRel);
                if let Err(e) = result {
                    sh.error(format!("publisher {p}: {e:#}"));
                }
            }));
        }
        for h in handles {
            if let Err(e) = h.await {
                shared.error(format!("task failed: {e}"));
            }
        }
    });
    let counters = *local.counters.borrow();
    let latency = local.latency.replace(stats::new_histogram());
    (counters, latency)
}

/// A connection after CONNACK, with whatever bytes followed it.
struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Room made before each read: a publisher reads acknowledgements only, and with
    /// 10,000 of them (iot) large buffers would cost the generator's memory for nothing.
    read_size: usize,
    /// MQTT 5 (a subscriber taking topic aliases), else 3.1.1.
    v5: bool,
    /// Bytes read so far.
    bytes_in: u64,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        client_id: &str,
        keep_alive: u16,
        read_size: usize,
    ) -> anyhow::Result<Conn> {
        Conn::open_session(addr, client_id, keep_alive, true, None, read_size).await
    }

    /// `open`, with Clean Session `clean`; with `aliases`, MQTT 5 taking that many topic
    /// aliases from the broker.
    async fn open_session(
        addr: SocketAddr,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
        aliases: Option<u16>,
        read_size: usize,
    ) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn {
            rd,
            wr,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            read_size,
            v5: aliases.is_some(),
            bytes_in: 0,
        };
        mqtt::connect_session(&mut conn.wbuf, client_id, keep_alive, clean, aliases);
        conn.flush().await?;
        loop {
            if let Some((frame, used)) = mqtt::next_frame(&conn.rbuf)? {
                if frame.kind != mqtt::CONNACK {
                    bail!("expected CONNACK, got packet type {}", frame.kind);
                }
                let code = mqtt::connack_code(&frame)?;
                if code != 0 {
                    bail!("connection refused with CONNACK code {code}");
                }
                conn.rbuf.advance(used);
                return Ok(conn);
            }
            conn.read().await?;
        }
    }

    /// Reads what is available (at least one byte).
    async fn read(&mut self) -> anyhow::Result<()> {
        self.rbuf.reserve(self.read_size);
        let n = self.rd.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            bail!("the broker closed the connection");
        }
        self.bytes_in += n as u64;
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.wr.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    async fn close(mut self) {
        mqtt::disconnect(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.wr.shutdown().await;
    }
}

/// Publisher state for the acknowledgement flows.
struct Acks {
    /// Per packet id (1..=window): 0 free, 1 waiting PUBACK/PUBREC, 2 waiting PUBCOMP.
    slots: Vec<u8>,
    acked: u32,
}

impl Acks {
    fn slot(&self, seq: u32) -> usize {
        (seq % (self.slots.len() as u32 - 1)) as usize + 1
    }

    /// Handles the acknowledgements in `rbuf`; queues PUBRELs into `wbuf`.
    fn handle(&mut self, rbuf: &mut BytesMut, wbuf: &mut Vec<u8>) -> anyhow::Result<()> {
        while let Some((frame, used)) = mqtt::next_frame(rbuf)? {
            let pkid = usize::from(mqtt::pkid(&frame).unwrap_or(0));
            let state = self.slots.get(pkid).copied().unwrap_or(0);
            match (frame.kind, state) {
                (mqtt::PUBACK, 1) | (mqtt::PUBCOMP, 2) => {
                    self.slots[pkid] = 0;
                    self.acked += 1;
                }
                (mqtt::PUBREC, 1) => {
                    self.slots[pkid] = 2;
                    mqtt::ack(wbuf, mqtt::PUBREL, pkid as u16);
                }
                // A repeated PUBREC is answered again.
                (mqtt::PUBREC, 2) => mqtt::ack(wbuf, mqtt::PUBREL, pkid as u16),
                (mqtt::PINGRESP, _) => {}
                (kind, _) => bail!("unexpected packet type {kind} (packet id {pkid})"),
            }
            rbuf.advance(used);
        }
        Ok(())
    }
}

#[allow(clippy::too_many_lines)] // one publisher's whole loop, its pacing and its acks
async fn publisher(sh: &Shared, local: &Local, p: usize) -> anyhow::Result<()> {
    let client_id = format!("lg{:08x}p{p}", sh.run);
    let permit = sh.connecting.acquire().await?;
    let mut conn = Conn::open(sh.addr, &client_id, sh.keep_alive, 4096).await?;
    let filters = sh.topology.own_filters(&sh.prefix, p);
    subscribe(&mut conn, &filters, sh.qos).await?;
    drop(permit);
    sh.ready.fetch_add(1, Ordering::AcqRel);
    let t0 = sh.wait_start().await?;
    let deadline = t0 + sh.duration;
    let state = &sh.pubs[p];
    let topic = sh.topology.topic(&sh.prefix, p);
    let filler = vec![0x5A; sh.payload - STAMP_LEN];
    let qos = sh.qos;
    let mut acks = Acks {
        slots: vec![0; sh.window as usize + 1],
        acked: 0,
    };
    let mut sent: u32 = 0;
    // The end-to-end window counts from here at least (raised after a stall).
    let mut floor: u32 = 0;
    let mut progress = (0u32, Instant::now());
    let mut stalls = 0u64;
    let mut last_send_ns = 0;
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);

    loop {
        let now = Instant::now();
        if now >= deadline || sent >= sh.count {
            break;
        }
        let mut allowed = sh.batch.min(sh.count - sent);
        if qos > 0 {
            allowed = allowed.min(sh.window - (sent - acks.acked));
        }
        let mut e2e_blocked = false;
        if !sh.open_loop {
            let settled = state.min_progress().max(floor);
            if settled != progress.0 {
                progress = (settled, now);
            }
            let room = sh.window.saturating_sub(sent.saturating_sub(settled));
            e2e_blocked = room == 0;
            allowed = allowed.min(room);
        }
        let mut wake_at = deadline;
        if sh.rate > 0.0 {
            // Message k is due at (k + phase) / rate: publishers spread evenly over a
            // period instead of all sending at once (10,000 IoT devices in step would be
            // one burst per period, measuring its queue instead of the broker's latency).
            let phase = p as f64 / sh.pubs.len() as f64;
            let ahead = now.duration_since(t0).as_secs_f64() * sh.rate - phase;
            let due = if ahead < 0.0 { 0 } else { ahead as u64 + 1 };
            allowed = allowed.min(due.saturating_sub(u64::from(sent)) as u32);
            let next = Duration::from_secs_f64((f64::from(sent) + phase) / sh.rate);
            wake_at = wake_at.min(t0 + next);
        }
        if allowed > 0 {
            let mut batch = 0;
            for _ in 0..allowed {
                let mut pkid = 0;
                if qos > 0 {
                    let slot = acks.slot(sent);
                    if acks.slots[slot] != 0 {
                        break; // still in flight: wait for its ack
                    }
                    acks.slots[slot] = 1;
                    pkid = slot as u16;
                }
                last_send_ns = sh.now_ns();
                let stamp = Stamp {
                    run: sh.run,
                    publisher: p as u32,
                    seq: sent,
                    sent_ns: last_send_ns,
                };
                mqtt::publish(
                    &mut conn.wbuf,
                    &topic,
                    qos,
                    pkid,
                    &stamp.to_bytes(),
                    &filler,
                );
                sent += 1;
                batch += 1;
            }
            if batch > 0 {
                conn.flush().await?;
                state.sent.store(sent, Ordering::Release);
                // Let the thread's other connections run between batches.
                tokio::task::yield_now().await;
                continue;
            }
        }
        if e2e_blocked {
            if now.duration_since(progress.1) >= sh.stall {
                floor = sent;
                stalls += 1;
                continue;
            }
            wake_at = wake_at.min(progress.1 + sh.stall);
        }
        timer.as_mut().reset(wake_at.min(now + TICK * 20));
        tokio::select! {
            r = conn.read() => {
                r?;
                acks.handle(&mut conn.rbuf, &mut conn.wbuf)?;
                conn.flush().await?;
            }
            // Subscribers' progress matters only to a publisher it holds back: a paced
            // publisher woken by every dashboard's progress (iot: 10,000 of them per
            // dashboard batch) would spend the generator's CPU on wake-ups.
            _ = state.wake.notified(), if !sh.open_loop && e2e_blocked => {}
            _ = &mut timer => {}
        }
    }
    state.sent.store(sent, Ordering::Release);

    // Collect the outstanding acknowledgements.
    let mut last_ack = Instant::now();
    while qos > 0 && acks.acked < sent && last_ack.elapsed() < ACK_PATIENCE {
        let before = acks.acked;
        match tokio::time::timeout(TICK, conn.read()).await {
            Ok(r) => r?,
            Err(_) => continue,
        }
        acks.handle(&mut conn.rbuf, &mut conn.wbuf)?;
        conn.flush().await?;
        if acks.acked != before {
            last_ack = Instant::now();
        }
    }
    conn.close().await;

    let mut c = local.counters.borrow_mut();
    c.sent += u64::from(sent);
    if qos > 0 {
        c.acked += u64::from(acks.acked);
        c.unacked += u64::from(sent - acks.acked);
    }
    c.stalls += stalls;
    c.last_send_ns = c.last_send_ns.max(last_send_ns);
    Ok(())
}

async fn subscriber(sh: &Shared, local: &Local, s: usize) -> anyhow::Result<()> {
    if let Some(addr) = sh.sse_addr {
        return sse::subscriber(sh, local, s, addr).await;
    }
    let client_id = format!("lg{:08x}s{s}", sh.run);
    let permit = sh.connecting.acquire().await?;
    let clean = !sh.persistent;
    let mut conn = Conn::open_session(
        sh.sub_addr,
        &client_id,
        sh.keep_alive,
        clean,
        sh.aliases,
        64 * 1024,
    )
    .await?;
    subscribe(&mut conn, &[sh.topology.filter(&sh.prefix, s)], sh.qos).await?;
    drop(permit);
    sh.ready.fetch_add(1, Ordering::AcqRel);
    sh.wait_start().await?;

    let pubs = sh.topology.pubs_of(s);
    let mut inbox = Inbox::new(sh.run, pubs.clone(), conn.v5);
    let mut last_message = Instant::now();
    let timer = tokio::time::sleep(TICK);
    tokio::pin!(timer);

    loop {
        tokio::select! {
            r = conn.read() => {
                r?;
                let now_ns = sh.now_ns();
                inbox.handle(&mut conn.rbuf, &mut conn.wbuf, now_ns, &mut local.latency.borrow_mut())?;
                conn.flush().await?;
                inbox.tell_publishers(sh, s, now_ns);
                last_message = Instant::now();
            }
            _ = &mut timer => {
                timer.as_mut().reset(Instant::now() + TICK);
            }
        }
        if inbox.finished(sh, last_message) {
            break;
        }
    }
    local.counters.borrow_mut().sub_bytes += conn.bytes_in;
    conn.close().await;
    if sh.persistent {
        // A clean connection discards the session, so that runs do not pile up sessions.
        Conn::open(sh.addr, &client_id, sh.keep_alive, 4096)
            .await?
            .close()
            .await;
    }
    local.counters.borrow_mut().add(&inbox.totals());
    Ok(())
}

/// Subscribes to each of `filters` (one SUBSCRIBE each) and waits for every SUBACK.
async fn subscribe(conn: &mut Conn, filters: &[String], qos: u8) -> anyhow::Result<()> {
    for (i, filter) in filters.iter().enumerate() {
        mqtt::subscribe(&mut conn.wbuf, i as u16 + 1, filter, qos, conn.v5);
    }
    conn.flush().await?;
    let mut acked = 0;
    while acked < filters.len() {
        while let Some((frame, used)) = mqtt::next_frame(&conn.rbuf)? {
            if frame.kind != mqtt::SUBACK {
                bail!("expected SUBACK, got packet type {}", frame.kind);
            }
            let code = mqtt::suback_code(&frame, conn.v5)?;
            if code != qos {
                let filter = &filters[acked];
                bail!("subscription to {filter} at QoS {qos} answered {code:#04x}");
            }
            conn.rbuf.advance(used);
            acked += 1;
        }
        if acked < filters.len() {
            conn.read().await?;
        }
    }
    Ok(())
}

/// A subscriber's view of what it receives: one tracker per publisher it hears from.
struct Inbox {
    run: u32,
    pubs: Range<usize>,
    trackers: Vec<SeqTracker>,
    /// Trackers that moved since the publishers were last told.
    touched: Vec<usize>,
    is_touched: Vec<bool>,
    counts: Counters,
    /// The subscriber speaks MQTT 5.
    v5: bool,
}

impl Inbox {
    fn new(run: u32, pubs: Range<usize>, v5: bool) -> Inbox {
        Inbox {
            run,
            v5,
            trackers: vec![SeqTracker::default(); pubs.len()],
            touched: Vec::new(),
            is_touched: vec![false; pubs.len()],
            pubs,
            counts: Counters::default(),
        }
    }

    /// Counts the packets in `rbuf` (received at `now_ns`) and queues their
    /// acknowledgements into `wbuf`.
    fn handle(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut Vec<u8>,
        now_ns: u64,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<()> {
        while let Some((frame, used)) = mqtt::next_frame(rbuf)? {
            match frame.kind {
                mqtt::PUBLISH => {
                    let msg = mqtt::parse_publish(&frame, self.v5)?;
                    match msg.qos {
                        1 => mqtt::ack(wbuf, mqtt::PUBACK, msg.pkid),
                        2 => mqtt::ack(wbuf, mqtt::PUBREC, msg.pkid),
                        _ => {}
                    }
                    self.record(msg.payload, now_ns, latency);
                }
                mqtt::PUBREL => mqtt::ack(wbuf, mqtt::PUBCOMP, mqtt::pkid(&frame)?),
                mqtt::PINGRESP => {}
                kind => bail!("unexpected packet type {kind}"),
            }
            rbuf.advance(used);
        }
        Ok(())
    }

    /// Counts one message received at `now_ns`.
    fn record(&mut self, payload: &[u8], now_ns: u64, latency: &mut Histogram<u64>) {
        let stamp = Stamp::read(payload).filter(|st| st.run == self.run);
        let index = stamp.and_then(|st| {
            let p = st.publisher as usize;
            self.pubs.contains(&p).then(|| p - self.pubs.start)
        });
        match (stamp, index) {
            (Some(st), Some(i)) => {
                self.counts.received += 1;
                self.trackers[i].record(st.seq);
                stats::record_latency(latency, now_ns.saturating_sub(st.sent_ns));
                if !self.is_touched[i] {
                    self.is_touched[i] = true;
                    self.touched.push(i);
                }
            }
            _ => self.counts.foreign += 1,
        }
    }

    /// Tells the publishers heard from how far subscriber `s` got (their windows).
    fn tell_publishers(&mut self, sh: &Shared, s: usize, now_ns: u64) {
        for i in self.touched.drain(..) {
            self.is_touched[i] = false;
            let p = self.pubs.start + i;
            let state = &sh.pubs[p];
            let slot = sh.topology.slot(s);
            state.progress[slot].store(self.trackers[i].progress(), Ordering::Release);
            state.wake.notify_one();
        }
        self.counts.last_receive_ns = now_ns;
    }

    /// Whether the subscriber is done: everything published arrived, or nothing has for
    /// a while after the publishers finished.
    fn finished(&self, sh: &Shared, last_message: Instant) -> bool {
        if !sh.all_published() {
            return false;
        }
        let complete = self
            .pubs
            .clone()
            .zip(&self.trackers)
            .all(|(p, t)| t.lost(sh.pubs[p].sent.load(Ordering::Acquire)) == 0);
        complete || last_message.elapsed() >= QUIET
    }

    fn totals(&self) -> Counters {
        let mut c = self.counts;
        c.unique = self.trackers.iter().map(|t| t.unique).sum();
        c.duplicates = self.trackers.iter().map(|t| t.duplicates).sum();
        c.reordered = self.trackers.iter().map(|t| t.reordered).sum();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topologies_pair_publishers_and_subscribers() {
        let t = |shape| Topology { shape, n: 3 };
        let fan_in = t(Shape::FanIn);
        assert_eq!((fan_in.publishers(), fan_in.subscribers()), (3, 1));
        assert_eq!((fan_in.subs_of(2), fan_in.pubs_of(0)), (vec![0], 0..3));
        assert_eq!(fan_in.topic("b", 2), "b/in/2");
        assert_eq!(fan_in.filter("b", 0), "b/in/+");

        let fan_out = t(Shape::FanOut);
        assert_eq!((fan_out.publishers(), fan_out.subscribers()), (1, 3));
        assert_eq!(
            (fan_out.subs_of(0), fan_out.pubs_of(2)),
            (vec![0, 1, 2], 0..1)
        );
        assert_eq!(fan_out.slot(2), 2);
        assert_eq!(fan_out.topic("b", 0), fan_out.filter("b", 2));

        let pairs = t(Shape::Pairs);
        assert_eq!((pairs.publishers(), pairs.subscribers()), (3, 3));
        assert_eq!((pairs.subs_of(1), pairs.pubs_of(1)), (vec![1], 1..2));
        assert_eq!(pairs.slot(1), 0);
        assert_eq!(pairs.topic("b", 1), pairs.filter("b", 1));
        assert_ne!(pairs.topic("b", 1), pairs.filter("b", 2));
    }

    #[test]
    fn iot_devices_reach_the_global_and_their_site_dashboards() {
        // 10 devices on 3 sites (4, 4, 2), 2 global dashboards, 5 site ones (sites 0, 1,
        // 2, 0, 1).
        let iot = Iot {
            sites: 3,
            dashboards: 7,
            global: 2,
            device_subs: 2,
        };
        let t = Topology {
            shape: Shape::Iot(iot),
            n: 10,
        };
        assert_eq!((t.publishers(), t.subscribers()), (10, 7));
        assert_eq!(t.subs_of(0), vec![0, 1, 2, 5]);
        assert_eq!(t.subs_of(5), vec![0, 1, 3, 6]);
        assert_eq!(t.subs_of(9), vec![0, 1, 4]);
        for p in 0..10 {
            for (i, s) in t.subs_of(p).into_iter().enumerate() {
                assert_eq!(t.slot(s), i, "device {p}, dashboard {s}");
                assert!(t.pubs_of(s).contains(&p), "device {p}, dashboard {s}");
            }
        }
        assert_eq!(
            (t.pubs_of(0), t.pubs_of(2), t.pubs_of(4)),
            (0..10, 0..4, 8..10)
        );
        assert_eq!(t.topic("bench", 5), "site/1/device/5/telemetry");
        assert_eq!(t.topic("x", 9), "x/site/2/device/9/telemetry");
        assert_eq!(t.filter("bench", 1), "site/+/device/+/telemetry");
        assert_eq!(t.filter("bench", 6), "site/1/#");
        assert_eq!(
            t.own_filters("bench", 5),
            vec!["site/1/device/5/cmd/0", "site/1/device/5/cmd/1"]
        );
        assert!(Topology {
            shape: Shape::Pairs,
            n: 2
        }
        .own_filters("b", 0)
        .is_empty());
    }

    #[test]
    fn ack_slots_follow_the_qos_flows() {
        let mut acks = Acks {
            slots: vec![0; 4],
            acked: 0,
        };
        assert_eq!((acks.slot(0), acks.slot(2), acks.slot(3)), (1, 3, 1));
        acks.slots[1] = 1;
        acks.slots[2] = 1;
        let mut rbuf = BytesMut::new();
        let mut wire = Vec::new();
        mqtt::ack(&mut wire, mqtt::PUBACK, 1);
        mqtt::ack(&mut wire, mqtt::PUBREC, 2);
        mqtt::ack(&mut wire, mqtt::PUBREC, 2);
        rbuf.extend_from_slice(&wire);
        let mut wbuf = Vec::new();
        acks.handle(&mut rbuf, &mut wbuf).expect("valid acks");
        assert_eq!((acks.acked, acks.slots.as_slice()), (1, &[0, 0, 2, 0][..]));
        let mut pubrels = Vec::new();
        mqtt::ack(&mut pubrels, mqtt::PUBREL, 2);
        mqtt::ack(&mut pubrels, mqtt::PUBREL, 2);
        assert_eq!(wbuf, pubrels, "one PUBREL per PUBREC");
        assert!(rbuf.is_empty());

        // PUBCOMP completes; an ack for a packet id not in flight is an error.
        let mut wire = Vec::new();
        mqtt::ack(&mut wire, mqtt::PUBCOMP, 2);
        rbuf.extend_from_slice(&wire);
        acks.handle(&mut rbuf, &mut wbuf).expect("valid");
        assert_eq!(acks.acked, 2);
        let mut wire = Vec::new();
        mqtt::ack(&mut wire, mqtt::PUBACK, 3);
        rbuf.extend_from_slice(&wire);
        assert!(acks.handle(&mut rbuf, &mut wbuf).is_err());
    }

    fn publish(wire: &mut Vec<u8>, run: u32, publisher: u32, seq: u32, qos: u8) {
        let stamp = Stamp {
            run,
            publisher,
            seq,
            sent_ns: 1_000,
        };
        mqtt::publish(wire, "t", qos, seq as u16 + 1, &stamp.to_bytes(), &[0; 8]);
    }

    #[test]
    fn inbox_counts_acks_and_ignores_foreign_messages() {
        // Publishers 4 and 5 of run 7.
        let mut inbox = Inbox::new(7, 4..6, false);
        let mut wire = Vec::new();
        for (publisher, seq) in [(4, 0), (5, 0), (4, 1), (4, 1), (5, 2), (5, 1)] {
            publish(&mut wire, 7, publisher, seq, 1);
        }
        publish(&mut wire, 8, 4, 2, 1); // another run
        publish(&mut wire, 7, 9, 0, 1); // a publisher not ours
        mqtt::publish(&mut wire, "t", 1, 99, b"short", &[]); // no stamp
        let mut pubrel = Vec::new();
        mqtt::ack(&mut pubrel, mqtt::PUBREL, 42);
        wire.extend_from_slice(&pubrel);
        // Split mid-packet: the rest waits for the next read.
        let mut rbuf = BytesMut::from(&wire[..wire.len() - 1]);
        let mut wbuf = Vec::new();
        let mut latency = stats::new_histogram();
        inbox
            .handle(&mut rbuf, &mut wbuf, 51_000, &mut latency)
            .expect("valid");
        assert_eq!(rbuf.len(), 3, "the partial PUBREL is kept");
        rbuf.extend_from_slice(&wire[wire.len() - 1..]);
        inbox
            .handle(&mut rbuf, &mut wbuf, 51_000, &mut latency)
            .expect("valid");
        assert!(rbuf.is_empty());

        let c = inbox.totals();
        assert_eq!(
            (c.received, c.unique, c.duplicates, c.reordered),
            (6, 5, 1, 1)
        );
        assert_eq!(c.foreign, 3);
        assert_eq!(
            (inbox.trackers[0].lost(2), inbox.trackers[1].lost(3)),
            (0, 0)
        );
        assert_eq!(inbox.touched, vec![0, 1]);
        assert_eq!(Latency::of(&latency).p50, 50, "(51,000 - 1,000) ns");
        // One PUBACK per PUBLISH (duplicates and foreign ones included), one PUBCOMP.
        let (mut acks, mut rest) = (Vec::new(), &wbuf[..]);
        while let Some((frame, used)) = mqtt::next_frame(rest).expect("valid") {
            acks.push(frame.kind);
            rest = &rest[used..];
        }
        assert_eq!(acks.iter().filter(|k| **k == mqtt::PUBACK).count(), 9);
        assert_eq!(acks.last(), Some(&mqtt::PUBCOMP));
    }

    #[test]
    fn inbox_refuses_what_a_subscriber_never_gets() {
        let mut inbox = Inbox::new(1, 0..1, false);
        let mut wire = Vec::new();
        mqtt::subscribe(&mut wire, 1, "t", 0, false);
        let mut rbuf = BytesMut::from(&wire[..]);
        let mut latency = stats::new_histogram();
        assert!(inbox
            .handle(&mut rbuf, &mut Vec::new(), 0, &mut latency)
            .is_err());
    }

    #[test]
    fn keep_alive_outlasts_the_run() {
        assert_eq!(keep_alive(10.0), 140);
        assert_eq!(keep_alive(1e9), 65535);
    }
}
