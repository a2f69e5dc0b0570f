//! Scenarios `echo` and `send`: round trips through the echo handler or the `send` topic.

use std::sync::Arc;
use std::time::Instant;

use fastwebsockets::{Frame, OpCode};
use tokio::time::timeout_at;

use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{latency_result, sample_cpu, Clock, Tally};
use crate::sockets::{open_sockets, send_text, Run, Ws};

/// Scenarios 1 and 3: each socket keeps `inflight` messages out and counts the answers.
pub(crate) async fn roundtrips(
    run: Arc<Run>,
    kind: Kind,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let sockets = open_sockets(&run, n.max(1)).await?;
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let expect = match kind {
        Kind::Echo => "bench:echo",
        _ => "bench.send",
    };
    let workers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let template = Template::new(kind, &format!("user-{i}"), run.payload);
            tokio::spawn(roundtrip_worker(
                ws,
                template,
                expect,
                inflight.max(1),
                clock,
                i as u32,
            ))
        })
        .collect();
    Ok(latency_result(
        vec![
            (
                "scenario",
                if kind == Kind::Echo { "echo" } else { "send" }.into(),
            ),
            ("sockets", n.to_string()),
            ("inflight", inflight.to_string()),
        ],
        workers,
        cpu,
        &clock,
    )
    .await)
}

async fn roundtrip_worker(
    mut ws: Ws,
    template: Template,
    expect: &'static str,
    inflight: usize,
    clock: Clock,
    me: u32,
) -> Tally {
    let mut tally = Tally::default();
    let mut scratch = Vec::with_capacity(template.len());
    let mut pending = 0usize;
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now < clock.end {
            while pending < inflight {
                let stamp = Stamp {
                    sent_ns: clock.ns(Instant::now()),
                    seq,
                    from: me,
                };
                template.stamped_into(stamp, &mut scratch);
                if let Err(e) = send_text(&mut ws, &mut scratch).await {
                    tally.error(e);
                    return tally;
                }
                pending += 1;
                seq += 1;
            }
        } else if pending == 0 {
            break;
        }
        let frame = match timeout_at(clock.hard.into(), ws.read_frame()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tally.error(e);
                return tally;
            }
            Err(_) => {
                tally.error(format!("{pending} answers never came"));
                return tally;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                let at = Instant::now();
                pending = pending.saturating_sub(1);
                match (
                    wire::frame_type(&frame.payload),
                    wire::read_stamp(&frame.payload),
                ) {
                    (Some(t), Some(stamp)) if t == expect && stamp.from == me => {
                        if clock.measured(at) {
                            tally
                                .samples
                                .push(clock.ns(at).saturating_sub(stamp.sent_ns));
                        }
                    }
                    _ => tally.error(format!(
                        "unexpected frame: {}",
                        String::from_utf8_lossy(&frame.payload)
                    )),
                }
            }
            OpCode::Close => {
                tally.error("server closed the socket");
                return tally;
            }
            _ => {}
        }
    }
    let _ = ws.write_frame(Frame::close(1000, b"")).await;
    tally
}
