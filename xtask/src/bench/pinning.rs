//! Pinning the servers and the load client to different cores, so that neither takes the
//! other's core and a run's ratios depend less on the scheduler.
//!
//! The processes are started through `taskset -c LIST` (util-linux): it sets the affinity and
//! then execs the program, so the PID `cargo xtask bench` holds is the program's own and
//! threads started later (tokio's workers, Node's) inherit the mask. The workspace forbids
//! `unsafe`, which rules out calling `sched_setaffinity` between fork and exec ourselves, and
//! Node has no affinity call, so `taskset` is the one way that works for every server. Where
//! it is missing (util-linux not installed) or there is a single core, the run is unpinned
//! and the report says why.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::options::{Options, PinChoice};
use super::Result;

/// Where the servers and the client run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pinning {
    /// Servers (every one of them, the same cores) on `server`, the client on `client`.
    Pinned {
        taskset: PathBuf,
        server: Vec<usize>,
        client: Vec<usize>,
    },
    /// Not pinned, and why.
    Unpinned(String),
}

/// Who a process is, for the cores it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Server,
    Client,
}

impl Pinning {
    /// A command running `program` on this role's cores.
    pub(super) fn command(&self, role: Role, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Pinning::Pinned {
                taskset,
                server,
                client,
            } => {
                let cores = if role == Role::Server { server } else { client };
                let mut c = Command::new(taskset);
                c.arg("-c").arg(cpu_list(cores)).arg(program);
                c
            }
            Pinning::Unpinned(_) => Command::new(program),
        }
    }

    /// The cores `role` should be allowed, as `/proc/PID/status` lists them (`None`: unpinned).
    pub(super) fn expected(&self, role: Role) -> Option<String> {
        match self {
            Pinning::Pinned { server, client, .. } => Some(cpu_list(match role {
                Role::Server => server,
                Role::Client => client,
            })),
            Pinning::Unpinned(_) => None,
        }
    }

    /// One line for the report's header.
    pub(super) fn describe(&self) -> String {
        match self {
            Pinning::Pinned { server, client, .. } => format!(
                "pinned (`taskset -c`): every server on CPU {}, the client on CPU {}; each \
                 process's `Cpus_allowed_list` is checked",
                cpu_list(server),
                cpu_list(client)
            ),
            Pinning::Unpinned(why) => format!("not pinned ({why})"),
        }
    }

    pub(super) fn is_pinned(&self) -> bool {
        matches!(self, Pinning::Pinned { .. })
    }
}

/// Decides the run's pinning from the options, the cores this process may use (`allowed`)
/// and where `taskset` is. Asking for `--pin` (or for cores) where it cannot be done is an
/// error; the default falls back to unpinned with the reason.
pub(super) fn decide(o: &Options, allowed: &[usize], taskset: Option<PathBuf>) -> Result<Pinning> {
    let explicit = o.pin == PinChoice::On || o.server_cores.is_some() || o.client_cores.is_some();
    if o.pin == PinChoice::Off {
        return Ok(Pinning::Unpinned("`--no-pin`".into()));
    }
    let fallback = |why: String| {
        if explicit {
            Err(format!("cannot pin: {why}"))
        } else {
            Ok(Pinning::Unpinned(why))
        }
    };
    let Some(taskset) = taskset else {
        return fallback("`taskset` (util-linux) is not installed".into());
    };
    if allowed.len() < 2 {
        return fallback(format!("{} core(s) available", allowed.len()));
    }
    // By default the client gets the last cores (one per client thread), the servers the rest.
    let client_n = o.client_threads.clamp(1, allowed.len() - 1);
    let (default_server, default_client) = allowed.split_at(allowed.len() - client_n);
    let server = o.server_cores.clone().unwrap_or(default_server.to_vec());
    let client = o.client_cores.clone().unwrap_or(default_client.to_vec());
    if let Some(c) = server.iter().chain(&client).find(|c| !allowed.contains(c)) {
        return Err(format!(
            "CPU {c} is not among this process's cores ({})",
            cpu_list(allowed)
        ));
    }
    if server.is_empty() || client.is_empty() {
        return Err("`--server-cores` and `--client-cores` need at least one core each".into());
    }
    if server.iter().any(|c| client.contains(c)) {
        return Err(format!(
            "the server cores ({}) and the client cores ({}) overlap",
            cpu_list(&server),
            cpu_list(&client)
        ));
    }
    Ok(Pinning::Pinned {
        taskset,
        server,
        client,
    })
}

/// `0-2,5` → `[0, 1, 2, 5]` (sorted, without repeats).
pub(super) fn parse_cpu_list(v: &str) -> Result<Vec<usize>> {
    let bad = || format!("`{v}` is not a CPU list (e.g. `0`, `0-2,5`)");
    let mut cores = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b > 4095 {
            return Err(bad());
        }
        cores.extend(a..=b);
    }
    if cores.is_empty() {
        return Err(bad());
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

/// `[0, 1, 2, 5]` → `0-2,5`, as the kernel lists them in `Cpus_allowed_list`.
pub(super) fn cpu_list(cores: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The cores `pid` (or this process) may run on, as `/proc/PID/status` lists them.
pub(super) fn allowed_list(pid: Option<u32>) -> Option<String> {
    status_field(pid, "Cpus_allowed_list")
}

/// A field of `/proc/PID/status` (of this process without a PID), trimmed: `VmRSS` gives
/// `5120 kB`.
pub(super) fn status_field(pid: Option<u32>, name: &str) -> Option<String> {
    let path = pid.map_or("/proc/self/status".into(), |p| format!("/proc/{p}/status"));
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// The cores this process may use (every core `nproc` counts, when `/proc` says nothing).
pub(super) fn allowed_cores() -> Vec<usize> {
    allowed_list(None)
        .and_then(|l| parse_cpu_list(&l).ok())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        })
}

/// `taskset` on the `PATH`, if there is one.
pub(super) fn find_taskset() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("taskset"))
        .find(|p| Path::new(p).is_file())
}

#[cfg(test)]
mod tests {
    use super::super::options::parse_words;
    use super::*;

    fn options(words: &[&str]) -> Options {
        Options::new(&parse_words(words).unwrap())
    }

    #[test]
    fn cpu_lists_parse_and_print_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), [0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("3,1,1").unwrap(), [1, 3]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[1]), "1");
    }

    #[test]
    fn two_cores_split_server_first_and_fall_back_without_taskset() {
        let ts = Some(PathBuf::from("/usr/bin/taskset"));
        let p = decide(&options(&[]), &[0, 1], ts.clone()).unwrap();
        assert_eq!(p.expected(Role::Server).as_deref(), Some("0"));
        assert_eq!(p.expected(Role::Client).as_deref(), Some("1"));
        let p = decide(&options(&[]), &[0, 1, 2, 3], ts.clone()).unwrap();
        assert_eq!(p.expected(Role::Server).as_deref(), Some("0-2"));
        let o = options(&["--server-cores", "1", "--client-cores", "0"]);
        let p = decide(&o, &[0, 1], ts.clone()).unwrap();
        assert_eq!(p.expected(Role::Server).as_deref(), Some("1"));
        // the default falls back; asking for it does not
        assert!(!decide(&options(&[]), &[0, 1], None).unwrap().is_pinned());
        assert!(!decide(&options(&[]), &[0], ts.clone()).unwrap().is_pinned());
        assert!(decide(&options(&["--pin"]), &[0], ts.clone()).is_err());
        assert!(decide(&options(&["--pin"]), &[0, 1], None).is_err());
        assert!(!decide(&options(&["--no-pin"]), &[0, 1], ts.clone())
            .unwrap()
            .is_pinned());
        let o = options(&["--server-cores", "0-1", "--client-cores", "1"]);
        assert!(decide(&o, &[0, 1], ts.clone()).is_err());
        let o = options(&["--server-cores", "7"]);
        assert!(decide(&o, &[0, 1], ts).is_err());
    }
}
