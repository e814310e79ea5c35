//! A small HTTP/1.1 client over raw sockets, for the http listener's tests: whole
//! requests (`request`), and Server-Sent Event streams read event by event (`Sse`),
//! which a test can also stop reading.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(10);

/// A response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` code of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// A connection that has sent a request and read the response head.
pub struct Open {
    pub stream: TcpStream,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head.
    pub rest: Vec<u8>,
}

fn head_text(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends a request and reads the response head.
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Open {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    stream
        .write_all(&head_text(method, path, headers, body))
        .await
        .expect("send request");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no response head in time"))
            .expect("read");
        assert!(n > 0, "{method} {path}: closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Open {
        stream,
        status,
        headers,
        rest: buf[end + 4..].to_vec(),
    }
}

/// One whole request (`Connection: close`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut all: Vec<(&str, &str)> = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    let mut open = open(addr, method, path, &all, body).await;
    let mut raw = std::mem::take(&mut open.rest);
    tokio::time::timeout(WAIT, open.stream.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: body not complete in time"))
        .expect("read body");
    let chunked = open
        .headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(&raw).0 } else { raw };
    Reply {
        status: open.status,
        headers: open.headers,
        body,
    }
}

/// Decodes complete chunks; returns the data, how many input bytes they took and
/// whether the last chunk (the end of the body) was among them.
fn dechunk(raw: &[u8]) -> (Vec<u8>, usize, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
            return (out, at, false);
        };
        let size_text = String::from_utf8_lossy(&raw[at..at + eol]).into_owned();
        let size = usize::from_str_radix(size_text.trim(), 16).expect("chunk size");
        let start = at + eol + 2;
        if raw.len() < start + size + 2 {
            return (out, at, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        at = start + size + 2;
        if size == 0 {
            return (out, at, true);
        }
    }
}

/// One Server-Sent Event, as the browser would see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    /// A `retry:` field or a comment, with no event.
    pub retry: Option<u64>,
    pub comment: bool,
}

impl Event {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// An SSE stream being read.
pub struct Sse {
    pub open: Open,
    /// Undecoded transport bytes, and decoded text not yet split into events.
    raw: Vec<u8>,
    text: String,
    pub ended: bool,
}

impl Sse {
    /// `GET path` with `headers`; asserts 200 and `text/event-stream`.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let open = open(addr, "GET", path, headers, b"").await;
        let ct = open
            .headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone());
        assert_eq!(
            (open.status, ct.as_deref()),
            (200, Some("text/event-stream")),
            "GET {path}"
        );
        Sse {
            raw: open.rest.clone(),
            open,
            text: String::new(),
            ended: false,
        }
    }

    /// The next block (event, comment or retry), or None at the end of the stream.
    pub async fn next_block(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (data, used, last) = dechunk(&self.raw);
            self.raw.drain(..used);
            self.text.push_str(&String::from_utf8_lossy(&data));
            self.ended |= last;
            if let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                return Some(parse_block(&block));
            }
            if self.ended {
                return None;
            }
            let mut chunk = [0u8; 16384];
            let read = tokio::time::timeout_at(deadline, self.open.stream.read(&mut chunk)).await;
            match read {
                Err(_) => panic!("no SSE block within {wait:?}; have {:?}", self.text),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                }
                Ok(Ok(n)) => self.raw.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next event (comments and `retry:` skipped), or None at the end.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            let block = self.next_block(WAIT).await?;
            if !block.comment && block.retry.is_none() {
                return Some(block);
            }
        }
    }

    /// The next `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_event().await {
                Some(e) => out.push(e),
                None => panic!("stream ended after {} of {n} events: {out:?}", out.len()),
            }
        }
        out
    }
}

fn parse_block(block: &str) -> Event {
    let mut e = Event {
        id: None,
        event: "message".into(),
        data: String::new(),
        retry: None,
        comment: false,
    };
    let mut fields = false;
    for line in block.lines().filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            e.comment = true;
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "id" => e.id = Some(value.into()),
            "event" => e.event = value.into(),
            "data" => {
                fields = true;
                e.data.push_str(value)
            }
            "retry" => e.retry = value.parse().ok(),
            _ => {}
        }
    }
    if fields {
        e.comment = false;
    }
    e
}

/// `s` percent-encoded for a query string.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
