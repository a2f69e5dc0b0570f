//! The markdown report: the header on the machine and the command, one table per scenario,
//! and the targets met or missed.

use std::process::Command;

use super::options::{Options, Scenario, Server};
use super::scenarios::IdleRow;
use super::Figures;

/// The markdown report: a header on the machine and the command, then one table per
/// scenario.
pub(super) struct Report {
    lines: Vec<String>,
    pub(super) failures: Vec<String>,
}

fn num(f: &Figures, key: &str) -> Option<f64> {
    f.get(key).and_then(|v| v.parse().ok())
}

/// `a / b` as `1.23×`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn fmt_int(v: Option<f64>) -> String {
    let Some(v) = v else { return "—".into() };
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shell_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

impl Report {
    pub(super) fn new(o: &Options, args: &[String]) -> Report {
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut r = Report {
            lines: Vec::new(),
            failures: Vec::new(),
        };
        r.line(format!(
            "# Load benchmark{}\n",
            if o.smoke { " (smoke)" } else { "" }
        ));
        r.line(format!("- command: `cargo xtask bench {}`", args.join(" ")));
        r.line(format!("- date: {}", shell_output("date", &["-u"])));
        r.line(format!(
            "- machine: {} cores (nproc), {mem} memory, {}",
            shell_output("nproc", &[]),
            shell_output("uname", &["-sr"])
        ));
        r.line(format!(
            "- load average at start: {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        r.line(format!(
            "- node {}; client threads {}; Switchboard worker threads {}",
            shell_output("node", &["--version"]),
            o.client_threads,
            o.server_threads
                .map_or("one per core".into(), |n| n.to_string())
        ));
        r.line(format!(
            "- each run: {} s warm-up, {} s measured; a fresh server process per run; \
             bench binaries built with the `{}` profile",
            o.warmup, o.secs, o.profile
        ));
        r.line(
            "- ratio column: Switchboard's figure ÷ this server's for throughput, this \
             server's ÷ Switchboard's for latency, CPU per unit of work and memory; above 1× means Switchboard \
             is better"
                .to_string(),
        );
        r
    }

    pub(super) fn line(&mut self, s: String) {
        self.lines.push(s);
    }

    pub(super) fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }

    pub(super) fn table(
        &mut self,
        o: &Options,
        scenario: Scenario,
        rows: &[(Server, Option<Figures>)],
    ) {
        let sb = rows
            .iter()
            .find(|(s, _)| *s == Server::Switchboard)
            .and_then(|(_, f)| f.clone());
        let sb_num = |k: &str| sb.as_ref().and_then(|f| num(f, k));
        let (title, figure) = match scenario {
            Scenario::Echo => (
                format!(
                    "echo through the bus: {} sockets, {} in flight each, 64 B payload",
                    o.sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Send => (
                format!(
                    "send to one user among {} sockets (each socket sends to its own user), \
                     {} in flight each",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Broadcast => (
                format!(
                    "broadcast fan-out: {} subscribers, {} broadcast(s) in flight, 64 B payload",
                    o.subscribers, o.broadcast_inflight
                ),
                "deliveries/s",
            ),
            Scenario::Handshake => (
                format!(
                    "handshakes with JWT verification (HS256): {} connecting at once",
                    o.handshake_concurrency
                ),
                "connections/s",
            ),
            Scenario::CrossNode => (
                format!(
                    "cross-node send through NATS: a plain NATS client publishes to `socket:send` \
                     for one user among {} sockets on a Switchboard node on the NATS bus, \
                     {} in flight each",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::CrossCluster => (
                format!(
                    "cross-cluster send through NATS: as cross-node, with the publisher on one \
                     nats-server and the node on another, routed to each other ({} sockets, {} \
                     in flight each)",
                    o.send_sockets, o.inflight
                ),
                "messages/s",
            ),
            Scenario::Idle => unreachable!("idle has its own table"),
        };
        self.line(format!("\n## {title}\n"));
        let latency = if scenario == Scenario::Broadcast {
            "time to all"
        } else {
            "latency"
        };
        let unit = if scenario == Scenario::Broadcast {
            "delivery"
        } else if scenario == Scenario::Handshake {
            "connection"
        } else {
            "message"
        };
        self.line(format!(
            "| server | {figure} | ratio | {latency} p50 µs | p99 µs | p999 µs | p99 ratio | \
             client CPU | server CPU | server CPU µs per {unit} | ratio |"
        ));
        self.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
        // CPU time per unit of work: less sensitive than throughput to a client or to other
        // processes taking the cores.
        let cost = |f: &Figures| {
            num(f, "server_cpu")
                .zip(num(f, "rate"))
                .filter(|(_, r)| *r > 0.0)
                .map(|(c, r)| c * 1e6 / r)
        };
        let sb_cost = sb.as_ref().and_then(cost);
        for (server, f) in rows {
            let Some(f) = f else {
                self.line(format!(
                    "| {} | failed | — | — | — | — | — | — | — | — | — |",
                    server.name()
                ));
                continue;
            };
            let client = num(f, "client_cpu");
            let bound = if client.is_some_and(|c| c >= 0.9 * o.client_threads as f64) {
                " (client-bound)"
            } else {
                ""
            };
            self.line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} |",
                server.name(),
                fmt_int(num(f, "rate")),
                ratio(sb_num("rate"), num(f, "rate")),
                fmt_opt(num(f, "p50_us"), 0),
                fmt_opt(num(f, "p99_us"), 0),
                fmt_opt(num(f, "p999_us"), 0),
                ratio(num(f, "p99_us"), sb_num("p99_us")),
                fmt_opt(client, 2),
                bound,
                fmt_opt(num(f, "server_cpu"), 2),
                fmt_opt(cost(f), 1),
                ratio(cost(f), sb_cost),
            ));
        }
        if scenario == Scenario::Broadcast {
            let bps: Vec<String> = rows
                .iter()
                .filter_map(|(s, f)| Some(format!("{} {}", s.name(), f.as_ref()?.get("bps")?)))
                .collect();
            self.line(format!(
                "\nBroadcasts completed per second: {}.",
                bps.join(", ")
            ));
        }
        self.targets(scenario, rows, sb.as_ref());
    }

    fn targets(
        &mut self,
        scenario: Scenario,
        rows: &[(Server, Option<Figures>)],
        sb: Option<&Figures>,
    ) {
        let of = |server: Server| {
            rows.iter()
                .find(|(s, _)| *s == server)
                .and_then(|(_, f)| f.clone())
        };
        let check = |name: &str, met: Option<bool>, detail: String| {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            format!("- target {name}: **{verdict}** ({detail})")
        };
        let rate = |f: &Option<Figures>| f.as_ref().and_then(|f| num(f, "rate"));
        let sb = sb.cloned();
        let mut out = Vec::new();
        match scenario {
            Scenario::Echo => {
                for (peer, want) in [(Server::WsNode, 3.0), (Server::UwsNode, 1.0)] {
                    let (a, b) = (rate(&sb), rate(&of(peer)));
                    if b.is_none() {
                        continue;
                    }
                    let r = a.zip(b).map(|(a, b)| a / b);
                    out.push(check(
                        &format!("echo ≥ {want}× {}", peer.name()),
                        r.map(|r| r >= want),
                        ratio(a, b),
                    ));
                }
            }
            Scenario::Broadcast => {
                let peer = of(Server::UwsNode);
                if peer.is_some() {
                    let (a, b) = (rate(&sb), rate(&peer));
                    out.push(check(
                        "broadcast deliveries/s ≥ 1.5× uws-node",
                        a.zip(b).map(|(a, b)| a / b >= 1.5),
                        ratio(a, b),
                    ));
                    let p = |f: &Option<Figures>| f.as_ref().and_then(|f| num(f, "p99_us"));
                    let (a, b) = (p(&sb), p(&peer));
                    out.push(check(
                        "broadcast p99 time-to-all ≤ uws-node's",
                        a.zip(b).map(|(a, b)| a <= b),
                        format!("{} µs vs {} µs", fmt_opt(a, 0), fmt_opt(b, 0)),
                    ));
                }
            }
            Scenario::Handshake => {
                let a = rate(&sb);
                out.push(check(
                    "JWT handshakes ≥ 5,000/s",
                    a.map(|a| a >= 5000.0),
                    format!("{}/s", fmt_int(a)),
                ));
            }
            _ => {}
        }
        if !out.is_empty() {
            self.line(String::new());
            for l in out {
                self.line(l);
            }
        }
    }

    pub(super) fn idle_table(
        &mut self,
        size: usize,
        processes: usize,
        rows: &[(Server, Option<IdleRow>)],
    ) {
        self.line(format!(
            "\n## idle memory: {} authenticated sockets ({} server process{} per server)\n",
            fmt_int(Some(size as f64)),
            processes,
            if processes == 1 { "" } else { "es" }
        ));
        self.line(
            "| server | RSS before (MiB) | RSS with sockets (MiB) | bytes per socket | ratio |"
                .into(),
        );
        self.line("|---|---:|---:|---:|---:|".into());
        let sb = rows
            .iter()
            .find(|(s, _)| *s == Server::Switchboard)
            .and_then(|(_, r)| r.as_ref().map(IdleRow::bytes_per_socket));
        for (server, row) in rows {
            match row {
                Some(r) => self.line(format!(
                    "| {} | {:.1} | {:.1} | {} | {} |",
                    server.name(),
                    r.before_kib as f64 / 1024.0,
                    r.after_kib as f64 / 1024.0,
                    fmt_int(Some(r.bytes_per_socket())),
                    ratio(Some(r.bytes_per_socket()), sb),
                )),
                None => self.line(format!("| {} | failed | — | — | — |", server.name())),
            }
        }
        let ws = rows
            .iter()
            .find(|(s, _)| *s == Server::WsNode)
            .and_then(|(_, r)| r.as_ref().map(IdleRow::bytes_per_socket));
        if ws.is_some() {
            let met = sb.zip(ws).map(|(a, b)| a * 4.0 <= b);
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            self.line(format!(
                "\n- target idle memory per socket ≤ ¼ of ws-node's: **{verdict}** ({})",
                ratio(ws, sb)
            ));
        }
        if rows
            .iter()
            .any(|(_, r)| r.as_ref().is_some_and(|r| r.processes > 1))
        {
            self.line(format!(
                "\n_{} sockets do not fit one process here (at most 20,000 open files each), so \
                 each server ran as {processes} processes of at most {} sockets, and the RSS \
                 of all of them is added up; the fixed cost of the extra processes is in \
                 \"before\" and cancels out._",
                fmt_int(Some(size as f64)),
                fmt_int(Some(size.div_ceil(processes) as f64))
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_and_print() {
        let f = Figures::from([("rate".to_string(), "1234".to_string())]);
        assert_eq!(num(&f, "rate"), Some(1234.0));
        assert_eq!(fmt_int(Some(1234567.0)), "1,234,567");
        assert_eq!(fmt_int(Some(999.0)), "999");
        assert_eq!(ratio(Some(3.0), Some(1.5)), "2.00×");
        assert_eq!(ratio(Some(3.0), None), "—");
    }
}
