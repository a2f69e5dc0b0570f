//! `echo` and `send` against several servers in one run, in turns a fraction of a second
//! long (`--targets`, `--phase-ms`).
//!
//! On a shared machine the speed of a core drifts over seconds: a slow stretch of a few
//! seconds lands on whichever server runs then, and slices of two seconds per server left
//! the same build at 0.8-1.2× of itself from one round to the next. Here the client holds
//! the sockets of every server at once and loads one server at a time for a phase (250 ms by
//! default), taking the servers in turn (`--turn-order`) for the whole run: every
//! server is measured across the same stretches of the machine's time. A phase ends by
//! sending no more and waiting for the answers still out; only what the phase's own window
//! saw counts (answers, latency, the server's and the client's CPU), and the drain does not.
//! Before the next turn the client waits (at most 200 ms) until the server it leaves has been
//! quiet for 20 ms, so that work it put off (a runtime's garbage collection) does not land on
//! the next server's turn. The turns come in whole cycles of the order: each server has the
//! same number of warm-up turns (worth `--warmup`), then of measured turns (worth `--secs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_bench::procfs::{self, Ticks};
use switchboard_bench::result_line;
use switchboard_bench::stats::Samples;
use switchboard_bench::wire::{self, Kind, Template};

use crate::measure::{
    client_cpu_fields, percentiles, server_cpu_fields, wait_quiet, Clock, CpuTicks, ServerCores,
    Tally, QUIET_LIMIT,
};
use crate::poller::{Inbound, Loop, Scenario, Sender};
use crate::roundtrip::{max_frame, send_stamped};
use crate::sockets::{open_sockets, Run};

/// Round trips on `n` sockets per target (`runs`, one per server), `inflight` out per socket,
/// one target loaded at a time for `phase`; each target gets about `secs` of measured phases.
/// Returns one `RESULT` line per target, in the order given, each with its `target` index.
pub(crate) async fn phased_roundtrips(
    runs: Vec<Arc<Run>>,
    kind: Kind,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
    turns: Turns,
) -> Result<Vec<String>, String> {
    let n = n.max(1);
    let targets = runs.len();
    let Turns { phase, order } = turns;
    let order = turn_order(order, targets)?;
    let mut sockets = Vec::with_capacity(n * targets);
    let mut templates = Vec::with_capacity(n * targets);
    for run in &runs {
        sockets.extend(open_sockets(run, n).await?);
        templates.extend((0..n).map(|j| Template::new(kind, &format!("user-{j}"), run.payload)));
    }
    let spin = runs.first().is_some_and(|r| r.spin);
    let mut lp = Loop::new(sockets, max_frame(&templates[0]), spin)?;
    let phase = phase.max(Duration::from_millis(10));
    let plan = Plan::new(&order, targets, warmup, secs, phase);
    // The schedule is the plan's; the clock only bounds the run.
    let clock = Clock::start(0.0, plan.bound(phase).as_secs_f64());
    let pids: Vec<Option<u32>> = runs.iter().map(|r| r.server_pid).collect();
    let phase_pids = pids.clone();
    let expect = match kind {
        Kind::Echo => "bench:echo",
        _ => "bench.send",
    };
    let inflight = inflight.max(1);
    let st = tokio::task::spawn_blocking(move || {
        let mut st = Phases::new(&templates, n, expect, inflight, clock, phase, phase_pids);
        st.order = order;
        st.plan = plan;
        st.start_next(&mut lp.tx, Instant::now());
        lp.run(&clock, &mut st);
        lp.close_all();
        st.finish()
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Some(e) = &st.tally.first_error {
        eprintln!("bench-client: {} errors, first: {e}", st.tally.errors);
    }
    let run_errors = st.run_errors;
    let scenario = if kind == Kind::Echo { "echo" } else { "send" };
    Ok(st
        .targets
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let window = t.active.as_secs_f64();
            let per =
                |ticks: u64| (window > 0.0).then(|| ticks as f64 / procfs::TICKS_PER_SEC / window);
            let samples = Samples::new(t.samples);
            let mut line = vec![
                ("scenario", scenario.to_string()),
                ("target", k.to_string()),
                ("sockets", n.to_string()),
                ("inflight", inflight.to_string()),
                ("phases", t.phases.to_string()),
                ("phase_ms", phase.as_millis().to_string()),
                ("count", samples.len().to_string()),
                (
                    "rate",
                    format!(
                        "{:.0}",
                        samples.len() as f64 / window.max(f64::MIN_POSITIVE)
                    ),
                ),
            ];
            line.extend(client_cpu_fields(per(t.client_ticks), t.idle, window));
            let server_cpu = pids[k].and_then(|_| ServerCores::of(t.server_ticks, window));
            line.extend(server_cpu_fields(server_cpu));
            line.extend([
                ("errors", (t.errors + run_errors).to_string()),
                ("late", t.late.to_string()),
            ]);
            line.extend(percentiles(&samples, ["p50_us", "p99_us", "p999_us"]));
            result_line(&line)
        })
        .collect())
}

/// How the targets take turns: each for `phase`, in `order` (target indexes, repeated; empty:
/// each in turn).
pub(crate) struct Turns {
    pub(crate) phase: Duration,
    pub(crate) order: Vec<usize>,
}

/// The order of the turns among `targets`: `order` (`--turn-order`), or each in turn when it
/// is empty. Every target must have turns, and only targets that exist.
fn turn_order(order: Vec<usize>, targets: usize) -> Result<Vec<usize>, String> {
    if order.is_empty() {
        return Ok((0..targets).collect());
    }
    if let Some(k) = order.iter().find(|&&k| k >= targets) {
        return Err(format!("--turn-order: no target {k} among {targets}"));
    }
    if let Some(k) = (0..targets).find(|k| !order.contains(k)) {
        return Err(format!("--turn-order: target {k} has no turn"));
    }
    Ok(order)
}

/// How long a target's answers may take to come in after its turn ends; the rest are counted
/// as errors and the next turn starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// How many turns a run takes: whole cycles of the order, so that each target has as many
/// (the cycles of `cargo xtask bench` have every target equally often).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Plan {
    /// Turns of warm-up, before the measured ones.
    warm: usize,
    /// Turns in all.
    total: usize,
}

impl Plan {
    /// Turns of `phase` worth `warmup` seconds for each target, then worth `secs` (at least
    /// one), in whole cycles of `order`.
    fn new(order: &[usize], targets: usize, warmup: f64, secs: f64, phase: Duration) -> Plan {
        let fewest = (0..targets)
            .map(|k| order.iter().filter(|&&o| o == k).count())
            .min()
            .unwrap_or(0);
        if fewest == 0 {
            return Plan::default();
        }
        let turns = |s: f64| (s.max(0.0) / phase.as_secs_f64()).ceil() as usize;
        let cycles = |t: usize| t.div_ceil(fewest);
        let warm = cycles(turns(warmup)) * order.len();
        Plan {
            warm,
            total: warm + cycles(turns(secs).max(1)) * order.len(),
        }
    }

    /// The longest the run may take: every turn at its longest, and some seconds.
    fn bound(&self, phase: Duration) -> Duration {
        // Saturating: `--secs` and `--phase-ms` are the caller's, and a huge plan must not
        // wrap around to a short bound.
        let turns = u32::try_from(self.total).unwrap_or(u32::MAX);
        (phase + DRAIN_LIMIT + QUIET_LIMIT).saturating_mul(turns) + Duration::from_secs(5)
    }
}

/// What one target's measured phases saw.
#[derive(Default)]
pub(crate) struct TargetTally {
    /// Round-trip times of the answers that came within a measured phase, in ns.
    samples: Vec<u64>,
    /// The measured phases' length in all.
    active: Duration,
    phases: usize,
    /// CPU ticks of the server, and of this process, within the measured phases.
    server_ticks: Ticks,
    client_ticks: u64,
    /// The client loop's idle polling within the measured phases.
    idle: Duration,
    errors: u64,
    /// Answers that came after their drain limit (charged as errors then, ignored now).
    late: u64,
}

/// The phase the run is in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Target `k` is loaded: each answer is followed by another message.
    Active {
        k: usize,
        since: Instant,
        /// Inside the measured window (started after the warm-up).
        measured: bool,
        /// The CPU at its start (when measured).
        ticks: CpuTicks,
        idle: Duration,
    },
    /// Target `k` gets no more messages (since `since`); the next phase starts once its
    /// answers are in.
    Draining { k: usize, since: Instant },
    /// The plan is done (or the clock has ended): no phase starts any more.
    Done,
}

/// The state of a phased run.
struct Phases<'a> {
    templates: &'a [Template],
    /// Sockets per target: socket `i` belongs to target `i / n`.
    n: usize,
    expect: &'a str,
    inflight: usize,
    clock: Clock,
    phase_len: Duration,
    pids: Vec<Option<u32>>,
    phase: Phase,
    /// The targets' turns, repeated (`--turn-order`).
    order: Vec<usize>,
    /// How many turns, and how many of them warm up.
    plan: Plan,
    /// [`DRAIN_LIMIT`] (shorter in tests).
    drain_limit: Duration,
    /// Per socket: answers below this sequence number were written off at a drain limit.
    written_off: Vec<u64>,
    /// Error events of the tally that [`Phases::charge`] charged to a target.
    charged_events: u64,
    /// Phases started so far (their number picks the next target).
    started: usize,
    pending: Vec<usize>,
    /// Messages out per target.
    outstanding: Vec<usize>,
    seq: Vec<u64>,
    scratch: Vec<u8>,
    tally: Tally,
    targets: Vec<TargetTally>,
}

/// What a finished phased run hands back.
struct Finished {
    /// Errors of the run as a whole (an answer overdue at the hard deadline, a failed poll),
    /// which count against every target.
    run_errors: u64,
    tally: Tally,
    targets: Vec<TargetTally>,
}

impl<'a> Phases<'a> {
    fn new(
        templates: &'a [Template],
        n: usize,
        expect: &'a str,
        inflight: usize,
        clock: Clock,
        phase_len: Duration,
        pids: Vec<Option<u32>>,
    ) -> Phases<'a> {
        let targets = pids.len();
        Phases {
            templates,
            n,
            expect,
            inflight,
            clock,
            phase_len,
            pids,
            phase: Phase::Done,
            order: (0..targets).collect(),
            plan: Plan::default(),
            drain_limit: DRAIN_LIMIT,
            written_off: vec![0; templates.len()],
            charged_events: 0,
            started: 0,
            pending: vec![0; templates.len()],
            outstanding: vec![0; targets],
            seq: vec![0; templates.len()],
            scratch: Vec::with_capacity(templates[0].len()),
            tally: Tally::default(),
            targets: (0..targets).map(|_| TargetTally::default()).collect(),
        }
    }

    fn finish(self) -> Finished {
        Finished {
            run_errors: self.tally.errors.saturating_sub(self.charged_events),
            tally: self.tally,
            targets: self.targets,
        }
    }

    /// Starts the next target's phase (or ends the run once the plan is done, or the clock
    /// has ended).
    fn start_next(&mut self, tx: &mut Sender, now: Instant) {
        if self.started >= self.plan.total || now >= self.clock.end || self.order.is_empty() {
            self.phase = Phase::Done;
            return;
        }
        let k = self.order[self.started % self.order.len()];
        debug_assert!(
            self.outstanding.iter().all(|&o| o == 0),
            "a phase starts only once every answer of the last one is in"
        );
        let measured = self.started >= self.plan.warm;
        self.started += 1;
        self.phase = Phase::Active {
            k,
            since: now,
            measured,
            ticks: if measured {
                CpuTicks::now(self.pids[k])
            } else {
                CpuTicks::default()
            },
            idle: self.tally.idle,
        };
        for i in k * self.n..(k + 1) * self.n {
            self.fill(tx, i);
        }
    }

    /// Ends the active phase: what its window saw is added to its target's tally.
    fn stop(&mut self, tx: &mut Sender, now: Instant) {
        let Phase::Active {
            k,
            since,
            measured,
            ticks,
            idle,
        } = self.phase
        else {
            return;
        };
        if measured {
            let t = &mut self.targets[k];
            t.active += now - since;
            t.phases += 1;
            let (client, server) = ticks.until(CpuTicks::now(self.pids[k]));
            t.client_ticks += client;
            t.server_ticks += server;
            t.idle += self.tally.idle.saturating_sub(idle);
        }
        self.phase = Phase::Draining { k, since: now };
        if self.outstanding[k] == 0 {
            self.drained(tx, k);
        }
    }

    /// Target `k`'s answers are all in: once its server is quiet, the next turn starts.
    fn drained(&mut self, tx: &mut Sender, k: usize) {
        wait_quiet(self.pids[k]);
        self.start_next(tx, Instant::now());
    }

    /// Charges `count` errors to target `k` (one event, `e`, in the run's tally).
    fn charge(&mut self, k: usize, count: u64, e: impl std::fmt::Display) {
        self.targets[k].errors += count;
        self.tally.error(e);
        self.charged_events += 1;
    }

    /// Whether target `k` is draining.
    fn draining(&self, k: usize) -> bool {
        matches!(self.phase, Phase::Draining { k: d, .. } if d == k)
    }

    /// Sends on socket `i` until it has `inflight` messages out.
    fn fill(&mut self, tx: &mut Sender, i: usize) {
        let k = i / self.n;
        while self.pending[i] < self.inflight {
            let template = &self.templates[i];
            let sent = send_stamped(tx, i, template, &self.clock, self.seq[i], &mut self.scratch);
            if let Err(e) = sent {
                self.charge(k, 1, e);
                // The socket has ended: its answers out will not come.
                self.outstanding[k] -= self.pending[i];
                self.pending[i] = 0;
                return;
            }
            self.seq[i] += 1;
            self.pending[i] += 1;
            self.outstanding[k] += 1;
        }
    }
}

impl Scenario for Phases<'_> {
    fn on(&mut self, tx: &mut Sender, i: usize, inbound: Inbound<'_>) {
        let k = i / self.n;
        match inbound {
            Inbound::Text(payload) => {
                let at = Instant::now();
                let stamp = wire::read_stamp(payload);
                // An answer written off at a drain limit, come late: already charged.
                if stamp.is_some_and(|s| s.seq < self.written_off[i]) {
                    self.targets[k].late += 1;
                    return;
                }
                if self.pending[i] > 0 {
                    self.pending[i] -= 1;
                    self.outstanding[k] -= 1;
                }
                let active = match self.phase {
                    Phase::Active { k: a, measured, .. } if a == k => Some(measured),
                    _ => None,
                };
                match (wire::frame_type(payload), stamp) {
                    (Some(t), Some(stamp)) if t == self.expect && stamp.from == i as u32 => {
                        if active == Some(true) {
                            let rtt = self.clock.ns(at).saturating_sub(stamp.sent_ns);
                            self.targets[k].samples.push(rtt);
                        }
                    }
                    _ => {
                        let e = format!(
                            "target {k}: unexpected frame: {}",
                            String::from_utf8_lossy(payload)
                        );
                        self.charge(k, 1, e);
                    }
                }
                if active.is_some() {
                    self.fill(tx, i);
                } else if self.draining(k) && self.outstanding[k] == 0 {
                    self.drained(tx, k);
                }
            }
            Inbound::Ended(why) => {
                self.charge(k, 1, format!("target {k}, socket {i}: {why}"));
                self.outstanding[k] -= self.pending[i];
                self.pending[i] = 0;
                if self.draining(k) && self.outstanding[k] == 0 {
                    self.drained(tx, k);
                }
            }
        }
    }

    fn after_turn(&mut self, tx: &mut Sender) {
        let now = Instant::now();
        match self.phase {
            Phase::Active { since, .. }
                if now - since >= self.phase_len || now >= self.clock.end =>
            {
                self.stop(tx, now);
            }
            Phase::Draining { k, since } if now - since >= self.drain_limit => {
                let lost = std::mem::take(&mut self.outstanding[k]);
                let e = format!(
                    "target {k}: {lost} answers did not come within {:?} of its turn's end",
                    self.drain_limit
                );
                self.charge(k, lost as u64, e);
                let sockets = k * self.n..(k + 1) * self.n;
                self.pending[sockets.clone()].fill(0);
                for i in sockets {
                    self.written_off[i] = self.seq[i];
                }
                self.drained(tx, k);
            }
            _ => {}
        }
    }

    fn wake_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Active { since, .. } => Some(since + self.phase_len),
            Phase::Draining { since, .. } => Some(since + self.drain_limit),
            Phase::Done => None,
        }
    }

    fn finished(&self) -> bool {
        self.settled()
    }

    fn settled(&self) -> bool {
        self.phase == Phase::Done && self.outstanding.iter().all(|&o| o == 0)
    }

    fn overdue(&self) -> String {
        format!(
            "{} answers never came",
            self.outstanding.iter().sum::<usize>()
        )
    }

    fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;

    use super::*;
    use crate::poller::tests::{client_frame, connected, server_frame};
    use switchboard_bench::frames::opcode;

    /// A server's end of one socket: answers each text frame `{"type":"echo","payload":P}`
    /// with `{"type":"bench:echo","payload":P}` until a close frame or the end; returns how
    /// many it answered.
    fn echo_server(mut s: TcpStream) -> usize {
        let mut answered = 0;
        loop {
            let (op, payload) = client_frame(&mut s);
            if op != opcode::TEXT {
                return answered;
            }
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let reply = serde_json::json!({"type": "bench:echo", "payload": v["payload"]});
            let frame = server_frame(opcode::TEXT, reply.to_string().as_bytes());
            if s.write_all(&frame).is_err() {
                return answered;
            }
            answered += 1;
        }
    }

    /// `targets` targets of `n` sockets each, served by `serve` on threads; runs a phased
    /// echo with turns of 20 ms, 3 of warm-up and 5 measured per target.
    fn phased_run(
        targets: usize,
        n: usize,
        serve: fn(usize, TcpStream) -> usize,
    ) -> (Finished, Vec<usize>, bool) {
        let mut streams = Vec::new();
        let mut servers = Vec::new();
        for i in 0..targets * n {
            let (client, server) = connected();
            streams.push(client);
            servers.push(std::thread::spawn(move || serve(i / n, server)));
        }
        let templates: Vec<Template> = (0..targets * n)
            .map(|_| Template::new(Kind::Echo, "", 64))
            .collect();
        let mut lp = Loop::from_std(streams, 1024, false).unwrap();
        let phase = Duration::from_millis(20);
        let order: Vec<usize> = (0..targets).collect();
        let plan = Plan::new(&order, targets, 0.05, 0.1, phase);
        assert_eq!(
            plan,
            Plan {
                warm: 3 * targets,
                total: 8 * targets
            }
        );
        let clock = Clock::start(0.0, plan.bound(phase).as_secs_f64());
        let mut st = Phases::new(
            &templates,
            n,
            "bench:echo",
            2,
            clock,
            phase,
            vec![None; targets],
        );
        st.plan = plan;
        st.drain_limit = Duration::from_millis(100);
        // A phase that started while another target had answers out fails a debug assertion.
        st.start_next(&mut lp.tx, Instant::now());
        lp.run(&clock, &mut st);
        let finished_early = st.finished() && Instant::now() < clock.end;
        lp.close_all();
        let answered = servers.into_iter().map(|s| s.join().unwrap()).collect();
        (st.finish(), answered, finished_early)
    }

    /// As [`echo_server`], each answer `delay` late.
    fn slow_echo_server(mut s: TcpStream, delay: Duration) -> usize {
        let mut answered = 0;
        loop {
            let (op, payload) = client_frame(&mut s);
            if op != opcode::TEXT {
                return answered;
            }
            std::thread::sleep(delay);
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let reply = serde_json::json!({"type": "bench:echo", "payload": v["payload"]});
            if s.write_all(&server_frame(opcode::TEXT, reply.to_string().as_bytes()))
                .is_err()
            {
                return answered;
            }
            answered += 1;
        }
    }

    #[test]
    fn each_target_has_as_many_turns_of_its_own_and_every_answer_comes_in() {
        let (finished, answered, early) = phased_run(2, 2, |_, s| echo_server(s));
        assert!(
            early,
            "the run ends with its plan, not at the clock's bound"
        );
        assert_eq!(finished.tally.errors, 0, "{:?}", finished.tally.first_error);
        let answered: usize = answered.iter().sum();
        let counted: usize = finished.targets.iter().map(|t| t.samples.len()).sum();
        assert!(
            counted > 0 && counted <= answered,
            "{counted} of {answered}"
        );
        for t in &finished.targets {
            assert_eq!(t.phases, 5, "measured turns");
            assert!(!t.samples.is_empty() && t.active > Duration::ZERO);
            assert_eq!(
                (t.errors, t.server_ticks),
                (0, Ticks::default()),
                "no PID: no server CPU"
            );
        }
    }

    #[test]
    fn a_target_that_stops_answering_is_charged_and_the_others_go_on() {
        // Target 1 reads its first messages and never answers.
        let (finished, _, early) = phased_run(2, 1, |target, s| match target {
            0 => echo_server(s),
            _ => {
                let mut s = s;
                while client_frame(&mut s).0 == opcode::TEXT {}
                0
            }
        });
        assert!(
            early,
            "a silent target holds the run up for one drain limit only"
        );
        assert!(
            finished.targets[1].errors > 0,
            "its lost answers are errors"
        );
        assert_eq!(finished.targets[0].errors, 0);
        assert_eq!(
            finished.targets[0].phases, 5,
            "the other target has all its turns"
        );
    }

    #[test]
    fn answers_that_come_after_the_drain_limit_are_not_taken_for_new_ones() {
        // Target 1 answers every message 150 ms late, after the test's 100 ms drain limit.
        let (finished, _, early) = phased_run(2, 1, |target, s| match target {
            0 => echo_server(s),
            _ => slow_echo_server(s, Duration::from_millis(150)),
        });
        assert!(early);
        let late = &finished.targets[1];
        assert!(late.errors > 0, "its answers are written off");
        assert!(late.late > 0, "they come, and are known for late answers");
        assert!(
            late.samples.is_empty(),
            "and never counted when they come: {:?}",
            late.samples
        );
        assert_eq!(finished.targets[0].phases, 5);
    }

    #[test]
    fn a_plan_is_whole_cycles_of_the_order() {
        let cycle = [0, 1, 0, 2, 0, 3, 1, 2, 1, 3, 2, 3]; // turn_cycle(4)
        let quarter = Duration::from_millis(250);
        // 2 s of warm-up is 8 turns each: 3 cycles (9 each); 6 s is 24 turns: 8 cycles.
        let plan = Plan::new(&cycle, 4, 2.0, 6.0, quarter);
        assert_eq!(
            plan,
            Plan {
                warm: 36,
                total: 36 + 96
            }
        );
        assert_eq!(
            Plan::new(&[0, 1], 2, 0.0, 0.0, quarter),
            Plan { warm: 0, total: 2 }
        );
        assert_eq!(
            Plan::new(&[0], 2, 1.0, 1.0, quarter),
            Plan::default(),
            "a target without turns"
        );
        let huge = Plan {
            warm: 0,
            total: (1 << 32) + 1,
        };
        assert!(
            huge.bound(quarter) > Duration::from_secs(1 << 32),
            "no wrap-around"
        );
    }

    #[test]
    fn a_turn_order_names_every_target_and_no_other() {
        assert_eq!(turn_order(vec![], 3).unwrap(), [0, 1, 2]);
        assert_eq!(turn_order(vec![0, 1, 0, 2], 3).unwrap(), [0, 1, 0, 2]);
        assert!(turn_order(vec![0, 3], 3)
            .unwrap_err()
            .contains("no target 3"));
        assert!(turn_order(vec![0, 1], 3)
            .unwrap_err()
            .contains("target 2 has no turn"));
    }
}
