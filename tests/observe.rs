//! Seeing inside the broker (docs/observability.md): the `$SYS` topics (on the paused
//! clock, and read by the real `mosquitto_sub`), `/metrics` checked as Prometheus text
//! (and by `promtool`), the JSON admin API, JSON logs from the binary, rate-limited
//! warnings, and the web console in headless Chromium.
//!
//! Counters are process-wide and the tests of this binary run at once, so exact values
//! are asserted on what belongs to one broker (clients, sessions, subscriptions, retained
//! messages); counters are asserted as lower bounds.

// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use common::client::{connect_expiry, connect_v311, encode, plain, retained, Client};
use common::http::Sse;
use common::mosquitto::{clients_available, in_ci, mosquitto_sub, on_path};
use common::TestBroker;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;
use ternmq::config::{Config, Listener, ListenerKind, LogFormat};
use ternmq::protocol::{Packet, Protocol, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const TOKEN: &str = "test-admin-token-0123456789";
const WAIT: Duration = Duration::from_secs(10);

/// Adds an admin listener on a free port.
fn with_admin(config: &mut Config) {
    config.listeners.push(Listener {
        token: Some(TOKEN.into()),
        ..Listener::new(ListenerKind::Admin, "127.0.0.1:0".parse().unwrap())
    });
}

fn admin_addr(b: &TestBroker) -> SocketAddr {
    let server = b.server.as_ref().expect("running");
    server
        .local_addr(ListenerKind::Admin)
        .expect("admin listener")
}

/// One HTTP/1.1 request (`Connection: close`); returns the status, the headers
/// (lower-case names) and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the admin listener answers in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A JSON API call with the token; asserts the status.
async fn api(addr: SocketAddr, method: &str, path: &str, body: &str, status: u16) -> Value {
    let (got, _, text) = http(addr, method, path, Some(TOKEN), body).await;
    assert_eq!(got, status, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

// =======================================================================================
// $SYS
// =======================================================================================

/// The retained `$SYS` values the client receives now, by topic.
async fn sys_values(c: &mut Client) -> BTreeMap<String, String> {
    c.drain_publishes()
        .await
        .into_iter()
        .map(|p| {
            let value = String::from_utf8(p.payload.to_vec()).unwrap();
            (p.topic.to_string(), value)
        })
        .collect()
}

fn sys(topic: &str) -> String {
    format!("$SYS/broker/{topic}")
}

/// Sleeps until `t`, then lets the tasks woken at `t` run (tests/timing.rs, `at`).
async fn at(t: Instant) {
    tokio::time::sleep_until(t).await;
    tokio::task::yield_now().await;
}

/// Every `sys_interval` the gauges that changed go out as retained messages, and those
/// that did not stay quiet: at an update where nothing changed, only the uptime is sent.
#[tokio::test(start_paused = true)]
async fn sys_topics_follow_the_broker_every_interval() {
    let b = TestBroker::in_memory(|c| c.sys_interval = 10);
    let t0 = Instant::now();
    ternmq::admin::sys::spawn(b.broker());
    tokio::task::yield_now().await;
    let mut watcher = Client::connect_v5(b.target(), "watcher").await;
    let filters = [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/+",
        "$SYS/broker/subscriptions/count",
    ];
    for f in filters {
        watcher.subscribe(f, QoS::AtMostOnce).await;
    }
    // The first update, made at the start: retained, so a late subscriber has it.
    let first = sys_values(&mut watcher).await;
    let version = format!("ternmq version {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(first.get(&sys("version")), Some(&version), "{first:#?}");
    assert_eq!(
        first.get(&sys("uptime")).map(String::as_str),
        Some("0 seconds")
    );
    assert_eq!(
        first.get(&sys("clients/connected")).map(String::as_str),
        Some("0")
    );
    assert_eq!(
        first.get(&sys("subscriptions/count")).map(String::as_str),
        Some("0")
    );

    // A persistent client comes and goes.
    let (away, _) = Client::connect_accepted(b.target(), connect_expiry("away", true, 3600)).await;
    away.disconnect().await;

    at(t0 + Duration::from_secs(10)).await;
    let second = sys_values(&mut watcher).await;
    let expect = |m: &BTreeMap<String, String>, topic: &str, v: &str| {
        assert_eq!(
            m.get(&sys(topic)).map(String::as_str),
            Some(v),
            "{topic} in {m:#?}"
        );
    };
    expect(&second, "uptime", "10 seconds");
    expect(&second, "clients/connected", "1");
    expect(&second, "clients/active", "1");
    expect(&second, "clients/total", "2");
    expect(&second, "clients/disconnected", "1");
    expect(&second, "clients/inactive", "1");
    expect(&second, "clients/maximum", "2");
    expect(&second, "subscriptions/count", "4");
    assert!(
        !second.contains_key(&sys("version")),
        "the version is sent once"
    );

    // Nothing changed: the uptime alone.
    at(t0 + Duration::from_secs(20)).await;
    let third = sys_values(&mut watcher).await;
    assert_eq!(
        third.keys().collect::<Vec<_>>(),
        [&sys("uptime")],
        "{third:#?}"
    );
    expect(&third, "uptime", "20 seconds");
}

/// `#` does not match `$SYS` topics [MQTT-4.7.2-1], and the ACL decides which `$SYS`
/// topics a client reads, as for any message.
#[tokio::test(start_paused = true)]
async fn sys_topics_are_read_as_the_acl_allows() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic read $SYS/broker/clients/#\ntopic readwrite app/#\n",
    )
    .unwrap();
    let b = TestBroker::in_memory(|c| {
        c.sys_interval = 10;
        c.auth.acl_file = Some(acl.clone());
    });
    ternmq::admin::sys::spawn(b.broker());
    tokio::task::yield_now().await;
    let mut everything = Client::connect_v5(b.target(), "everything").await;
    everything.subscribe("#", QoS::AtMostOnce).await;
    let mut sys_all = Client::connect_v5(b.target(), "sys-all").await;
    sys_all.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let mut publisher = Client::connect_v5(b.target(), "publisher").await;
    publisher
        .publish(retained("app/state", b"up", QoS::AtLeastOnce))
        .await;

    let got: Vec<String> = everything
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(got, ["app/state"], "# matches no $SYS topic");
    let got = sys_values(&mut sys_all).await;
    assert!(!got.is_empty(), "the ACL lets clients/# through");
    assert!(
        got.keys().all(|t| t.starts_with("$SYS/broker/clients/")),
        "only what the ACL allows: {got:#?}"
    );
}

/// The real `mosquitto_sub -t '$SYS/#' -v` reads the tree as it reads mosquitto's.
#[tokio::test]
async fn mosquitto_sub_reads_the_sys_tree() {
    if !clients_available() {
        return;
    }
    let b = TestBroker::with(|c| c.sys_interval = 1).await;
    let mut c = Client::connect_v5(b.addr, "retainer").await;
    c.publish(retained("zz/marker", b"hello", QoS::AtLeastOnce))
        .await;
    // Retained messages come in topic order (bytes, clients, heap, load, ...).
    let lines = mosquitto_sub(&b, &["-t", "$SYS/#", "-v", "-C", "20"])
        .output()
        .await;
    assert!(
        lines.iter().any(|l| l == "$SYS/broker/clients/connected 1"),
        "{lines:#?}"
    );
    for prefix in [
        "$SYS/broker/bytes/received ",
        "$SYS/broker/bytes/sent ",
        "$SYS/broker/clients/total ",
        "$SYS/broker/heap/current ",
        "$SYS/broker/load/bytes/received/1min ",
        "$SYS/broker/load/connections/15min ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "{prefix:?} in {lines:#?}"
        );
    }
    let version = mosquitto_sub(&b, &["-t", "$SYS/broker/version", "-v", "-C", "1"])
        .output()
        .await;
    let wanted = format!(
        "$SYS/broker/version ternmq version {}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(version, [wanted]);
    let uptime = mosquitto_sub(&b, &["-t", "$SYS/broker/uptime", "-v", "-C", "1"])
        .output()
        .await;
    let seconds = uptime[0]
        .strip_prefix("$SYS/broker/uptime ")
        .and_then(|u| u.strip_suffix(" seconds"));
    assert!(
        seconds.is_some_and(|s| s.parse::<u64>().is_ok()),
        "{uptime:?}"
    );
    let hash = mosquitto_sub(&b, &["-t", "#", "-v", "-C", "1"])
        .output()
        .await;
    assert_eq!(hash, ["zz/marker hello"], "# skips $SYS");
}

// =======================================================================================
// /metrics
// =======================================================================================

/// A checker of the Prometheus text format (0.0.4): every sample belongs to a family
/// declared by HELP and TYPE before it, names and labels are well formed, values are
/// numbers, and no series appears twice. Returns the samples by series.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        n.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        }) && !n.is_empty()
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "metric name {name:?}");
        let kind = types
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no TYPE"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name} ends in _total");
            assert!(value >= 0.0, "{line}");
        }
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                let inner = inner.unwrap_or_else(|| panic!("labels of {line:?}"));
                for pair in inner.split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(name_ok(k) && !k.contains(':'), "label name {k:?}");
                    assert!(!v.trim_end_matches('"').contains('\n'), "{line}");
                }
            }
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "series twice: {series}"
        );
    }
    samples
}

/// `GET /metrics` needs the token, and is valid Prometheus text with every family
/// docs/observability.md lists; the broker's own gauges are exact.
#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let b = TestBroker::with(with_admin).await;
    let admin = admin_addr(&b);
    let mut sub = Client::connect_v5(b.addr, "metrics-sub").await;
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v311(b.addr, "metrics-pub").await;
    publisher
        .publish_v311("m/1", b"12345", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("m/2", b"x", QoS::AtMostOnce, false)
        .await;
    sub.receive().await;
    sub.receive().await;

    assert_eq!(http(admin, "GET", "/metrics", None, "").await.0, 401);
    assert_eq!(
        http(admin, "GET", "/metrics", Some("wrong-token-0123456789"), "")
            .await
            .0,
        401
    );
    let (status, headers, text) = http(admin, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(status, 200, "{text}");
    assert!(headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let samples = parse_exposition(&text);
    let listener = format!("mqtt://{}", b.addr);
    let get = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("{series}:\n{text}"))
    };
    assert_eq!(
        get(&format!(
            "ternmq_clients_connected{{listener=\"{listener}\",protocol=\"5.0\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "ternmq_clients_connected{{listener=\"{listener}\",protocol=\"3.1.1\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!("ternmq_connections{{listener=\"{listener}\"}}")),
        2.0
    );
    assert_eq!(
        get(&format!(
            "ternmq_accept_errors_total{{listener=\"{listener}\"}}"
        )),
        0.0
    );
    assert_eq!(get("ternmq_sessions{state=\"online\"}"), 2.0);
    assert_eq!(get("ternmq_subscriptions"), 1.0);
    assert_eq!(get("ternmq_retained_messages"), 1.0);
    assert_eq!(get("ternmq_retained_bytes"), 8.0, "topic m/1 and 5 bytes");
    assert!(get("ternmq_messages_received_total{qos=\"1\"}") >= 1.0);
    assert!(get("ternmq_messages_sent_total{qos=\"0\"}") >= 1.0);
    assert!(get("ternmq_message_bytes_received_total{qos=\"1\"}") >= 5.0);
    assert!(get("ternmq_bytes_received_total") > 0.0);
    assert!(get("ternmq_memory_limit_bytes{budget=\"queued\"}") > 0.0);
    for family in [
        "ternmq_messages_dropped_total{reason=\"queue_full\"}",
        "ternmq_messages_dropped_total{reason=\"expired\"}",
        "ternmq_messages_dropped_total{reason=\"too_large\"}",
        "ternmq_messages_dropped_total{reason=\"not_authorized\"}",
        "ternmq_auth_failures_total",
        "ternmq_packets_sent_total",
        "ternmq_sessions_expired_total",
        "ternmq_memory_used_bytes{budget=\"buffers\"}",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        get(family);
    }

    // promtool, Prometheus's own checker, where it is installed (tests/run.sh installs it).
    if on_path("promtool") {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool: {said}\n{text}"
        );
    } else {
        assert!(
            !in_ci(),
            "CI=true and promtool is missing (apt-get install prometheus)"
        );
    }
}

/// Listeners hand over a connection only once it has sent something (TCP_DEFER_ACCEPT):
/// connections that stay silent hold no descriptor and no task of the broker's, and do
/// not count as accepted; the first bytes of one make it an ordinary connection.
#[tokio::test]
async fn silent_connections_are_not_accepted_until_they_speak() {
    let b = TestBroker::with(with_admin).await;
    let admin = admin_addr(&b);
    let accepted = || async {
        let (status, _, text) = http(admin, "GET", "/metrics", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{text}");
        let series = format!(
            "ternmq_connections_accepted_total{{listener=\"mqtt://{}\"}}",
            b.addr
        );
        parse_exposition(&text)[&series]
    };
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(b.addr).await.unwrap());
    }
    let _speaking = Client::connect_v311(b.addr, "speaks").await;
    assert_eq!(accepted().await, 1.0, "only the connection that spoke");

    // One of the silent ones sends its CONNECT: accepted, and answered as usual.
    let mut late = silent.pop().unwrap();
    let connect = encode(
        &Packet::Connect(Box::new(connect_v311("late"))),
        Protocol::V311,
    );
    late.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, late.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    assert_eq!(accepted().await, 2.0);
    b.stop().await;
}

/// Idle connections are parked without a task of their own (`transport::park`; the
/// `ternmq_connections_parked` gauge) and still do everything a connection does: answer
/// pings, take deliveries, lose their session to a takeover, close on an administrator's
/// request, time out on their keep-alive (with their will) and hear of the shutdown.
#[tokio::test]
async fn idle_connections_are_parked_and_keep_working() {
    let b = TestBroker::with(with_admin).await;
    let admin = admin_addr(&b);
    let series = format!(
        "ternmq_connections_parked{{listener=\"mqtt://{}\"}}",
        b.addr
    );
    let parked = || async {
        let (status, _, text) = http(admin, "GET", "/metrics", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{text}");
        parse_exposition(&text)[&series]
    };
    let all_parked = |n: f64| async move {
        let deadline = Instant::now() + WAIT;
        while parked().await != n {
            assert!(Instant::now() < deadline, "{n} connections parked in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    let mut idle = Client::connect_v311(b.addr, "idle").await;
    let mut sub = Client::connect_v5(b.addr, "sub").await;
    sub.subscribe("p/#", QoS::AtLeastOnce).await;
    let mut victim = Client::connect_v5(b.addr, "victim").await;
    let mut kicked = Client::connect_v5(b.addr, "kicked").await;
    let mut watcher = Client::connect_v5(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let silent =
        common::client::connect_with_will("silent", "will/silent", "gone", Default::default());
    let (mut silent, _) = Client::connect_with(
        b.addr,
        ternmq::protocol::Connect {
            keep_alive: 2,
            ..silent
        },
    )
    .await;
    // Connections that carried no message are parked once they have nothing to do.
    all_parked(6.0).await;

    assert!(idle.ping().await.is_empty(), "a parked client's PINGRESP");
    let mut publisher = Client::connect_v5(b.addr, "publisher").await;
    assert_eq!(
        publisher
            .publish(plain("p/1", b"wake up", QoS::AtLeastOnce))
            .await,
        ReasonCode::Success
    );
    let p = sub.expect_publish().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("p/1", &b"wake up"[..]));
    sub.acknowledge(&p).await;

    // The silent client's keep-alive (3 s) runs out while it is parked: it is closed,
    // and its will is published.
    // Its 3 s run from its CONNECT, a few milliseconds ago: the wait allows for a busy
    // machine waking the lot late.
    silent
        .expect_disconnect_within(ReasonCode::KeepAliveTimeout, WAIT)
        .await;
    let will = watcher.expect_publish().await;
    assert_eq!(
        (&*will.topic, &will.payload[..]),
        ("will/silent", &b"gone"[..])
    );
    watcher.acknowledge(&will).await;

    let _thief = Client::connect_v5(b.addr, "victim").await;
    victim.expect_disconnect(ReasonCode::SessionTakenOver).await;
    api(admin, "DELETE", "/api/v1/clients/kicked", "", 200).await;
    kicked
        .expect_disconnect(ReasonCode::AdministrativeAction)
        .await;

    // Shutdown reaches the parked ones too.
    all_parked(5.0).await;
    b.stop().await;
    sub.expect_disconnect(ReasonCode::ServerShuttingDown).await;
    idle.expect_closed(WAIT).await;
}

// =======================================================================================
// The admin API
// =======================================================================================

/// An HTTP stream's session is listed as any session, not connected (a stream is no
/// MQTT connection) and not closed by the API; the stream goes on. An MQTT client taking
/// the session over shows as connected, and the API can close it.
#[tokio::test]
async fn admin_api_lists_http_streams_as_sessions() {
    let b = TestBroker::with_http(with_admin).await;
    let admin = admin_addr(&b);
    let mut sse = Sse::connect(b.http_addr(), "/sse?topic=news&client_id=tab", &[]).await;
    sse.next_block(WAIT).await;

    let row = api(admin, "GET", "/api/v1/clients/tab", "", 200).await;
    assert_eq!(row["connected"], false);
    assert_eq!(row["address"], Value::Null);
    assert_eq!(row["subscription_count"], 1);
    let list = api(admin, "GET", "/api/v1/clients", "", 200).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["clients"][0]["client_id"], "tab");
    api(admin, "DELETE", "/api/v1/clients/tab", "", 404).await;

    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    publisher
        .publish(plain("news", b"still streaming", QoS::AtLeastOnce))
        .await;
    let event = sse.next_event().await.expect("the stream goes on");
    assert_eq!(event.json()["payload"], "still streaming");

    let mut mqtt = Client::connect_v5(b.addr, "tab").await;
    assert_eq!(sse.next_event().await.unwrap().event, "taken_over");
    let row = api(admin, "GET", "/api/v1/clients/tab", "", 200).await;
    assert_eq!(row["connected"], true);
    assert_eq!(row["protocol"], "5.0");
    api(admin, "DELETE", "/api/v1/clients/tab", "", 200).await;
    mqtt.expect_disconnect(ReasonCode::AdministrativeAction)
        .await;
}

/// Clients listed, looked up and disconnected (5.0: DISCONNECT 0x98); the console's
/// files are served without the token, the API not.
#[tokio::test]
async fn admin_api_lists_and_disconnects_clients() {
    let b = TestBroker::with(with_admin).await;
    let admin = admin_addr(&b);
    let (status, headers, page) = http(admin, "GET", "/", None, "").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/html") && page.contains("console.js"));
    assert_eq!(http(admin, "GET", "/api/v1/clients", None, "").await.0, 401);
    assert_eq!(
        api(admin, "GET", "/api/v1/nothing", "", 404).await["error"],
        "no such endpoint"
    );

    let mut victim = Client::connect_v5(b.addr, "victim").await;
    victim.subscribe("v/#", QoS::AtLeastOnce).await;
    let mut old = Client::connect_v311(b.addr, "old-timer").await;
    old.subscribe("o/+", QoS::AtMostOnce).await;
    let (away, _) = Client::connect_accepted(b.addr, connect_expiry("away", true, 3600)).await;
    away.disconnect().await;

    let list = api(admin, "GET", "/api/v1/clients", "", 200).await;
    assert_eq!(list["total"], 3);
    let ids: Vec<&str> = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["away", "old-timer", "victim"], "sorted by client id");
    let victim_row = &list["clients"][2];
    assert_eq!(victim_row["connected"], true);
    assert_eq!(victim_row["protocol"], "5.0");
    assert_eq!(victim_row["listener"], format!("mqtt://{}", b.addr));
    assert_eq!(victim_row["subscription_count"], 1);
    assert!(victim_row["address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(victim_row["connected_since"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(list["clients"][0]["connected"], false);
    assert_eq!(list["clients"][1]["protocol"], "3.1.1");

    let page = api(
        admin,
        "GET",
        "/api/v1/clients?search=i&offset=1&limit=1",
        "",
        200,
    )
    .await;
    assert_eq!(
        (
            page["total"].as_u64(),
            page["clients"][0]["client_id"].as_str()
        ),
        (Some(2), Some("victim"))
    );
    assert_eq!(
        api(admin, "GET", "/api/v1/clients?limit=x", "", 400).await["error"],
        "`limit` must be a non-negative integer (got \"x\")"
    );

    let one = api(admin, "GET", "/api/v1/clients/victim", "", 200).await;
    assert_eq!(one["subscriptions"][0]["filter"], "v/#");
    assert_eq!(one["subscriptions"][0]["qos"], 1);
    let subs = api(admin, "GET", "/api/v1/subscriptions?limit=10", "", 200).await;
    let pairs: Vec<(String, String)> = subs["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["client_id"].as_str().unwrap().into(),
                s["filter"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("old-timer".into(), "o/+".into()),
            ("victim".into(), "v/#".into())
        ]
    );

    // Disconnect: a 5.0 client is told why, a 3.1.1 one is closed.
    let gone = api(admin, "DELETE", "/api/v1/clients/victim", "", 200).await;
    assert_eq!(gone["disconnected"], "victim");
    victim
        .expect_disconnect(ReasonCode::AdministrativeAction)
        .await;
    api(admin, "DELETE", "/api/v1/clients/old-timer", "", 200).await;
    old.expect_closed(WAIT).await;
    api(admin, "DELETE", "/api/v1/clients/away", "", 404).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !b.broker().clients.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the clients' records go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Clean sessions ended with their connections; the persistent one stays.
    let list = api(admin, "GET", "/api/v1/clients", "", 200).await;
    assert_eq!(list["total"], 1);
    api(admin, "GET", "/api/v1/clients/victim", "", 404).await;
}

/// Retained messages listed page by page and deleted; publishing through the API.
#[tokio::test]
async fn admin_api_retained_messages_and_publish() {
    let b = TestBroker::with(with_admin).await;
    let admin = admin_addr(&b);
    let mut c = Client::connect_v5(b.addr, "retainer").await;
    for (t, v) in [
        ("r/a", &b"1"[..]),
        ("r/b", b"\xff\xfe"),
        ("r/c", b"3"),
        ("other", b"x"),
    ] {
        c.publish(retained(t, v, QoS::AtLeastOnce)).await;
    }
    let first = api(
        admin,
        "GET",
        "/api/v1/retained?filter=r/%23&limit=2",
        "",
        200,
    )
    .await;
    let topics = |v: &Value| -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["topic"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(topics(&first), ["r/a", "r/b"]);
    assert_eq!(first["next"], "r/b");
    assert_eq!(first["messages"][0]["payload"], "1");
    assert_eq!(first["messages"][1]["encoding"], "base64");
    assert_eq!(first["messages"][1]["payload"], "//4=");
    let second = api(
        admin,
        "GET",
        "/api/v1/retained?filter=r/%23&limit=2&after=r/b",
        "",
        200,
    )
    .await;
    assert_eq!(topics(&second), ["r/c"]);
    assert_eq!(second["next"], Value::Null);
    api(admin, "GET", "/api/v1/retained?filter=r/%23/x", "", 400).await;

    let deleted = api(admin, "DELETE", "/api/v1/retained?topic=r/a", "", 200).await;
    assert_eq!(deleted["deleted"], true);
    assert_eq!(
        api(admin, "DELETE", "/api/v1/retained?topic=r/a", "", 200).await["deleted"],
        false
    );
    api(admin, "DELETE", "/api/v1/retained?topic=r/%2B", "", 400).await;
    assert_eq!(
        topics(&api(admin, "GET", "/api/v1/retained", "", 200).await),
        ["other", "r/b", "r/c"]
    );

    c.subscribe("api/in", QoS::AtLeastOnce).await;
    let sent = api(
        admin,
        "POST",
        "/api/v1/publish",
        r#"{"topic":"api/in","payload":"from the API","qos":1}"#,
        200,
    )
    .await;
    assert_eq!(sent["receivers"], 1);
    let p = c.receive().await;
    assert_eq!(
        (&*p.topic, &p.payload[..]),
        ("api/in", &b"from the API"[..])
    );
    api(admin, "POST", "/api/v1/publish", r#"{"topic":"a/#"}"#, 400).await;
    api(
        admin,
        "POST",
        "/api/v1/publish",
        r#"{"topic":"a","qos":3}"#,
        400,
    )
    .await;
    api(admin, "GET", "/api/v1/publish", "", 405).await;

    let summary = api(admin, "GET", "/api/v1/summary", "", 200).await;
    assert_eq!(summary["retained"]["count"], 3);
    assert_eq!(summary["clients_connected"], 1);
    assert_eq!(
        summary["listeners"][0]["name"],
        format!("mqtt://{}", b.addr)
    );
    assert!(summary["messages"]["received"].as_u64().unwrap() >= 4);
}

// =======================================================================================
// Logs
// =======================================================================================

/// `log_format = "json"`: every line is one JSON object, and a connection's lines carry
/// its client id and peer.
#[test]
fn json_logs_carry_the_client_id_and_peer() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "log_format = \"json\"\nsys_interval = 0\n[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ternmq"))
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = || -> Value {
        let line = rx.recv_timeout(WAIT).expect("a log line in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: SocketAddr = loop {
        let v = next();
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let id = "json-logger";
    let mut connect = vec![
        0x10,
        12 + id.len() as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        2,
        0,
        60,
        0,
        id.len() as u8,
    ];
    connect.extend_from_slice(id.as_bytes());
    stream.write_all(&connect).unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    let line = loop {
        let v = next();
        if v["message"] == "connected" {
            break v;
        }
    };
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["span"]["client_id"], id, "{line}");
    let peer = stream.local_addr().unwrap().to_string();
    assert_eq!(line["span"]["peer"], peer, "{line}");
    assert_eq!(line["protocol"], 4, "{line}");
}

/// 500 garbage connections write one warning; a different malformation in the same
/// interval writes its own; the next line after the interval says how many were held back.
#[tokio::test(start_paused = true)]
async fn repeated_warnings_are_written_once_per_interval() {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = {
        let lines = lines.clone();
        move || Capture(lines.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let b = TestBroker::in_memory(|_| {});
    let send = async |b: &TestBroker, bytes: &[u8]| {
        let mut c = Client::open(b.target(), "garbage", Protocol::V311).await;
        c.send_raw(bytes).await;
        // Closed, after a CONNACK refusal for an unknown level.
        c.read_to_end().await;
    };
    // A CONNECT whose protocol name is cut short (malformed), and one of an unknown
    // protocol level (another reason code).
    let malformed: &[u8] = &[0x10, 0x03, 0xff, 0xff, 0xff];
    let level_9: &[u8] = &[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60, 0, 0];
    for _ in 0..500 {
        send(&b, malformed).await;
    }
    let bad_connect = |lines: &std::sync::Mutex<Vec<u8>>| -> Vec<String> {
        String::from_utf8(lines.lock().unwrap().clone())
            .unwrap()
            .lines()
            .filter(|l| l.contains("bad CONNECT"))
            .map(str::to_owned)
            .collect()
    };
    let logged = bad_connect(&lines);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert!(!logged[0].contains("repeated"), "{}", logged[0]);
    send(&b, level_9).await;
    send(&b, level_9).await;
    let logged = bad_connect(&lines);
    assert_eq!(
        logged.len(),
        2,
        "another reason has its own line: {logged:#?}"
    );
    assert_ne!(logged[0], logged[1]);
    tokio::time::sleep(ternmq::observe::ratelimit::REPEAT_INTERVAL).await;
    send(&b, malformed).await;
    let logged = bad_connect(&lines);
    assert_eq!(logged.len(), 3, "{logged:#?}");
    assert!(logged[2].contains("repeated=499"), "{}", logged[2]);
}

struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The counters of refusals and expiries in `/metrics` follow the events that cause them
/// (process-wide counters, shared with the other tests here: compared before and after).
#[tokio::test]
async fn metrics_count_refusals_and_expiries_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    let mut file = ternmq::security::password::PasswordFile::empty().unwrap();
    file.set("alice", b"secret", Default::default()).unwrap();
    file.save(&passwords).unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite m/#\ntopic subscribe m/#\n",
    )
    .unwrap();
    let b = TestBroker::with(|c| {
        with_admin(c);
        c.auth.password_file = Some(passwords.clone());
        c.auth.acl_file = Some(acl.clone());
    })
    .await;
    let admin = admin_addr(&b);
    let metrics = async || {
        let (status, _, text) = http(admin, "GET", "/metrics", Some(TOKEN), "").await;
        assert_eq!(status, 200, "{text}");
        parse_exposition(&text)
    };
    let before = metrics().await;
    let alice = |id: &str, expiry: u32| ternmq::protocol::Connect {
        username: Some("alice".into()),
        password: Some(bytes::Bytes::from_static(b"secret")),
        ..connect_expiry(id, true, expiry)
    };

    // A wrong password: CONNACK 0x86.
    let wrong = ternmq::protocol::Connect {
        password: Some(bytes::Bytes::from_static(b"guess")),
        ..alice("intruder", 0)
    };
    let (_c, ack) = Client::connect_with(b.addr, wrong).await;
    assert_eq!(ack.code, ReasonCode::BadUserNameOrPassword);
    // A SUBSCRIBE outside the subscribe rules: 0x87 for that filter.
    let (mut c, _) = Client::accepted(b.addr, alice("subscriber", 0)).await;
    let codes = c
        .subscribe_qos(&[("m/ok", QoS::AtMostOnce), ("other", QoS::AtMostOnce)])
        .await;
    assert_eq!(codes, [0x00, 0x87]);
    // A session with a 1 s expiry, left to expire.
    let (gone, _) = Client::accepted(b.addr, alice("short-lived", 1)).await;
    gone.disconnect_with(ReasonCode::Success, Default::default())
        .await;
    common::client::eventually("the session expired", WAIT, || {
        b.broker().session("short-lived").is_none()
    })
    .await;

    let after = metrics().await;
    let grew = |series: &str, by: f64| {
        let (was, is) = (before[series], after[series]);
        assert!(is - was >= by, "{series}: {was} -> {is}");
    };
    grew("ternmq_auth_failures_total", 1.0);
    grew("ternmq_subscribe_denied_total", 1.0);
    grew("ternmq_sessions_expired_total", 1.0);
    grew("ternmq_connects_total", 3.0);
}

/// The config keys of this feature, with errors that name the listener.
#[test]
fn admin_and_sys_config_keys() {
    let c = Config::parse("sys_interval = 0\nlog_format = \"json\"\n[[listeners]]\ntype = \"admin\"\nbind = \"127.0.0.1:9090\"\ntoken = \"0123456789abcdef\"\n").unwrap();
    assert_eq!((c.sys_interval, c.log_format), (0, LogFormat::Json));
    assert_eq!(c.listeners[0].kind, ListenerKind::Admin);
    assert_eq!(Config::default().sys_interval, 10);
    let admin = "[[listeners]]\ntype = \"admin\"\nbind = \"127.0.0.1:9090\"\n";
    for (extra, wanted) in [
        ("", "needs a `token`"),
        ("token = \"short\"\n", "at least 16 characters"),
        (
            "token = \"0123456789abcdef\"\nallow_anonymous = true\n",
            "`allow_anonymous` is not for type = \"admin\"",
        ),
    ] {
        let err = Config::parse(&format!("{admin}{extra}")).unwrap_err();
        assert!(
            err.contains(wanted) && err.contains("127.0.0.1:9090"),
            "{err}"
        );
    }
    let err = Config::parse(
        "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:1883\"\ntoken = \"0123456789abcdef\"\n",
    )
    .unwrap_err();
    assert!(
        err.contains("`token` is only for type = \"admin\""),
        "{err}"
    );
    let err = Config::parse("sys_interval = -1\n").unwrap_err();
    assert!(err.contains("sys_interval"), "{err}");
}

// =======================================================================================
// The web console in a real browser
// =======================================================================================

mod browser {
    use super::*;
    use common::browser::Browser;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const BROWSER_WAIT: Duration = Duration::from_secs(120);

    /// The console in headless Chromium: it loads, its charts move while messages flow,
    /// a connected client appears in the table and goes when the page disconnects it
    /// (the client is told 0x98), the topic browser shows a retained value, and the
    /// page's own MQTT client publishes and receives. Screenshots in
    /// target/console-test/.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_console_in_chromium() {
        let Some(browser) = Browser::prepare(
            "console test",
            "console-test",
            &["playwright-core/package.json"],
            &[],
        ) else {
            return;
        };

        let b = TestBroker::with_ws(with_admin).await;
        let admin = admin_addr(&b);
        let mut c = Client::connect_v5(b.addr, "console-retainer").await;
        c.publish(retained("console/retained", b"42", QoS::AtLeastOnce))
            .await;
        let mut victim = Client::connect_v5(b.addr, "console-victim").await;

        // Load while the page watches: a publisher and a subscriber on the side.
        let running = Arc::new(AtomicBool::new(true));
        let load = {
            let (running, addr) = (running.clone(), b.addr);
            tokio::spawn(async move {
                let mut sink = Client::connect_v5(addr, "console-load-sink").await;
                sink.subscribe("load/#", QoS::AtMostOnce).await;
                let mut source = Client::connect_v5(addr, "console-load-source").await;
                while running.load(Ordering::Relaxed) {
                    for _ in 0..20 {
                        source
                            .send(Packet::Publish(plain("load/x", b"tick", QoS::AtMostOnce)))
                            .await;
                    }
                    let _ = sink.drain_publishes().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };

        let mut node = browser.node("admin-console.js");
        node.arg(admin.port().to_string())
            .arg(TOKEN)
            .arg(&browser.out);
        browser.run(node, "run.log", BROWSER_WAIT).await;
        running.store(false, Ordering::Relaxed);
        let _ = load.await;
        let d = victim
            .expect_disconnect(ReasonCode::AdministrativeAction)
            .await;
        assert_eq!(d.reason, ReasonCode::AdministrativeAction);
        browser.assert_screenshots(&["console"]);
    }
}

/// Every reason a message is not delivered is counted under its name.
#[tokio::test(start_paused = true)]
async fn dropped_messages_are_counted_by_reason() {
    use common::client::{expiry_props, message};
    use ternmq::metrics::{snapshot, Dropped};
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite d/#\n").unwrap();
    let b = TestBroker::in_memory(|c| {
        c.session.max_queued_messages = 2;
        c.limits.message_size_limit = 100;
        c.auth.acl_file = Some(acl.clone());
    });
    let before = snapshot();
    for (id, filter) in [("full", "d/q"), ("late", "d/e")] {
        let (mut c, _) = Client::connect_accepted(b.target(), connect_expiry(id, true, 3600)).await;
        c.subscribe(filter, QoS::AtLeastOnce).await;
        c.disconnect().await;
    }
    let mut publisher = Client::connect_v5(b.target(), "dropper").await;
    for i in 0..5u8 {
        publisher
            .publish(plain("d/q", &[i], QoS::AtLeastOnce))
            .await;
    }
    publisher
        .publish(message(
            "d/e",
            b"soon stale",
            QoS::AtLeastOnce,
            expiry_props(1),
        ))
        .await;
    publisher
        .publish_expect(
            plain("d/big", &[0; 101], QoS::AtLeastOnce),
            ReasonCode::QuotaExceeded,
        )
        .await;
    publisher
        .publish_expect(
            plain("forbidden", b"x", QoS::AtLeastOnce),
            ReasonCode::NotAuthorized,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut late, present) =
        Client::connect_accepted(b.target(), connect_expiry("late", false, 3600)).await;
    assert!(present);
    assert!(
        late.drain_publishes().await.is_empty(),
        "the expired message is not sent"
    );

    let after = snapshot();
    let grew = |why| after.dropped(why) - before.dropped(why);
    assert!(
        grew(Dropped::QueueFull) >= 3,
        "queue_full +{}",
        grew(Dropped::QueueFull)
    );
    assert!(
        grew(Dropped::Expired) >= 1,
        "expired +{}",
        grew(Dropped::Expired)
    );
    assert!(
        grew(Dropped::TooLarge) >= 1,
        "too_large +{}",
        grew(Dropped::TooLarge)
    );
    assert!(
        grew(Dropped::NotAuthorized) >= 1,
        "not_authorized +{}",
        grew(Dropped::NotAuthorized)
    );
}
