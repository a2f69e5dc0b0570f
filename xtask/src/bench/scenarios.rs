//! The scenarios: measured rounds over the servers, cross-node and cross-cluster through
//! NATS, and idle memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::client::{client_command, parse_result, run_client, scenario_args};
use super::options::{Options, Scenario, Server};
use super::processes::{nats_pair, wait_bounded, wait_for_route_interest, NatsServer, Running};
use super::report::Report;
use super::{Figures, Result};

/// Scenarios 1, 2, 3, 5, 6 and 7: `o.runs` rounds, each running every server once in turn
/// (switchboard, floor, ws-node, uws-node, then again), a fresh server process each time, the
/// same client run against each. Interleaving spreads whatever else the machine does over
/// every server alike, and each round's ratios compare runs minutes apart at most.
pub(super) fn measured(o: &Options, scenario: Scenario, report: &mut Report) -> Result {
    let mut rows: Vec<(Server, Vec<Option<Figures>>)> = o
        .servers
        .iter()
        .filter(|s| s.runs(scenario))
        .map(|&s| (s, Vec::new()))
        .collect();
    for round in 1..=o.runs {
        for (server, rounds) in &mut rows {
            println!(
                "bench: {} against {} (round {round} of {}) ...",
                scenario_args(o, scenario).join(" "),
                server.name(),
                o.runs
            );
            rounds.push(measure_once(o, *server, scenario, report));
        }
    }
    report.table(o, scenario, &rows);
    Ok(())
}

/// One run of `scenario` against a fresh `server`; a failure goes to the report's failures.
fn measure_once(
    o: &Options,
    server: Server,
    scenario: Scenario,
    report: &mut Report,
) -> Option<Figures> {
    let result = Running::start(o, server).and_then(|running| {
        // Let the server settle (JIT warm-up is part of the measured warm-up).
        std::thread::sleep(Duration::from_millis(300));
        if let Some((_, monitor)) = &o.publisher_nats {
            wait_for_route_interest(*monitor, "socket:send")?;
        }
        let mut f = run_client(o, &running, scenario)?;
        f.insert(
            "server_cores".into(),
            running.cores.clone().unwrap_or_else(|| "?".into()),
        );
        Ok(f)
    });
    let what = format!("{scenario:?} on {}", server.name());
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
                report
                    .failures
                    .push(format!("{what}: {errors} errors, {count} measured"));
            }
            report.check_cores(o, server, f, &what);
        }
        Err(e) => {
            println!("bench:   failed: {e}");
            report.failures.push(format!("{what}: {e}"));
        }
    }
    result.ok()
}

/// Scenario 6: `send` through NATS from a plain NATS client, Switchboard only.
pub(super) fn cross_node(o: &Options, report: &mut Report) -> Result {
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

/// Scenario 7: `cross-node` across a NATS cluster: the node on one server, the publisher on
/// the other, every message over the route between them.
pub(super) fn cross_cluster(o: &Options, report: &mut Report) -> Result {
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

fn fmt_figures(f: &Figures) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one idle measurement found.
pub(super) struct IdleRow {
    pub(super) sockets: usize,
    pub(super) processes: usize,
    pub(super) before_kib: u64,
    pub(super) after_kib: u64,
}

impl IdleRow {
    pub(super) fn bytes_per_socket(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 * 1024.0 / self.sockets as f64
    }
}

/// Scenario 4: RSS per connected, authenticated socket. More sockets than one process may
/// hold are spread over several server processes (and as many client processes), and the
/// RSS of all of them is added up. Measured once whatever `--runs` says: it moves within 3%
/// from run to run, and a round at 50,000 sockets takes minutes.
pub(super) fn idle(o: &Options, report: &mut Report) -> Result {
    for &size in &o.idle {
        let processes = size.div_ceil(o.per_process).max(1);
        let mut rows = Vec::new();
        for &server in o.servers.iter().filter(|s| s.runs(Scenario::Idle)) {
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
