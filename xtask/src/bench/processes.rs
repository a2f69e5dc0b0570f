//! The processes a run starts and stops by PID: the servers under test, nats-servers and
//! their cluster, with bounded waits.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::options::{Options, Server};
use super::pinning::{allowed_list, Role};
use super::{bin, Result, SECRET};
use crate::free_port;

/// A child process, killed by PID when dropped (`Child::kill` signals its PID only).
pub(super) struct Killed(pub(super) Child);

impl Killed {
    /// Asks the child to stop (SIGTERM, so that it can clean up: valgrind removes its vgdb
    /// pipes from /tmp), then kills it if it has not within 10 s.
    pub(super) fn stop(mut self) {
        let asked = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if asked {
            let _ = wait_bounded(&mut self.0, Duration::from_secs(10));
        }
        // Dropped here: killed, if it is still running.
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines a child writes, on a channel (read by a thread of their own).
pub(super) fn lines(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// `utime + stime` from the text of a `/proc/PID/stat` file: the total of
/// `switchboard_bench::procfs::parse_stat` (xtask does not build the bench crate, which pulls
/// in the whole gateway); keep the two in step.
fn stat_ticks(stat: &str) -> Option<u64> {
    // After the command name in parentheses (it may hold spaces and parentheses): state is
    // field 3, utime and stime are fields 14 and 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A server process, killed by PID when dropped.
pub(super) struct Running {
    child: Killed,
    pub(super) port: u16,
    /// The cores it may run on once listening (`Cpus_allowed_list`), to check the pinning.
    pub(super) cores: Option<String>,
}

impl Running {
    pub(super) fn start(o: &Options, server: Server) -> Result<Running> {
        let port = free_port()?;
        // In errors: which program it was, when the twin is another build.
        let who = match (&o.twin_bin, server) {
            (Some(other), Server::SwitchboardTwin) => {
                format!("{} (`{}`)", server.name(), other.display())
            }
            _ => server.name().to_string(),
        };
        let mut command = match server.peer_dir() {
            None => {
                let program = match (&o.twin_bin, server) {
                    (Some(other), Server::SwitchboardTwin) => other.clone(),
                    _ => bin(&o.profile, "bench-server"),
                };
                let mut c = o.pinning.command(Role::Server, program);
                c.arg(port.to_string());
                if server == Server::Floor {
                    c.arg("--floor");
                }
                if let Some(url) = &o.nats {
                    c.args(["--nats", url]);
                }
                if let Some(n) = o.server_threads {
                    c.args(["--threads", &n.to_string()]);
                }
                if o.echo_over_http {
                    c.arg("--echo-over-http");
                }
                c
            }
            Some(dir) => {
                let mut c = o.pinning.command(Role::Server, "node");
                c.arg(Path::new(dir).join("server.js"))
                    .arg(port.to_string());
                c
            }
        };
        let mut child = command
            .env("SWITCHBOARD_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {who}: {e}"))?;
        let rx = lines(child.stdout.take().expect("piped stdout"));
        let mut running = Running {
            child: Killed(child),
            port,
            cores: None,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("listening") => {
                running.cores = allowed_list(Some(running.pid()));
                Ok(running)
            }
            Ok(line) => Err(format!("{who} said `{line}` instead of listening")),
            Err(_) => Err(format!("{who} did not start listening")),
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// CPU time used so far (user + system, all threads), in clock ticks (`/proc/PID/stat`).
    pub(super) fn cpu_ticks(&self) -> Option<u64> {
        stat_ticks(&std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?)
    }

    pub(super) fn rss_kib(&self) -> Option<u64> {
        super::pinning::status_field(Some(self.pid()), "VmRSS")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// Waits for `child` at most `limit`, killing it (by PID) past that.
pub(super) fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {} s; killed", limit.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A nats-server of our own on a free loopback port, killed by PID when dropped.
pub(super) struct NatsServer {
    _child: Killed,
    pub(super) url: String,
}

impl NatsServer {
    pub(super) fn start() -> Result<NatsServer> {
        Self::start_with(free_port()?, &[])
    }

    /// A server on `port` with `args` besides its address.
    fn start_with(port: u16, args: &[&str]) -> Result<NatsServer> {
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nats-server ({program}): {e}"))?;
        let nats = NatsServer {
            _child: Killed(child),
            url: format!("nats://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server did not start listening within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nats)
    }
}

/// Two nats-servers routed to each other: (the publisher's, its monitoring port), the node's.
pub(super) fn nats_pair() -> Result<((NatsServer, u16), NatsServer)> {
    let (route, monitor) = (free_port()?, free_port()?);
    let cluster = format!("nats://127.0.0.1:{route}");
    let monitor_arg = monitor.to_string();
    let first = NatsServer::start_with(
        free_port()?,
        &[
            "--cluster_name",
            "sb",
            "--cluster",
            &cluster,
            "-m",
            &monitor_arg,
        ],
    )?;
    let second = NatsServer::start_with(
        free_port()?,
        &[
            "--cluster_name",
            "sb",
            "--cluster",
            &format!("nats://127.0.0.1:{}", free_port()?),
            "--routes",
            &cluster,
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http_get(monitor, "/routez").is_some_and(|r| r.contains("\"num_routes\": 1")) {
        if Instant::now() > deadline {
            return Err("the two nats-servers did not form a cluster within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(((first, monitor), second))
}

/// Waits until the server with monitoring port `monitor` knows, over a route, that someone
/// subscribes to `subject`: until then a message published there is dropped.
pub(super) fn wait_for_route_interest(monitor: u16, subject: &str) -> Result {
    let quoted = format!("\"{subject}\"");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http_get(monitor, "/routez?subs=1").is_some_and(|r| r.contains(&quoted)) {
        if Instant::now() > deadline {
            return Err(format!("no route interest in {subject} within 15 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The body of `GET path` on 127.0.0.1:`port`.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces() {
        let stat = "42 (node (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 11 0";
        assert_eq!(stat_ticks(stat), Some(22));
        assert_eq!(stat_ticks("42 (short) S 1"), None);
    }
}
