//! `cargo xtask instructions`: the user-space instructions `bench-server` runs per frame it
//! sends, counted by callgrind while `bench-client` drives a scenario.
//!
//! Messages per second on this shared 2-core machine swing by ±20% from run to run, so a
//! change that saves a tenth of the gateway's work cannot be seen in the load benchmark. An
//! instruction count can: the same binary under the same load counts the same within about
//! 1%, whatever else the machine does. It is the figure to compare two builds by
//! (`--server-bin` the old one), and the gateway's own cost is Switchboard's count minus the
//! floor's. It is not a speed: the kernel's part of a message (most of it on loopback) is not
//! counted, nor cache misses. Node peers are not counted (a JIT under valgrind says little).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser, ValueEnum};

use super::processes::{lines, wait_bounded, Killed};
use super::{bin, Result, SECRET};
use crate::{free_port, have};

/// `cargo xtask instructions [options]`.
#[derive(Debug, Parser)]
#[command(name = "instructions")]
pub(crate) struct InstructionsArgs {
    /// The scenarios [default: echo,send,broadcast]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    scenarios: Option<Vec<Kind>>,
    /// The servers [default: switchboard,floor]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set)]
    servers: Option<Vec<Counted>>,
    /// Seconds counted per run, after the sockets are open
    #[arg(long, value_name = "S", default_value_t = 8)]
    secs: u64,
    /// broadcast: subscribers (each costs the server a frame per broadcast)
    #[arg(long, value_name = "N", default_value_t = 2000)]
    subscribers: usize,
    /// The bench-server binary to count, e.g. an older build to compare with [default: the
    /// release build, built first]
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Do not build the bench binaries first
    #[arg(long)]
    no_build: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    Echo,
    Send,
    Broadcast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Counted {
    Switchboard,
    Floor,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Send => "send",
            Kind::Broadcast => "broadcast",
        }
    }

    /// The client's subcommand and its options.
    fn client_args(self, subscribers: usize) -> Vec<String> {
        let args = match self {
            Kind::Echo => vec!["echo", "--sockets", "100", "--inflight", "1"],
            Kind::Send => vec!["send", "--sockets", "100", "--inflight", "1"],
            Kind::Broadcast => vec!["broadcast", "--subscribers"],
        };
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        if self == Kind::Broadcast {
            args.push(subscribers.to_string());
        }
        args
    }
}

/// One counted run.
struct Count {
    frames: u64,
    instructions: u64,
}

pub(crate) fn run(args: &InstructionsArgs) -> Result {
    // callgrind_control and callgrind_annotate come with it.
    if !have("valgrind") {
        return Err("valgrind is missing: install it (apt install valgrind)".into());
    }
    if args.server_bin.is_none() && !args.no_build {
        super::build("release")?;
    }
    let server_bin = args
        .server_bin
        .as_deref()
        .map_or_else(|| bin("release", "bench-server"), crate::users_path);
    let scenarios = args
        .scenarios
        .clone()
        .unwrap_or(vec![Kind::Echo, Kind::Send, Kind::Broadcast]);
    let servers = args
        .servers
        .clone()
        .unwrap_or(vec![Counted::Switchboard, Counted::Floor]);
    let mut table = vec![
        format!(
            "User-space instructions per frame sent (callgrind, {} s counted; `{}`)\n",
            args.secs,
            server_bin.display()
        ),
        "| scenario | server | frames sent | instructions per frame |".into(),
        "|---|---|---:|---:|".into(),
    ];
    for &kind in &scenarios {
        for &server in &servers {
            let name = match server {
                Counted::Switchboard => "switchboard",
                Counted::Floor => "floor",
            };
            println!("instructions: {} on {name}", kind.name());
            let count = count_one(args, &server_bin, kind, server == Counted::Floor)?;
            table.push(format!(
                "| {} | {name} | {} | {:.0} |",
                kind.name(),
                count.frames,
                count.instructions as f64 / count.frames as f64
            ));
        }
    }
    let text = table.join("\n") + "\n";
    let out = PathBuf::from("target/bench/instructions.md");
    let _ = std::fs::create_dir_all("target/bench");
    std::fs::write(&out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("\n{text}\n(written to {})", out.display());
    Ok(())
}

/// Runs `kind` against the server under callgrind, counting only while the sockets are open
/// and busy.
fn count_one(args: &InstructionsArgs, server_bin: &Path, kind: Kind, floor: bool) -> Result<Count> {
    let port = free_port()?;
    let dump = PathBuf::from(format!(
        "target/bench/callgrind.{}.{}.out",
        kind.name(),
        if floor { "floor" } else { "switchboard" }
    ));
    let _ = std::fs::create_dir_all("target/bench");
    let _ = std::fs::remove_file(dump.with_extension("out.1"));
    let mut server = Command::new("valgrind");
    server
        .args(["--tool=callgrind", "--instr-atstart=no"])
        .arg(format!("--callgrind-out-file={}", dump.display()))
        .arg(server_bin)
        .arg(port.to_string());
    if floor {
        server.arg("--floor");
    }
    let mut server = Killed(
        server
            .env("SWITCHBOARD_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start valgrind: {e}"))?,
    );
    let listening = lines(server.0.stdout.take().expect("piped stdout"));
    match listening.recv_timeout(Duration::from_secs(120)) {
        Ok(line) if line.starts_with("listening") => {}
        _ => return Err("bench-server under valgrind did not start listening".into()),
    }
    let mut client = Command::new(bin("release", "bench-client"));
    client
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--secs", &(args.secs + 30).to_string(), "--warmup", "1"])
        .args(kind.client_args(args.subscribers))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut client = Killed(
        client
            .spawn()
            .map_err(|e| format!("cannot start bench-client: {e}"))?,
    );
    // The client says so on stderr once its sockets are open (broadcast: answered).
    let said = lines(client.0.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match said.recv_timeout(left) {
            Ok(line) if line.contains(" open in ") || line.contains(" answered in ") => break,
            Ok(_) => {}
            Err(_) => return Err("bench-client did not open its sockets within 180 s".into()),
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let pid = server.0.id().to_string();
    callgrind_control(&["-i", "on", &pid])?;
    std::thread::sleep(Duration::from_secs(args.secs));
    callgrind_control(&["-d", &pid])?;
    callgrind_control(&["-i", "off", &pid])?;
    drop(client);
    server.stop();
    // Every function, however small its share: `send` itself is a fraction of a percent.
    let annotated = Command::new("callgrind_annotate")
        .args(["--tree=caller", "--threshold=100"])
        .arg(dump.with_extension("out.1"))
        .output()
        .map_err(|e| format!("callgrind_annotate: {e}"))?;
    if !annotated.status.success() {
        return Err(format!(
            "callgrind_annotate failed: {}",
            String::from_utf8_lossy(&annotated.stderr).trim()
        ));
    }
    parse_annotation(&String::from_utf8_lossy(&annotated.stdout))
}

/// Total instructions, and the calls to libc's `send` (one per frame on a plain socket: the
/// scenarios' frames are all under the size sent with `sendmsg`).
fn parse_annotation(text: &str) -> Result<Count> {
    let number = |s: &str| s.replace(',', "").parse::<u64>().ok();
    let instructions = text
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(|l| number(l.split_whitespace().next()?))
        .ok_or("no totals in callgrind's output")?;
    // `--tree=caller`: a function's callers (`< ... (Nx)`) come just before its `*` line.
    let mut callers: Vec<u64> = Vec::new();
    let mut frames = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            callers.clear();
        } else if line.contains(" < ") {
            let calls = line
                .rsplit_once('(')
                .and_then(|(_, rest)| number(rest.split('x').next()?));
            callers.extend(calls);
        } else if line.contains(" * ") && line.contains("/send.c:send ") {
            frames += callers.iter().sum::<u64>();
        }
    }
    if frames == 0 {
        return Err("no frame was sent while counting".into());
    }
    Ok(Count {
        frames,
        instructions,
    })
}

/// Calls `callgrind_control` (bounded); fails if it does.
fn callgrind_control(args: &[&str]) -> Result {
    let mut child = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("callgrind_control: {e}"))?;
    let status = wait_bounded(&mut child, Duration::from_secs(30))?;
    if !status.success() {
        return Err(format!(
            "callgrind_control {} failed ({status})",
            args.join(" ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_the_calls_to_send_and_totals_are_read() {
        let text = "\
--------------------------------------------------------------------------------
100,000 (100.0%)  PROGRAM TOTALS

1,000 ( 1.0%)  < /src/wire.rs:switchboard_transport::wire::send_plain (40x) [/x]
2,000 ( 2.0%)  < /src/wire.rs:switchboard_transport::wire::send_joined (60x) [/x]
3,000 ( 3.0%)  *  ./socket/../sysdeps/unix/sysv/linux/send.c:send [/libc.so.6]

5,000 ( 5.0%)  < /src/a.rs:f (7x) [/x]
5,000 ( 5.0%)  *  ./socket/../sysdeps/unix/sysv/linux/recv.c:recv [/libc.so.6]
";
        let count = parse_annotation(text).unwrap();
        assert_eq!(count.instructions, 100_000);
        assert_eq!(count.frames, 100);
        assert!(parse_annotation("100 PROGRAM TOTALS\n").is_err());
    }
}
