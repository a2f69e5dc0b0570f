//! The markdown report: the header on the machine, the command and the pinning, one table per
//! scenario (the median and the range over the rounds of each figure and ratio), and at the
//! end the targets, each met only if its worst round meets it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use super::options::{Options, Scenario, Server};
use super::pinning::Role;
use super::scenarios::IdleRow;
use super::Figures;

/// The markdown report: a header on the machine and the command, then one table per
/// scenario, then the verdicts.
pub(super) struct Report {
    lines: Vec<String>,
    pub(super) failures: Vec<String>,
    /// One line per target, printed together at the end.
    verdicts: Vec<String>,
    /// One line per scenario with the A/A control, printed before the verdicts.
    controls: Vec<String>,
    /// `--twin-bin`: the twin is another build (an A/B comparison), not the same one.
    twin_bin: Option<PathBuf>,
    /// The load client's threads: its CPU is at its limit near this many cores.
    client_threads: usize,
    /// The cores each kind of process was seen to be allowed, by process.
    cores_seen: BTreeMap<&'static str, BTreeSet<String>>,
}

/// A figure over the rounds that measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    /// Rounds with a value.
    n: usize,
}

/// The median and range of the values present (`None`: no round measured it).
fn spread(values: impl IntoIterator<Item = Option<f64>>) -> Option<Spread> {
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[v.len() - 1],
        n: v.len(),
    })
}

/// `median (min–max)` with `f` for each number; the median alone for a single round.
fn fmt_spread(s: Option<Spread>, f: impl Fn(f64) -> String) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => f(s.median),
        Some(s) => format!("{} ({}–{})", f(s.median), f(s.min), f(s.max)),
    }
}

/// A figure of every round of one server.
fn series(rounds: &[Option<Figures>], key: &str) -> Vec<Option<f64>> {
    rounds
        .iter()
        .map(|f| f.as_ref().and_then(|f| num(f, key)))
        .collect()
}

/// Per round, server CPU (`cpu_key`: `server_cpu`, or `server_sys_cpu` for its kernel part)
/// in µs per unit of work: less sensitive than throughput to a client or to other processes
/// taking the cores.
fn per_unit(rounds: &[Option<Figures>], cpu_key: &str) -> Vec<Option<f64>> {
    series(rounds, cpu_key)
        .into_iter()
        .zip(series(rounds, "rate"))
        .map(|(c, r)| c.zip(r.filter(|r| *r > 0.0)).map(|(c, r)| c * 1e6 / r))
        .collect()
}

/// Whether the load client, using `cores` of CPU with `threads` threads, was the bottleneck.
fn at_its_limit(cores: f64, threads: usize) -> bool {
    cores >= 0.9 * threads as f64
}

/// The unit of work a scenario's rate counts.
fn unit_of(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Broadcast => "delivery",
        Scenario::Handshake => "connection",
        _ => "message",
    }
}

/// Round by round, Switchboard's figure ÷ the other's (`lower_is_better`: the other's ÷
/// Switchboard's), so that above 1× always means Switchboard did better in that round.
fn round_ratios(
    sb: &[Option<f64>],
    other: &[Option<f64>],
    lower_is_better: bool,
) -> Vec<Option<f64>> {
    sb.iter()
        .zip(other)
        .map(|(a, b)| {
            let (a, b) = ((*a)?, (*b)?);
            let (num, den) = if lower_is_better { (b, a) } else { (a, b) };
            (den > 0.0).then(|| num / den)
        })
        .collect()
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
            verdicts: Vec::new(),
            controls: Vec::new(),
            twin_bin: o.twin_bin.clone(),
            client_threads: o.client_threads,
            cores_seen: BTreeMap::new(),
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
        r.line(format!("- {}", o.pinning.describe()));
        r.line(if o.client_spins() {
            "- the client (echo, send, broadcast) polls without sleeping on its core; \
             `client_cpu` leaves out its polls that found nothing (`--client-sleeps` to let it \
             sleep)"
                .to_string()
        } else {
            "- the client sleeps in `epoll_wait` between events".to_string()
        });
        r.line(format!(
            "- node {}; client threads {}; Switchboard worker threads {}",
            shell_output("node", &["--version"]),
            o.client_threads,
            o.server_threads.map_or(
                // tokio counts the cores of the process's affinity mask.
                "one per core it may use".into(),
                |n| n.to_string()
            )
        ));
        let phased = o.phase_ms > 0;
        r.line(format!(
            "- each run {}: {} s measured in {} slice{} taken in turn with the other servers' \
             slices of the round (the order rotating), after a warm-up of {} s for a \
             server's first slice and {} s for the others; rates and CPU are averaged over a \
             run's slices, percentiles taken over all its samples; every server started once \
             per round; bench binaries built with the `{}` profile",
            if phased {
                "of handshakes, cross-node and cross-cluster"
            } else {
                ""
            },
            o.secs,
            o.slices,
            if o.slices == 1 { "" } else { "s" },
            o.warmup,
            o.warmup.min(super::scenarios::LATER_SLICE_WARMUP),
            o.profile
        ));
        if phased {
            r.line(format!(
                "- echo, send and broadcast, in turns instead of slices: the servers of a round \
                 are loaded one at a time, in turns of {} ms ({} ms for broadcast), each server \
                 right after every other one equally often and never after itself (`turn_cycle`), \
                 in whole cycles: turns worth {} s of warm-up, then {} s measured, for each \
                 server, with a wait for the server left to be quiet between turns; echo and \
                 send by one client holding sockets \
                 to every server, broadcast by one client per server (each holds its \
                 subscribers) taking turns as asked; a turn ends by sending no more and waiting \
                 for what is out, and only the turns' own windows count (answers, deliveries, \
                 latency, CPU; a broadcast's time-to-all counts if it was sent in the window)",
                o.turn_ms(Scenario::Echo),
                o.turn_ms(Scenario::Broadcast),
                o.warmup,
                o.secs
            ));
        }
        r.line(format!(
            "- {} round{} per scenario, the servers interleaved within each round; a cell is \
             the median over the rounds with the range (min–max) in brackets; a ratio is \
             computed round by round (Switchboard's run i against the other's run i), then \
             summarized the same way; idle memory is measured once",
            o.runs,
            if o.runs == 1 { "" } else { "s" }
        ));
        r.line(
            "- ratio column: Switchboard's figure ÷ this server's for throughput, this \
             server's ÷ Switchboard's for latency, CPU per unit of work and memory; above 1× means Switchboard \
             is better"
                .to_string(),
        );
        match (&o.twin_bin, o.servers.contains(&Server::SwitchboardTwin)) {
            (Some(other), _) => r.line(format!(
                "- switchboard-twin: `{}`, another `bench-server` build, run as one more \
                 server (`--twin-bin`): an A/B comparison of two builds, measured as the A/A \
                 control is, so its ratios are this build's against that one's",
                other.display()
            )),
            (None, true) => r.line(
                "- switchboard-twin: a second process of the same `bench-server` build, run as \
                 one more server (the A/A control); its ratios are what the machine's noise \
                 alone makes of one build against itself, so a verdict on the worst round is \
                 only as fine as their spread"
                    .to_string(),
            ),
            (None, false) => {}
        }
        if o.servers.contains(&Server::Floor) {
            r.line(
                "- floor (transport only): `bench-server --floor`, the same wire protocol on \
                 `switchboard_transport` alone (no JSON parse, no bus, no registry; the same \
                 HS256 verification); its ratio is what Switchboard keeps of the floor, and \
                 1 minus it what the gateway's layers cost"
                    .to_string(),
            );
        }
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

    /// Notes the cores a run's server and client were allowed; a failure when pinned and
    /// they are not the ones asked for.
    pub(super) fn check_cores(&mut self, o: &Options, server: Server, f: &Figures, what: &str) {
        for (role, process, key) in [
            (Role::Server, server.name(), "server_cores"),
            (Role::Client, "client", "cores"),
        ] {
            let seen = f.get(key).cloned().unwrap_or_else(|| "?".into());
            if let Some(want) = o.pinning.expected(role) {
                if seen != want {
                    self.failures.push(format!(
                        "{what}: the {process} ran on CPU {seen}, not on {want} as pinned"
                    ));
                }
            }
            self.cores_seen.entry(process).or_default().insert(seen);
        }
    }

    pub(super) fn table(
        &mut self,
        o: &Options,
        scenario: Scenario,
        rows: &[(Server, Vec<Option<Figures>>)],
    ) {
        let none = vec![None; o.runs];
        let sb = rows
            .iter()
            .find(|(s, _)| *s == Server::Switchboard)
            .map_or(&none, |(_, r)| r);
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
        let unit = unit_of(scenario);
        self.line(format!(
            "| server | {figure} | ratio | {latency} p50 µs | p99 µs | p999 µs | p99 ratio | \
             client CPU | server CPU | server CPU µs per {unit} | ratio |"
        ));
        self.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
        let cost = |rounds: &[Option<Figures>]| per_unit(rounds, "server_cpu");
        let times = |v: f64| format!("{v:.2}×");
        for (server, rounds) in rows {
            let done = rounds.iter().filter(|f| f.is_some()).count();
            if done == 0 {
                self.line(format!(
                    "| {} | failed | — | — | — | — | — | — | — | — | — |",
                    server.label(self.twin_bin.as_deref())
                ));
                continue;
            }
            let label = if done < rounds.len() {
                format!(
                    "{} ({done} of {} rounds)",
                    server.label(self.twin_bin.as_deref()),
                    rounds.len()
                )
            } else {
                server.label(self.twin_bin.as_deref()).to_string()
            };
            // Ratios against Switchboard itself say nothing.
            let vs = |key: &str, lower_is_better: bool| {
                if *server == Server::Switchboard {
                    "—".to_string()
                } else {
                    fmt_spread(
                        spread(round_ratios(
                            &series(sb, key),
                            &series(rounds, key),
                            lower_is_better,
                        )),
                        times,
                    )
                }
            };
            let of = |key: &str, digits: usize| {
                fmt_spread(spread(series(rounds, key)), |v| fmt_opt(Some(v), digits))
            };
            let client = spread(series(rounds, "client_cpu"));
            let bound = if client.is_some_and(|c| at_its_limit(c.median, o.client_threads)) {
                " (client-bound)"
            } else {
                ""
            };
            let cost_ratio = if *server == Server::Switchboard {
                "—".to_string()
            } else {
                fmt_spread(spread(round_ratios(&cost(sb), &cost(rounds), true)), times)
            };
            self.line(format!(
                "| {label} | {} | {} | {} | {} | {} | {} | {}{bound} | {} | {} | {cost_ratio} |",
                fmt_spread(spread(series(rounds, "rate")), |v| fmt_int(Some(v))),
                vs("rate", false),
                of("p50_us", 0),
                of("p99_us", 0),
                of("p999_us", 0),
                vs("p99_us", true),
                fmt_spread(client, |v| fmt_opt(Some(v), 2)),
                of("server_cpu", 2),
                fmt_spread(spread(cost(rounds)), |v| fmt_opt(Some(v), 1)),
            ));
        }
        let kernel: Vec<String> = rows
            .iter()
            .filter_map(|(s, rounds)| {
                let k = spread(per_unit(rounds, "server_sys_cpu"))?;
                Some(format!("{} {:.1}", s.name(), k.median))
            })
            .collect();
        if !kernel.is_empty() {
            self.line(format!(
                "\nServer CPU µs per {unit} spent in the kernel (median): {}.",
                kernel.join(", ")
            ));
        }
        if scenario == Scenario::Broadcast {
            let bps: Vec<String> = rows
                .iter()
                .filter_map(|(s, rounds)| {
                    let b = spread(series(rounds, "bps"))?;
                    Some(format!(
                        "{} {}",
                        s.name(),
                        fmt_spread(Some(b), |v| format!("{v:.1}"))
                    ))
                })
                .collect();
            self.line(format!(
                "\nBroadcasts completed per second: {}.",
                bps.join(", ")
            ));
        }
        self.targets(scenario, rows, sb);
    }

    /// Issue 15's targets against uws-node, when it ran: each met only if every round meets it.
    /// With the twin in the run, also the same build against itself (`controls`): the noise
    /// a verdict cannot see through.
    fn targets(
        &mut self,
        scenario: Scenario,
        rows: &[(Server, Vec<Option<Figures>>)],
        sb: &[Option<Figures>],
    ) {
        let (name, figure, latency) = match scenario {
            Scenario::Echo => ("echo", "messages/s", Some("latency")),
            Scenario::Send => ("send", "messages/s", Some("latency")),
            Scenario::Broadcast => ("broadcast", "deliveries/s", Some("time-to-all")),
            Scenario::Handshake => ("handshakes", "connections/s", None),
            _ => return,
        };
        if let Some((_, twin)) = rows.iter().find(|(s, _)| *s == Server::SwitchboardTwin) {
            let rate = round_ratios(&series(sb, "rate"), &series(twin, "rate"), false);
            if let Some(s) = spread(rate.iter().copied()) {
                let (what, twin) = match &self.twin_bin {
                    Some(other) => ("A/B", format!("`{}`", other.display())),
                    None => ("A/A control", "the same build".to_string()),
                };
                self.controls.push(format!(
                    "- {name}, {what}: {figure} of switchboard ÷ switchboard-twin ({twin}) \
                     {:.2}×–{:.2}× over the rounds, median {:.2}×",
                    s.min, s.max, s.median
                ));
            }
        }
        let Some((_, uws)) = rows.iter().find(|(s, _)| *s == Server::UwsNode) else {
            return;
        };
        let rate = round_ratios(&series(sb, "rate"), &series(uws, "rate"), false);
        self.verdict(&format!("{name}: {figure} ≥ 1.2× uws-node's"), &rate, 1.2);
        // What no user-space work can pass: uws-node's whole CPU per unit against the part of
        // Switchboard's that the kernel spends on the same traffic.
        let ceiling = round_ratios(
            &per_unit(sb, "server_sys_cpu"),
            &per_unit(uws, "server_cpu"),
            true,
        );
        if let Some(c) = spread(ceiling.iter().copied()) {
            let unit = unit_of(scenario);
            self.verdicts.push(format!(
                "  - ceiling for user-space work: {:.2}× (worst round {:.2}×), uws-node's server \
                 CPU per {unit} ÷ the part of Switchboard's spent in the kernel; {}",
                c.median,
                c.min,
                if c.median < 1.2 {
                    "below 1.2×, so this target needs less kernel work per {unit}, not less \
                     user-space work"
                        .replace("{unit}", unit)
                } else {
                    "at or above 1.2×".to_string()
                }
            ));
        }
        if let Some((_, floor)) = rows.iter().find(|(s, _)| *s == Server::Floor) {
            self.floor_reach(figure, floor, uws, 1.2);
        }
        if scenario == Scenario::Broadcast {
            self.verdict(
                &format!("{name} (stretch): {figure} ≥ 1.5× uws-node's"),
                &rate,
                1.5,
            );
        }
        if let Some(latency) = latency {
            let p99 = round_ratios(&series(sb, "p99_us"), &series(uws, "p99_us"), true);
            self.verdict(
                &format!(
                    "{name}: p99 {latency} ≤ uws-node's (ratio: uws-node's p99 ÷ Switchboard's)"
                ),
                &p99,
                1.0,
            );
        }
    }

    /// What the run could show at all: the floor (the transport alone, no gateway work) against
    /// uws-node in the same rounds. A floor below `want` means a gateway on this transport
    /// cannot be expected to meet the target with this client on this machine; with the
    /// client at its limit while it drives the floor, the limit is the client's. (Not a proof
    /// for every server: what a server costs the client per unit differs a little.)
    fn floor_reach(
        &mut self,
        figure: &str,
        floor: &[Option<Figures>],
        uws: &[Option<Figures>],
        want: f64,
    ) {
        let reach = round_ratios(&series(floor, "rate"), &series(uws, "rate"), false);
        let Some(s) = spread(reach.iter().copied()) else {
            return;
        };
        let client = spread(series(floor, "client_cpu")).map(|c| c.median);
        let threads = self.client_threads;
        let client_text = client.map_or(String::new(), |c| {
            format!(", the client at {c:.2} of its {threads} core(s) while it drives the floor")
        });
        let what = if s.min >= want {
            "the floor reaches the target, so this run can show it".to_string()
        } else if client.is_some_and(|c| at_its_limit(c, threads)) {
            format!(
                "below {want:.1}× in its worst round with the client at its limit: with this \
                 client on this machine, a gateway on this transport cannot be expected to show \
                 this target"
            )
        } else {
            format!(
                "below {want:.1}× in its worst round: a gateway on this transport cannot be \
                 expected to show this target here"
            )
        };
        // Three decimals: a worst round of 1.199× must not print as 1.20× beside "below".
        self.verdicts.push(format!(
            "  - reach of this run: the floor's {figure} ÷ uws-node's {:.3}× (worst round {:.3}×){client_text}; {what}",
            s.median, s.min
        ));
    }

    /// One target: met only if every round measured it and the worst round meets `want`.
    fn verdict(&mut self, name: &str, ratios: &[Option<f64>], want: f64) {
        let Some(s) = spread(ratios.iter().copied()) else {
            self.verdicts.push(format!("- {name}: **not measured**"));
            return;
        };
        let met = if s.n < ratios.len() {
            "not measured in every round"
        } else if s.min >= want {
            "met"
        } else {
            "MISSED"
        };
        let each: Vec<String> = ratios
            .iter()
            .map(|r| r.map_or("—".into(), |r| format!("{r:.2}×")))
            .collect();
        self.verdicts.push(format!(
            "- {name}: **{met}** (worst round {:.2}×, median {:.2}×; rounds: {})",
            s.min,
            s.median,
            each.join(", ")
        ));
    }

    /// The verdicts of the whole run, and the cores each process was seen on.
    pub(super) fn verdict_section(&mut self, o: &Options) {
        self.line(
            "\n## Verdicts (issue 15's targets: same run, pinned, worst of three rounds)\n".into(),
        );
        if !o.pinning.is_pinned() || o.runs < 3 {
            self.line(format!(
                "_Not the issue's conditions ({}, {} round{}): these verdicts are indicative \
                 only._\n",
                if o.pinning.is_pinned() {
                    "pinned".into()
                } else {
                    o.pinning.describe()
                },
                o.runs,
                if o.runs == 1 { "" } else { "s" }
            ));
        }
        if !self.controls.is_empty() {
            self.line(if self.twin_bin.is_some() {
                "This build against the twin's (`--twin-bin`), ratios per round (range and \
                 median); no A/A control in this run:\n"
                    .into()
            } else {
                "The same build against itself, the resolution of the verdicts below (see the \
                 header on switchboard-twin):\n"
                    .into()
            });
            for c in std::mem::take(&mut self.controls) {
                self.line(c);
            }
            self.line(String::new());
        }
        if self.verdicts.is_empty() {
            self.line("No target applies: uws-node was not in this run.".into());
        }
        for v in std::mem::take(&mut self.verdicts) {
            self.line(v);
        }
        if !self.cores_seen.is_empty() {
            let seen: Vec<String> = self
                .cores_seen
                .iter()
                .map(|(p, c)| format!("{p} {}", c.iter().cloned().collect::<Vec<_>>().join(" or ")))
                .collect();
            self.line(format!(
                "\nCPUs each process was allowed (`Cpus_allowed_list`): {}.",
                seen.join("; ")
            ));
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
        let bytes = |server: Server| {
            rows.iter()
                .find(|(s, _)| *s == server)
                .and_then(|(_, r)| r.as_ref().map(IdleRow::bytes_per_socket))
        };
        let sb = bytes(Server::Switchboard);
        for (server, row) in rows {
            match row {
                Some(r) => self.line(format!(
                    "| {} | {:.1} | {:.1} | {} | {} |",
                    server.label(self.twin_bin.as_deref()),
                    r.before_kib as f64 / 1024.0,
                    r.after_kib as f64 / 1024.0,
                    fmt_int(Some(r.bytes_per_socket())),
                    if *server == Server::Switchboard {
                        "—".into()
                    } else {
                        ratio(Some(r.bytes_per_socket()), sb)
                    },
                )),
                None => self.line(format!(
                    "| {} | failed | — | — | — |",
                    server.label(self.twin_bin.as_deref())
                )),
            }
        }
        if rows.iter().any(|(s, _)| *s == Server::UwsNode) {
            // Issue 10's target; idle memory is measured once (it varies within 3% from run
            // to run), so the one round is the worst.
            let r = round_ratios(&[sb], &[bytes(Server::UwsNode)], true);
            self.verdict(
                &format!(
                    "idle memory at {} sockets ≤ uws-node's bytes per socket (ratio: uws-node's \
                     ÷ Switchboard's)",
                    fmt_int(Some(size as f64))
                ),
                &r,
                1.0,
            );
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

    #[test]
    fn rounds_give_a_median_a_range_and_per_round_ratios() {
        let s = spread([Some(3.0), None, Some(1.0), Some(2.0)]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread([Some(1.0), Some(4.0)]).unwrap().median, 2.5);
        assert_eq!(spread([None]), None);
        assert_eq!(fmt_spread(Some(s), |v| format!("{v:.0}")), "2 (1–3)");
        assert_eq!(fmt_spread(spread([Some(5.0)]), |v| format!("{v:.0}")), "5");
        // round i against round i, above 1× when Switchboard does better
        let sb = [Some(120.0), Some(90.0), None];
        let peer = [Some(100.0), Some(100.0), Some(100.0)];
        assert_eq!(
            round_ratios(&sb, &peer, false),
            [Some(1.2), Some(0.9), None]
        );
        assert_eq!(
            round_ratios(&sb, &peer, true)[1].map(|r| r > 1.0),
            Some(true)
        );
    }

    #[test]
    fn a_target_is_met_only_if_its_worst_round_is() {
        let o = Options::new(&super::super::options::parse_words(&[]).unwrap());
        let mut r = Report::new(&o, &[]);
        r.verdict("a", &[Some(1.3), Some(1.25)], 1.2);
        r.verdict("b", &[Some(1.5), Some(1.1), Some(1.6)], 1.2);
        r.verdict("c", &[Some(1.5), None], 1.2);
        assert!(r.verdicts[0].starts_with("- a: **met** (worst round 1.25×"));
        assert!(r.verdicts[1].starts_with("- b: **MISSED** (worst round 1.10×"));
        assert!(r.verdicts[2].contains("**not measured in every round**"));
        r.verdict_section(&o);
        assert!(r.text().contains("indicative only"));
    }

    #[test]
    fn the_kernel_part_bounds_what_user_space_work_can_gain() {
        let o = Options::new(&super::super::options::parse_words(&[]).unwrap());
        let rounds = |figures: &[(f64, f64, f64)]| -> Vec<Option<Figures>> {
            figures
                .iter()
                .map(|(rate, cpu, sys)| {
                    Some(Figures::from([
                        ("rate".to_string(), rate.to_string()),
                        ("server_cpu".to_string(), cpu.to_string()),
                        ("server_sys_cpu".to_string(), sys.to_string()),
                    ]))
                })
                .collect()
        };
        // Switchboard: 10 µs per delivery, 9 of them in the kernel; uws-node: 10.5 µs.
        let sb = rounds(&[(100_000.0, 1.0, 0.9), (100_000.0, 1.0, 0.9)]);
        let uws = rounds(&[(95_000.0, 1.0, 0.95), (100_000.0, 1.05, 1.0)]);
        let rows = vec![(Server::Switchboard, sb.clone()), (Server::UwsNode, uws)];
        let mut r = Report::new(&o, &[]);
        r.table(&o, Scenario::Broadcast, &rows);
        let text = r.text();
        assert!(
            text.contains("spent in the kernel (median): switchboard 9.0, uws-node 10.0."),
            "{text}"
        );
        assert!(r.verdicts[0].contains("**MISSED**"), "{:?}", r.verdicts);
        assert!(
            r.verdicts[1].starts_with(
                "  - ceiling for user-space work: 1.17× (worst round 1.17×), uws-node's server \
                 CPU per delivery ÷"
            ) && r.verdicts[1].contains("needs less kernel work per delivery"),
            "{:?}",
            r.verdicts
        );
    }

    #[test]
    fn the_floor_says_whether_the_run_could_show_a_target() {
        let o = Options::new(&super::super::options::parse_words(&[]).unwrap());
        let rounds = |figures: &[(f64, f64)]| -> Vec<Option<Figures>> {
            figures
                .iter()
                .map(|(rate, client)| {
                    Some(Figures::from([
                        ("rate".to_string(), rate.to_string()),
                        ("client_cpu".to_string(), client.to_string()),
                    ]))
                })
                .collect()
        };
        let uws = rounds(&[(100.0, 0.8), (100.0, 0.8), (100.0, 0.8)]);
        let sb = rounds(&[(110.0, 0.9), (112.0, 0.9), (111.0, 0.9)]);
        let reach = |floor: Vec<Option<Figures>>| {
            let rows = vec![
                (Server::Switchboard, sb.clone()),
                (Server::Floor, floor),
                (Server::UwsNode, uws.clone()),
            ];
            let mut r = Report::new(&o, &[]);
            r.targets(Scenario::Handshake, &rows, &sb);
            r.verdicts
                .into_iter()
                .find(|v| v.contains("reach of this run"))
                .expect("a reach line")
        };
        // The client at its limit and the floor short of 1.2× in one round: not showable.
        let limited = reach(rounds(&[(125.0, 0.98), (118.0, 0.99), (130.0, 0.97)]));
        assert!(
            limited
                .contains("÷ uws-node's 1.250× (worst round 1.180×), the client at 0.98 of its 1")
                && limited.contains("with this client on this machine, a gateway on this"),
            "{limited}"
        );
        // The floor short, the client not at its limit: the transport's own cost.
        let transport = reach(rounds(&[(115.0, 0.7), (116.0, 0.7), (117.0, 0.7)]));
        assert!(
            transport.contains("in its worst round: a gateway on this transport"),
            "{transport}"
        );
        // Just under the target prints as just under, not as the target.
        let just_under = reach(rounds(&[(125.0, 0.98), (119.9, 0.99), (130.0, 0.97)]));
        assert!(just_under.contains("(worst round 1.199×)"), "{just_under}");
        // The floor above the target in every round: the run can show it.
        let room = reach(rounds(&[(140.0, 0.95), (150.0, 0.95), (145.0, 0.95)]));
        assert!(room.contains("so this run can show it"), "{room}");
    }

    #[test]
    fn the_twin_gives_the_same_builds_spread_before_the_targets() {
        let o = Options::new(&super::super::options::parse_words(&[]).unwrap());
        let mut r = Report::new(&o, &[]);
        let rounds = |rates: &[f64]| -> Vec<Option<Figures>> {
            rates
                .iter()
                .map(|v| Some(Figures::from([("rate".to_string(), v.to_string())])))
                .collect()
        };
        let sb = rounds(&[100.0, 90.0, 110.0]);
        let rows = vec![
            (Server::Switchboard, sb.clone()),
            (Server::SwitchboardTwin, rounds(&[100.0, 100.0, 100.0])),
            (Server::UwsNode, rounds(&[80.0, 80.0, 80.0])),
        ];
        r.targets(Scenario::Echo, &rows, &sb);
        assert_eq!(
            r.controls[0],
            "- echo, A/A control: messages/s of switchboard ÷ switchboard-twin (the same \
             build) 0.90×–1.10× over the rounds, median 1.00×"
        );
        assert!(r.verdicts[0].starts_with("- echo: messages/s ≥ 1.2× uws-node's: **MISSED**"));
        // With `--twin-bin`, the same figures are an A/B of two builds, and say so.
        let ab = Options::new(
            &super::super::options::parse_words(&["--twin-bin", "/tmp/old/bench-server"]).unwrap(),
        );
        let mut r = Report::new(&ab, &[]);
        r.targets(Scenario::Echo, &rows, &sb);
        assert_eq!(
            r.controls[0],
            "- echo, A/B: messages/s of switchboard ÷ switchboard-twin (`/tmp/old/bench-server`) \
             0.90×–1.10× over the rounds, median 1.00×"
        );
        r.verdict_section(&ab);
        let text = r.text();
        assert!(text.contains("an A/B comparison of two builds"), "{text}");
        assert!(text.contains("This build against the twin's"), "{text}");
        // Without uws-node in the run, the control alone, and no target.
        let mut r = Report::new(&o, &[]);
        r.targets(Scenario::Echo, &rows[..2], &sb);
        assert_eq!((r.controls.len(), r.verdicts.len()), (1, 0));
        r.verdict_section(&o);
        let text = r.text();
        assert!(text.contains("the resolution of the verdicts"), "{text}");
        assert!(text.contains("No target applies"), "{text}");
    }
}
