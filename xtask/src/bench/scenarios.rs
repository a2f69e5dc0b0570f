//! The scenarios: measured rounds over the servers, cross-node and cross-cluster through
//! NATS, and idle memory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::client::{client_command, parse_result, run_client, run_client_phased, scenario_args};
use super::options::{Options, Scenario, Server};
use super::processes::{nats_pair, wait_bounded, wait_for_route_interest, NatsServer, Running};
use super::report::Report;
use super::{Figures, Result};

/// Scenarios 1, 2, 3, 5, 6 and 7: `o.runs` rounds. In a round every server is started once
/// and measured in `o.slices` slices, the servers taking turns slice by slice (in the
/// orders of [`turn_order`]), and a server's slices add up to its run: rates and CPU are
/// averaged over the slices (equal windows), latency percentiles are taken over every
/// sample of the run (pooled by the client in a file). On a shared machine whose speed
/// changes from one ten-second stretch to the next, slices taken in turn put every server
/// through the same stretches, so a round's ratios compare like with like. Echo and send
/// go further (`measure_phased`): one client takes the servers in turns of a fraction of a
/// second.
pub(super) fn measured(o: &Options, scenario: Scenario, report: &mut Report) -> Result {
    let servers: Vec<Server> = o
        .servers
        .iter()
        .copied()
        .filter(|s| s.runs(scenario))
        .collect();
    let mut rows: Vec<(Server, Vec<Option<Figures>>)> =
        servers.iter().map(|&s| (s, Vec::new())).collect();
    for round in 1..=o.runs {
        let figures = measure_round(o, scenario, &servers, round, report);
        for ((_, runs), f) in rows.iter_mut().zip(figures) {
            runs.push(f);
        }
    }
    report.table(o, scenario, &rows);
    Ok(())
}

/// Warm-up of every slice but a server's first: the server is warm by then (JIT included),
/// only the client's new connections are not.
pub(super) const LATER_SLICE_WARMUP: f64 = 0.5;

/// After each slice, the servers must be quiet before the next slice starts on the same
/// core: the one just measured closes the client's sockets (10,000 of them after a
/// broadcast), and a Node server may collect its garbage. Quiet: at most one clock tick
/// (10 ms) of CPU among all of them in `QUIET_WINDOW`, waited for at most `QUIET_LIMIT`.
const QUIET_WINDOW: Duration = Duration::from_millis(200);
const QUIET_LIMIT: Duration = Duration::from_secs(5);

/// Waits until the running servers are quiet (see [`QUIET_WINDOW`]); false if they were not
/// within [`QUIET_LIMIT`].
fn settle(servers: &[Result<Running>]) -> bool {
    let ticks = || -> u64 {
        servers
            .iter()
            .flatten()
            .filter_map(Running::cpu_ticks)
            .sum()
    };
    let give_up = Instant::now() + QUIET_LIMIT;
    let mut before = ticks();
    while Instant::now() < give_up {
        std::thread::sleep(QUIET_WINDOW);
        let now = ticks();
        if now.saturating_sub(before) <= 1 {
            return true;
        }
        before = now;
    }
    false
}

/// One round: every server started once, then each server's run, in turns (echo and send)
/// or from its slices (`None` where it failed).
fn measure_round(
    o: &Options,
    scenario: Scenario,
    servers: &[Server],
    round: usize,
    report: &mut Report,
) -> Vec<Option<Figures>> {
    let started: Vec<Result<Running>> = servers
        .iter()
        .map(|&server| {
            let running = Running::start(o, server)?;
            if let Some((_, monitor)) = &o.publisher_nats {
                wait_for_route_interest(*monitor, "socket:send")?;
            }
            Ok(running)
        })
        .collect();
    // Let the servers settle (JIT warm-up is part of each first slice's warm-up).
    std::thread::sleep(Duration::from_millis(300));
    let runs = match scenario {
        _ if !o.phased(scenario) => measure_slices(o, scenario, servers, &started, round, report),
        Scenario::Broadcast => {
            super::turns::measure_turns(o, scenario, servers, &started, round, report)
        }
        _ => measure_phased(o, scenario, servers, &started, round, report),
    };
    drop(started);
    servers
        .iter()
        .zip(runs)
        .map(|(server, run)| {
            let what = format!("{scenario:?} on {} (round {round})", server.name());
            match &run {
                Ok(f) => {
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
                }
                Err(e) => report.failures.push(format!("{what}: {e}")),
            }
            run.ok()
        })
        .collect()
}

/// Echo and send: one client run loads every server of the round in turns of `o.phase_ms`
/// (`bench-client --targets`), each server getting `o.secs` of measured turns; a turn a
/// fraction of a second long puts every server through the same stretches of a machine
/// whose speed drifts over seconds, which slices of seconds did not.
fn measure_phased(
    o: &Options,
    scenario: Scenario,
    servers: &[Server],
    started: &[Result<Running>],
    round: usize,
    report: &mut Report,
) -> Vec<Result<Figures>> {
    let up: Vec<(usize, &Running)> = started
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|r| (i, r)))
        .collect();
    let names: Vec<&str> = up.iter().map(|&(i, _)| servers[i].name()).collect();
    println!(
        "bench: {} against {} in turns of {} ms (round {round} of {}) ...",
        scenario_args(o, scenario).join(" "),
        names.join(", "),
        o.phase_ms,
        o.runs,
    );
    if !settle(started) {
        println!("bench:   the servers were not quiet after {QUIET_LIMIT:?}; going on");
    }
    let targets: Vec<&Running> = up.iter().map(|&(_, r)| r).collect();
    let measured = run_client_phased(o, &targets, scenario);
    let mut runs: Vec<Result<Figures>> = started
        .iter()
        .map(|r| match r {
            Ok(_) => Err("not measured".to_string()),
            Err(e) => Err(e.clone()),
        })
        .collect();
    match measured {
        Ok(figures) => {
            for (&(i, running), f) in up.iter().zip(figures) {
                let what = format!("{scenario:?} on {} (round {round})", servers[i].name());
                runs[i] = Ok(taken(o, report, servers[i], running, f, &what));
            }
        }
        Err(e) => {
            println!("bench:   failed: {e}");
            for &(i, _) in &up {
                runs[i] = Err(e.clone());
            }
        }
    }
    runs
}

/// A server's figures as its client reported them: tagged with the cores the server was
/// allowed, printed, and checked against the pinning (`what` names the run in a failure).
pub(super) fn taken(
    o: &Options,
    report: &mut Report,
    server: Server,
    running: &Running,
    mut f: Figures,
    what: &str,
) -> Figures {
    f.insert(
        "server_cores".into(),
        running.cores.clone().unwrap_or_else(|| "?".into()),
    );
    println!("bench:   {}: {}", server.name(), fmt_figures(&f));
    report.check_cores(o, server, &f, what);
    f
}

/// The other scenarios: each server's run in `o.slices` slices, the servers taking turns
/// slice by slice; a run's figures from its slices (`merge_slices`).
fn measure_slices(
    o: &Options,
    scenario: Scenario,
    servers: &[Server],
    started: &[Result<Running>],
    round: usize,
    report: &mut Report,
) -> Vec<Result<Figures>> {
    let dir = o.report.parent().unwrap_or(Path::new(".")).join("samples");
    let pool_of = |server: Server| dir.join(format!("{}-round{round}.samples", server.name()));
    let mut slices: Vec<Result<Vec<Figures>>> = started
        .iter()
        .map(|r| r.as_ref().map(|_| Vec::new()).map_err(Clone::clone))
        .collect();
    let n = servers.len();
    for slice in 0..o.slices {
        for i in turn_order(n, (round - 1) * o.slices + slice) {
            let (Ok(running), Ok(done)) = (&started[i], &mut slices[i]) else {
                continue;
            };
            println!(
                "bench: {} against {} (round {round} of {}, slice {} of {}) ...",
                scenario_args(o, scenario).join(" "),
                servers[i].name(),
                o.runs,
                slice + 1,
                o.slices,
            );
            let mut sliced = o.clone();
            sliced.secs = o.secs / o.slices as f64;
            if slice > 0 {
                sliced.warmup = o.warmup.min(LATER_SLICE_WARMUP);
            }
            let pool = pool_of(servers[i]);
            let result = std::fs::create_dir_all(&dir)
                .and_then(|()| match slice {
                    0 => std::fs::remove_file(&pool).or_else(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    }),
                    _ => Ok(()),
                })
                .map_err(|e| format!("{}: {e}", pool.display()))
                .and_then(|()| run_client(&sliced, running, scenario, Some(&pool)));
            match result {
                Ok(f) => {
                    let what = format!(
                        "{scenario:?} on {} (round {round}, slice {})",
                        servers[i].name(),
                        slice + 1
                    );
                    done.push(taken(o, report, servers[i], running, f, &what));
                }
                Err(e) => {
                    println!("bench:   failed: {e}");
                    slices[i] = Err(e);
                }
            }
            if !settle(started) {
                println!("bench:   the servers were not quiet after {QUIET_LIMIT:?}; going on");
            }
        }
    }
    // The pooled samples are in each run's last slice's figures now.
    for server in servers {
        let _ = std::fs::remove_file(pool_of(*server));
    }
    slices
        .into_iter()
        .map(|run| run.and_then(|slices| merge_slices(&slices)))
        .collect()
}

/// The order in which `n` servers take their turns in the `index`th pass of a scenario: the
/// rows of a Williams square, which put every server in every place, and right after every
/// other server, equally often over whole cycles of rows (`n` passes for an even `n`, `2n`
/// for an odd one; the passes of a scenario are numbered across its rounds, so a run whose
/// rounds × slices is not a whole number of cycles is nearly, not exactly, balanced). A
/// plain rotation varies only the place: each server then always ran right after the same
/// other one, a bias the balanced order rules out. (It was not the cause of the offset the
/// same-build control showed on echo and send; docs/PERFORMANCE.md, fifth pass.)
fn turn_order(n: usize, index: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    // 0, 1, n-1, 2, n-2, ...: the differences between neighbours are all different mod n.
    let first: Vec<usize> = (0..n)
        .map(|j| match j {
            0 => 0,
            _ if j % 2 == 1 => j.div_ceil(2),
            _ => n - j / 2,
        })
        .collect();
    let rows = if n % 2 == 0 { n } else { 2 * n };
    let row = index % rows;
    let mut order: Vec<usize> = first.iter().map(|&s| (s + row % n) % n).collect();
    if row >= n {
        order.reverse();
    }
    order
}

/// The order in which `n` servers take turns, as a cycle to repeat: every server right after
/// every other one exactly once, and never right after itself (an Eulerian circuit of the
/// complete directed graph on the servers, `n × (n - 1)` turns). A server taking two turns
/// in a row would start its second with its sockets warm in the caches; with 10,000
/// subscribers that was worth 18% to the servers that did (forward-then-backward turns
/// repeat the first and the last server). One server: `[0]`.
pub(super) fn turn_cycle(n: usize) -> Vec<usize> {
    if n < 2 {
        return vec![0; n];
    }
    // Hierholzer's algorithm; `unused[a]`: the servers `a` has not yet been followed by.
    let mut unused: Vec<Vec<usize>> = (0..n)
        .map(|a| (0..n).rev().filter(|&b| b != a).collect())
        .collect();
    let (mut path, mut circuit) = (vec![0], Vec::with_capacity(n * (n - 1) + 1));
    while let Some(&at) = path.last() {
        match unused[at].pop() {
            Some(next) => path.push(next),
            None => circuit.extend(path.pop()),
        }
    }
    circuit.reverse();
    circuit.pop(); // back at the start: the cycle closes on its first server
    circuit
}

/// One run from its slices: rates and CPU averaged (the slices' windows are equal), counts
/// and errors added up, percentiles from the samples the last slice pooled with the earlier
/// ones; the rest (the scenario's parameters, the cores) from the first slice.
fn merge_slices(slices: &[Figures]) -> Result<Figures> {
    let (Some(first), Some(last)) = (slices.first(), slices.last()) else {
        return Err("no slice measured".into());
    };
    let mut run = first.clone();
    let number = |f: &Figures, key: &str| f.get(key).and_then(|v| v.parse::<f64>().ok());
    for key in ["rate", "bps", "client_cpu", "server_cpu", "server_sys_cpu"] {
        let values: Vec<f64> = slices.iter().filter_map(|f| number(f, key)).collect();
        if !values.is_empty() {
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let text = if key.ends_with("cpu") {
                format!("{mean:.2}")
            } else {
                format!("{mean:.1}")
            };
            run.insert(key.into(), text);
        }
    }
    for key in ["count", "complete", "broadcasts", "errors"] {
        if first.contains_key(key) {
            let total: f64 = slices.iter().filter_map(|f| number(f, key)).sum();
            run.insert(key.into(), format!("{total:.0}"));
        }
    }
    if last.contains_key("pooled_error") {
        return Err("the client could not pool its samples".into());
    }
    for p in ["p50_us", "p99_us", "p999_us"] {
        let pooled = last
            .get(&format!("pooled_{p}"))
            .ok_or_else(|| format!("the client reported no pooled_{p}"))?;
        run.insert(p.into(), pooled.clone());
    }
    run.insert("slices".into(), slices.len().to_string());
    Ok(run)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_cycle_has_every_server_after_every_other_once_and_never_after_itself() {
        assert_eq!(turn_cycle(0), Vec::<usize>::new());
        assert_eq!(turn_cycle(1), [0]);
        assert_eq!(turn_cycle(2), [0, 1]);
        for n in 2..=7 {
            let cycle = turn_cycle(n);
            assert_eq!(cycle.len(), n * (n - 1), "n = {n}");
            let mut pairs = std::collections::BTreeSet::new();
            for (i, &s) in cycle.iter().enumerate() {
                let next = cycle[(i + 1) % cycle.len()];
                assert_ne!(s, next, "n = {n}: {cycle:?}");
                assert!(pairs.insert((s, next)), "n = {n}: ({s}, {next}) twice");
            }
            assert_eq!(pairs.len(), n * (n - 1));
        }
    }

    #[test]
    fn turns_put_every_server_in_every_place_and_after_every_other_equally() {
        for n in 1..=7 {
            let rows = if n % 2 == 0 { n } else { 2 * n };
            let mut place = vec![vec![0; n]; n];
            let mut after = vec![vec![0; n]; n];
            for index in 0..rows {
                let order = turn_order(n, index);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..n).collect::<Vec<_>>(),
                    "n {n}: each server once"
                );
                for (k, &s) in order.iter().enumerate() {
                    place[s][k] += 1;
                }
                for pair in order.windows(2) {
                    after[pair[0]][pair[1]] += 1;
                }
            }
            let each = rows / n;
            assert!(
                place.iter().flatten().all(|&c| c == each),
                "n {n}: {place:?}"
            );
            for (a, row) in after.iter().enumerate() {
                for (b, &c) in row.iter().enumerate() {
                    assert_eq!(c, if a == b { 0 } else { each }, "n {n}: {a} then {b}");
                }
            }
        }
        assert_eq!(turn_order(4, 4), turn_order(4, 0), "the rows repeat");
    }

    #[test]
    fn a_run_adds_up_its_slices() {
        let slice = |rate: &str, cpu: &str, count: &str, p99: &str| -> Figures {
            [
                ("scenario", "echo"),
                ("rate", rate),
                ("server_cpu", cpu),
                ("client_cpu", "na"),
                ("count", count),
                ("errors", "0"),
                ("p99_us", "1.0"),
                ("pooled_p50_us", "5.0"),
                ("pooled_p99_us", p99),
                ("pooled_p999_us", "9.0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let run = merge_slices(&[
            slice("100", "0.90", "10", "7.0"),
            slice("200", "1.00", "20", "8.0"),
        ])
        .unwrap();
        assert_eq!(run["rate"], "150.0");
        assert_eq!(run["server_cpu"], "0.95");
        assert_eq!(run["client_cpu"], "na", "no figure stays no figure");
        assert_eq!(run["count"], "30");
        assert_eq!(run["p99_us"], "8.0", "the last slice's pooled percentile");
        assert_eq!(run["slices"], "2");
        assert_eq!(run["scenario"], "echo");
        let mut unpooled = slice("1", "1", "1", "1");
        unpooled.remove("pooled_p99_us");
        assert!(merge_slices(&[unpooled])
            .unwrap_err()
            .contains("pooled_p99_us"));
        assert!(merge_slices(&[]).is_err());
    }
}
