//! The `ternmq` binary as a user runs it: flags, configuration errors (exit code 2 with
//! the file, line and key named), serving the sample `broker.toml`, a clean exit (0)
//! on SIGTERM and SIGINT, plain-text logs when not on a terminal, and `ternmq passwd`.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

mod common;

use common::binary::{command as ternmq, BrokerProcess as Broker};
use common::client::WAIT;

/// The broker gives its connections 3 s to close after a signal; it should need far less.
const EXIT_AFTER_SIGNAL: Duration = Duration::from_secs(5);

/// Runs the binary with `args`, waits (bounded) for it to exit, and returns its exit
/// status, stdout and stderr.
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = ternmq();
    cmd.args(args);
    let mut broker = Broker::spawn_command(cmd);
    let status = broker.wait();
    (status, broker.stdout(), broker.stderr())
}

/// Writes `text` to a config file in a fresh temporary directory.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, text).expect("write the config file");
    (dir, path)
}

/// Runs with `--config` set to a file holding `text`, which must be refused with exit
/// code 2 and a message naming the file, `line` and `key`.
fn assert_config_refused(text: &str, line: usize, key: &str) {
    let (_dir, path) = config_file(text);
    let path = path.to_str().expect("utf-8 path");
    // --bind keeps a wrongly accepted config off port 1883 (`run` bounds the wait).
    let (status, _, stderr) = run(&["--config", path, "--bind", "127.0.0.1:0"]);
    assert_eq!(
        status.code(),
        Some(2),
        "exit code for {text:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains(path), "the file is named:\n{stderr}");
    assert!(
        stderr.contains(&format!("line {line}")),
        "line {line} is named:\n{stderr}"
    );
    assert!(stderr.contains(key), "`{key}` is named:\n{stderr}");
}

#[test]
fn help_describes_the_flags() {
    let (status, stdout, _) = run(&["--help"]);
    assert!(status.success(), "--help exits 0: {status}\n{stdout}");
    for flag in ["--config", "--bind", "--log-level"] {
        assert!(stdout.contains(flag), "--help mentions {flag}:\n{stdout}");
    }
}

#[test]
fn version_prints_the_crate_version() {
    let (status, stdout, _) = run(&["--version"]);
    assert!(status.success(), "--version exits 0: {status}");
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "version in:\n{stdout}"
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (status, _, stderr) = run(&["--no-such-flag"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn bad_log_level_flag_is_a_usage_error() {
    let (status, _, stderr) = run(&["--log-level", "loud"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("loud"), "{stderr}");
}

#[test]
fn unknown_config_key_names_file_line_and_key() {
    assert_config_refused(
        "log_level = \"info\"\n\n[mqtt]\nconect_timeout = 5\n",
        4,
        "conect_timeout",
    );
}

#[test]
fn zero_max_inflight_messages_is_refused() {
    assert_config_refused(
        "[session]\nmax_queued_messages = 10\nmax_inflight_messages = 0\n",
        3,
        "max_inflight_messages",
    );
}

#[test]
fn bad_bind_address_is_refused() {
    assert_config_refused(
        "[[listeners]]\ntype = \"tcp\"\nbind = \"nope\"\n",
        3,
        "bind",
    );
}

#[test]
fn bad_log_level_is_refused() {
    assert_config_refused("log_level = \"loud\"\n", 1, "log_level");
}

#[test]
fn value_of_the_wrong_type_is_refused() {
    assert_config_refused(
        "[session]\nmax_queued_messages = \"many\"\n",
        2,
        "max_queued_messages",
    );
}

#[test]
fn config_without_listeners_is_refused() {
    let (_dir, path) = config_file("listeners = []\n");
    let path = path.to_str().expect("utf-8 path");
    let (status, _, stderr) = run(&["--config", path]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(path) && stderr.contains("listeners"),
        "the file and the key are named:\n{stderr}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("does-not-exist.toml");
    let path = path.to_str().expect("utf-8 path");
    let (status, _, stderr) = run(&["--config", path]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(path), "the path is named:\n{stderr}");
}

/// The repository's sample configuration, with every listener's `bind` moved to
/// 127.0.0.1 on an OS-chosen port: its fixed ports (1883, and any other listener's) may
/// be taken on the machine, or by the other test of this file running at the same time.
/// Everything else is the sample's.
fn sample_config_on_free_ports() -> (tempfile::TempDir, PathBuf) {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.toml");
    let text = std::fs::read_to_string(&sample).expect("read broker.toml");
    let mut moved = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            if key == "bind" {
                moved += 1;
                "bind = \"127.0.0.1:0\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(moved > 0, "broker.toml has a listener `bind`");
    config_file(&(lines.join("\n") + "\n"))
}

/// Starts the binary with the sample config and `--bind 127.0.0.1:0` (a free port, which
/// never collides), and returns it with the TCP listener's address, read from the log.
///
/// It runs in the temporary directory, as the README's run command runs in a fresh
/// checkout: the sample's relative data directory is made there.
fn start_sample() -> (Broker, SocketAddr, tempfile::TempDir) {
    let (dir, config) = sample_config_on_free_ports();
    let mut cmd = ternmq();
    cmd.arg("--config")
        .arg(config)
        .args(["--bind", "127.0.0.1:0"])
        .current_dir(dir.path());
    let mut broker = Broker::spawn_command(cmd);
    let addr = broker.wait_for_log("the TCP listening address", |log| {
        log.lines()
            .filter(|l| l.contains("listening") && l.contains("kind=Tcp"))
            .find_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    });
    (broker, addr, dir)
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) for `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Connects as `client_id` and checks the CONNACK; returns the open connection.
fn mqtt_connect(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)
        .unwrap_or_else(|e| panic!("cannot connect to ternmq at {addr}: {e}"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(&connect_packet(client_id))
        .expect("send CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("read CONNACK");
    assert_eq!(
        connack,
        [0x20, 2, 0, 0],
        "CONNACK: accepted, no session present"
    );
    stream
}

/// Serves an MQTT client, logs its client id, then exits 0 on `signal` while the client
/// is still connected (and closes that connection).
fn serves_and_exits_cleanly_on(signal: &str) {
    let (mut broker, addr, config) = start_sample();
    let client_id = format!("cli-probe-{}", signal.to_lowercase());
    let mut client = mqtt_connect(addr, &client_id);
    broker.wait_for_log("the client id of the connection", |log| {
        log.lines()
            .find(|l| l.contains("connected") && l.contains(&format!("client_id=\"{client_id}\"")))
            .map(str::to_owned)
    });

    assert!(
        config.path().join("data").is_dir(),
        "the sample's data directory is made where the broker runs"
    );
    broker.signal(signal);
    let status = broker.wait_within(EXIT_AFTER_SIGNAL);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{signal}:\n{}",
        broker.log()
    );
    assert!(
        config.path().join("data").join("clean-shutdown").exists(),
        "the store was closed before the exit"
    );
    let mut rest = Vec::new();
    let closed = client.read_to_end(&mut rest);
    assert!(
        closed.is_ok(),
        "the broker closed the client's connection: {closed:?}"
    );
}

#[test]
fn sample_config_serves_mqtt_and_exits_cleanly_on_sigterm() {
    serves_and_exits_cleanly_on("TERM");
}

#[test]
fn sample_config_serves_mqtt_and_exits_cleanly_on_sigint() {
    serves_and_exits_cleanly_on("INT");
}

// ---- ternmq passwd ----

/// Runs `ternmq passwd <args>` with `stdin` piped in; returns its status and stderr.
fn passwd(args: &[&str], stdin: &str) -> (ExitStatus, String) {
    let mut cmd = ternmq();
    cmd.arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ternmq passwd");
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes());
    // A command refused for its arguments may exit before it reads its input.
    if let Err(e) = written {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "write the password: {e}"
        );
    }
    // stdin is closed here: the command sees the end of its input.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx
        .recv_timeout(WAIT)
        .expect("ternmq passwd exits in time")
        .expect("wait for ternmq passwd");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn load_passwords(path: &Path) -> ternmq::security::password::PasswordFile {
    ternmq::security::password::PasswordFile::load(path).expect("the broker reads the file")
}

#[test]
fn passwd_creates_adds_updates_and_deletes_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("passwd");
    let file = path.to_str().expect("utf-8 path");

    let (status, stderr) = passwd(&["-c", file, "alice"], "first secret\n");
    assert!(status.success(), "{stderr}");
    let mode = std::fs::metadata(&path)
        .expect("file created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a new password file is private");
    let (status, stderr) = passwd(&["--scram", file, "bob"], "bobs secret\r\n");
    assert!(status.success(), "{stderr}");

    let text = std::fs::read_to_string(&path).expect("read the file");
    assert!(text.starts_with("alice:$argon2id$v=19$"), "{text}");
    assert!(text.contains("\nbob:SCRAM-SHA-256$4096:"), "{text}");
    assert!(!text.contains("secret"), "no password in clear:\n{text}");
    let loaded = load_passwords(&path);
    assert!(loaded.verify("alice", b"first secret"));
    assert!(loaded.verify("bob", b"bobs secret"));
    assert!(!loaded.verify("alice", b"bobs secret"));

    let (status, stderr) = passwd(&[file, "alice"], "second secret\n");
    assert!(status.success(), "{stderr}");
    let (status, stderr) = passwd(&["-D", file, "bob"], "");
    assert!(status.success(), "{stderr}");
    let loaded = load_passwords(&path);
    assert!(loaded.verify("alice", b"second secret"));
    assert!(!loaded.verify("alice", b"first secret"));
    assert!(!loaded.contains("bob"));
    assert_eq!(loaded.len(), 1);
}

#[test]
fn passwd_refusals_exit_non_zero_and_leave_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("passwd");
    let file = path.to_str().expect("utf-8 path");

    let (status, stderr) = passwd(&[file, "alice"], "pw\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not exist (-c creates it)"),
        "{stderr}"
    );
    assert!(!path.exists());

    let (status, stderr) = passwd(&["-c", file, "alice"], "pw\n");
    assert!(status.success(), "{stderr}");
    let before = std::fs::read(&path).expect("read the file");
    for (args, input, message) in [
        (vec![file, "alice"], "\n", "empty password"),
        (vec![file, "al:ice"], "pw\n", "invalid username"),
        (vec!["-D", file, "nobody"], "", "user `nobody` is not in"),
    ] {
        let (status, stderr) = passwd(&args, input);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // Conflicting flags are a usage error (exit 2), as for the broker's flags.
    let (status, stderr) = passwd(&["-c", "-D", file, "alice"], "");
    assert_eq!(status.code(), Some(2), "{stderr}");
    // `--config` belongs to the broker, not to `passwd`.
    let (status, _, stderr) = run(&["--config", "x.toml", "passwd", file, "alice"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("read the file"), before);
}

/// A mosquitto password file is used unchanged: ternmq passwd adds to it and keeps every
/// other line byte for byte, and the broker verifies both kinds. Skipped without
/// mosquitto_passwd, except under CI=true (tests/run.sh installs it).
#[test]
fn passwd_extends_a_mosquitto_password_file() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if Command::new("mosquitto_passwd").arg("-h").output().is_err() {
        assert!(
            !in_ci,
            "CI=true and mosquitto_passwd not found (apt-get install mosquitto)"
        );
        eprintln!("note: skipping: mosquitto_passwd not found");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("passwd");
    let file = path.to_str().expect("utf-8 path");
    for args in [
        vec!["-c", "-b", file, "m2", "mosquitto two"],
        vec!["-H", "sha512", "-b", file, "m1", "mosquitto one"],
    ] {
        let out = Command::new("mosquitto_passwd")
            .args(&args)
            .output()
            .expect("run mosquitto_passwd");
        assert!(out.status.success(), "mosquitto_passwd {args:?}: {out:?}");
    }
    let mosquitto_text = std::fs::read_to_string(&path).expect("read the file");
    let (status, stderr) = passwd(&[file, "t"], "ternmq three\n");
    assert!(status.success(), "{stderr}");
    let text = std::fs::read_to_string(&path).expect("read the file");
    assert!(
        text.starts_with(&mosquitto_text),
        "mosquitto lines kept:\n{text}"
    );
    let loaded = load_passwords(&path);
    assert!(loaded.verify("m2", b"mosquitto two"));
    assert!(loaded.verify("m1", b"mosquitto one"));
    assert!(loaded.verify("t", b"ternmq three"));
    assert!(!loaded.verify("m1", b"mosquitto two"));
}

/// Logs written to a pipe (or a file) are plain text: colour codes only on a terminal,
/// without being asked (no NO_COLOR here).
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternmq"));
    cmd.env_remove("RUST_LOG").env_remove("NO_COLOR").args([
        "--bind",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ]);
    let mut broker = Broker::spawn_command(cmd);
    broker.wait_for_log("the listening line", |log| {
        log.contains("listening").then_some(())
    });
    let raw = broker.stdout();
    assert!(
        !raw.contains('\u{1b}'),
        "escape sequences in the piped log: {raw:?}"
    );
}

/// An admin listener on a public address without TLS starts, with a warning that its
/// token would cross the network in the clear.
#[test]
fn an_admin_listener_open_to_the_network_without_tls_is_warned_about() {
    let (_dir, path) = config_file(
        "[[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\ntype = \"admin\"\nbind = \"0.0.0.0:0\"\ntoken = \"0123456789abcdef0123\"\n",
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternmq"));
    cmd.env_remove("RUST_LOG")
        .args(["--config", path.to_str().unwrap_or_default()]);
    let mut broker = Broker::spawn_command(cmd);
    let line = broker.wait_for_log("the admin warning", |log| {
        log.lines()
            .find(|l| l.contains("admin listener is reachable from the network without TLS"))
            .map(str::to_owned)
    });
    assert!(line.contains("WARN"), "{line}");
}
