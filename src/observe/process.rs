//! The broker process's own figures, read from /proc (Linux; elsewhere they are absent).

/// What the process uses now.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Resident memory (VmRSS), bytes.
    pub rss: u64,
    /// The highest resident memory so far (VmHWM), bytes.
    pub peak_rss: u64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors, and the soft limit on them.
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// The process's usage, or None where /proc cannot tell.
pub fn usage() -> Option<Usage> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    Some(Usage {
        rss: kib("VmRSS:")?,
        peak_rss: kib("VmHWM:").unwrap_or(0),
        cpu_seconds: cpu_seconds(&stat, ticks_per_second())?,
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        max_fds: max_open_files(&limits),
    })
}

#[cfg(target_os = "linux")]
fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

#[cfg(not(target_os = "linux"))]
fn ticks_per_second() -> u64 {
    100
}

/// utime + stime (fields 14 and 15 of /proc/self/stat, counted after the command name,
/// which is in parentheses and may hold spaces), in seconds.
fn cpu_seconds(stat: &str, ticks: u64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks.max(1) as f64)
}

/// The soft limit of "Max open files" in /proc/self/limits.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds(stat, 100), Some(3.0));
        let limits = "Limit Soft Limit Hard Limit Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_memory_and_descriptors() {
        let u = usage().expect("/proc is readable");
        assert!(
            u.rss > 0 && u.peak_rss >= u.rss / 2 && u.open_fds > 0,
            "{u:?}"
        );
    }
}
