//! What /proc tells about a process (the broker under test, or ourselves), and raising
//! the open-file limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Memory in KiB, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    /// Resident now.
    pub rss_kb: u64,
    /// Highest resident since the process started.
    pub hwm_kb: u64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&text)
}

fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// User plus system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&text)?;
    Some(ticks as f64 / clock_ticks())
}

pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses: fields are counted from
/// the last ')'.
fn parse_stat_ticks(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[allow(unsafe_code)] // libc's sysconf has no safe wrapper here
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
#[allow(unsafe_code)] // libc's getrlimit/setrlimit have no safe wrapper here
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Samples a process's resident memory in the background and keeps the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kb: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kb.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(m) = memory(pid) {
                    p.fetch_max(m.rss_kb, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        RssSampler {
            stop,
            peak_kb,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the peak seen (KiB).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kb.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_rss_and_peak() {
        let text =
            "Name:\tmosquitto\nVmPeak:\t  20000 kB\nVmHWM:\t    9120 kB\nVmRSS:\t    8004 kB\n";
        assert_eq!(
            parse_status(text),
            Some(Memory {
                rss_kb: 8004,
                hwm_kb: 9120
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_this_process() {
        let m = memory(std::process::id()).expect("own status");
        assert!(m.rss_kb > 0 && m.hwm_kb >= m.rss_kb);
        assert!(own_cpu_seconds() >= 0.0);
        let sampler = RssSampler::start(std::process::id(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(sampler.finish() > 0);
        assert!(raise_nofile_limit() > 0);
    }
}
