//! Scenario `cross-node`: a plain NATS client publishes to `socket:send`; the server on the
//! NATS bus delivers to each socket's user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode};
use tokio::time::timeout_at;

use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{latency_result, sample_cpu, Clock, Tally};
use crate::sockets::{open_sockets, probe, Run, Ws};

/// Scenario 6: each socket's messages come from a plain NATS client (this process) publishing
/// `{"username":U,"type":"bench","payload":P}` to `socket:send`, through nats-server and the
/// Switchboard node on the NATS bus, to the socket. Latency is publish to socket read.
pub(crate) async fn cross_node(
    run: Arc<Run>,
    nats: &str,
    n: usize,
    inflight: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let url = nats.trim_start_matches("nats://");
    let host = url.rsplit_once(':').map_or(url, |(h, _)| h);
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!("{nats} is not a loopback address"));
    }
    let publisher = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(nats))
        .await
        .map_err(|_| format!("{nats}: no connection within 10 s"))?
        .map_err(|e| format!("{nats}: {e}"))?;
    let n = n.max(1);
    let sockets = open_sockets(&run, n).await?;
    // One echo each proves every socket is registered before the first publish.
    let probes: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(probe(ws, i as u32, run.payload)))
        .collect();
    let mut proven = Vec::with_capacity(n);
    for p in probes {
        match p.await {
            Ok(Ok(ws)) => proven.push(ws),
            Ok(Err(e)) => return Err(format!("a socket failed its first echo: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let workers: Vec<_> = proven
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let template = Template::new(Kind::Nats, &format!("user-{i}"), run.payload);
            tokio::spawn(cross_worker(
                ws,
                publisher.clone(),
                template,
                inflight.max(1),
                clock,
                i as u32,
            ))
        })
        .collect();
    Ok(latency_result(
        vec![
            ("scenario", "cross-node".into()),
            ("sockets", n.to_string()),
            ("inflight", inflight.to_string()),
        ],
        workers,
        cpu,
        &clock,
        run.samples_file.as_deref(),
    )
    .await)
}

/// One socket of the cross-node run: keeps `inflight` NATS publishes for its user
/// outstanding and reads them back from the socket.
async fn cross_worker(
    mut ws: Ws,
    nats: async_nats::Client,
    template: Template,
    inflight: usize,
    clock: Clock,
    me: u32,
) -> Tally {
    let mut tally = Tally::default();
    let mut scratch = Vec::with_capacity(template.len());
    let mut pending = 0usize;
    let mut seq = 0u64;
    loop {
        if Instant::now() < clock.end {
            while pending < inflight {
                let stamp = Stamp {
                    sent_ns: clock.ns(Instant::now()),
                    seq,
                    from: me,
                };
                template.stamped_into(stamp, &mut scratch);
                let body = bytes::Bytes::copy_from_slice(&scratch);
                if let Err(e) = nats.publish("socket:send", body).await {
                    tally.error(format!("publish: {e}"));
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
                tally.error(format!("{pending} messages never came"));
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
                    (Some("bench"), Some(stamp)) if stamp.from == me => {
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
