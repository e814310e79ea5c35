//! The idle scenario: open N MQTT connections as fast as the broker takes them, hold
//! them, and see what each costs the broker in resident memory.

use crate::mqtt;
use crate::procfs::{self, RssSampler};
use crate::Args;
use anyhow::{bail, Context};
use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Connections per source address: below the default ephemeral port range (28k).
const PER_SOURCE: usize = 25_000;
/// Time given to the broker to settle before reading its memory.
const SETTLE: Duration = Duration::from_secs(1);

pub struct IdleReport {
    pub connections: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub connect_s: f64,
    pub sources: usize,
    /// Broker memory (KiB) before, with every connection open, peak while held, and
    /// after they closed (with `--pid`).
    pub rss_before_kb: Option<u64>,
    pub rss_connected_kb: Option<u64>,
    pub rss_peak_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    /// The generator's own CPU time while connecting: near `connect_s`, it is the limit.
    pub loadgen_cpu_s: f64,
    /// The broker's CPU time while the connections were being set up (with `--pid`):
    /// connect cost that does not depend on how fast the generator is.
    pub broker_connect_cpu_s: Option<f64>,
}

impl IdleReport {
    pub fn connect_rate(&self) -> f64 {
        self.connections as f64 / self.connect_s
    }

    /// Broker memory per open connection, in bytes.
    pub fn bytes_per_connection(&self) -> Option<f64> {
        let (before, with) = (self.rss_before_kb?, self.rss_connected_kb?);
        let n = self.connections.max(1) as f64;
        Some((with as f64 - before as f64) * 1024.0 / n)
    }

    pub fn failures(&self) -> Vec<String> {
        match &self.first_error {
            Some(e) => vec![format!("{} connections failed; first: {e}", self.failed)],
            None => Vec::new(),
        }
    }
}

/// Source addresses for `n` connections to `addr`: one per `PER_SOURCE` connections
/// on loopback (127.0.0.1, 127.0.0.2, ...), or the system's choice otherwise.
pub fn sources(addr: SocketAddr, n: usize, asked: usize) -> Vec<Option<IpAddr>> {
    let count = if asked > 0 {
        asked
    } else {
        n.div_ceil(PER_SOURCE).max(1)
    };
    if count == 1 || !addr.ip().is_loopback() || !addr.is_ipv4() {
        return vec![None];
    }
    (0..count)
        .map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 250) as u8))))
        .collect()
}

pub fn run(args: &Args, addr: SocketAddr) -> anyhow::Result<IdleReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let tasks = tokio::task::LocalSet::new();
    tasks.block_on(&runtime, idle(args, addr))
}

async fn idle(args: &Args, addr: SocketAddr) -> anyhow::Result<IdleReport> {
    let n = args.clients;
    let sources = sources(addr, n, args.source_ips);
    let pid = args.pid;
    let rss_before = pid.and_then(procfs::memory).map(|m| m.rss_kb);
    let own_cpu = procfs::own_cpu_seconds();
    let broker_cpu = pid.and_then(procfs::cpu_seconds);
    let run = std::process::id();

    let open: Rc<RefCell<Vec<TcpStream>>> = Rc::new(RefCell::new(Vec::with_capacity(n)));
    let errors: Rc<RefCell<(usize, Option<String>)>> = Rc::default();
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let source = sources[i % sources.len()];
        let (open, errors) = (open.clone(), errors.clone());
        handles.push(tokio::task::spawn_local(async move {
            let client_id = format!("lg{run}i{i}");
            match connect(addr, source, &client_id).await {
                Ok(stream) => open.borrow_mut().push(stream),
                Err(e) => {
                    let mut errors = errors.borrow_mut();
                    errors.0 += 1;
                    errors.1.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            drop(permit);
        }));
    }
    for h in handles {
        h.await?;
    }
    let connect_s = start.elapsed().as_secs_f64();
    let loadgen_cpu_s = procfs::own_cpu_seconds() - own_cpu;
    let broker_connect_cpu_s = broker_cpu
        .zip(pid.and_then(procfs::cpu_seconds))
        .map(|(before, after)| after - before);

    tokio::time::sleep(SETTLE).await;
    let rss_connected = pid.and_then(procfs::memory).map(|m| m.rss_kb);
    let sampler = pid.map(|p| RssSampler::start(p, Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let rss_peak = sampler.map(|s| s.finish());

    let streams = std::mem::take(&mut *open.borrow_mut());
    let connections = streams.len();
    for mut s in streams {
        let mut bye = Vec::with_capacity(2);
        mqtt::disconnect(&mut bye);
        let _ = s.write_all(&bye).await;
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after = pid.and_then(procfs::memory).map(|m| m.rss_kb);
    let (failed, first_error) = errors.take();
    Ok(IdleReport {
        connections,
        failed,
        first_error,
        connect_s,
        sources: sources.len(),
        rss_before_kb: rss_before,
        rss_connected_kb: rss_connected,
        rss_peak_kb: rss_peak,
        rss_after_kb: rss_after,
        loadgen_cpu_s,
        broker_connect_cpu_s,
    })
}

/// TCP connect, CONNECT, CONNACK accepted.
async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    client_id: &str,
) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding to {ip}"))?;
    }
    let mut stream = socket.connect(addr).await.context("TCP connect")?;
    stream.set_nodelay(true)?;
    let mut out = Vec::with_capacity(64);
    // Long keep-alive: the connection stays silent while held.
    mqtt::connect(&mut out, client_id, 3600);
    stream.write_all(&out).await?;
    let mut buf = Vec::with_capacity(8);
    loop {
        if let Some((frame, _)) = mqtt::next_frame(&buf)? {
            if frame.kind != mqtt::CONNACK {
                bail!("expected CONNACK, got packet type {}", frame.kind);
            }
            match mqtt::connack_code(&frame)? {
                0 => return Ok(stream),
                code => bail!("refused with CONNACK code {code}"),
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("closed before CONNACK");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_gets_a_source_address_per_25k_connections() {
        let local: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        assert_eq!(sources(local, 10_000, 0), vec![None]);
        let many = sources(local, 60_000, 0);
        assert_eq!(many.len(), 3);
        assert_eq!(many[2], Some("127.0.0.3".parse().expect("ip")));
        assert_eq!(sources(local, 10, 2).len(), 2, "asked for explicitly");
        let remote: SocketAddr = "192.0.2.1:1883".parse().expect("addr");
        assert_eq!(sources(remote, 60_000, 0), vec![None], "only on loopback");
    }

    #[test]
    fn bytes_per_connection_from_rss() {
        let report = IdleReport {
            connections: 1000,
            failed: 0,
            first_error: None,
            connect_s: 0.5,
            sources: 1,
            rss_before_kb: Some(1000),
            rss_connected_kb: Some(3000),
            rss_peak_kb: Some(3000),
            rss_after_kb: Some(1100),
            loadgen_cpu_s: 0.1,
            broker_connect_cpu_s: Some(0.25),
        };
        assert_eq!(report.bytes_per_connection(), Some(2048.0));
        assert_eq!(report.connect_rate(), 2000.0);
        assert!(report.failures().is_empty());
    }
}
