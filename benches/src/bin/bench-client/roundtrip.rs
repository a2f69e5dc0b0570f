//! Scenarios `echo` and `send`: round trips through the echo handler or the `send` topic.

use std::sync::Arc;
use std::time::Instant;

use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{latency_result, sample_cpu, Clock, Tally};
use crate::poller::{Inbound, Loop, Scenario, Sender};
use crate::sockets::{open_sockets, Run};

/// Scenarios 1 and 3: each socket keeps `inflight` messages out and counts the answers.
pub(crate) async fn roundtrips(
    run: Arc<Run>,
    kind: Kind,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let n = n.max(1);
    let sockets = open_sockets(&run, n).await?;
    let templates: Vec<_> = (0..n)
        .map(|i| Template::new(kind, &format!("user-{i}"), run.payload))
        .collect();
    let mut lp = Loop::new(sockets, max_frame(&templates[0]), run.spin)?;
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let expect = match kind {
        Kind::Echo => "bench:echo",
        _ => "bench.send",
    };
    let inflight = inflight.max(1);
    let worker = tokio::task::spawn_blocking(move || {
        let tally = roundtrip_loop(&mut lp, &templates, expect, inflight, clock);
        lp.close_all();
        tally
    });
    Ok(latency_result(
        vec![
            (
                "scenario",
                if kind == Kind::Echo { "echo" } else { "send" }.into(),
            ),
            ("sockets", n.to_string()),
            ("inflight", inflight.to_string()),
        ],
        vec![worker],
        cpu,
        &clock,
        run.samples_file.as_deref(),
    )
    .await)
}

/// The longest frame the client accepts: well over any answer to `template`.
pub(crate) fn max_frame(template: &Template) -> usize {
    (4 * template.len()).max(64 * 1024)
}

/// Every socket sends `inflight` messages, then one more for each answer until the clock
/// ends; the loop ends when every answer is in (or at the hard deadline).
fn roundtrip_loop(
    lp: &mut Loop,
    templates: &[Template],
    expect: &str,
    inflight: usize,
    clock: Clock,
) -> Tally {
    let mut st = Roundtrips {
        templates,
        expect,
        inflight,
        clock,
        tally: Tally::default(),
        pending: vec![0; templates.len()],
        seq: vec![0; templates.len()],
        outstanding: 0,
        scratch: Vec::with_capacity(templates[0].len()),
    };
    for i in 0..templates.len() {
        st.fill(&mut lp.tx, i);
    }
    lp.run(&clock, &mut st);
    st.tally
}

/// The state of the round trips of every socket.
struct Roundtrips<'a> {
    templates: &'a [Template],
    expect: &'a str,
    inflight: usize,
    clock: Clock,
    tally: Tally,
    /// Messages out per socket, and in all.
    pending: Vec<usize>,
    outstanding: usize,
    seq: Vec<u64>,
    scratch: Vec<u8>,
}

impl Scenario for Roundtrips<'_> {
    fn on(&mut self, tx: &mut Sender, i: usize, inbound: Inbound<'_>) {
        match inbound {
            Inbound::Text(payload) => {
                let at = Instant::now();
                if self.pending[i] > 0 {
                    self.pending[i] -= 1;
                    self.outstanding -= 1;
                }
                match (wire::frame_type(payload), wire::read_stamp(payload)) {
                    (Some(t), Some(stamp)) if t == self.expect && stamp.from == i as u32 => {
                        if self.clock.measured(at) {
                            let rtt = self.clock.ns(at).saturating_sub(stamp.sent_ns);
                            self.tally.samples.push(rtt);
                        }
                    }
                    _ => self.tally.error(format!(
                        "unexpected frame: {}",
                        String::from_utf8_lossy(payload)
                    )),
                }
                if at < self.clock.end {
                    self.fill(tx, i);
                }
            }
            Inbound::Ended(why) => {
                self.tally.error(format!("socket {i}: {why}"));
                self.outstanding -= self.pending[i];
                self.pending[i] = 0;
            }
        }
    }

    fn settled(&self) -> bool {
        self.outstanding == 0
    }

    fn overdue(&self) -> String {
        format!("{} answers never came", self.outstanding)
    }

    fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }
}

impl Roundtrips<'_> {
    /// Sends on socket `i` until it has `inflight` messages out.
    fn fill(&mut self, tx: &mut Sender, i: usize) {
        while self.pending[i] < self.inflight {
            let template = &self.templates[i];
            let sent = send_stamped(tx, i, template, &self.clock, self.seq[i], &mut self.scratch);
            if let Err(e) = sent {
                self.tally.error(e);
                self.outstanding -= self.pending[i];
                self.pending[i] = 0;
                return;
            }
            self.pending[i] += 1;
            self.outstanding += 1;
            self.seq[i] += 1;
        }
    }
}

/// Sends `template` on socket `i`, stamped with the time now, `seq` and the socket's index
/// (which its answer must carry back); `scratch` holds the message.
pub(crate) fn send_stamped(
    tx: &mut Sender,
    i: usize,
    template: &Template,
    clock: &Clock,
    seq: u64,
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let stamp = Stamp {
        sent_ns: clock.ns(Instant::now()),
        seq,
        from: i as u32,
    };
    template.stamped_into(stamp, scratch);
    tx.text(i, scratch)
}
