//! loadgen: an MQTT 3.1.1 load generator for any broker at host:port.
//!
//!     cargo run --release --example loadgen -- fan-in --port 1883 --qos 1 --clients 100
//!
//! Prints one human line and one JSON line per run. Exits 1 when the run failed (loss
//! or unacknowledged publishes at QoS 1/2, duplicates at QoS 2, connection errors), 2
//! when it could not run at all. See docs/benchmarks.md.

mod idle;
mod load;
mod mqtt;
mod procfs;
mod stats;

use clap::{Parser, ValueEnum};
use stats::{fmt_us, Json};
use std::io::Write as _;
use std::net::ToSocketAddrs;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// N publishers → 1 subscriber on a `+` filter.
    FanIn,
    /// 1 publisher → N subscribers of one topic.
    FanOut,
    /// N publisher/subscriber pairs, each on its own topic.
    P2p,
    /// Like p2p at a fixed total rate (--rate, default 5000/s): latency percentiles.
    Latency,
    /// Open N idle connections: connect rate and broker memory per connection.
    Idle,
    /// N devices publishing telemetry on `site/{s}/device/{d}/telemetry`, each
    /// subscribed to --device-subs command topics of its own; --dashboards subscribers on
    /// `site/+/device/+/telemetry` (--global-dashboards of them) and `site/{s}/#`.
    Iot,
}

/// The default --topic-prefix (left out of the IoT scenario's `site/...` topics).
pub const DEFAULT_PREFIX: &str = "bench";

#[derive(Debug, Clone, Parser)]
#[command(about = "MQTT load generator (docs/benchmarks.md)")]
pub struct Args {
    pub scenario: Scenario,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Subscribers connect to this port instead (same host): publishers on one node of a
    /// cluster, subscribers on another (docs/cluster.md).
    #[arg(long)]
    pub sub_port: Option<u16>,
    /// Milliseconds between every subscription's SUBACK and the first publish: the time
    /// a cluster takes to spread new subscriptions to its other nodes.
    #[arg(long, default_value_t = 0)]
    pub settle_ms: u64,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (at least 20: the stamp of run, publisher, sequence and send time).
    #[arg(long, default_value_t = 64, value_parser = payload_size)]
    pub payload: usize,
    /// Publishers (fan-in), subscribers (fan-out), pairs (p2p, latency) or connections (idle).
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub clients: usize,
    /// Seconds of publishing (idle: seconds the connections are held).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Total publish rate, messages per second, spread over the publishers (0: unpaced;
    /// the latency scenario defaults to 5000).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Stop each publisher after this many messages (or at --duration, if sooner).
    #[arg(long)]
    pub count: Option<u32>,
    /// Messages a publisher may have outstanding: unacknowledged, and not yet received
    /// by its subscribers unless --open-loop.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub window: u32,
    /// Messages a publisher writes with one system call when it may (1: one write per
    /// message, as most client libraries do).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub batch: u32,
    /// Seconds after which a publisher whose end-to-end window has not moved gives up on
    /// it (a "stall"; for QoS 0 loss). Deep queues (iot) need longer.
    #[arg(long, default_value_t = 1.0)]
    pub stall: f64,
    /// Subscribers ask for persistent sessions (Clean Session 0), which a broker with
    /// persistence stores; each is discarded (a clean reconnect) when the run ends.
    #[arg(long)]
    pub persistent: bool,
    /// Subscribers connect with MQTT 5 and accept this many topic aliases from the broker
    /// (publishers stay on MQTT 3.1.1): measures what aliases save on long topics.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub topic_aliases: Option<u16>,
    /// Let publishers run ahead of their subscribers (QoS 0: no limit at all; QoS 1/2:
    /// only the acknowledgement window). The broker may then queue or drop.
    #[arg(long)]
    pub open_loop: bool,
    /// Threads of the generator, each a single-threaded runtime.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub threads: usize,
    /// The broker's process id: report its memory and CPU time.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Topics are <prefix>/in/<n>, <prefix>/out or <prefix>/p2p/<n> (iot: site/..., or
    /// <prefix>/site/... for another prefix than the default).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// IoT: sites the devices are spread over.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub sites: usize,
    /// IoT: dashboard subscribers.
    #[arg(long, default_value_t = 100)]
    pub dashboards: usize,
    /// IoT: dashboards on every site (`site/+/device/+/telemetry`); the others watch one
    /// site each (`site/{s}/#`).
    #[arg(long, default_value_t = 10)]
    pub global_dashboards: usize,
    /// IoT: command topics each device subscribes to (never published to).
    #[arg(long, default_value_t = 10)]
    pub device_subs: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub connect_concurrency: usize,
    /// Idle: local addresses to connect from (127.0.0.1, .2, ...; 0: one per 25,000).
    #[arg(long, default_value_t = 0)]
    pub source_ips: usize,
    /// Subscribers take Server-Sent Events from ternmq's http listener on this port
    /// (GET /sse) instead of subscribing over MQTT; publishers still use MQTT.
    #[arg(long)]
    pub sse_port: Option<u16>,
    /// Copied into the JSON line (e.g. the broker's name) for the comparison table.
    #[arg(long, default_value = "")]
    pub label: String,
}

fn payload_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !(stats::STAMP_LEN..=256 * 1024 * 1024).contains(&n) {
        return Err(format!("between {} and 268435456 bytes", stats::STAMP_LEN));
    }
    Ok(n)
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("a whole number of at least 1".into()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    procfs::raise_nofile_limit();
    let addr = match (args.host.as_str(), args.port).to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(a) => a,
            None => return fatal(&format!("{} resolves to no address", args.host)),
        },
        Err(e) => return fatal(&format!("cannot resolve {}: {e}", args.host)),
    };
    if args.scenario == Scenario::Idle {
        match idle::run(&args, addr) {
            Ok(r) => finish(&args, idle_lines(&args, &r), r.failures()),
            Err(e) => fatal(&format!("{e:#}")),
        }
    } else {
        match load::run(&args, addr) {
            Ok(r) => finish(&args, load_lines(&args, &r), r.failures.clone()),
            Err(e) => fatal(&format!("{e:#}")),
        }
    }
}

fn fatal(message: &str) -> ExitCode {
    eprintln!("loadgen: {message}");
    ExitCode::from(2)
}

fn finish(args: &Args, (human, json): (String, Json), failures: Vec<String>) -> ExitCode {
    // A closed stdout (`| head`) is no reason to panic.
    let mut out = std::io::stdout().lock();
    let json = json.bool("ok", failures.is_empty()).finish();
    let _ = writeln!(out, "{human}\n{json}");
    drop(out);
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &failures {
        eprintln!("loadgen: FAIL {}: {f}", name(args));
    }
    ExitCode::FAILURE
}

fn name(args: &Args) -> String {
    let scenario = args
        .scenario
        .to_possible_value()
        .map(|v| v.get_name().to_string());
    scenario.unwrap_or_default()
}

fn common_json(args: &Args) -> Json {
    Json::default()
        .str("label", &args.label)
        .str("scenario", &name(args))
        .int("qos", u64::from(args.qos))
        .int("payload", args.payload as u64)
        .int("clients", args.clients as u64)
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn load_lines(args: &Args, r: &load::Report) -> (String, Json) {
    let c = &r.counters;
    let l = &r.latency;
    let mut human = format!(
        "{} qos {} payload {} ({} pub → {} sub): sent {} ({:.0}/s), received {} ({:.0} msg/s), \
         lost {}, duplicates {}, latency p50 {} p99 {} p99.9 {} max {}",
        name(args),
        args.qos,
        args.payload,
        r.topology.publishers(),
        r.topology.subscribers(),
        c.sent,
        r.publish_rate(),
        c.unique,
        r.receive_rate(),
        r.lost,
        c.duplicates,
        fmt_us(l.p50),
        fmt_us(l.p99),
        fmt_us(l.p999),
        fmt_us(l.max),
    );
    if c.sub_bytes > 0 && c.unique > 0 {
        human += &format!(
            ", subscribers read {:.1} B/msg",
            c.sub_bytes as f64 / c.unique as f64
        );
    }
    let mut json = common_json(args)
        .int("publishers", r.topology.publishers() as u64)
        .int("subscribers", r.topology.subscribers() as u64)
        .int("threads", args.threads as u64)
        .int("window", u64::from(args.window))
        .int("batch", u64::from(args.batch))
        .bool("open_loop", args.open_loop)
        .bool("persistent", args.persistent)
        .int("rate_target", args.rate)
        .int("sent", c.sent)
        .int("acked", c.acked)
        .int("unacked", c.unacked)
        .int("expected", r.expected)
        .int("received", c.received)
        .int("unique", c.unique)
        .int("lost", r.lost)
        .int("duplicates", c.duplicates)
        .int("reordered", c.reordered)
        .int("foreign", c.foreign)
        .int("stalls", c.stalls)
        .int("sub_bytes", c.sub_bytes)
        .num("publish_s", r.publish_s)
        .num("receive_s", r.receive_s)
        .num("publish_rate", r.publish_rate())
        .num("receive_rate", r.receive_rate())
        .int("latency_count", l.count)
        .int("p50_us", l.p50)
        .int("p99_us", l.p99)
        .int("p999_us", l.p999)
        .int("max_us", l.max)
        .num("loadgen_cpu_s", r.loadgen_cpu_s);
    if let Some(b) = &r.broker {
        human += &format!(
            " | broker rss {} → peak {} → {} after, cpu {:.2} s",
            mib(b.rss_before_kb),
            mib(b.rss_peak_kb),
            mib(b.rss_after_kb),
            b.cpu_s
        );
        json = json
            .int("rss_before_kb", b.rss_before_kb)
            .int("rss_peak_kb", b.rss_peak_kb)
            .int("rss_after_kb", b.rss_after_kb)
            .int("hwm_kb", b.hwm_kb)
            .num("broker_cpu_s", b.cpu_s);
    }
    human += &format!(" | loadgen cpu {:.2} s", r.loadgen_cpu_s);
    (human, json)
}

fn idle_lines(args: &Args, r: &idle::IdleReport) -> (String, Json) {
    let mut human = format!(
        "idle: {} connections in {:.2} s ({:.0} conn/s), {} failed",
        r.connections,
        r.connect_s,
        r.connect_rate(),
        r.failed
    );
    let mut json = common_json(args)
        .int("connections", r.connections as u64)
        .int("failed", r.failed as u64)
        .int("sources", r.sources as u64)
        .num("connect_s", r.connect_s)
        .num("connect_rate", r.connect_rate())
        .num("loadgen_cpu_s", r.loadgen_cpu_s);
    if let Some(cpu) = r.broker_connect_cpu_s {
        let per_us = cpu * 1e6 / r.connections.max(1) as f64;
        human += &format!(", broker CPU {per_us:.1} µs/connection");
        json = json
            .num("broker_connect_cpu_s", cpu)
            .num("cpu_us_per_connection", per_us);
    }
    if let (Some(before), Some(with), Some(after)) =
        (r.rss_before_kb, r.rss_connected_kb, r.rss_after_kb)
    {
        let per = r.bytes_per_connection().unwrap_or(f64::NAN);
        human += &format!(
            " | broker rss {} → {} connected ({per:.0} B/conn) → {} after close",
            mib(before),
            mib(with),
            mib(after)
        );
        json = json
            .int("rss_before_kb", before)
            .int("rss_connected_kb", with)
            .int("rss_peak_kb", r.rss_peak_kb.unwrap_or(with).max(with))
            .int("rss_after_kb", after)
            .num("bytes_per_connection", per);
    }
    (human, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;
    use ternmq::config::{Config, Listener, ListenerKind};

    /// A ternmq on 127.0.0.1 (OS-chosen ports: MQTT, and SSE for `--sse-port`) on its own
    /// runtime, for the duration of `f`.
    fn with_broker(f: impl FnOnce(SocketAddr, u16)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut config = Config::default();
        let bind = "127.0.0.1:0".parse().expect("addr");
        config.listeners = vec![
            Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Tcp, bind)
            },
            Listener {
                allow_anonymous: true,
                ..Listener::new(ListenerKind::Http, bind)
            },
        ];
        let server = runtime
            .block_on(ternmq::Server::start(config))
            .expect("starts");
        let addr = server.local_addr(ListenerKind::Tcp).expect("tcp");
        let http = server.local_addr(ListenerKind::Http).expect("http");
        f(addr, http.port());
        runtime.block_on(server.shutdown(Duration::from_secs(5)));
    }

    fn args(line: &str) -> Args {
        Args::try_parse_from(line.split_whitespace()).expect("valid arguments")
    }

    #[test]
    fn arguments_are_checked() {
        let a = args("loadgen fan-in --qos 1 --payload 64 --clients 100 --duration 10");
        assert_eq!(
            (a.scenario, a.qos, a.payload, a.clients),
            (Scenario::FanIn, 1, 64, 100)
        );
        assert_eq!((a.window, a.threads, a.rate), (100, 1, 0));
        for bad in [
            "loadgen p2p --qos 3",
            "loadgen p2p --payload 19",
            "loadgen p2p --clients 0",
            "loadgen p2p --window 0",
            "loadgen nowhere",
        ] {
            assert!(
                Args::try_parse_from(bad.split_whitespace()).is_err(),
                "{bad}"
            );
        }
    }

    /// Exact counts over real sockets, for every shape and QoS.
    #[test]
    fn counts_exactly_against_an_in_process_ternmq() {
        with_broker(|addr, http| {
            let sse = format!("fan-out --qos 1 --clients 3 --sse-port {http}");
            let cases = [
                (sse.as_str(), 200, 3 * 200),
                ("p2p --qos 1 --clients 2 --threads 2", 2 * 200, 2 * 200),
                // ternmq's default receive maximum (20) bounds unreleased QoS 2 publishes.
                ("p2p --qos 2 --clients 2 --window 20", 2 * 200, 2 * 200),
                ("fan-in --qos 1 --clients 3", 3 * 200, 3 * 200),
                (
                    "fan-out --qos 2 --clients 3 --threads 2 --window 20",
                    200,
                    3 * 200,
                ),
                ("fan-in --qos 0 --clients 2", 2 * 200, 2 * 200),
                ("latency --qos 1 --clients 2 --rate 4000", 2 * 200, 2 * 200),
                // 6 devices on 2 sites; 1 global dashboard and 2 site ones: 2 copies each.
                (
                    "iot --qos 1 --clients 6 --sites 2 --dashboards 3 --global-dashboards 1 --window 5",
                    6 * 200,
                    6 * 200 * 2,
                ),
            ];
            for (case, sent, received) in cases {
                let line = format!("loadgen {case} --count 200 --duration 20 --topic-prefix t");
                let a = args(&line);
                let r = load::run(&a, addr).expect("runs");
                let c = &r.counters;
                assert!(r.failures.is_empty(), "{case}: {:?}", r.failures);
                assert_eq!((c.sent, r.expected), (sent, received), "{case}");
                assert_eq!(
                    (c.unique, c.received, r.lost),
                    (received, received, 0),
                    "{case}"
                );
                assert_eq!((c.duplicates, c.foreign), (0, 0), "{case}");
                if a.qos > 0 {
                    assert_eq!((c.acked, c.unacked), (sent, 0), "{case}");
                }
                assert_eq!(r.latency.count, received, "{case}");
                assert!(
                    r.latency.p50 > 0 && r.latency.p50 <= r.latency.max,
                    "{case}"
                );
                let (human, json) = load_lines(&a, &r);
                assert!(human.contains(&format!("received {received} ")), "{human}");
                let json = json.finish();
                assert!(json.contains(&format!("\"unique\":{received},")), "{json}");
            }
        });
    }

    /// Subscribers taking topic aliases read the long topic once, then a 3-byte alias
    /// property in its place: every message still arrives, each once.
    #[test]
    fn topic_aliases_save_the_topic_on_the_wire() {
        with_broker(|addr, _| {
            let prefix = "t".repeat(100);
            let run = |aliases: &str| {
                let line = format!(
                    "loadgen fan-out --qos 1 --clients 2 --count 300 --duration 20 --topic-prefix {prefix}{aliases}"
                );
                let r = load::run(&args(&line), addr).expect("runs");
                assert!(r.failures.is_empty(), "{line}: {:?}", r.failures);
                assert_eq!(
                    (r.counters.unique, r.lost, r.counters.duplicates),
                    (600, 0, 0)
                );
                r.counters.sub_bytes as f64 / 600.0
            };
            let (plain, aliased) = (run(""), run(" --topic-aliases 10"));
            // The topic (100+ bytes) goes, an alias property (4 bytes with its length) comes.
            assert!(
                plain - aliased > 90.0,
                "{plain} vs {aliased} bytes per message"
            );
        });
    }

    #[test]
    fn a_paced_run_never_outruns_its_rate() {
        with_broker(|addr, _| {
            // 2 publishers × 300 messages at 1,000/s each: the last is due at 0.299 s.
            let a = args("loadgen latency --qos 0 --clients 2 --rate 2000 --count 300");
            let r = load::run(&a, addr).expect("runs");
            assert!(r.failures.is_empty(), "{:?}", r.failures);
            assert_eq!(r.counters.sent, 600);
            // A lower bound only: a slow machine makes the run longer, never shorter.
            assert!(r.publish_s >= 0.298, "{} s", r.publish_s);
        });
    }

    #[test]
    fn idle_connections_are_counted_and_measured() {
        with_broker(|addr, _| {
            let pid = std::process::id();
            let line = format!("loadgen idle --clients 50 --duration 0.1 --pid {pid}");
            let r = idle::run(&args(&line), addr).expect("runs");
            assert_eq!((r.connections, r.failed), (50, 0));
            assert!(r.connect_rate() > 0.0);
            assert!(r.rss_connected_kb.is_some() && r.rss_after_kb.is_some());
        });
    }

    #[test]
    fn an_unreachable_broker_is_a_setup_error() {
        let a = args("loadgen p2p --clients 2 --duration 1");
        // Port 1 on loopback: nothing listens there.
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let e = load::run(&a, addr).err().expect("fails");
        assert!(format!("{e:#}").contains("connecting to"), "{e:#}");
    }
}
