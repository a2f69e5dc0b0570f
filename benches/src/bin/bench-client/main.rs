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
//! The last line on stdout is `RESULT k=v ...` (read by `cargo xtask bench`); it includes the
//! client's own CPU use (`client_cpu`, in cores) and the server's (`server_cpu`, given its
//! PID), so a run can tell when the client, not the server, was the bottleneck, and the cores
//! the client may run on (`cores`, as `/proc/self/status` lists them), so a pinned run can
//! be checked.

mod broadcast;
mod cross_node;
mod handshake;
mod idle;
mod measure;
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
        Ok(line) => {
            let cores = switchboard_bench::procfs::allowed_cpus().unwrap_or_else(|| "?".into());
            println!("{line} cores={cores}");
            let _ = std::io::stdout().flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<String, String> {
    if !cli.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", cli.addr));
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
    });
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
        } => {
            broadcast::broadcast(
                run,
                subscribers,
                inflight,
                max_broadcasts,
                cli.warmup,
                cli.secs,
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
