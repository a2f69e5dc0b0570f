//! Broadcast in turns: one client per server (each holds its 10,000 subscribers, more than
//! one process may hold for four servers), all connected at once, and this process asking
//! one client at a time for a turn (`bench-client broadcast --turns`). Like echo and send's
//! turns within one client (`run_client_phased`), every server is measured across the same
//! stretches of a machine whose speed drifts over seconds.

use std::io::Write;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use super::client::{client_command, parse_result, scenario_args};
use super::options::{Options, Scenario, Server};
use super::processes::{lines, wait_bounded, Killed, Running};
use super::report::Report;
use super::scenarios::{taken, turn_cycle};
use super::{Figures, Result};

/// How long a client may take to open and prove its subscribers.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// How long a turn may run past its length (the broadcasts out reach everyone).
const TURN_GRACE: Duration = Duration::from_secs(30);

/// One server's client, waiting for turns.
struct Turned {
    child: Killed,
    stdin: ChildStdin,
    out: Receiver<String>,
}

/// Waits for a line from `out` starting with `what`; the lines before it are passed on.
fn expect(out: &Receiver<String>, what: &str, limit: Duration) -> Result<String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match out.recv_timeout(left) {
            Ok(line) if line.starts_with(what) => return Ok(line),
            Ok(line) => println!("bench:   {line}"),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no `{what}` from the client within {limit:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("the client ended before `{what}`"))
            }
        }
    }
}

impl Turned {
    /// Asks for one turn of `ms` and waits until it is done.
    fn turn(&mut self, ms: u64, measured: bool) -> Result {
        writeln!(self.stdin, "turn {ms} {}", u8::from(measured))
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the client's input: {e}"))?;
        expect(&self.out, "DONE", Duration::from_millis(ms) + TURN_GRACE).map(drop)
    }

    /// Ends the run and reads its figures.
    fn finish(self) -> Result<Figures> {
        let Turned {
            mut child,
            mut stdin,
            out,
        } = self;
        writeln!(stdin, "end").map_err(|e| format!("the client's input: {e}"))?;
        drop(stdin);
        let line = expect(&out, "RESULT", TURN_GRACE)?;
        let status = wait_bounded(&mut child.0, TURN_GRACE)?;
        match parse_result(&line) {
            Some(f) if status.success() => Ok(f),
            _ => Err(format!("the client exited with {status}")),
        }
    }
}

/// Broadcast: each server's run in turns of `o.turn_ms(scenario)`, after turns of warm-up
/// worth `o.warmup` seconds per server, until each has had `o.secs` of measured turns.
pub(super) fn measure_turns(
    o: &Options,
    scenario: Scenario,
    servers: &[Server],
    started: &[Result<Running>],
    round: usize,
    report: &mut Report,
) -> Vec<Result<Figures>> {
    let ms = o.turn_ms(scenario);
    let args = scenario_args(o, scenario);
    println!(
        "bench: {} against {} in turns of {ms} ms (round {round} of {}) ...",
        args.join(" "),
        servers
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        o.runs,
    );
    let mut clients: Vec<Result<Turned>> = started
        .iter()
        .map(|running| {
            let running = running.as_ref().map_err(Clone::clone)?;
            let mut child = client_command(o, running)
                .args(&args)
                .arg("--turns")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start the client: {e}"))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let out = lines(child.stdout.take().expect("piped stdout"));
            Ok(Turned {
                child: Killed(child),
                stdin,
                out,
            })
        })
        .collect();
    for client in &mut clients {
        if let Ok(c) = client {
            if let Err(e) = expect(&c.out, "READY", READY_LIMIT) {
                *client = Err(e);
            }
        }
    }
    let per_server = |secs: f64| (secs * 1000.0 / ms as f64).ceil() as usize;
    let (warm, measured) = (per_server(o.warmup), per_server(o.secs).max(1));
    // The cycle is over the servers whose client is ready (a server that fails later is
    // skipped: a turn may then follow one of its own).
    let up: Vec<usize> = (0..clients.len()).filter(|&k| clients[k].is_ok()).collect();
    let cycle: Vec<usize> = turn_cycle(up.len()).into_iter().map(|i| up[i]).collect();
    // Whole cycles of warm-up, then whole cycles measured: every server has as many turns of
    // each, and in the measured ones each comes right after every other equally often.
    let each_per_cycle = up.len().saturating_sub(1).max(1);
    let warm_cycles = warm.div_ceil(each_per_cycle);
    let cycles = warm_cycles + measured.div_ceil(each_per_cycle);
    let turns = (0..cycles).flat_map(|c| cycle.iter().map(move |&k| (c >= warm_cycles, k)));
    for (measured, k) in turns {
        if let Ok(c) = &mut clients[k] {
            if let Err(e) = c.turn(ms, measured) {
                println!("bench:   {} failed: {e}", servers[k].name());
                clients[k] = Err(e);
            }
        }
    }
    clients
        .into_iter()
        .zip(started)
        .zip(servers)
        .map(|((client, running), server)| {
            let f = client?.finish()?;
            // A client runs only for a server that started.
            let running = running.as_ref().map_err(Clone::clone)?;
            let what = format!("{scenario:?} on {} (round {round})", server.name());
            Ok(taken(o, report, *server, running, f, &what))
        })
        .collect()
}
