//! The load generator of the benchmark: one client, the same for every server.
//!
//! ```text
//! SWITCHBOARD_JWT_SECRET=... bench-client --addr 127.0.0.1:PORT [--server-pid PID] SCENARIO [knobs]
//!   echo       --sockets 100 --inflight 1     round trips through the echo handler
//!   send       --sockets 100 --inflight 1     round trips through the `send` topic (own user)
//!   broadcast  --subscribers 10000 --inflight 1   fan-out; time until every subscriber has it
//!   idle       --sockets 10000 --hold 120     connect, prove each socket, print READY, hold
//!   handshake  --concurrency 32               connect + JWT upgrade + reset, as fast as possible
//!   cross-node --nats URL --sockets 100 --inflight 1   a plain NATS client publishes to
//!              `socket:send`; the server (on the NATS bus) delivers to each socket's user
//! ```
//!
//! Every run is bounded: a warm-up, a measured window (`--warmup`, `--secs`), then at most a
//! few seconds of drain; `idle` holds until its standard input closes or `--hold` passes.
//! `echo` and `send` may also load several servers in one run (`--targets A/PID,B/PID,...`),
//! one at a time in turns of `--phase-ms` (see `phased.rs`): then there is one `RESULT` line
//! per server.
//!
//! The last line on stdout is `RESULT k=v ...` (read by `cargo xtask bench`); it includes the
//! client's own CPU use (`client_cpu`, in cores) and the server's (`server_cpu`, given its
//! PID, with `server_sys_cpu` its part in the kernel), so a run can tell when the client, not
//! the server, was the bottleneck, and how much of the server's work no user-space change can
//! touch; and the cores
//! the client may run on (`cores`, as `/proc/self/status` lists them), so a pinned run can
//! be checked.

mod broadcast;
mod cross_node;
mod handshake;
mod idle;
mod measure;
mod phased;
mod poller;
mod roundtrip;
mod sockets;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use switchboard_bench::client::{self, Endpoint};
use switchboard_bench::wire::{self, Kind};
use switchboard_bench::{DEFAULT_SECRET, NAMESPACE, SECRET_ENV};

use sockets::Run;

/// Switchboard's load generator.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's address (loopback only).
    #[arg(long, global = true, default_value = "127.0.0.1:4000")]
    addr: SocketAddr,
    /// The upgrade path.
    #[arg(long, global = true, default_value = switchboard_bench::PATH)]
    path: String,
    /// The server's PID, to report its CPU use.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Source addresses are PREFIX.1 ..= PREFIX.N ("" to let the kernel choose).
    #[arg(long, global = true, default_value = "127.1.0")]
    source_prefix: String,
    /// How many source addresses to spread sockets over.
    #[arg(long, global = true, default_value_t = 8)]
    sources: u8,
    /// Seconds of measurement (after the warm-up).
    #[arg(long, global = true, default_value_t = 5.0)]
    secs: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, global = true, default_value_t = 1.0)]
    warmup: f64,
    /// Client threads (1: a single-threaded runtime, cheapest per message).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Connections being opened at once while setting up.
    #[arg(long, global = true, default_value_t = 128)]
    connect_concurrency: usize,
    /// Append this run's latency (or time-to-all) samples to FILE and report the percentiles
    /// of all the samples in it too (`pooled_*`): runs measured in slices add up to one
    /// distribution.
    #[arg(long, global = true, value_name = "FILE")]
    samples_file: Option<std::path::PathBuf>,
    /// Payload bytes per message (at least 40, the stamp).
    #[arg(long, global = true, default_value_t = wire::DEFAULT_PAYLOAD)]
    payload: usize,
    /// echo, send and broadcast: poll without ever sleeping, for a client pinned to a core of
    /// its own. The server then never pays to wake the client, a cost that moves with how
    /// often the client happens to sleep; the polls that find nothing are timed and left out
    /// of `client_cpu` (reported as `client_idle`), so it still shows how busy the client was.
    #[arg(long, global = true)]
    spin: bool,
    /// echo and send: load these servers in one run, one at a time in turns of `--phase-ms`
    /// (`--turn-order`), instead of `--addr` alone; one `RESULT` line per server, in
    /// this order, with its `target` index. Each is ADDR or ADDR/PID (the PID to report the
    /// server's CPU); `--secs` is each server's share of the measured time.
    #[arg(long, global = true, value_delimiter = ',', value_parser = target)]
    targets: Vec<(SocketAddr, Option<u32>)>,
    /// The length of a turn with `--targets`, in milliseconds.
    #[arg(long, global = true, default_value_t = 250)]
    phase_ms: u64,
    /// The order of the turns with `--targets`, as target indexes, repeated (default: each in
    /// turn); `cargo xtask bench` passes one in which no target follows itself.
    #[arg(long, global = true, value_delimiter = ',')]
    turn_order: Vec<usize>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// N sockets send `echo`; the handler replies; messages/s and round-trip latency.
    Echo {
        /// Sockets.
        #[arg(long, default_value_t = 100)]
        sockets: usize,
        /// Messages in flight per socket.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
    },
    /// N sockets (one user each) send to their own user through the `send` topic.
    Send {
        /// Sockets (and users).
        #[arg(long, default_value_t = 100)]
        sockets: usize,
        /// Messages in flight per socket.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
    },
    /// A publisher socket triggers broadcasts; N subscribers receive them.
    Broadcast {
        /// Subscriber sockets.
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Broadcasts in flight (not yet received by every subscriber).
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        /// Upper bound on broadcasts in one run.
        #[arg(long, default_value_t = 200_000)]
        max_broadcasts: usize,
        /// Print `READY`, then broadcast in the turns standard input asks for (`turn MS 1|0`,
        /// then `end`), printing `DONE` after each: how `cargo xtask bench` takes several
        /// servers in turn, one client each. `--secs` and `--warmup` are then unused.
        #[arg(long)]
        turns: bool,
    },
    /// Opens N authenticated sockets, proves each with one echo, prints READY, holds.
    Idle {
        /// Sockets.
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// Longest hold in seconds (the hold ends earlier when stdin closes).
        #[arg(long, default_value_t = 120.0)]
        hold: f64,
    },
    /// N sockets (one user each) on a server that runs on the NATS bus; a plain NATS client
    /// in this process publishes to `socket:send` for each socket's user.
    CrossNode {
        /// The NATS server the Switchboard server uses (loopback).
        #[arg(long)]
        nats: String,
        /// Sockets (and users).
        #[arg(long, default_value_t = 100)]
        sockets: usize,
        /// Messages in flight per socket.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
    },
    /// Connect + upgrade with JWT + reset, by many workers at once.
    Handshake {
        /// Workers connecting at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Distinct tokens (users) to cycle through.
        #[arg(long, default_value_t = 1000)]
        tokens: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-client: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(lines) => {
            let cores = switchboard_bench::procfs::allowed_cpus().unwrap_or_else(|| "?".into());
            for line in lines {
                println!("{line} cores={cores}");
            }
            let _ = std::io::stdout().flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-client: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ADDR` or `ADDR/PID`.
fn target(v: &str) -> Result<(SocketAddr, Option<u32>), String> {
    let (addr, pid) = match v.split_once('/') {
        Some((a, p)) => (a, Some(p.parse().map_err(|e| format!("`{p}`: {e}"))?)),
        None => (v, None),
    };
    Ok((addr.parse().map_err(|e| format!("`{addr}`: {e}"))?, pid))
}

async fn run(cli: Cli) -> Result<Vec<String>, String> {
    for addr in std::iter::once(&cli.addr).chain(cli.targets.iter().map(|(a, _)| a)) {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr} is not a loopback address"));
        }
    }
    let run = Arc::new(Run {
        ep: Endpoint {
            addr: cli.addr,
            path: cli.path.clone(),
            namespace: NAMESPACE.into(),
        },
        sources: client::source_addresses(&cli.source_prefix, cli.sources)?,
        secret: std::env::var(SECRET_ENV).unwrap_or_else(|_| DEFAULT_SECRET.into()),
        server_pid: cli.server_pid,
        connect_concurrency: cli.connect_concurrency.max(1),
        payload: cli.payload,
        samples_file: cli.samples_file.clone(),
        spin: cli.spin,
    });
    if cli.targets.is_empty() {
        return one_target(run, cli).await.map(|line| vec![line]);
    }
    let (kind, sockets, inflight) = match cli.scenario {
        Scenario::Echo { sockets, inflight } => (Kind::Echo, sockets, inflight),
        Scenario::Send { sockets, inflight } => (Kind::Send, sockets, inflight),
        _ => return Err("--targets is for echo and send only".into()),
    };
    let runs = cli
        .targets
        .iter()
        .map(|&(addr, server_pid)| {
            let mut target = (*run).clone();
            target.ep.addr = addr;
            target.server_pid = server_pid;
            Arc::new(target)
        })
        .collect();
    let turns = phased::Turns {
        phase: std::time::Duration::from_millis(cli.phase_ms),
        order: cli.turn_order.clone(),
    };
    phased::phased_roundtrips(runs, kind, sockets, inflight, cli.warmup, cli.secs, turns).await
}

/// A scenario against the one server at `--addr`.
async fn one_target(run: Arc<Run>, cli: Cli) -> Result<String, String> {
    match cli.scenario {
        Scenario::Echo { sockets, inflight } => {
            roundtrip::roundtrips(run, Kind::Echo, sockets, inflight, cli.warmup, cli.secs).await
        }
        Scenario::Send { sockets, inflight } => {
            roundtrip::roundtrips(run, Kind::Send, sockets, inflight, cli.warmup, cli.secs).await
        }
        Scenario::Broadcast {
            subscribers,
            inflight,
            max_broadcasts,
            turns,
        } => {
            broadcast::broadcast(
                run,
                subscribers,
                inflight,
                max_broadcasts,
                cli.warmup,
                cli.secs,
                turns,
            )
            .await
        }
        Scenario::Idle { sockets, hold } => idle::idle(run, sockets, hold).await,
        Scenario::CrossNode {
            nats,
            sockets,
            inflight,
        } => cross_node::cross_node(run, &nats, sockets, inflight, cli.warmup, cli.secs).await,
        Scenario::Handshake {
            concurrency,
            tokens,
        } => handshake::handshakes(run, concurrency, tokens, cli.warmup, cli.secs).await,
    }
}
