//! Scenario `broadcast`: fan-out to N subscribers, timed until every subscriber has each
//! broadcast.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_bench::result_line;
use switchboard_bench::stats::Samples;
use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{client_cpu_fields, fmt_cores, percentiles, pooled, sample_cpu, Clock, Tally};
use crate::poller::{Inbound, Loop, Scenario, Sender};
use crate::roundtrip::max_frame;
use crate::sockets::{open_sockets, Run};

/// Scenario 2: broadcast fan-out to N subscribers.
pub(crate) async fn broadcast(
    run: Arc<Run>,
    n: usize,
    inflight: usize,
    max_broadcasts: usize,
    warmup: f64,
    secs: f64,
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
    let cpu = sample_cpu(clock, run.server_pid);
    let inflight = inflight.max(1);
    let fan = tokio::task::spawn_blocking(move || {
        let mut fan = Fanout {
            subscribers: n,
            publisher: n,
            template,
            scratch: Vec::new(),
            remaining: vec![0; max_broadcasts],
            sent_ns: vec![0; max_broadcasts],
            sent: 0,
            free: inflight,
            inflight,
            clock,
            deliveries: 0,
            time_to_all: Vec::new(),
            tally: Tally::default(),
        };
        fan.publish(&mut lp.tx);
        lp.run(&clock, &mut fan);
        fan
    })
    .await
    .map_err(|e| e.to_string())?;
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
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
    let pooled = pooled(run.samples_file.as_deref(), &tta);
    let mut line = vec![
        ("scenario", "broadcast".into()),
        ("subscribers", n.to_string()),
        ("inflight", inflight.to_string()),
        ("broadcasts", sent.to_string()),
        ("complete", tta.len().to_string()),
        (
            "rate",
            format!("{:.0}", deliveries as f64 / clock.window_secs()),
        ),
        (
            "bps",
            format!("{:.1}", tta.len() as f64 / clock.window_secs()),
        ),
    ];
    line.extend(client_cpu_fields(
        client_cpu,
        tally.idle,
        clock.window_secs(),
    ));
    line.extend([
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", tally.errors.to_string()),
    ]);
    line.extend(percentiles(&tta, ["p50_us", "p99_us", "p999_us"]));
    line.extend(pooled);
    Ok(result_line(&line))
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
}

impl Scenario for Fanout {
    fn on(&mut self, tx: &mut Sender, i: usize, inbound: Inbound<'_>) {
        match inbound {
            // The publisher gets every broadcast too: dropped.
            Inbound::Text(_) if i == self.publisher => {}
            Inbound::Text(payload) => {
                self.delivered(payload);
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
            }
        }
    }

    /// The publisher waits for a free slot, and for the warm-up's idle start.
    fn after_turn(&mut self, tx: &mut Sender) {
        self.publish(tx);
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
    /// Sends broadcasts while the window has room and the clock runs.
    fn publish(&mut self, tx: &mut Sender) {
        while self.free > 0 && self.sent < self.remaining.len() {
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

    fn delivered(&mut self, frame: &[u8]) {
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
        if self.clock.measured(at) {
            self.deliveries += 1;
        }
        if *left == 0 {
            if self.clock.measured(at) {
                let sent = self.sent_ns[seq];
                self.time_to_all
                    .push(self.clock.ns(at).saturating_sub(sent));
            }
            self.free += 1;
        }
    }
}
