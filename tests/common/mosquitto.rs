//! Debian's `mosquitto_pub` and `mosquitto_sub` as test peers: child processes with
//! their output collected, every wait bounded, killed (by PID) when dropped.
//!
//! Without the clients a test is skipped with a note, except under `CI=true`, where it
//! fails: `tests/run.sh` installs them.

use super::TestBroker;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long any single wait of these tests may take.
pub const WAIT: Duration = Duration::from_secs(15);
/// `mosquitto_sub -W`: a subscriber gives up by itself after this many seconds.
pub const SUB_TIMEOUT_SECS: &str = "10";
pub const POLL: Duration = Duration::from_millis(10);

/// Whether the clients are installed; skips (outside CI) or fails (under CI) otherwise.
pub fn clients_available() -> bool {
    let missing: Vec<&str> = ["mosquitto_pub", "mosquitto_sub", "stdbuf"]
        .into_iter()
        .filter(|c| !on_path(c))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let what = format!(
        "{} not found on PATH (apt-get install mosquitto-clients coreutils, or run tests/run.sh)",
        missing.join(", ")
    );
    if in_ci() {
        panic!("CI=true and {what}: the mosquitto interop tests cannot run");
    }
    eprintln!("note: skipping mosquitto interop test: {what}");
    false
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

pub fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// A child process with its output collected by reader threads; killed when dropped.
pub struct Proc {
    command: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, stdin: Option<Vec<u8>>) -> Proc {
        let command = format!("{cmd:?}");
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            // Closing the pipe afterwards (by dropping it) ends the client's input.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut err = child.stderr.take().expect("piped stderr");
        let lines = stdout.clone();
        let text = stderr.clone();
        let readers = vec![
            std::thread::spawn(move || {
                let mut line = Vec::new();
                while matches!(out.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    let s = String::from_utf8_lossy(&line).into_owned();
                    lines.lock().unwrap().push(s);
                    line.clear();
                }
            }),
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = err.read_to_end(&mut buf);
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf));
            }),
        ];
        Proc {
            command,
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The command and what it printed so far, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{}\n  stdout: {:?}\n  stderr: {:?}",
            self.command,
            self.lines(),
            self.stderr.lock().unwrap()
        )
    }

    /// What the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (bounded) for the process to exit, then for all of its output.
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {WAIT:?}: {}",
                self.describe()
            );
            tokio::time::sleep(POLL).await;
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Waits for a successful exit and returns the lines printed on stdout.
    pub async fn output(mut self) -> Vec<String> {
        let status = self.wait().await;
        assert!(status.success(), "failed ({status}): {}", self.describe());
        self.lines()
    }

    /// SIGKILL: the client gets no chance to send DISCONNECT.
    pub async fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `mosquitto_sub` (line-buffered, so that each message is seen as it arrives),
/// connected to `broker`, with a `-W` bound; `args` add to or override it.
pub fn mosquitto_sub(broker: &TestBroker, args: &[&str]) -> Proc {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
        .arg(broker.port().to_string())
        .args(["-W", SUB_TIMEOUT_SECS])
        .args(args);
    Proc::spawn(cmd, None)
}

pub fn mosquitto_pub_with_input(
    broker: &TestBroker,
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> Proc {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(broker.port().to_string())
        .args(args);
    Proc::spawn(cmd, stdin)
}

/// Runs `mosquitto_pub` to completion. At QoS 1 and 2 it exits only once the broker has
/// acknowledged (and so routed) the message, which orders consecutive publishers.
pub async fn publish(broker: &TestBroker, args: &[&str]) {
    mosquitto_pub_with_input(broker, args, None).output().await;
}

/// `mosquitto_pub -l`: one message per line of `lines`, in order, on one connection.
pub async fn publish_lines(broker: &TestBroker, args: &[&str], lines: &[&str]) {
    let mut input = lines.join("\n");
    input.push('\n');
    let mut all = vec!["-l"];
    all.extend_from_slice(args);
    mosquitto_pub_with_input(broker, &all, Some(input.into_bytes()))
        .output()
        .await;
}

/// Waits (bounded) until `ready` holds; fails early if one of `watched` exits meanwhile.
pub async fn wait_until(what: &str, mut ready: impl FnMut() -> bool, watched: &mut [&mut Proc]) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        for p in watched.iter_mut() {
            if let Some(status) = p.exited() {
                panic!(
                    "waiting for {what}: a client exited ({status}): {}",
                    p.describe()
                );
            }
        }
        if Instant::now() >= deadline {
            let clients: Vec<String> = watched.iter().map(|p| p.describe()).collect();
            panic!("timed out waiting for {what}; clients: {clients:#?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the broker holds `count` subscriptions in all: the last subscriber's
/// subscription is in place, so it receives whatever is published from now on.
pub async fn wait_subscriptions(broker: &TestBroker, count: usize, subscriber: &mut Proc) {
    let router = &broker.broker().router;
    wait_until(
        &format!("{count} subscription(s)"),
        || router.subscription_count() >= count,
        &mut [subscriber],
    )
    .await;
}

/// Waits until the broker serves no connection. Its task tracker holds one accept loop
/// per listener and one task per connection, which ends only after the connection's will
/// and session bookkeeping are done.
pub async fn wait_no_connections(broker: &TestBroker) {
    let b = broker.broker();
    // Counted until a connection's task (or the parking lot) drops it, after its close.
    wait_until(
        "every connection to close",
        || b.connection_count() == 0,
        &mut [],
    )
    .await;
}

/// Where Debian's broker is: `mosquitto` on PATH, or /usr/sbin (not on a user's PATH).
pub fn mosquitto_broker_command() -> Option<std::path::PathBuf> {
    if on_path("mosquitto") {
        return Some("mosquitto".into());
    }
    let sbin = std::path::Path::new("/usr/sbin/mosquitto");
    sbin.is_file().then(|| sbin.to_path_buf())
}

/// Whether Debian's `mosquitto` broker is installed; skips (outside CI) or fails (under CI).
pub fn mosquitto_broker_available() -> bool {
    if mosquitto_broker_command().is_some() {
        return true;
    }
    let what = "mosquitto (the broker) not found (apt-get install mosquitto, or run tests/run.sh)";
    if in_ci() {
        panic!("CI=true and {what}");
    }
    eprintln!("note: skipping the comparison with mosquitto: {what}");
    false
}

/// A real mosquitto broker on 127.0.0.1 and a free port, with `config` (mosquitto.conf
/// lines: password_file, acl_file, allow_anonymous...) after its `listener` line; for
/// asserting that ternmq decides as mosquitto does. Killed when dropped.
pub struct MosquittoBroker {
    pub addr: std::net::SocketAddr,
    pub process: Proc,
    _dir: tempfile::TempDir,
}

impl MosquittoBroker {
    pub async fn start(config: &str) -> MosquittoBroker {
        let command = mosquitto_broker_command().expect("mosquitto is installed");
        let dir = tempfile::tempdir().expect("temporary directory");
        // A port the OS has just given out and taken back: free unless something races
        // for it in the next milliseconds.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = dir.path().join("mosquitto.conf");
        // Started as root, mosquitto would switch to its own user, which cannot read the
        // test's files: `user root` keeps it as it is.
        let as_root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        });
        let user = if as_root { "user root\n" } else { "" };
        let text = format!(
            "{user}listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\nlog_type all\n{config}\n"
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut cmd = Command::new(command);
        cmd.arg("-c").arg(&conf);
        let mut process = Proc::spawn(cmd, None);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = process.exited() {
                panic!("mosquitto exited ({status}): {}", process.describe());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto does not listen: {}",
                process.describe()
            );
            tokio::time::sleep(POLL).await;
        }
        MosquittoBroker {
            addr,
            process,
            _dir: dir,
        }
    }
}
