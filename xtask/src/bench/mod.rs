//! `cargo xtask bench`: the load benchmark. One Rust client (`bench-client`), the same for
//! every server, against Switchboard (`bench-server`), its floor (`bench-server --floor`: the
//! transport alone), `ws-node` and `uws-node` (`benches/peers/`), in one run; one table per
//! scenario with ratios to Switchboard, and the targets' verdicts at the end.
//!
//! Every server runs as its own process on a free port of 127.0.0.1, started and stopped by
//! PID, once per round. Each scenario runs `--runs` rounds (3); in a round each server's run
//! is measured in `--slices` slices (3) that take turns with the other servers' slices, so
//! that a change in the shared machine's speed falls on every server alike; the report gives
//! medians and ranges over the rounds, and a target is met only if its worst round meets it. Servers and client are pinned to different cores
//! (`pinning`) when the machine allows it. The clients bind 127.x.y.z source addresses so
//! that tens of thousands of sockets do not run out of ephemeral ports. `--smoke` is what CI
//! runs: every scenario once for about two seconds, small N, Switchboard and the floor only;
//! it fails on errors, never on speed.
//!
//! `cross-node` runs Switchboard alone (the peers have no NATS): its own nats-server on a free
//! port (started and stopped by PID), `bench-server --nats`, and a plain NATS client in
//! `bench-client` publishing to `socket:send`. `cross-cluster` is the same across a NATS
//! cluster: two nats-servers routed to each other, the node on one, the publisher on the other.

mod client;
mod instructions;
mod options;
mod pinning;
mod processes;
mod report;
mod scenarios;
mod turns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub(crate) use instructions::{run as instructions, InstructionsArgs};
pub(crate) use options::Args;

use crate::run as cmd;
use options::{parse_words, Options, Scenario};
use report::Report;
use scenarios::{cross_cluster, cross_node, idle, measured};

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

/// `cargo xtask bench [options]`; `words` are the options as given, for the report.
pub(crate) fn run(args: &Args, words: &[String]) -> Result {
    let mut o = Options::new(args);
    if let Some(typed) = o.twin_bin.take() {
        let other = crate::users_path(&typed);
        if !other.is_file() {
            return Err(format!("--twin-bin {}: no such file", other.display()));
        }
        // The build step would overwrite it with this build: the A/B would be an A/A.
        let own = bin(&o.profile, "bench-server");
        if std::fs::canonicalize(&other).ok() == std::fs::canonicalize(&own).ok() {
            return Err(format!(
                "--twin-bin {} is this build's own bench-server; copy the other build elsewhere",
                other.display()
            ));
        }
        o.twin_bin = Some(other);
    }
    o.pinning = pinning::decide(&o, &pinning::allowed_cores(), pinning::find_taskset())?;
    println!("bench: {}", o.pinning.describe());
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
    report.verdict_section(&o);
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
/// Switchboard (and the floor where it applies), pinned when the machine allows it.
/// `cargo bench --no-run` also builds the bench binaries (benches may run them), in the same
/// profile, so the smoke run needs no second build. CI builds them in the dev profile: it
/// reuses what `cargo test --workspace` has built and adds about a minute, where the release
/// profile would add about five on this machine; the smoke run never judges speed.
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
