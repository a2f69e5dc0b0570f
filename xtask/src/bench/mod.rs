//! `cargo xtask bench`: the load benchmark. One Rust client (`bench-client`), the same for
//! every server, against Switchboard (`bench-server`), `ws-node` and `uws-node`
//! (`benches/peers/`), in one run; one table per scenario with ratios to Switchboard.
//!
//! Every server runs as its own process on a free port of 127.0.0.1, started and stopped by
//! PID; each scenario gets fresh server processes. The clients bind 127.x.y.z source
//! addresses so that tens of thousands of sockets do not run out of ephemeral ports.
//! `--smoke` is what CI runs: every scenario for about two seconds, small N, Switchboard
//! only; it fails on errors, never on speed.
//!
//! `cross-node` runs Switchboard alone (the peers have no NATS): its own nats-server on a free
//! port (started and stopped by PID), `bench-server --nats`, and a plain NATS client in
//! `bench-client` publishing to `socket:send`. `cross-cluster` is the same across a NATS
//! cluster: two nats-servers routed to each other, the node on one, the publisher on the other.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser, ValueEnum};

use crate::run as cmd;

type Result<T = ()> = std::result::Result<T, String>;
type Figures = BTreeMap<String, String>;

/// The secret every server verifies and the client signs with (loopback benchmark only).
const SECRET: &str = "switchboard-bench-secret-not-for-production";

/// A bench binary built with `profile`, in `CARGO_TARGET_DIR` or `target`.
fn bin(profile: &str, name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    let dir = match profile {
        "dev" | "test" => "debug",
        "release" | "bench" => "release",
        other => other,
    };
    PathBuf::from(target).join(dir).join(name)
}

/// `cargo xtask bench [options]`. The defaults in brackets are the full run's; `--smoke`
/// lowers most of them (`Options::defaults`).
#[derive(Debug, Parser)]
#[command(name = "bench", args_override_self = true)]
pub(crate) struct Args {
    /// CI: every scenario ~2 s, small N, Switchboard only; fails on errors
    #[arg(long)]
    smoke: bool,
    /// The servers [default: all three]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    servers: Option<Vec<Server>>,
    /// The scenarios [default: all; cross-node and cross-cluster run Switchboard only and
    /// need nats-server]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    scenarios: Option<Vec<Scenario>>,
    /// Measured seconds per run [default: 10]
    #[arg(long, value_name = "S", value_parser = seconds)]
    secs: Option<f64>,
    /// Warm-up seconds per run [default: 2]
    #[arg(long, value_name = "S", value_parser = seconds)]
    warmup: Option<f64>,
    /// echo: sockets [default: 100]
    #[arg(long, value_name = "N", value_parser = count)]
    sockets: Option<usize>,
    /// echo, send, cross-*: messages in flight per socket [default: 1]
    #[arg(long, value_name = "N", value_parser = count)]
    inflight: Option<usize>,
    /// send and cross-*: sockets, one user each [default: 100]
    #[arg(long, value_name = "N", value_parser = count)]
    send_sockets: Option<usize>,
    /// broadcast: subscribers [default: 10000]
    #[arg(long, value_name = "N", value_parser = count)]
    subscribers: Option<usize>,
    /// broadcast: broadcasts in flight [default: 1]
    #[arg(long, value_name = "N", value_parser = count)]
    broadcast_inflight: Option<usize>,
    /// idle: socket counts [default: 10000,50000]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set,
          value_parser = count)]
    idle: Option<Vec<usize>>,
    /// idle: most sockets per server/client process [default: 15000; a process may hold at
    /// most 20,000 open files here]
    #[arg(long, value_name = "N", value_parser = count)]
    per_process: Option<usize>,
    /// handshake: workers connecting at once [default: 32]
    #[arg(long, value_name = "N", value_parser = count)]
    handshake_concurrency: Option<usize>,
    /// Client runtime threads [default: 1]
    #[arg(long, value_name = "N", value_parser = count)]
    client_threads: Option<usize>,
    /// Switchboard worker threads [default: one per core]
    #[arg(long, value_name = "N", value_parser = count)]
    server_threads: Option<usize>,
    /// Also write the tables here [default: target/bench/report.md]
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Cargo profile of the bench binaries [default: release]
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Do not build the bench binaries first
    #[arg(long)]
    no_build: bool,
}

/// A count: `10000` or `10_000`.
fn count(v: &str) -> Result<usize> {
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("`{v}` is not a number"))
}

/// Seconds: `5` or `5s`.
fn seconds(v: &str) -> Result<f64> {
    v.trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{v}` is not a number of seconds"))
}

/// `Args` from the words after `bench`.
fn parse_words(words: &[&str]) -> Result<Args> {
    Args::try_parse_from(std::iter::once("bench").chain(words.iter().copied()))
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Server {
    Switchboard,
    WsNode,
    UwsNode,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Switchboard => "switchboard",
            Server::WsNode => "ws-node",
            Server::UwsNode => "uws-node",
        }
    }

    fn peer_dir(self) -> Option<&'static str> {
        match self {
            Server::Switchboard => None,
            Server::WsNode => Some("benches/peers/ws-node"),
            Server::UwsNode => Some("benches/peers/uws-node"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Echo,
    Broadcast,
    Send,
    Idle,
    Handshake,
    CrossNode,
    CrossCluster,
}

#[derive(Debug, Clone)]
struct Options {
    smoke: bool,
    servers: Vec<Server>,
    scenarios: Vec<Scenario>,
    secs: f64,
    warmup: f64,
    sockets: usize,
    inflight: usize,
    send_sockets: usize,
    subscribers: usize,
    broadcast_inflight: usize,
    idle: Vec<usize>,
    per_process: usize,
    handshake_concurrency: usize,
    client_threads: usize,
    server_threads: Option<usize>,
    report: PathBuf,
    profile: String,
    build: bool,
    /// The NATS server of a cross-node run (set while one runs, never from the command line).
    nats: Option<String>,
    /// Where the cross-cluster publisher connects, and that server's monitoring port.
    publisher_nats: Option<(String, u16)>,
}

impl Options {
    fn defaults(smoke: bool) -> Options {
        Options {
            smoke,
            servers: if smoke {
                vec![Server::Switchboard]
            } else {
                vec![Server::Switchboard, Server::WsNode, Server::UwsNode]
            },
            scenarios: vec![
                Scenario::Echo,
                Scenario::Broadcast,
                Scenario::Send,
                Scenario::Idle,
                Scenario::Handshake,
                Scenario::CrossNode,
                Scenario::CrossCluster,
            ],
            secs: if smoke { 2.0 } else { 10.0 },
            warmup: if smoke { 0.5 } else { 2.0 },
            sockets: if smoke { 10 } else { 100 },
            inflight: 1,
            send_sockets: if smoke { 10 } else { 100 },
            subscribers: if smoke { 200 } else { 10_000 },
            broadcast_inflight: 1,
            idle: if smoke {
                vec![300]
            } else {
                vec![10_000, 50_000]
            },
            per_process: 15_000,
            handshake_concurrency: if smoke { 4 } else { 32 },
            client_threads: 1,
            server_threads: None,
            report: PathBuf::from(if smoke {
                "target/bench/smoke.md"
            } else {
                "target/bench/report.md"
            }),
            profile: "release".into(),
            build: true,
            nats: None,
            publisher_nats: None,
        }
    }

    /// The defaults of the run `args` asks for, overridden by what it names.
    fn new(args: &Args) -> Options {
        let d = Options::defaults(args.smoke);
        let mut o = Options {
            servers: args.servers.clone().unwrap_or(d.servers),
            scenarios: args.scenarios.clone().unwrap_or(d.scenarios),
            secs: args.secs.unwrap_or(d.secs),
            warmup: args.warmup.unwrap_or(d.warmup),
            sockets: args.sockets.unwrap_or(d.sockets),
            inflight: args.inflight.unwrap_or(d.inflight),
            send_sockets: args.send_sockets.unwrap_or(d.send_sockets),
            subscribers: args.subscribers.unwrap_or(d.subscribers),
            broadcast_inflight: args.broadcast_inflight.unwrap_or(d.broadcast_inflight),
            idle: args.idle.clone().unwrap_or(d.idle),
            per_process: args
                .per_process
                .map_or(d.per_process, |n| n.clamp(1, 19_000)),
            handshake_concurrency: args
                .handshake_concurrency
                .unwrap_or(d.handshake_concurrency),
            client_threads: args.client_threads.unwrap_or(d.client_threads),
            server_threads: args.server_threads.or(d.server_threads),
            report: args.report.clone().unwrap_or(d.report),
            profile: args.profile.clone().unwrap_or(d.profile),
            build: !args.no_build,
            ..d
        };
        if o.servers.first() != Some(&Server::Switchboard) {
            o.servers.retain(|s| *s != Server::Switchboard);
            o.servers.insert(0, Server::Switchboard);
        }
        o
    }
}

/// `cargo xtask bench [options]`; `words` are the options as given, for the report.
pub(crate) fn run(args: &Args, words: &[String]) -> Result {
    let o = Options::new(args);
    if o.build {
        build(&o.profile)?;
    }
    for server in &o.servers {
        if let Some(dir) = server.peer_dir() {
            npm_ci(dir)?;
        }
    }
    let started = Instant::now();
    let mut report = Report::new(&o, words);
    for scenario in o.scenarios.clone() {
        match scenario {
            Scenario::Idle => idle(&o, &mut report)?,
            Scenario::CrossNode => cross_node(&o, &mut report)?,
            Scenario::CrossCluster => cross_cluster(&o, &mut report)?,
            _ => measured(&o, scenario, &mut report)?,
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.line(format!(
        "\n_Whole run: {:.0} s; load average at the end: {}._",
        started.elapsed().as_secs_f64(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let text = report.text();
    if let Some(dir) = o.report.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&o.report, &text).map_err(|e| format!("{}: {e}", o.report.display()))?;
    println!("\n{text}");
    println!("(written to {})", o.report.display());
    if o.smoke && !report.failures.is_empty() {
        return Err(format!(
            "smoke run failed:\n  {}",
            report.failures.join("\n  ")
        ));
    }
    if !report.failures.is_empty() {
        eprintln!(
            "bench: some runs reported errors:\n  {}",
            report.failures.join("\n  ")
        );
    }
    Ok(())
}

/// What CI runs: the micro-benchmarks build, and every load scenario briefly against
/// Switchboard alone. `cargo bench --no-run` also builds the bench binaries (benches may run
/// them), in the same profile, so the smoke run needs no second build. CI builds them in
/// the dev profile: it reuses what `cargo test --workspace` has built and adds about a
/// minute, where the release profile would add about five on this machine; the smoke run
/// never judges speed.
pub(crate) fn ci() -> Result {
    cmd(
        "cargo",
        &[
            "bench",
            "-p",
            "switchboard-bench",
            "--no-run",
            "--profile",
            "dev",
        ],
    )?;
    let words = ["--smoke", "--no-build", "--profile", "dev"];
    run(&parse_words(&words)?, &words.map(String::from))
}

fn build(profile: &str) -> Result {
    cmd(
        "cargo",
        &[
            "build",
            "--profile",
            profile,
            "-p",
            "switchboard-bench",
            "--bin",
            "bench-server",
            "--bin",
            "bench-client",
        ],
    )
}

/// Installs a peer's locked dependencies when they are missing.
fn npm_ci(dir: &str) -> Result {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("the peers need Node.js 20 (node: {e})"))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    if !version.starts_with("v20.") {
        eprintln!("bench: the peers are pinned for Node 20; found {version}");
    }
    if Path::new(dir).join("node_modules").is_dir() {
        return Ok(());
    }
    println!("$ (cd {dir} && npm ci)");
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("npm ci in {dir} failed ({status})"))
    }
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A server process, killed by PID when dropped.
struct Running {
    child: Child,
    port: u16,
}

impl Running {
    fn start(o: &Options, server: Server) -> Result<Running> {
        let port = free_port()?;
        let mut command = match server.peer_dir() {
            None => {
                let mut c = Command::new(bin(&o.profile, "bench-server"));
                c.arg(port.to_string());
                if let Some(url) = &o.nats {
                    c.args(["--nats", url]);
                }
                if let Some(n) = o.server_threads {
                    c.args(["--threads", &n.to_string()]);
                }
                c
            }
            Some(dir) => {
                let mut c = Command::new("node");
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
            .map_err(|e| format!("cannot start {}: {e}", server.name()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let running = Running { child, port };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("listening") => Ok(running),
            Ok(line) => Err(format!(
                "{} said `{line}` instead of listening",
                server.name()
            )),
            Err(_) => Err(format!("{} did not start listening", server.name())),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // `Child::kill` signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's arguments shared by every scenario.
fn client_command(o: &Options, target: &Running) -> Command {
    let mut c = Command::new(bin(&o.profile, "bench-client"));
    c.env("SWITCHBOARD_JWT_SECRET", SECRET)
        .arg("--addr")
        .arg(format!("127.0.0.1:{}", target.port))
        .arg("--server-pid")
        .arg(target.pid().to_string())
        .arg("--secs")
        .arg(o.secs.to_string())
        .arg("--warmup")
        .arg(o.warmup.to_string())
        .arg("--threads")
        .arg(o.client_threads.to_string());
    c
}

fn scenario_args(o: &Options, scenario: Scenario) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match scenario {
        Scenario::Echo => s(&[
            "echo",
            "--sockets",
            &o.sockets.to_string(),
            "--inflight",
            &o.inflight.to_string(),
        ]),
        Scenario::Send => s(&[
            "send",
            "--sockets",
            &o.send_sockets.to_string(),
            "--inflight",
            &o.inflight.to_string(),
        ]),
        Scenario::Broadcast => s(&[
            "broadcast",
            "--subscribers",
            &o.subscribers.to_string(),
            "--inflight",
            &o.broadcast_inflight.to_string(),
        ]),
        Scenario::Handshake => s(&[
            "handshake",
            "--concurrency",
            &o.handshake_concurrency.to_string(),
        ]),
        Scenario::Idle => s(&["idle"]),
        Scenario::CrossNode | Scenario::CrossCluster => s(&[
            "cross-node",
            "--nats",
            match (&o.publisher_nats, &o.nats) {
                (Some((url, _)), _) => url,
                (None, Some(url)) => url,
                (None, None) => "nats://127.0.0.1:4222",
            },
            "--sockets",
            &o.send_sockets.to_string(),
            "--inflight",
            &o.inflight.to_string(),
        ]),
    }
}

/// Parses `RESULT k=v ...`.
fn parse_result(line: &str) -> Option<Figures> {
    let rest = line.strip_prefix("RESULT")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Waits for `child` at most `limit`, killing it (by PID) past that.
fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
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

/// Runs the client once against `target` and returns its figures.
fn run_client(o: &Options, target: &Running, scenario: Scenario) -> Result<Figures> {
    let args = scenario_args(o, scenario);
    let mut child = client_command(o, target)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the client: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<_>>()
    });
    let limit = Duration::from_secs_f64(o.warmup + o.secs + 180.0);
    let status = wait_bounded(&mut child, limit)?;
    let lines = reader.join().unwrap_or_default();
    let figures = lines.iter().rev().find_map(|l| parse_result(l));
    match (status.success(), figures) {
        (true, Some(f)) => Ok(f),
        (_, _) => Err(format!("client {} exited with {status}", args[0])),
    }
}

/// Scenarios 1, 2, 3, 5 and 6: a fresh server process each, the same client run against each.
fn measured(o: &Options, scenario: Scenario, report: &mut Report) -> Result {
    let mut rows = Vec::new();
    for &server in &o.servers {
        println!(
            "bench: {} against {} ...",
            scenario_args(o, scenario).join(" "),
            server.name()
        );
        let result = Running::start(o, server).and_then(|running| {
            // Let the server settle (JIT warm-up is part of the measured warm-up).
            std::thread::sleep(Duration::from_millis(300));
            if let Some((_, monitor)) = &o.publisher_nats {
                wait_for_route_interest(*monitor, "socket:send")?;
            }
            run_client(o, &running, scenario)
        });
        match &result {
            Ok(f) => {
                println!("bench:   {}", fmt_figures(f));
                let errors: u64 = f.get("errors").and_then(|e| e.parse().ok()).unwrap_or(0);
                let count: u64 = f
                    .get("count")
                    .or_else(|| f.get("complete"))
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                if errors > 0 || count == 0 {
                    report.failures.push(format!(
                        "{:?} on {}: {errors} errors, {count} measured",
                        scenario,
                        server.name()
                    ));
                }
            }
            Err(e) => {
                println!("bench:   failed: {e}");
                report
                    .failures
                    .push(format!("{:?} on {}: {e}", scenario, server.name()));
            }
        }
        rows.push((server, result.ok()));
    }
    report.table(o, scenario, &rows);
    Ok(())
}

/// A nats-server of our own on a free loopback port, killed by PID when dropped.
struct NatsServer {
    child: Child,
    url: String,
}

impl NatsServer {
    fn start() -> Result<NatsServer> {
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
            child,
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        // `Child::kill` signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scenario 6: `send` through NATS from a plain NATS client, Switchboard only.
fn cross_node(o: &Options, report: &mut Report) -> Result {
    let nats = match NatsServer::start() {
        Ok(n) => n,
        Err(e) => {
            println!("bench: cross-node: {e}");
            report.failures.push(format!("CrossNode: {e}"));
            return Ok(());
        }
    };
    let mut o = o.clone();
    o.servers = vec![Server::Switchboard];
    o.nats = Some(nats.url.clone());
    let result = measured(&o, Scenario::CrossNode, report);
    drop(nats);
    result
}

/// Two nats-servers routed to each other: (the publisher's, its monitoring port), the node's.
fn nats_pair() -> Result<((NatsServer, u16), NatsServer)> {
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

/// Scenario 7: `cross-node` across a NATS cluster: the node on one server, the publisher on
/// the other, every message over the route between them.
fn cross_cluster(o: &Options, report: &mut Report) -> Result {
    let ((publisher_side, monitor), node_side) = match nats_pair() {
        Ok(pair) => pair,
        Err(e) => {
            println!("bench: cross-cluster: {e}");
            report.failures.push(format!("CrossCluster: {e}"));
            return Ok(());
        }
    };
    let mut o = o.clone();
    o.servers = vec![Server::Switchboard];
    o.nats = Some(node_side.url.clone());
    o.publisher_nats = Some((publisher_side.url.clone(), monitor));
    let result = measured(&o, Scenario::CrossCluster, report);
    drop((publisher_side, node_side));
    result
}

/// Waits until the server with monitoring port `monitor` knows, over a route, that someone
/// subscribes to `subject`: until then a message published there is dropped.
fn wait_for_route_interest(monitor: u16, subject: &str) -> Result {
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

fn fmt_figures(f: &Figures) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one idle measurement found.
struct IdleRow {
    sockets: usize,
    processes: usize,
    before_kib: u64,
    after_kib: u64,
}

impl IdleRow {
    fn bytes_per_socket(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 * 1024.0 / self.sockets as f64
    }
}

/// Scenario 4: RSS per connected, authenticated socket. More sockets than one process may
/// hold are spread over several server processes (and as many client processes), and the
/// RSS of all of them is added up.
fn idle(o: &Options, report: &mut Report) -> Result {
    for &size in &o.idle {
        let processes = size.div_ceil(o.per_process).max(1);
        let mut rows = Vec::new();
        for &server in &o.servers {
            println!(
                "bench: idle {size} sockets on {processes} {} process(es) ...",
                server.name()
            );
            let result = idle_once(o, server, size, processes);
            match &result {
                Ok(row) => println!(
                    "bench:   RSS {} -> {} KiB: {:.0} bytes/socket",
                    row.before_kib,
                    row.after_kib,
                    row.bytes_per_socket()
                ),
                Err(e) => {
                    println!("bench:   failed: {e}");
                    report
                        .failures
                        .push(format!("idle {size} on {}: {e}", server.name()));
                }
            }
            rows.push((server, result.ok()));
        }
        report.idle_table(size, processes, &rows);
    }
    Ok(())
}

fn idle_once(o: &Options, server: Server, size: usize, processes: usize) -> Result<IdleRow> {
    let servers = (0..processes)
        .map(|_| Running::start(o, server))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = |servers: &[Running]| -> Result<u64> {
        servers
            .iter()
            .map(|s| {
                s.rss_kib()
                    .ok_or_else(|| "cannot read the server's RSS".into())
            })
            .sum()
    };
    let before_kib = rss(&servers)?;
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let mut clients: Vec<(Child, ChildStdin)> = Vec::new();
    let share = size.div_ceil(processes);
    let mut remaining = size;
    for (p, target) in servers.iter().enumerate() {
        let n = share.min(remaining);
        remaining -= n;
        let mut child = client_command(o, target)
            .args(["--source-prefix", &format!("127.1.{}", p + 1)])
            .args(["--sources", &(n / 8_000 + 2).to_string()])
            .args(["idle", "--sockets", &n.to_string(), "--hold", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the client: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send((p, Some(line)));
            }
            let _ = tx.send((p, None));
        });
        clients.push((child, stdin));
    }
    drop(tx);
    // Wait (bounded) until every client holds all of its sockets.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ready = vec![false; clients.len()];
    let mut results: Vec<Option<Figures>> = vec![None; clients.len()];
    let mut outcome = Ok(());
    while !ready.iter().all(|r| *r) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((p, Some(line))) if line.starts_with("READY") => ready[p] = true,
            Ok((p, Some(line))) => {
                if let Some(f) = parse_result(&line) {
                    results[p] = Some(f);
                }
            }
            Ok((p, None)) => {
                outcome = Err(format!("client {p} ended before READY"));
                break;
            }
            Err(_) => {
                outcome = Err("clients not READY within 300 s".to_string());
                break;
            }
        }
    }
    let after_kib = if outcome.is_ok() {
        // Let allocations settle, then read every server's RSS while the sockets are held.
        std::thread::sleep(Duration::from_secs(2));
        rss(&servers)?
    } else {
        0
    };
    // Closing stdin releases the clients; each prints RESULT and exits.
    let mut errors = 0u64;
    for (p, (mut child, stdin)) in clients.into_iter().enumerate() {
        drop(stdin);
        if let Err(e) = wait_bounded(&mut child, Duration::from_secs(60)) {
            outcome = outcome.and(Err(format!("client {p}: {e}")));
        }
    }
    while let Ok((p, line)) = rx.recv_timeout(Duration::from_secs(5)) {
        if let Some(f) = line.as_deref().and_then(parse_result) {
            results[p] = Some(f);
        }
    }
    for f in results.iter().flatten() {
        errors += f.get("errors").and_then(|e| e.parse().ok()).unwrap_or(0);
    }
    drop(servers);
    outcome?;
    if errors > 0 {
        return Err(format!("{errors} sockets ended while held"));
    }
    Ok(IdleRow {
        sockets: size,
        processes,
        before_kib,
        after_kib,
    })
}

/// The markdown report: a header on the machine and the command, then one table per
/// scenario.
struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

fn num(f: &Figures, key: &str) -> Option<f64> {
    f.get(key).and_then(|v| v.parse().ok())
}

/// `a / b` as `1.23×`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn fmt_int(v: Option<f64>) -> String {
    let Some(v) = v else { return "—".into() };
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shell_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

impl Report {
    fn new(o: &Options, args: &[String]) -> Report {
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut r = Report {
            lines: Vec::new(),
            failures: Vec::new(),
        };
        r.line(format!(
            "# Load benchmark{}\n",
            if o.smoke { " (smoke)" } else { "" }
        ));
        r.line(format!("- command: `cargo xtask bench {}`", args.join(" ")));
        r.line(format!("- date: {}", shell_output("date", &["-u"])));
        r.line(format!(
            "- machine: {} cores (nproc), {mem} memory, {}",
            shell_output("nproc", &[]),
            shell_output("uname", &["-sr"])
        ));
        r.line(format!(
            "- load average at start: {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        r.line(format!(
            "- node {}; client threads {}; Switchboard worker threads {}",
            shell_output("node", &["--version"]),
            o.client_threads,
            o.server_threads
                .map_or("one per core".into(), |n| n.to_string())
        ));
        r.line(format!(
            "- each run: {} s warm-up, {} s measured; a fresh server process per run; \
             bench binaries built with the `{}` profile",
            o.warmup, o.secs, o.profile
        ));
        r.line(
            "- ratio column: Switchboard's figure ÷ this server's for throughput, this \
             server's ÷ Switchboard's for latency, CPU per unit of work and memory; above 1× means Switchboard \
             is better"
                .to_string(),
        );
        r
    }

    fn line(&mut self, s: String) {
        self.lines.push(s);
    }

    fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }

    fn table(&mut self, o: &Options, scenario: Scenario, rows: &[(Server, Option<Figures>)]) {
        let sb = rows
            .iter()
            .find(|(s, _)| *s == Server::Switchboard)
            .and_then(|(_, f)| f.clone());
        let sb_num = |k: &str| sb.as_ref().and_then(|f| num(f, k));
        let (title, figure) = match scenario {
            Scenario::Echo => (
                format!(
                    "echo through the bus: {} sockets, {} in flight each, 64 B payload",
                    o.sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Send => (
                format!(
                    "send to one user among {} sockets (each socket sends to its own user), \
                     {} in flight each",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Broadcast => (
                format!(
                    "broadcast fan-out: {} subscribers, {} broadcast(s) in flight, 64 B payload",
                    o.subscribers, o.broadcast_inflight
                ),
                "deliveries/s",
            ),
            Scenario::Handshake => (
                format!(
                    "handshakes with JWT verification (HS256): {} connecting at once",
                    o.handshake_concurrency
                ),
                "connections/s",
            ),
            Scenario::CrossNode => (
                format!(
                    "cross-node send through NATS: a plain NATS client publishes to `socket:send` \
                     for one user among {} sockets on a Switchboard node on the NATS bus, \
                     {} in flight each",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::CrossCluster => (
                format!(
                    "cross-cluster send through NATS: as cross-node, with the publisher on one \
                     nats-server and the node on another, routed to each other ({} sockets, {} \
                     in flight each)",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Idle => unreachable!("idle has its own table"),
        };
        self.line(format!("\n## {title}\n"));
        let latency = if scenario == Scenario::Broadcast {
            "time to all"
        } else {
            "latency"
        };
        let unit = if scenario == Scenario::Broadcast {
            "delivery"
        } else if scenario == Scenario::Handshake {
            "connection"
        } else {
            "message"
        };
        self.line(format!(
            "| server | {figure} | ratio | {latency} p50 µs | p99 µs | p999 µs | p99 ratio | \
             client CPU | server CPU | server CPU µs per {unit} | ratio |"
        ));
        self.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
        // CPU time per unit of work: less sensitive than throughput to a client or to other
        // processes taking the cores.
        let cost = |f: &Figures| {
            num(f, "server_cpu")
                .zip(num(f, "rate"))
                .filter(|(_, r)| *r > 0.0)
                .map(|(c, r)| c * 1e6 / r)
        };
        let sb_cost = sb.as_ref().and_then(cost);
        for (server, f) in rows {
            let Some(f) = f else {
                self.line(format!(
                    "| {} | failed | — | — | — | — | — | — | — | — | — |",
                    server.name()
                ));
                continue;
            };
            let client = num(f, "client_cpu");
            let bound = if client.is_some_and(|c| c >= 0.9 * o.client_threads as f64) {
                " (client-bound)"
            } else {
                ""
            };
            self.line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} |",
                server.name(),
                fmt_int(num(f, "rate")),
                ratio(sb_num("rate"), num(f, "rate")),
                fmt_opt(num(f, "p50_us"), 0),
                fmt_opt(num(f, "p99_us"), 0),
                fmt_opt(num(f, "p999_us"), 0),
                ratio(num(f, "p99_us"), sb_num("p99_us")),
                fmt_opt(client, 2),
                bound,
                fmt_opt(num(f, "server_cpu"), 2),
                fmt_opt(cost(f), 1),
                ratio(cost(f), sb_cost),
            ));
        }
        if scenario == Scenario::Broadcast {
            let bps: Vec<String> = rows
                .iter()
                .filter_map(|(s, f)| Some(format!("{} {}", s.name(), f.as_ref()?.get("bps")?)))
                .collect();
            self.line(format!(
                "\nBroadcasts completed per second: {}.",
                bps.join(", ")
            ));
        }
        self.targets(scenario, rows, sb.as_ref());
    }

    fn targets(
        &mut self,
        scenario: Scenario,
        rows: &[(Server, Option<Figures>)],
        sb: Option<&Figures>,
    ) {
        let of = |server: Server| {
            rows.iter()
                .find(|(s, _)| *s == server)
                .and_then(|(_, f)| f.clone())
        };
        let check = |name: &str, met: Option<bool>, detail: String| {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            format!("- target {name}: **{verdict}** ({detail})")
        };
        let rate = |f: &Option<Figures>| f.as_ref().and_then(|f| num(f, "rate"));
        let sb = sb.cloned();
        let mut out = Vec::new();
        match scenario {
            Scenario::Echo => {
                for (peer, want) in [(Server::WsNode, 3.0), (Server::UwsNode, 1.0)] {
                    let (a, b) = (rate(&sb), rate(&of(peer)));
                    if b.is_none() {
                        continue;
                    }
                    let r = a.zip(b).map(|(a, b)| a / b);
                    out.push(check(
                        &format!("echo ≥ {want}× {}", peer.name()),
                        r.map(|r| r >= want),
                        ratio(a, b),
                    ));
                }
            }
            Scenario::Broadcast => {
                let peer = of(Server::UwsNode);
                if peer.is_some() {
                    let (a, b) = (rate(&sb), rate(&peer));
                    out.push(check(
                        "broadcast deliveries/s ≥ 1.5× uws-node",
                        a.zip(b).map(|(a, b)| a / b >= 1.5),
                        ratio(a, b),
                    ));
                    let p = |f: &Option<Figures>| f.as_ref().and_then(|f| num(f, "p99_us"));
                    let (a, b) = (p(&sb), p(&peer));
                    out.push(check(
                        "broadcast p99 time-to-all ≤ uws-node's",
                        a.zip(b).map(|(a, b)| a <= b),
                        format!("{} µs vs {} µs", fmt_opt(a, 0), fmt_opt(b, 0)),
                    ));
                }
            }
            Scenario::Handshake => {
                let a = rate(&sb);
                out.push(check(
                    "JWT handshakes ≥ 5,000/s",
                    a.map(|a| a >= 5000.0),
                    format!("{}/s", fmt_int(a)),
                ));
            }
            _ => {}
        }
        if !out.is_empty() {
            self.line(String::new());
            for l in out {
                self.line(l);
            }
        }
    }

    fn idle_table(&mut self, size: usize, processes: usize, rows: &[(Server, Option<IdleRow>)]) {
        self.line(format!(
            "\n## idle memory: {} authenticated sockets ({} server process{} per server)\n",
            fmt_int(Some(size as f64)),
            processes,
            if processes == 1 { "" } else { "es" }
        ));
        self.line(
            "| server | RSS before (MiB) | RSS with sockets (MiB) | bytes per socket | ratio |"
                .into(),
        );
        self.line("|---|---:|---:|---:|---:|".into());
        let sb = rows
            .iter()
            .find(|(s, _)| *s == Server::Switchboard)
            .and_then(|(_, r)| r.as_ref().map(IdleRow::bytes_per_socket));
        for (server, row) in rows {
            match row {
                Some(r) => self.line(format!(
                    "| {} | {:.1} | {:.1} | {} | {} |",
                    server.name(),
                    r.before_kib as f64 / 1024.0,
                    r.after_kib as f64 / 1024.0,
                    fmt_int(Some(r.bytes_per_socket())),
                    ratio(Some(r.bytes_per_socket()), sb),
                )),
                None => self.line(format!("| {} | failed | — | — | — |", server.name())),
            }
        }
        let ws = rows
            .iter()
            .find(|(s, _)| *s == Server::WsNode)
            .and_then(|(_, r)| r.as_ref().map(IdleRow::bytes_per_socket));
        if ws.is_some() {
            let met = sb.zip(ws).map(|(a, b)| a * 4.0 <= b);
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            self.line(format!(
                "\n- target idle memory per socket ≤ ¼ of ws-node's: **{verdict}** ({})",
                ratio(ws, sb)
            ));
        }
        if rows
            .iter()
            .any(|(_, r)| r.as_ref().is_some_and(|r| r.processes > 1))
        {
            self.line(format!(
                "\n_{} sockets do not fit one process here (at most 20,000 open files each), so \
                 each server ran as {processes} processes of at most {} sockets, and the RSS \
                 of all of them is added up; the fixed cost of the extra processes is in \
                 \"before\" and cancels out._",
                fmt_int(Some(size as f64)),
                fmt_int(Some(size.div_ceil(processes) as f64))
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Options> {
        parse_words(words).map(|a| Options::new(&a))
    }

    #[test]
    fn options_default_and_parse() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.servers.len(), 3);
        assert_eq!(o.idle, [10_000, 50_000]);
        let o = parse(&["--smoke", "--secs", "3s", "--idle", "1_000,2000"]).unwrap();
        assert!(o.smoke);
        assert_eq!(o.servers, [Server::Switchboard]);
        assert_eq!(o.secs, 3.0);
        assert_eq!(o.idle, [1000, 2000]);
        let o = parse(&["--servers", "ws-node"]).unwrap();
        assert_eq!(o.servers, [Server::Switchboard, Server::WsNode]);
        assert!(parse(&["--bogus", "1"]).is_err());
        let o = parse(&["--scenarios", "send,cross-node"]).unwrap();
        assert_eq!(o.scenarios, [Scenario::Send, Scenario::CrossNode]);
        assert_eq!(scenario_args(&o, Scenario::CrossNode)[0], "cross-node");
        let o = parse(&["--scenarios", "cross-cluster"]).unwrap();
        assert_eq!(o.scenarios, [Scenario::CrossCluster]);
        assert!(parse(&["--secs"]).is_err());
        // as by hand: a repeated option's last value counts; --per-process is clamped
        let o = parse(&["--idle", "1", "--idle", "2,3", "--per-process", "99999"]).unwrap();
        assert_eq!(o.idle, [2, 3]);
        assert_eq!(o.per_process, 19_000);
        let o = parse(&["--smoke", "--no-build", "--profile", "dev"]).unwrap();
        assert!(!o.build);
        assert_eq!(o.profile, "dev");
        assert_eq!(o.report, Path::new("target/bench/smoke.md"));
    }

    #[test]
    fn results_and_numbers_read_and_print() {
        let f = parse_result("RESULT rate=1234 p99_us=10.5 errors=0").unwrap();
        assert_eq!(num(&f, "rate"), Some(1234.0));
        assert_eq!(parse_result("READY sockets=3"), None);
        assert_eq!(fmt_int(Some(1234567.0)), "1,234,567");
        assert_eq!(fmt_int(Some(999.0)), "999");
        assert_eq!(ratio(Some(3.0), Some(1.5)), "2.00×");
        assert_eq!(ratio(Some(3.0), None), "—");
    }
}
