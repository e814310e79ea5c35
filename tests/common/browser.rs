//! Pages in headless Chromium, driven by the Node scripts of tests/browser (playwright-core,
//! see /work/shared/browser-testing.md): what the browser tests share — the tools they
//! need, a run of a script bounded in time, its log, its screenshots.

use super::mosquitto::{in_ci, on_path};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A browser test ready to run: its tools are there.
pub struct Browser {
    /// tests/browser: the scripts and their node_modules.
    dir: PathBuf,
    /// Where the scripts write screenshots and the run's log (under target/).
    pub out: PathBuf,
    /// Names the test in its messages.
    test: &'static str,
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

impl Browser {
    /// Checks for node, Chromium, the npm `modules` (paths under node_modules) and the
    /// `commands` (with their Debian packages). With something missing the test is
    /// skipped with a note (None), except under CI=true, where it fails. Screenshots and
    /// the log go to target/`out`.
    pub fn prepare(
        test: &'static str,
        out: &str,
        modules: &[&str],
        commands: &[(&str, &str)],
    ) -> Option<Browser> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        let mut missing: Vec<String> = [("node", "nodejs")]
            .iter()
            .chain(commands)
            .filter(|(c, _)| !on_path(c))
            .map(|(c, p)| format!("{c} (apt-get install {p})"))
            .collect();
        if !chromium().is_file() {
            missing.push(format!(
                "{} (apt-get install chromium)",
                chromium().display()
            ));
        }
        for module in modules {
            if !dir.join("node_modules").join(module).is_file() {
                missing.push(format!(
                    "node_modules/{module} (cd tests/browser && npm ci)"
                ));
            }
        }
        if !missing.is_empty() {
            let what = format!("missing for the {test}: {}", missing.join(", "));
            assert!(!in_ci(), "CI=true and {what}");
            eprintln!("note: skipping the {test}: {what}");
            return None;
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("..").join(out);
        std::fs::create_dir_all(&out).unwrap();
        let out = out.canonicalize().unwrap();
        Some(Browser { dir, out, test })
    }

    /// `node script` in tests/browser, with CHROMIUM set: add its arguments.
    pub fn node(&self, script: &str) -> Command {
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .env("CHROMIUM", chromium())
            .current_dir(&self.dir);
        cmd
    }

    /// Runs `cmd` with its output in out/`log`, for at most `wait` (the scripts have
    /// their own, shorter watchdogs), prints the log, and asserts that it succeeded.
    pub async fn run(&self, mut cmd: Command, log: &str, wait: Duration) {
        let log_path = self.out.join(log);
        let file = std::fs::File::create(&log_path).unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("run node");
        let deadline = Instant::now() + wait;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                // Only our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        let test = self.test;
        match status {
            Some(s) => assert!(
                s.success(),
                "{test} failed ({s}); log in {}",
                log_path.display()
            ),
            None => panic!("{test} still running after {wait:?}; killed"),
        }
    }

    /// Asserts that the run saved out/`name`.png for each name.
    pub fn assert_screenshots(&self, names: &[&str]) {
        for name in names {
            let shot = self.out.join(format!("{name}.png"));
            assert!(shot.is_file(), "no screenshot {}", shot.display());
        }
    }
}
