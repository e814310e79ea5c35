//! The `ternmq` binary as a separate process, for what an in-process broker cannot show:
//! its own memory (`/proc/PID/status`), its own descriptor limit, its log, a crash and a
//! signal. Killed (by PID) when dropped.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound of every wait: start-up, a log line, an exit.
const WAIT: Duration = Duration::from_secs(15);

/// A running `ternmq`; its stdout (the log) and stderr (configuration errors) collected
/// by threads.
pub struct BrokerProcess {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The first TCP listener's address, read from the log (`start*` only).
    pub addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

/// The binary, with the configured log level in plain text.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternmq"));
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

impl BrokerProcess {
    /// Starts the binary with `config` (broker.toml text; give listeners port 0) written
    /// to a file of a fresh temporary directory, and waits until it listens.
    pub fn start(config: &str) -> BrokerProcess {
        Self::start_with(config, |_| {})
    }

    /// `start`, with `open_files` as the process's open-file limit (`prlimit --nofile`).
    pub fn start_with_open_files(config: &str, open_files: u32) -> BrokerProcess {
        let limit = format!("--nofile={open_files}:{open_files}");
        Self::spawn(config, |bin, config| {
            let mut cmd = Command::new("prlimit");
            cmd.arg(limit)
                .arg("--")
                .arg(bin)
                .arg("--config")
                .arg(config);
            cmd
        })
    }

    /// `start`, letting `tweak` change the command (environment, say).
    pub fn start_with(config: &str, tweak: impl FnOnce(&mut Command)) -> BrokerProcess {
        Self::spawn(config, |bin, config| {
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(config);
            tweak(&mut cmd);
            cmd
        })
    }

    /// Runs the binary with `config` until it exits by itself (a config it refuses):
    /// its exit status and log.
    pub fn run_to_exit(config: &str) -> (ExitStatus, String) {
        let mut broker = Self::launch(config, |bin, config| {
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(config);
            cmd
        });
        let status = broker.wait();
        (status, broker.log())
    }

    fn spawn(config: &str, command: impl FnOnce(&Path, &Path) -> Command) -> BrokerProcess {
        let mut broker = Self::launch(config, command);
        // Logged once every listener is bound.
        broker.wait_for_log("ternmq started", |log| {
            log.contains("ternmq started").then_some(())
        });
        broker.addr = *broker
            .addrs(ternmq::config::ListenerKind::Tcp)
            .first()
            .unwrap_or_else(|| panic!("no tcp listener in the log:\n{}", broker.log()));
        broker
    }

    fn launch(config: &str, command: impl FnOnce(&Path, &Path) -> Command) -> BrokerProcess {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, config).expect("write the config file");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_ternmq"));
        let mut cmd = command(&bin, &path);
        cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
        let mut broker = Self::spawn_command(cmd);
        broker._dir = Some(dir);
        broker
    }

    /// Runs `cmd` (see `command`) as it is: no config file is written, and nothing is
    /// awaited.
    pub fn spawn_command(mut cmd: Command) -> BrokerProcess {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run the ternmq binary");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        BrokerProcess {
            child,
            stdout,
            stderr,
            readers,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            _dir: None,
        }
    }

    /// The addresses of the listeners of `kind`, read from the log.
    pub fn addrs(&self, kind: ternmq::config::ListenerKind) -> Vec<SocketAddr> {
        let kind = format!("kind={kind:?}");
        self.log()
            .lines()
            .filter(|l| l.contains("listening") && l.contains(&kind))
            .filter_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything printed so far: the log, then any configuration error.
    pub fn log(&self) -> String {
        self.stdout() + &self.stderr()
    }

    /// Waits (bounded) until `find` finds something in the complete lines of stdout or
    /// stderr (a line still being written could be read half); fails if the process
    /// exits first.
    pub fn wait_for_log<T>(&mut self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let (out, err) = (self.stdout(), self.stderr());
            if let Some(found) = find(complete_lines(&out)).or_else(|| find(complete_lines(&err))) {
                return found;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "ternmq exited ({status}) before logging {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in the log after {WAIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A field of `/proc/PID/status` in KiB: `VmRSS` (resident now), `VmHWM` (the most
    /// it has been resident).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| {
                let value = l.strip_prefix(field)?.strip_prefix(':')?;
                value.trim().strip_suffix("kB")?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Open file descriptors of the process.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Waits (bounded) for the process to end, then for the rest of its output.
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_within(WAIT)
    }

    /// Waits up to `within` for the process to end, then for the rest of its output.
    pub fn wait_within(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ternmq still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Sends `signal` (e.g. "TERM") with kill(1), to this process only.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// SIGKILL: a crash.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.wait();
    }

    /// SIGTERM: a clean shutdown, which must succeed.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait();
        assert!(
            status.success(),
            "exit after SIGTERM: {status}\n{}",
            self.log()
        );
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

/// `text` up to its last newline.
fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |end| end + 1)]
}
