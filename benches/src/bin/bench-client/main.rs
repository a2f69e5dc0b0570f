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
//! PID), so a run can tell when the client, not the server, was the bottleneck.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout_at;

use switchboard_bench::client::{self, Endpoint};
use switchboard_bench::stats::Samples;
use switchboard_bench::wire::{self, Kind, Stamp, Template};
use switchboard_bench::{procfs, result_line, DEFAULT_SECRET, NAMESPACE, SECRET_ENV};

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

/// The shared setup of a run.
struct Run {
    ep: Endpoint,
    sources: Vec<IpAddr>,
    secret: String,
    server_pid: Option<u32>,
    connect_concurrency: usize,
    payload: usize,
}

impl Run {
    fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

/// The timeline of a measured run, fixed once every socket is connected.
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
    warm: Instant,
    end: Instant,
    /// No run goes on past this, whatever is still in flight.
    hard: Instant,
}

impl Clock {
    fn start(warmup: f64, secs: f64) -> Clock {
        let base = Instant::now();
        let warm = base + Duration::from_secs_f64(warmup.max(0.0));
        let end = warm + Duration::from_secs_f64(secs.max(0.1));
        Clock {
            base,
            warm,
            end,
            hard: end + Duration::from_secs(5),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.base).as_nanos() as u64
    }

    fn measured(&self, t: Instant) -> bool {
        t >= self.warm && t < self.end
    }

    fn window_secs(&self) -> f64 {
        (self.end - self.warm).as_secs_f64()
    }
}

/// CPU of client and server over the measured window, sampled by a task of its own.
fn sample_cpu(clock: Clock, server_pid: Option<u32>) -> JoinHandle<(Option<f64>, Option<f64>)> {
    tokio::spawn(async move {
        tokio::time::sleep_until(clock.warm.into()).await;
        let (c0, s0, t0) = (
            procfs::cpu_ticks(None),
            server_pid.and_then(|p| procfs::cpu_ticks(Some(p))),
            Instant::now(),
        );
        tokio::time::sleep_until(clock.end.into()).await;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = procfs::cpu_ticks(None);
        let s1 = server_pid.and_then(|p| procfs::cpu_ticks(Some(p)));
        (procfs::cores(c0, c1, secs), procfs::cores(s0, s1, secs))
    })
}

fn fmt_cores(c: Option<f64>) -> String {
    c.map_or("na".into(), |c| format!("{c:.2}"))
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
            println!("{line}");
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
    });
    match cli.scenario {
        Scenario::Echo { sockets, inflight } => {
            roundtrips(run, Kind::Echo, sockets, inflight, cli.warmup, cli.secs).await
        }
        Scenario::Send { sockets, inflight } => {
            roundtrips(run, Kind::Send, sockets, inflight, cli.warmup, cli.secs).await
        }
        Scenario::Broadcast {
            subscribers,
            inflight,
            max_broadcasts,
        } => {
            broadcast(
                run,
                subscribers,
                inflight,
                max_broadcasts,
                cli.warmup,
                cli.secs,
            )
            .await
        }
        Scenario::Idle { sockets, hold } => idle(run, sockets, hold).await,
        Scenario::CrossNode {
            nats,
            sockets,
            inflight,
        } => cross_node(run, &nats, sockets, inflight, cli.warmup, cli.secs).await,
        Scenario::Handshake {
            concurrency,
            tokens,
        } => handshakes(run, concurrency, tokens, cli.warmup, cli.secs).await,
    }
}

type Ws = WebSocket<TcpStream>;

/// Opens socket `i` as `user-{i}`, retrying up to three times.
async fn open_one(run: &Run, i: usize) -> Result<Ws, String> {
    let token = switchboard_bench::mint_token(&run.secret, &format!("user-{i}"), 3600);
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        let connect = client::connect(&run.ep, run.source(i), &token);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(format!("socket {i}: {last}"))
}

/// Opens `n` sockets, `user-{i}` each, at most `connect_concurrency` at a time. Fails if any
/// cannot be opened.
async fn open_sockets(run: &Arc<Run>, n: usize) -> Result<Vec<Ws>, String> {
    let gate = Arc::new(Semaphore::new(run.connect_concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let run = run.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            open_one(&run, i).await
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(ws)) => sockets.push(ws),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(format!(
            "{} of {n} sockets failed to open (first: {})",
            failures.len(),
            failures[0]
        ));
    }
    eprintln!(
        "bench-client: {n} sockets open in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(sockets)
}

async fn send_text(ws: &mut Ws, scratch: &mut [u8]) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::text(Payload::BorrowedMut(scratch)))
        .await
}

/// What one round-trip worker saw.
#[derive(Default)]
struct Tally {
    samples: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    /// Waits for every worker and adds up what they saw (a worker that panicked counts as an
    /// error); reports the first error on stderr.
    async fn join_all(workers: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
        let mut total = Tally::default();
        for w in workers {
            match w.await {
                Ok(t) => {
                    total.samples.extend(t.samples);
                    total.errors += t.errors;
                    total.first_error = total.first_error.or(t.first_error);
                }
                Err(e) => total.error(e),
            }
        }
        if let Some(e) = &total.first_error {
            eprintln!("bench-client: {} errors, first: {e}", total.errors);
        }
        total
    }
}

/// Scenarios 1 and 3: each socket keeps `inflight` messages out and counts the answers.
async fn roundtrips(
    run: Arc<Run>,
    kind: Kind,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let sockets = open_sockets(&run, n.max(1)).await?;
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let expect = match kind {
        Kind::Echo => "bench:echo",
        _ => "bench.send",
    };
    let workers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let template = Template::new(kind, &format!("user-{i}"), run.payload);
            tokio::spawn(roundtrip_worker(
                ws,
                template,
                expect,
                inflight.max(1),
                clock,
                i as u32,
            ))
        })
        .collect();
    let Tally {
        samples: all,
        errors,
        ..
    } = Tally::join_all(workers).await;
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    let samples = Samples::new(all);
    Ok(result_line(&[
        (
            "scenario",
            if kind == Kind::Echo { "echo" } else { "send" }.into(),
        ),
        ("sockets", n.to_string()),
        ("inflight", inflight.to_string()),
        ("count", samples.len().to_string()),
        (
            "rate",
            format!("{:.0}", samples.len() as f64 / clock.window_secs()),
        ),
        ("p50_us", format!("{:.1}", samples.percentile_us(50.0))),
        ("p99_us", format!("{:.1}", samples.percentile_us(99.0))),
        ("p999_us", format!("{:.1}", samples.percentile_us(99.9))),
        ("client_cpu", fmt_cores(client_cpu)),
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", errors.to_string()),
    ]))
}

async fn roundtrip_worker(
    mut ws: Ws,
    template: Template,
    expect: &'static str,
    inflight: usize,
    clock: Clock,
    me: u32,
) -> Tally {
    let mut tally = Tally::default();
    let mut scratch = Vec::with_capacity(template.len());
    let mut pending = 0usize;
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now < clock.end {
            while pending < inflight {
                let stamp = Stamp {
                    sent_ns: clock.ns(Instant::now()),
                    seq,
                    from: me,
                };
                template.stamped_into(stamp, &mut scratch);
                if let Err(e) = send_text(&mut ws, &mut scratch).await {
                    tally.error(e);
                    return tally;
                }
                pending += 1;
                seq += 1;
            }
        } else if pending == 0 {
            break;
        }
        let frame = match timeout_at(clock.hard.into(), ws.read_frame()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tally.error(e);
                return tally;
            }
            Err(_) => {
                tally.error(format!("{pending} answers never came"));
                return tally;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                let at = Instant::now();
                pending = pending.saturating_sub(1);
                match (
                    wire::frame_type(&frame.payload),
                    wire::read_stamp(&frame.payload),
                ) {
                    (Some(t), Some(stamp)) if t == expect && stamp.from == me => {
                        if clock.measured(at) {
                            tally
                                .samples
                                .push(clock.ns(at).saturating_sub(stamp.sent_ns));
                        }
                    }
                    _ => tally.error(format!(
                        "unexpected frame: {}",
                        String::from_utf8_lossy(&frame.payload)
                    )),
                }
            }
            OpCode::Close => {
                tally.error("server closed the socket");
                return tally;
            }
            _ => {}
        }
    }
    let _ = ws.write_frame(Frame::close(1000, b"")).await;
    tally
}

/// Scenario 6: each socket's messages come from a plain NATS client (this process) publishing
/// `{"username":U,"type":"bench","payload":P}` to `socket:send`, through nats-server and the
/// Switchboard node on the NATS bus, to the socket. Latency is publish to socket read.
async fn cross_node(
    run: Arc<Run>,
    nats: &str,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let url = nats.trim_start_matches("nats://");
    let host = url.rsplit_once(':').map_or(url, |(h, _)| h);
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!("{nats} is not a loopback address"));
    }
    let publisher = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(nats))
        .await
        .map_err(|_| format!("{nats}: no connection within 10 s"))?
        .map_err(|e| format!("{nats}: {e}"))?;
    let n = n.max(1);
    let sockets = open_sockets(&run, n).await?;
    // One echo each proves every socket is registered before the first publish.
    let probes: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(probe(ws, i as u32, run.payload)))
        .collect();
    let mut proven = Vec::with_capacity(n);
    for p in probes {
        match p.await {
            Ok(Ok(ws)) => proven.push(ws),
            Ok(Err(e)) => return Err(format!("a socket failed its first echo: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let workers: Vec<_> = proven
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let template = Template::new(Kind::Nats, &format!("user-{i}"), run.payload);
            tokio::spawn(cross_worker(
                ws,
                publisher.clone(),
                template,
                inflight.max(1),
                clock,
                i as u32,
            ))
        })
        .collect();
    let Tally {
        samples: all,
        errors,
        ..
    } = Tally::join_all(workers).await;
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    let samples = Samples::new(all);
    Ok(result_line(&[
        ("scenario", "cross-node".into()),
        ("sockets", n.to_string()),
        ("inflight", inflight.to_string()),
        ("count", samples.len().to_string()),
        (
            "rate",
            format!("{:.0}", samples.len() as f64 / clock.window_secs()),
        ),
        ("p50_us", format!("{:.1}", samples.percentile_us(50.0))),
        ("p99_us", format!("{:.1}", samples.percentile_us(99.0))),
        ("p999_us", format!("{:.1}", samples.percentile_us(99.9))),
        ("client_cpu", fmt_cores(client_cpu)),
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", errors.to_string()),
    ]))
}

/// One socket of the cross-node run: keeps `inflight` NATS publishes for its user
/// outstanding and reads them back from the socket.
async fn cross_worker(
    mut ws: Ws,
    nats: async_nats::Client,
    template: Template,
    inflight: usize,
    clock: Clock,
    me: u32,
) -> Tally {
    let mut tally = Tally::default();
    let mut scratch = Vec::with_capacity(template.len());
    let mut pending = 0usize;
    let mut seq = 0u64;
    loop {
        if Instant::now() < clock.end {
            while pending < inflight {
                let stamp = Stamp {
                    sent_ns: clock.ns(Instant::now()),
                    seq,
                    from: me,
                };
                template.stamped_into(stamp, &mut scratch);
                let body = bytes::Bytes::copy_from_slice(&scratch);
                if let Err(e) = nats.publish("socket:send", body).await {
                    tally.error(format!("publish: {e}"));
                    return tally;
                }
                pending += 1;
                seq += 1;
            }
        } else if pending == 0 {
            break;
        }
        let frame = match timeout_at(clock.hard.into(), ws.read_frame()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tally.error(e);
                return tally;
            }
            Err(_) => {
                tally.error(format!("{pending} messages never came"));
                return tally;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                let at = Instant::now();
                pending = pending.saturating_sub(1);
                match (
                    wire::frame_type(&frame.payload),
                    wire::read_stamp(&frame.payload),
                ) {
                    (Some("bench"), Some(stamp)) if stamp.from == me => {
                        if clock.measured(at) {
                            tally
                                .samples
                                .push(clock.ns(at).saturating_sub(stamp.sent_ns));
                        }
                    }
                    _ => tally.error(format!(
                        "unexpected frame: {}",
                        String::from_utf8_lossy(&frame.payload)
                    )),
                }
            }
            OpCode::Close => {
                tally.error("server closed the socket");
                return tally;
            }
            _ => {}
        }
    }
    let _ = ws.write_frame(Frame::close(1000, b"")).await;
    tally
}

/// Per-broadcast bookkeeping shared by the publisher and every subscriber.
struct Fanout {
    subscribers: u32,
    remaining: Vec<AtomicU32>,
    sent_ns: Vec<AtomicU64>,
    /// Broadcasts allowed in flight; the last subscriber to receive one gives its permit back.
    window: Semaphore,
    clock: Clock,
    deliveries: AtomicU64,
    time_to_all: Mutex<Vec<u64>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    failed: AtomicBool,
}

impl Fanout {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }

    fn delivered(&self, frame: &[u8]) {
        let at = Instant::now();
        let Some(stamp) = wire::read_stamp(frame) else {
            self.error(format!(
                "unexpected frame: {}",
                String::from_utf8_lossy(frame)
            ));
            return;
        };
        let Some(left) = self.remaining.get(stamp.seq as usize) else {
            self.error("broadcast sequence out of range");
            return;
        };
        if self.clock.measured(at) {
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let sent = self.sent_ns[stamp.seq as usize].load(Ordering::Acquire);
            if self.clock.measured(at) {
                self.time_to_all
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(self.clock.ns(at).saturating_sub(sent));
            }
            self.window.add_permits(1);
        }
    }
}

/// Scenario 2: broadcast fan-out to N subscribers.
async fn broadcast(
    run: Arc<Run>,
    n: usize,
    inflight: usize,
    max_broadcasts: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let n = n.max(1);
    let mut sockets = open_sockets(&run, n + 1).await?;
    let publisher = sockets.pop().expect("n + 1 sockets");

    // Prove that every subscriber is registered (open ran) before the first broadcast.
    let ready_started = Instant::now();
    let probes: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(probe(ws, i as u32, run.payload)))
        .collect();
    let mut subscribers = Vec::with_capacity(n);
    for p in probes {
        match p.await {
            Ok(Ok(ws)) => subscribers.push(ws),
            Ok(Err(e)) => return Err(format!("a subscriber failed its first echo: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    eprintln!(
        "bench-client: {n} subscribers answered in {:.2}s",
        ready_started.elapsed().as_secs_f64()
    );

    let clock = Clock::start(warmup, secs);
    let fan = Arc::new(Fanout {
        subscribers: n as u32,
        remaining: (0..max_broadcasts).map(|_| AtomicU32::new(0)).collect(),
        sent_ns: (0..max_broadcasts).map(|_| AtomicU64::new(0)).collect(),
        window: Semaphore::new(inflight.max(1)),
        clock,
        deliveries: AtomicU64::new(0),
        time_to_all: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        failed: AtomicBool::new(false),
    });
    let cpu = sample_cpu(clock, run.server_pid);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|ws| tokio::spawn(subscriber(ws, fan.clone())))
        .collect();

    let (mut pub_read, mut pub_write) = publisher.split(|s| s.into_split());
    // The publisher gets every broadcast too; read and drop them so its queue stays short.
    let drain = tokio::spawn(async move {
        let mut ignore = |_f: Frame<'_>| async { Ok::<_, WebSocketError>(()) };
        while let Ok(f) = pub_read.read_frame(&mut ignore).await {
            if f.opcode == OpCode::Close {
                break;
            }
        }
    });

    let template = Template::new(Kind::Broadcast, "", run.payload);
    let mut scratch = Vec::with_capacity(template.len());
    let mut sent = 0usize;
    while Instant::now() < clock.end && sent < max_broadcasts {
        match timeout_at(clock.end.into(), fan.window.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        fan.remaining[sent].store(fan.subscribers, Ordering::Release);
        fan.sent_ns[sent].store(clock.ns(Instant::now()), Ordering::Release);
        template.stamped_into(
            Stamp {
                sent_ns: clock.ns(Instant::now()),
                seq: sent as u64,
                from: n as u32,
            },
            &mut scratch,
        );
        if let Err(e) = pub_write
            .write_frame(Frame::text(Payload::BorrowedMut(&mut scratch)))
            .await
        {
            fan.error(format!("publisher: {e}"));
            break;
        }
        sent += 1;
    }
    // Let the broadcasts in flight land (bounded), then stop every reader.
    let all = inflight.max(1) as u32;
    let landed = timeout_at(clock.hard.into(), fan.window.acquire_many(all))
        .await
        .is_ok();
    if !landed {
        fan.error("some broadcasts never reached every subscriber");
    }
    for r in &readers {
        r.abort();
    }
    drain.abort();
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    if fan.failed.load(Ordering::Relaxed) {
        fan.error("a subscriber's socket ended early");
    }
    let tta = Samples::new(std::mem::take(
        &mut *fan.time_to_all.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let errors = fan.errors.load(Ordering::Relaxed);
    if let Some(e) = &*fan.first_error.lock().unwrap_or_else(|e| e.into_inner()) {
        eprintln!("bench-client: {errors} errors, first: {e}");
    }
    let deliveries = fan.deliveries.load(Ordering::Relaxed);
    Ok(result_line(&[
        ("scenario", "broadcast".into()),
        ("subscribers", n.to_string()),
        ("inflight", inflight.to_string()),
        ("broadcasts", sent.to_string()),
        ("complete", tta.len().to_string()),
        (
            "rate",
            format!("{:.0}", deliveries as f64 / clock.window_secs()),
        ),
        (
            "bps",
            format!("{:.1}", tta.len() as f64 / clock.window_secs()),
        ),
        ("p50_us", format!("{:.1}", tta.percentile_us(50.0))),
        ("p99_us", format!("{:.1}", tta.percentile_us(99.0))),
        ("p999_us", format!("{:.1}", tta.percentile_us(99.9))),
        ("client_cpu", fmt_cores(client_cpu)),
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", errors.to_string()),
    ]))
}

/// One echo round trip: proves the server has registered the socket.
async fn probe(mut ws: Ws, me: u32, payload: usize) -> Result<Ws, String> {
    let template = Template::new(Kind::Echo, "", payload);
    let mut scratch = Vec::new();
    template.stamped_into(
        Stamp {
            sent_ns: 0,
            seq: 0,
            from: me,
        },
        &mut scratch,
    );
    send_text(&mut ws, &mut scratch)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let frame = timeout_at(deadline.into(), ws.read_frame())
            .await
            .map_err(|_| "no echo within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        match frame.opcode {
            OpCode::Text if wire::frame_type(&frame.payload) == Some("bench:echo") => break,
            OpCode::Text => {
                return Err(format!(
                    "unexpected frame: {}",
                    String::from_utf8_lossy(&frame.payload)
                ))
            }
            OpCode::Close => return Err("closed".into()),
            _ => {}
        }
    }
    Ok(ws)
}

async fn subscriber(mut ws: Ws, fan: Arc<Fanout>) {
    loop {
        match ws.read_frame().await {
            Ok(f) if f.opcode == OpCode::Text => fan.delivered(&f.payload),
            Ok(f) if f.opcode == OpCode::Close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    fan.failed.store(true, Ordering::Relaxed);
}

/// Scenario 4: hold N proven sockets until told to stop. The caller reads the server's RSS
/// between `READY` and closing our stdin. Each socket is connected, proven with one echo and
/// then read (answering heartbeats) by its own task from the start, so a slow setup of many
/// sockets never misses a ping.
async fn idle(run: Arc<Run>, n: usize, hold: f64) -> Result<String, String> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(run.connect_concurrency));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let lost = Arc::new(AtomicU64::new(0));
    let holders: Vec<_> = (0..n)
        .map(|i| {
            let (run, gate, ready, lost) =
                (run.clone(), gate.clone(), ready_tx.clone(), lost.clone());
            tokio::spawn(async move {
                let permit = gate.acquire().await;
                let opened = match open_one(&run, i).await {
                    Ok(ws) => probe(ws, i as u32, run.payload).await,
                    Err(e) => Err(e),
                };
                drop(permit);
                let mut ws = match opened {
                    Ok(ws) => ws,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                // Answer heartbeats (auto-pong) until the socket or the process ends.
                while let Ok(f) = ws.read_frame().await {
                    if f.opcode == OpCode::Close {
                        break;
                    }
                }
                lost.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(format!("a socket failed to open or echo: {e}")),
            None => return Err("a socket task ended early".into()),
        }
    }
    let setup = started.elapsed().as_secs_f64();
    eprintln!("bench-client: {n} sockets open and proven in {setup:.2}s");
    println!("READY sockets={n} setup_s={setup:.2}");
    let _ = std::io::stdout().flush();

    // Hold until stdin closes (the orchestrator is done measuring) or `hold` passes.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = tx.send(());
    });
    let _ = tokio::time::timeout(Duration::from_secs_f64(hold.max(0.0)), rx).await;
    let lost = lost.load(Ordering::Relaxed);
    for h in holders {
        h.abort();
    }
    Ok(result_line(&[
        ("scenario", "idle".into()),
        ("sockets", n.to_string()),
        ("setup_s", format!("{setup:.2}")),
        ("errors", lost.to_string()),
    ]))
}

/// Scenario 5: handshakes per second. Each worker connects, upgrades with a JWT, and resets
/// the connection (linger 0: no TIME_WAIT to exhaust ports), again and again.
async fn handshakes(
    run: Arc<Run>,
    concurrency: usize,
    tokens: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..tokens.max(1))
            .map(|i| switchboard_bench::mint_token(&run.secret, &format!("user-{i}"), 3600))
            .collect(),
    );
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let run = run.clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = w;
                while Instant::now() < clock.end {
                    let t0 = Instant::now();
                    let token = &tokens[i % tokens.len()];
                    let attempt = timeout_at(
                        clock.hard.into(),
                        client::handshake(&run.ep, run.source(i), token),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(stream)) => {
                            let at = Instant::now();
                            if clock.measured(at) {
                                tally.samples.push((at - t0).as_nanos() as u64);
                            }
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        }
                        Ok(Err(e)) => {
                            tally.error(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => {
                            tally.error("handshake timed out");
                            break;
                        }
                    }
                    i += concurrency;
                }
                tally
            })
        })
        .collect();
    let Tally {
        samples: all,
        errors,
        ..
    } = Tally::join_all(workers).await;
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    let samples = Samples::new(all);
    Ok(result_line(&[
        ("scenario", "handshake".into()),
        ("concurrency", concurrency.to_string()),
        ("count", samples.len().to_string()),
        (
            "rate",
            format!("{:.0}", samples.len() as f64 / clock.window_secs()),
        ),
        ("p50_us", format!("{:.1}", samples.percentile_us(50.0))),
        ("p99_us", format!("{:.1}", samples.percentile_us(99.0))),
        ("p999_us", format!("{:.1}", samples.percentile_us(99.9))),
        ("client_cpu", fmt_cores(client_cpu)),
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", errors.to_string()),
    ]))
}
