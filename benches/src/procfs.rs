//! What `/proc` says about a process: CPU time used, resident memory and the cores it may run
//! on (Linux only; on other systems every reading is `None`).

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on every Linux build).
pub const TICKS_PER_SEC: f64 = 100.0;

/// CPU time a process has used, in clock ticks: in user space and in the kernel (system
/// calls, and on loopback the receiving sockets' work the kernel does for its sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ticks {
    /// `utime`.
    pub user: u64,
    /// `stime`.
    pub system: u64,
}

impl Ticks {
    /// User and system together.
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// The ticks used from `earlier` to `self` (none where a reading went backwards).
    pub fn since(self, earlier: Ticks) -> Ticks {
        Ticks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::ops::AddAssign for Ticks {
    fn add_assign(&mut self, other: Ticks) {
        self.user += other.user;
        self.system += other.system;
    }
}

/// User + system CPU time of `pid` (or of this process) in clock ticks.
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    cpu_ticks_split(pid).map(Ticks::total)
}

/// User and system CPU time of `pid` (or of this process), apart.
pub fn cpu_ticks_split(pid: Option<u32>) -> Option<Ticks> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// `utime` and `stime` from the text of a `/proc/PID/stat` file.
pub fn parse_stat(stat: &str) -> Option<Ticks> {
    // The command name (field 2) may hold spaces; fields are counted after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Some(Ticks {
        user: fields.get(11)?.parse().ok()?,
        system: fields.get(12)?.parse().ok()?,
    })
}

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS` in KiB from the text of a `/proc/PID/status` file.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The cores this process may run on (`Cpus_allowed_list`, e.g. `1` or `0-3`): what
/// `cargo xtask bench` checks its pinning against.
pub fn allowed_cpus() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// Cores' worth of CPU used between two readings `secs` apart (1.0 = one core busy).
pub fn cores(before: Option<u64>, after: Option<u64>, secs: f64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (secs > 0.0).then(|| a.saturating_sub(b) as f64 / TICKS_PER_SEC / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(
            parse_stat(stat),
            Some(Ticks {
                user: 250,
                system: 75
            })
        );
    }

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\tx\nVmPeak:\t 9000 kB\nVmRSS:\t    5120 kB\nThreads:\t2\n";
        assert_eq!(parse_vm_rss(status), Some(5120));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_readings_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(cpu_ticks(None).is_some());
            assert!(rss_kib(std::process::id()).unwrap() > 0);
            assert!(allowed_cpus().is_some_and(|c| !c.is_empty()));
        }
        assert_eq!(cores(Some(100), Some(300), 2.0), Some(1.0));
        assert_eq!(cores(None, Some(300), 2.0), None);
    }
}
