//! Scenario `broadcast`: fan-out to N subscribers, timed until every subscriber has each
//! broadcast.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_bench::procfs::{self, Ticks};
use switchboard_bench::result_line;
use switchboard_bench::stats::Samples;
use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{
    client_cpu_fields, percentiles, pooled, sample_cpu, server_cpu_fields, wait_quiet, Clock,
    Cores, CpuTicks, ServerCores, Tally,
};
use crate::poller::{Inbound, Loop, Scenario, Sender};
use crate::roundtrip::max_frame;
use crate::sockets::{open_sockets, Run};

/// Scenario 2: broadcast fan-out to N subscribers. With `turns`, the run is measured in
/// turns that standard input asks for (see [`turns`]), not in one window.
pub(crate) async fn broadcast(
    run: Arc<Run>,
    n: usize,
    inflight: usize,
    max_broadcasts: usize,
    warmup: f64,
    secs: f64,
    turns: bool,
) -> Result<String, String> {
    let n = n.max(1);
    // Sockets 0..n subscribe; socket n publishes (and gets every broadcast too).
    let sockets = open_sockets(&run, n + 1).await?;
    let template = Template::new(Kind::Broadcast, "", run.payload);
    let mut lp = Loop::new(sockets, max_frame(&template), run.spin)?;
    let payload = run.payload;
    let ready = tokio::task::spawn_blocking(move || probe_all(&mut lp, n, payload).map(|()| lp))
        .await
        .map_err(|e| e.to_string())?;
    let mut lp = ready?;

    let clock = Clock::start(warmup, secs);
    let inflight = inflight.max(1);
    if turns {
        let server_pid = run.server_pid;
        let (fan, cpu, window) = tokio::task::spawn_blocking(move || {
            let fan = Fanout::new(n, template, max_broadcasts, inflight, clock);
            self::turns(&mut lp, fan, server_pid)
        })
        .await
        .map_err(|e| e.to_string())??;
        return Ok(fanout_result(fan, n, inflight, cpu, window, &|_| {
            Vec::new()
        }));
    }
    let cpu = sample_cpu(clock, run.server_pid);
    let fan = tokio::task::spawn_blocking(move || {
        let mut fan = Fanout::new(n, template, max_broadcasts, inflight, clock);
        fan.publish(&mut lp.tx);
        lp.run(&clock, &mut fan);
        fan
    })
    .await
    .map_err(|e| e.to_string())?;
    let cpu = cpu.await.unwrap_or((None, None));
    let pooled = |tta: &Samples| pooled(run.samples_file.as_deref(), tta);
    Ok(fanout_result(
        fan,
        n,
        inflight,
        cpu,
        clock.window_secs(),
        &pooled,
    ))
}

/// The longest turn `--turns` takes.
const MAX_TURN_MS: u64 = 60_000;

/// The `RESULT` line of a broadcast run measured over `window` seconds, with the client's and
/// the server's CPU over it (`cpu`), and what `pool` adds (the pooled percentiles of a slice).
fn fanout_result(
    fan: Fanout,
    n: usize,
    inflight: usize,
    (client_cpu, server_cpu): Cores,
    window: f64,
    pool: &dyn Fn(&Samples) -> Vec<(&'static str, String)>,
) -> String {
    let Fanout {
        sent,
        deliveries,
        time_to_all,
        tally,
        ..
    } = fan;
    if let Some(e) = &tally.first_error {
        eprintln!("bench-client: {} errors, first: {e}", tally.errors);
    }
    let tta = Samples::new(time_to_all);
    let window = window.max(f64::MIN_POSITIVE);
    let mut line = vec![
        ("scenario", "broadcast".into()),
        ("subscribers", n.to_string()),
        ("inflight", inflight.to_string()),
        ("broadcasts", sent.to_string()),
        ("complete", tta.len().to_string()),
        ("rate", format!("{:.0}", deliveries as f64 / window)),
        ("bps", format!("{:.1}", tta.len() as f64 / window)),
    ];
    line.extend(client_cpu_fields(client_cpu, tally.idle, window));
    line.extend(server_cpu_fields(server_cpu));
    line.push(("errors", tally.errors.to_string()));
    line.extend(percentiles(&tta, ["p50_us", "p99_us", "p999_us"]));
    line.extend(pool(&tta));
    result_line(&line)
}

/// The run in turns that standard input asks for, one line each, for `cargo xtask bench` to
/// take several servers in turn with one client each (10,000 sockets per server are more
/// than one process may hold for four servers):
///
/// - `READY` (printed): the subscribers are proven, the client waits for turns;
/// - `turn MS 1` (or `0`): broadcasts for MS milliseconds, measured (or a warm-up), then
///   waits for the broadcasts out to reach everyone, and prints `DONE`;
/// - `end`, or the end of the input: the run's figures, over its measured turns only.
///
/// A turn counts the deliveries that arrive within it, the time-to-all of the broadcasts
/// sent within it, and the CPU used until it ends (read then, not after the drain). Before
/// `DONE`, the client waits (at most 200 ms) for the server to be quiet, so that work it put
/// off does not land on the next server's turn. Returns the run, the client's and the
/// server's CPU in cores over the measured turns, and their length in seconds.
fn turns(
    lp: &mut Loop,
    mut fan: Fanout,
    server_pid: Option<u32>,
) -> Result<(Fanout, Cores, f64), String> {
    use std::io::{BufRead, Write};
    let base = fan.clock.base;
    let (mut window, mut client_ticks, mut server_ticks) = (Duration::ZERO, 0u64, Ticks::default());
    println!("READY");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (ms, measured) = match words[..] {
            ["turn", ms, measured @ ("0" | "1")] => (
                ms.parse::<u64>()
                    .ok()
                    .filter(|ms| (1..=MAX_TURN_MS).contains(ms))
                    .ok_or_else(|| format!("`{line}`: a turn is 1 to {MAX_TURN_MS} ms"))?,
                measured == "1",
            ),
            ["end"] => break,
            _ => return Err(format!("not `turn MS 0|1` nor `end`: `{line}`")),
        };
        let start = Instant::now();
        let end = start + Duration::from_millis(ms);
        fan.clock = Clock {
            base,
            warm: if measured { start } else { end },
            end,
            hard: end + Duration::from_secs(5),
        };
        let before = CpuTicks::now(server_pid);
        fan.read_at_end = Some(server_pid);
        fan.ticks_at_end = None;
        fan.publish(&mut lp.tx);
        let clock = fan.clock;
        lp.run(&clock, &mut fan);
        let after = fan
            .ticks_at_end
            .take()
            .unwrap_or_else(|| CpuTicks::now(server_pid));
        if measured {
            window += end - start;
            let (client, server) = before.until(after);
            client_ticks += client;
            server_ticks += server;
        }
        wait_quiet(server_pid);
        println!("DONE");
        let _ = std::io::stdout().flush();
    }
    let secs = window.as_secs_f64();
    let client = (secs > 0.0).then(|| client_ticks as f64 / procfs::TICKS_PER_SEC / secs);
    let server = server_pid.and_then(|_| ServerCores::of(server_ticks, secs));
    Ok((fan, (client, server), secs))
}

/// One echo round trip on each of the `n` subscribers, all at once: proves the server has
/// registered them before the first broadcast.
fn probe_all(lp: &mut Loop, n: usize, payload: usize) -> Result<(), String> {
    let started = Instant::now();
    let template = Template::new(Kind::Echo, "", payload);
    let mut scratch = Vec::new();
    for i in 0..n {
        let stamp = Stamp {
            sent_ns: 0,
            seq: 0,
            from: i as u32,
        };
        template.stamped_into(stamp, &mut scratch);
        lp.tx.text(i, &scratch)?;
    }
    let deadline = started + Duration::from_secs(30);
    let mut answered = vec![false; n];
    let mut left = n;
    let mut failure = None;
    while left > 0 && failure.is_none() {
        if Instant::now() >= deadline {
            return Err(format!(
                "{left} of {n} subscribers gave no echo within 30 s"
            ));
        }
        lp.turn(deadline, &mut |_, i, inbound| match inbound {
            Inbound::Text(p) if i < n && wire::frame_type(p) == Some("bench:echo") => {
                if !std::mem::replace(&mut answered[i], true) {
                    left -= 1;
                }
            }
            Inbound::Text(p) => {
                failure = Some(format!(
                    "socket {i}: unexpected frame: {}",
                    String::from_utf8_lossy(p)
                ));
            }
            Inbound::Ended(why) => failure = Some(format!("socket {i}: {why}")),
        })?;
    }
    if let Some(e) = failure {
        return Err(format!("a subscriber failed its first echo: {e}"));
    }
    eprintln!(
        "bench-client: {n} subscribers answered in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The publisher, the subscribers and what they have received.
struct Fanout {
    subscribers: usize,
    publisher: usize,
    template: Template,
    scratch: Vec<u8>,
    /// Per broadcast: subscribers that have not received it yet, and when it was sent.
    remaining: Vec<usize>,
    /// Per subscriber: the broadcasts it has received, which come in order (one socket, the
    /// order sent), so the next it waits for.
    received: Vec<usize>,
    sent_ns: Vec<u64>,
    sent: usize,
    /// Broadcasts that may still be sent before one in flight has reached every subscriber,
    /// out of `inflight`.
    free: usize,
    inflight: usize,
    clock: Clock,
    deliveries: u64,
    time_to_all: Vec<u64>,
    tally: Tally,
    /// In a turn: the server whose CPU is read when the clock ends (`Some(None)`: no PID),
    /// and the client's and the server's ticks then.
    read_at_end: Option<Option<u32>>,
    ticks_at_end: Option<CpuTicks>,
}

impl Scenario for Fanout {
    fn on(&mut self, tx: &mut Sender, i: usize, inbound: Inbound<'_>) {
        match inbound {
            // The publisher gets every broadcast too: dropped.
            Inbound::Text(_) if i == self.publisher => {}
            Inbound::Text(payload) => {
                self.delivered(i, payload);
                if self.free > 0 {
                    self.publish(tx);
                }
            }
            Inbound::Ended(why) if i == self.publisher => {
                self.tally.error(format!("publisher: {why}"));
            }
            Inbound::Ended(why) => {
                self.tally
                    .error(format!("a subscriber's socket ended early: {why}"));
                self.gone(i);
                if self.free > 0 {
                    self.publish(tx);
                }
            }
        }
    }

    /// The publisher waits for a free slot, and for the warm-up's idle start. In a turn, the
    /// CPU is read when the clock ends, before the drain.
    fn after_turn(&mut self, tx: &mut Sender) {
        self.publish(tx);
        if let Some(pid) = self.read_at_end {
            if self.ticks_at_end.is_none() && Instant::now() >= self.clock.end {
                self.ticks_at_end = Some(CpuTicks::now(pid));
            }
        }
    }

    fn settled(&self) -> bool {
        self.free == self.inflight
    }

    fn overdue(&self) -> String {
        "some broadcasts never reached every subscriber".into()
    }

    fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }
}

impl Fanout {
    /// `n` subscribers (sockets `0..n`) and the publisher (socket `n`), room for
    /// `max_broadcasts`.
    fn new(
        n: usize,
        template: Template,
        max_broadcasts: usize,
        inflight: usize,
        clock: Clock,
    ) -> Fanout {
        Fanout {
            subscribers: n,
            publisher: n,
            template,
            scratch: Vec::new(),
            remaining: vec![0; max_broadcasts],
            received: vec![0; n],
            sent_ns: vec![0; max_broadcasts],
            sent: 0,
            free: inflight,
            inflight,
            clock,
            deliveries: 0,
            time_to_all: Vec::new(),
            tally: Tally::default(),
            read_at_end: None,
            ticks_at_end: None,
        }
    }

    /// Sends broadcasts while the window has room and the clock runs.
    fn publish(&mut self, tx: &mut Sender) {
        while self.free > 0 && self.sent < self.remaining.len() && self.subscribers > 0 {
            let now = Instant::now();
            if now >= self.clock.end {
                return;
            }
            let seq = self.sent;
            self.remaining[seq] = self.subscribers;
            self.sent_ns[seq] = self.clock.ns(now);
            let stamp = Stamp {
                sent_ns: self.clock.ns(now),
                seq: seq as u64,
                from: self.publisher as u32,
            };
            self.template.stamped_into(stamp, &mut self.scratch);
            if let Err(e) = tx.text(self.publisher, &self.scratch) {
                self.tally.error(format!("publisher: {e}"));
                self.sent = self.remaining.len();
                return;
            }
            self.sent += 1;
            self.free -= 1;
        }
    }

    /// Subscriber `i` has ended: the broadcasts out that it had not received wait for it no
    /// more, and later ones are not sent to it (the run reports the error; without this, no
    /// broadcast would complete again and every later turn would run into its deadline).
    fn gone(&mut self, i: usize) {
        let at = Instant::now();
        self.subscribers = self.subscribers.saturating_sub(1);
        for seq in self.received[i]..self.sent {
            if self.remaining[seq] > 0 {
                self.remaining[seq] -= 1;
                if self.remaining[seq] == 0 {
                    self.complete(seq, at);
                }
            }
        }
        self.received[i] = self.sent;
    }

    /// Broadcast `seq` has reached every subscriber at `at`.
    fn complete(&mut self, seq: usize, at: Instant) {
        // Timed if it was sent within the window, even when it reached its last subscriber
        // after: the slowest broadcasts are the likeliest to straddle the end.
        let sent = self.sent_ns[seq];
        let window = self.clock.ns(self.clock.warm)..self.clock.ns(self.clock.end);
        if window.contains(&sent) {
            self.time_to_all
                .push(self.clock.ns(at).saturating_sub(sent));
        }
        self.free += 1;
    }

    fn delivered(&mut self, i: usize, frame: &[u8]) {
        let at = Instant::now();
        let Some(stamp) = wire::read_stamp(frame) else {
            self.tally.error(format!(
                "unexpected frame: {}",
                String::from_utf8_lossy(frame)
            ));
            return;
        };
        let seq = stamp.seq as usize;
        let Some(left) = self.remaining.get_mut(seq).filter(|left| **left > 0) else {
            self.tally
                .error(format!("broadcast {seq} was never sent, or came twice"));
            return;
        };
        *left -= 1;
        let done = *left == 0;
        if let Some(next) = self.received.get_mut(i) {
            *next = seq + 1;
        }
        if self.clock.measured(at) {
            self.deliveries += 1;
        }
        if done {
            self.complete(seq, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame a subscriber gets for broadcast `seq`.
    fn broadcast_frame(template: &Template, seq: u64) -> Vec<u8> {
        let mut msg = Vec::new();
        let stamp = Stamp {
            sent_ns: 1,
            seq,
            from: 3,
        };
        template.stamped_into(stamp, &mut msg);
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        serde_json::to_vec(&serde_json::json!({"type": "bench.broadcast", "payload": v["payload"]}))
            .unwrap()
    }

    #[test]
    fn a_subscriber_that_ends_is_waited_for_no_more() {
        let template = Template::new(Kind::Broadcast, "", 64);
        let clock = Clock::start(0.0, 60.0);
        let mut fan = Fanout::new(3, template.clone(), 10, 2, clock);
        // Two broadcasts out, as `publish` sends them.
        for seq in 0..2 {
            fan.remaining[seq] = fan.subscribers;
            fan.sent += 1;
            fan.free -= 1;
        }
        for i in 0..3 {
            fan.delivered(i, &broadcast_frame(&template, 0));
        }
        for i in 0..2 {
            fan.delivered(i, &broadcast_frame(&template, 1));
        }
        assert_eq!(
            (fan.free, fan.remaining[1]),
            (1, 1),
            "broadcast 1 waits for subscriber 2"
        );
        fan.gone(2);
        assert_eq!(fan.free, fan.inflight, "nothing is out any more");
        assert_eq!(fan.time_to_all.len(), 2, "both broadcasts completed");
        assert_eq!(fan.subscribers, 2, "later broadcasts go to two");
        assert_eq!(fan.tally.errors, 0);
    }
}
