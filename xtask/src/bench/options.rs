//! The command line of `cargo xtask bench` (clap) and the options of a run, with the
//! defaults that `--smoke` lowers.

use std::path::{Path, PathBuf};

use clap::{ArgAction, Parser, ValueEnum};

use super::pinning::Pinning;
use super::Result;

/// `cargo xtask bench [options]`. The defaults in brackets are the full run's; `--smoke`
/// lowers most of them (`Options::defaults`).
#[derive(Debug, Parser)]
#[command(name = "bench", args_override_self = true)]
pub(crate) struct Args {
    /// CI: every scenario ~2 s, one round, small N, Switchboard and the floor only; fails on
    /// errors
    #[arg(long)]
    smoke: bool,
    /// The servers [default: switchboard, floor, ws-node, uws-node; the floor runs echo,
    /// broadcast and handshake only; switchboard-twin, a second process of the same build
    /// (the A/A control) or of another (`--twin-bin`), only when named or with --twin-bin]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    servers: Option<Vec<Server>>,
    /// The scenarios [default: all; cross-node and cross-cluster run Switchboard only and
    /// need nats-server]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    scenarios: Option<Vec<Scenario>>,
    /// Rounds: each scenario runs N times per server, interleaved [default: 3]
    #[arg(long, value_name = "N", value_parser = count)]
    runs: Option<usize>,
    /// Slices per run: a run's measured seconds are split into N slices, taken in turn with
    /// the other servers' slices of the round (broadcast, handshakes) [default: 3; 1 with
    /// --smoke]
    #[arg(long, value_name = "N", value_parser = count)]
    slices: Option<usize>,
    /// echo, send and broadcast: the servers of a round take turns of MS milliseconds (4 × MS
    /// for broadcast), one at a time, instead of slices [default: 250; 0: slices, as for the
    /// others]
    #[arg(long, value_name = "MS")]
    phase_ms: Option<u64>,
    /// Pin the servers and the client to different cores (taskset) [default: when there
    /// are 2 cores or more and taskset is installed]
    #[arg(long, overrides_with = "no_pin")]
    pin: bool,
    /// Do not pin
    #[arg(long, overrides_with = "pin")]
    no_pin: bool,
    /// The cores of every server, e.g. `0` or `0-2` [default: all but the client's]
    #[arg(long, value_name = "LIST", value_parser = cores)]
    server_cores: Option<Cores>,
    /// The client's cores [default: the last core, one per client thread]
    #[arg(long, value_name = "LIST", value_parser = cores)]
    client_cores: Option<Cores>,
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
    /// echo: Switchboard answers from an HTTP handler endpoint (gateway.http_handlers, served
    /// by bench-server on loopback, keep-alive) instead of an in-process handler
    #[arg(long)]
    echo_over_http: bool,
    /// echo, send, broadcast: a pinned client sleeps in `epoll_wait` between events, instead
    /// of polling without sleep on its own core (the default when pinned)
    #[arg(long)]
    client_sleeps: bool,
    /// switchboard-twin runs this `bench-server` (e.g. the build before a change, copied out
    /// of target/) instead of a second process of the same build: the A/A control becomes an
    /// A/B comparison of two builds, measured the same way (adds switchboard-twin to the
    /// servers). A relative path is taken from the directory you run the command in. The run
    /// then has no A/A control: run one on its own to know the noise
    #[arg(long, value_name = "PATH")]
    twin_bin: Option<PathBuf>,
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

/// A CPU list (a type of its own, so that clap takes it as one value).
#[derive(Debug, Clone)]
pub(super) struct Cores(Vec<usize>);

/// A CPU list: `1` or `0-2,5`.
fn cores(v: &str) -> Result<Cores> {
    super::pinning::parse_cpu_list(v).map(Cores)
}

/// `Args` from the words after `bench`.
pub(super) fn parse_words(words: &[&str]) -> Result<Args> {
    Args::try_parse_from(std::iter::once("bench").chain(words.iter().copied()))
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Server {
    Switchboard,
    /// A second `bench-server` of the same build: the A/A control. Its ratio to Switchboard
    /// is what noise alone makes of one build against itself, the resolution of a verdict.
    /// With `--twin-bin`, another build instead: an A/B comparison.
    SwitchboardTwin,
    /// `bench-server --floor`: the transport alone, what the gateway's layers add to.
    Floor,
    WsNode,
    UwsNode,
}

impl Server {
    pub(super) fn name(self) -> &'static str {
        match self {
            Server::Switchboard => "switchboard",
            Server::SwitchboardTwin => "switchboard-twin",
            Server::Floor => "floor",
            Server::WsNode => "ws-node",
            Server::UwsNode => "uws-node",
        }
    }

    /// The name in a table's first column; `twin_bin` is `--twin-bin`.
    pub(super) fn label(self, twin_bin: Option<&Path>) -> &'static str {
        match self {
            Server::Floor => "floor (transport only)",
            Server::SwitchboardTwin if twin_bin.is_some() => "switchboard-twin (other build, A/B)",
            Server::SwitchboardTwin => "switchboard-twin (same build, A/A)",
            other => other.name(),
        }
    }

    /// Whether this server runs `scenario`: the floor has no bus and no NATS, so it
    /// implements echo, send, broadcast and handshake only.
    pub(super) fn runs(self, scenario: Scenario) -> bool {
        match self {
            Server::Floor => matches!(
                scenario,
                Scenario::Echo | Scenario::Send | Scenario::Broadcast | Scenario::Handshake
            ),
            _ => true,
        }
    }

    pub(super) fn peer_dir(self) -> Option<&'static str> {
        match self {
            Server::Switchboard | Server::SwitchboardTwin | Server::Floor => None,
            Server::WsNode => Some("benches/peers/ws-node"),
            Server::UwsNode => Some("benches/peers/uws-node"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Scenario {
    Echo,
    Broadcast,
    Send,
    Idle,
    Handshake,
    CrossNode,
    CrossCluster,
}

/// `--pin`, `--no-pin`, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinChoice {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) smoke: bool,
    pub(super) runs: usize,
    /// Slices per run (`--slices`).
    pub(super) slices: usize,
    /// Echo and send's turns in milliseconds (`--phase-ms`; 0: slices).
    pub(super) phase_ms: u64,
    pub(super) pin: PinChoice,
    pub(super) server_cores: Option<Vec<usize>>,
    pub(super) client_cores: Option<Vec<usize>>,
    /// Decided once the run starts (`pinning::decide`), from the three above.
    pub(super) pinning: Pinning,
    pub(super) servers: Vec<Server>,
    pub(super) scenarios: Vec<Scenario>,
    pub(super) secs: f64,
    pub(super) warmup: f64,
    pub(super) sockets: usize,
    pub(super) inflight: usize,
    pub(super) send_sockets: usize,
    pub(super) subscribers: usize,
    pub(super) broadcast_inflight: usize,
    pub(super) idle: Vec<usize>,
    pub(super) per_process: usize,
    pub(super) handshake_concurrency: usize,
    pub(super) client_threads: usize,
    pub(super) server_threads: Option<usize>,
    pub(super) report: PathBuf,
    pub(super) profile: String,
    pub(super) build: bool,
    /// `--echo-over-http`.
    pub(super) echo_over_http: bool,
    /// `--client-sleeps`.
    pub(super) client_sleeps: bool,
    /// `--twin-bin`: the twin's `bench-server`, another build (None: the same build).
    pub(super) twin_bin: Option<PathBuf>,
    /// The NATS server of a cross-node run (set while one runs, never from the command line).
    pub(super) nats: Option<String>,
    /// Where the cross-cluster publisher connects, and that server's monitoring port.
    pub(super) publisher_nats: Option<(String, u16)>,
}

impl Options {
    /// Whether the client polls without sleeping: when it has a core of its own (pinned),
    /// unless `--client-sleeps`. Sleeping, it made each server pay to wake it at a rate that
    /// moved from slice to slice, the largest noise in the runs (docs/PERFORMANCE.md).
    pub(super) fn client_spins(&self) -> bool {
        self.pinning.is_pinned() && !self.client_sleeps
    }

    /// Whether `scenario` is measured in turns among the servers (echo and send by one client
    /// for all, broadcast by one client per server), rather than in slices.
    pub(super) fn phased(&self, scenario: Scenario) -> bool {
        self.phase_ms > 0
            && matches!(
                scenario,
                Scenario::Echo | Scenario::Send | Scenario::Broadcast
            )
    }

    /// The length of a turn of `scenario` in milliseconds: `phase_ms`, four times that for
    /// broadcast (a broadcast to 10,000 sockets takes some 50 ms, and a turn should hold
    /// many).
    pub(super) fn turn_ms(&self, scenario: Scenario) -> u64 {
        match scenario {
            Scenario::Broadcast => self.phase_ms * 4,
            _ => self.phase_ms,
        }
    }

    fn defaults(smoke: bool) -> Options {
        Options {
            smoke,
            runs: if smoke { 1 } else { 3 },
            slices: if smoke { 1 } else { 3 },
            phase_ms: 250,
            pin: PinChoice::Auto,
            server_cores: None,
            client_cores: None,
            pinning: Pinning::Unpinned("not decided yet".into()),
            // The floor is in the smoke run so that CI notices when it breaks.
            servers: if smoke {
                vec![Server::Switchboard, Server::Floor]
            } else {
                vec![
                    Server::Switchboard,
                    Server::Floor,
                    Server::WsNode,
                    Server::UwsNode,
                ]
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
            echo_over_http: false,
            client_sleeps: false,
            twin_bin: None,
            nats: None,
            publisher_nats: None,
        }
    }

    /// The defaults of the run `args` asks for, overridden by what it names.
    pub(super) fn new(args: &Args) -> Options {
        let d = Options::defaults(args.smoke);
        let mut o = Options {
            runs: args.runs.unwrap_or(d.runs).max(1),
            slices: args.slices.unwrap_or(d.slices).max(1),
            phase_ms: args.phase_ms.unwrap_or(d.phase_ms),
            pin: match (args.pin, args.no_pin) {
                (true, _) => PinChoice::On,
                (_, true) => PinChoice::Off,
                _ => PinChoice::Auto,
            },
            server_cores: args.server_cores.clone().map(|c| c.0),
            client_cores: args.client_cores.clone().map(|c| c.0),
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
            echo_over_http: args.echo_over_http,
            client_sleeps: args.client_sleeps,
            twin_bin: args.twin_bin.clone(),
            ..d
        };
        if o.twin_bin.is_some() && !o.servers.contains(&Server::SwitchboardTwin) {
            o.servers.insert(0, Server::SwitchboardTwin);
        }
        if o.servers.first() != Some(&Server::Switchboard) {
            o.servers.retain(|s| *s != Server::Switchboard);
            o.servers.insert(0, Server::Switchboard);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(words: &[&str]) -> Result<Options> {
        parse_words(words).map(|a| Options::new(&a))
    }

    #[test]
    fn a_twin_of_another_build_joins_the_servers_after_switchboard() {
        let o = parse(&[
            "--servers",
            "uws-node",
            "--twin-bin",
            "/tmp/old/bench-server",
        ])
        .unwrap();
        assert_eq!(
            o.servers,
            [
                Server::Switchboard,
                Server::SwitchboardTwin,
                Server::UwsNode
            ]
        );
        assert_eq!(
            o.twin_bin.as_deref(),
            Some(Path::new("/tmp/old/bench-server"))
        );
        let named = parse(&["--servers", "switchboard-twin", "--twin-bin", "b"]).unwrap();
        assert_eq!(
            named.servers,
            [Server::Switchboard, Server::SwitchboardTwin]
        );
        assert!(parse(&[]).unwrap().twin_bin.is_none());
        let twin = Server::SwitchboardTwin;
        assert_eq!(twin.label(None), "switchboard-twin (same build, A/A)");
        assert_eq!(
            twin.label(Some(Path::new("b"))),
            "switchboard-twin (other build, A/B)"
        );
    }

    #[test]
    fn options_default_and_parse() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.servers.len(), 4);
        assert_eq!((o.runs, o.slices, o.pin), (3, 3, PinChoice::Auto));
        assert_eq!(o.idle, [10_000, 50_000]);
        let o = parse(&["--smoke", "--secs", "3s", "--idle", "1_000,2000"]).unwrap();
        assert!(o.smoke);
        assert_eq!(o.servers, [Server::Switchboard, Server::Floor]);
        assert_eq!((o.runs, o.slices), (1, 1));
        assert_eq!(o.secs, 3.0);
        assert_eq!(parse(&["--slices", "5"]).unwrap().slices, 5);
        assert_eq!(o.idle, [1000, 2000]);
        let o = parse(&["--servers", "ws-node"]).unwrap();
        assert_eq!(o.servers, [Server::Switchboard, Server::WsNode]);
        assert!(parse(&["--bogus", "1"]).is_err());
        let o = parse(&["--scenarios", "send,cross-node"]).unwrap();
        assert_eq!(o.scenarios, [Scenario::Send, Scenario::CrossNode]);
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
        let o = parse(&["--runs", "5", "--pin", "--no-pin", "--server-cores", "0-1"]).unwrap();
        assert_eq!((o.runs, o.pin), (5, PinChoice::Off));
        assert_eq!(o.server_cores, Some(vec![0, 1]));
        assert_eq!(parse(&["--no-pin", "--pin"]).unwrap().pin, PinChoice::On);
        assert!(parse(&["--client-cores", "x"]).is_err());
    }

    #[test]
    fn echo_and_send_take_turns_and_a_pinned_client_spins() {
        let mut o = parse(&[]).unwrap();
        assert_eq!(o.phase_ms, 250);
        assert!(o.phased(Scenario::Echo) && o.phased(Scenario::Send));
        assert!(o.phased(Scenario::Broadcast) && !o.phased(Scenario::Handshake));
        assert_eq!(
            (o.turn_ms(Scenario::Echo), o.turn_ms(Scenario::Broadcast)),
            (250, 1000)
        );
        assert!(!parse(&["--phase-ms", "0"]).unwrap().phased(Scenario::Echo));
        // Spinning needs a core of the client's own.
        assert!(!o.client_spins(), "not pinned yet");
        o.pinning = Pinning::Pinned {
            taskset: "taskset".into(),
            server: vec![0],
            client: vec![1],
        };
        assert!(o.client_spins());
        o.client_sleeps = true;
        assert!(!o.client_spins());
        assert!(parse(&["--client-sleeps"]).unwrap().client_sleeps);
    }
}
