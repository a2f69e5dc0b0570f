//! Runs `bench-client`: its command line per scenario and the `RESULT` line it prints.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::options::{Options, Scenario};
use super::pinning::Role;
use super::processes::{wait_bounded, Running};
use super::{bin, Figures, Result, SECRET};

/// The client's arguments shared by every scenario.
pub(super) fn client_command(o: &Options, target: &Running) -> Command {
    let mut c = o
        .pinning
        .command(Role::Client, bin(&o.profile, "bench-client"));
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
    if o.client_spins() {
        c.arg("--spin");
    }
    c
}

pub(super) fn scenario_args(o: &Options, scenario: Scenario) -> Vec<String> {
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
pub(super) fn parse_result(line: &str) -> Option<Figures> {
    let rest = line.strip_prefix("RESULT")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Runs the client once against `target` and returns its figures; with `samples`, the client
/// pools its latency samples in that file (`--samples-file`).
pub(super) fn run_client(
    o: &Options,
    target: &Running,
    scenario: Scenario,
    samples: Option<&Path>,
) -> Result<Figures> {
    let args = scenario_args(o, scenario);
    let mut command = client_command(o, target);
    if let Some(path) = samples {
        command.arg("--samples-file").arg(path);
    }
    command.args(&args);
    let limit = Duration::from_secs_f64(o.warmup + o.secs + 180.0);
    let (status, lines) = run_for_lines(command, limit)?;
    let figures = lines.iter().rev().find_map(|l| parse_result(l));
    match (status.success(), figures) {
        (true, Some(f)) => Ok(f),
        (_, _) => Err(format!("client {} exited with {status}", args[0])),
    }
}

/// Runs the client `command` for at most `limit`; its exit status and the lines it printed.
fn run_for_lines(mut command: Command, limit: Duration) -> Result<(ExitStatus, Vec<String>)> {
    let mut child = command
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
    let status = wait_bounded(&mut child, limit)?;
    Ok((status, reader.join().unwrap_or_default()))
}

/// Runs one client that loads every server of `targets` in turns of `o.phase_ms` (echo and
/// send) and returns each server's figures, in the same order.
pub(super) fn run_client_phased(
    o: &Options,
    targets: &[&Running],
    scenario: Scenario,
) -> Result<Vec<Figures>> {
    let first = targets.first().ok_or("no server to measure")?;
    let args = scenario_args(o, scenario);
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("127.0.0.1:{}/{}", t.port, t.pid()))
        .collect();
    let mut command = client_command(o, first);
    command
        .arg("--targets")
        .arg(list.join(","))
        .arg("--phase-ms")
        .arg(o.phase_ms.to_string())
        .arg("--turn-order")
        .arg(
            super::scenarios::turn_cycle(targets.len())
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .args(&args);
    let limit = Duration::from_secs_f64(o.warmup + o.secs * targets.len() as f64 + 180.0);
    let (status, lines) = run_for_lines(command, limit)?;
    let figures: Vec<Figures> = lines.iter().filter_map(|l| parse_result(l)).collect();
    let in_order = figures.len() == targets.len()
        && figures
            .iter()
            .enumerate()
            .all(|(k, f)| f.get("target") == Some(&k.to_string()));
    match (status.success(), in_order) {
        (true, true) => Ok(figures),
        (true, false) => Err(format!(
            "client {} gave {} results for {} servers",
            args[0],
            figures.len(),
            targets.len()
        )),
        (false, _) => Err(format!("client {} exited with {status}", args[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::super::options::parse_words;
    use super::*;

    #[test]
    fn scenario_args_and_results_read() {
        let o = Options::new(&parse_words(&["--scenarios", "send,cross-node"]).unwrap());
        assert_eq!(scenario_args(&o, Scenario::CrossNode)[0], "cross-node");
        let f = parse_result("RESULT rate=1234 p99_us=10.5 errors=0").unwrap();
        assert_eq!(f["rate"], "1234");
        assert_eq!(parse_result("READY sockets=3"), None);
    }
}
