//! Scenario `broadcast`: fan-out to N subscribers, timed until every subscriber has each
//! broadcast.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use tokio::sync::Semaphore;
use tokio::time::timeout_at;

use switchboard_bench::result_line;
use switchboard_bench::stats::Samples;
use switchboard_bench::wire::{self, Kind, Stamp, Template};

use crate::measure::{fmt_cores, sample_cpu, Clock};
use crate::sockets::{open_sockets, probe, Run, Ws};

/// Per-broadcast bookkeeping shared by the publisher and every subscriber.
struct Fanout {
    subscribers: u32,
    remaining: Vec<AtomicU32>,
    sent_ns: Vec<AtomicU64>,
    /// Broadcasts allowed in flight; the last subscriber to receive one gives its permit back.
    window: Semaphore,
    clock: Clock,
    deliveries: AtomicU64,
    time_to_all: Mutex<Vec<u64>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    failed: AtomicBool,
}

impl Fanout {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }

    fn delivered(&self, frame: &[u8]) {
        let at = Instant::now();
        let Some(stamp) = wire::read_stamp(frame) else {
            self.error(format!(
                "unexpected frame: {}",
                String::from_utf8_lossy(frame)
            ));
            return;
        };
        let Some(left) = self.remaining.get(stamp.seq as usize) else {
            self.error("broadcast sequence out of range");
            return;
        };
        if self.clock.measured(at) {
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let sent = self.sent_ns[stamp.seq as usize].load(Ordering::Acquire);
            if self.clock.measured(at) {
                self.time_to_all
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(self.clock.ns(at).saturating_sub(sent));
            }
            self.window.add_permits(1);
        }
    }
}

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
    let mut sockets = open_sockets(&run, n + 1).await?;
    let publisher = sockets.pop().expect("n + 1 sockets");

    // Prove that every subscriber is registered (open ran) before the first broadcast.
    let ready_started = Instant::now();
    let probes: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(probe(ws, i as u32, run.payload)))
        .collect();
    let mut subscribers = Vec::with_capacity(n);
    for p in probes {
        match p.await {
            Ok(Ok(ws)) => subscribers.push(ws),
            Ok(Err(e)) => return Err(format!("a subscriber failed its first echo: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    eprintln!(
        "bench-client: {n} subscribers answered in {:.2}s",
        ready_started.elapsed().as_secs_f64()
    );

    let clock = Clock::start(warmup, secs);
    let fan = Arc::new(Fanout {
        subscribers: n as u32,
        remaining: (0..max_broadcasts).map(|_| AtomicU32::new(0)).collect(),
        sent_ns: (0..max_broadcasts).map(|_| AtomicU64::new(0)).collect(),
        window: Semaphore::new(inflight.max(1)),
        clock,
        deliveries: AtomicU64::new(0),
        time_to_all: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        failed: AtomicBool::new(false),
    });
    let cpu = sample_cpu(clock, run.server_pid);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|ws| tokio::spawn(subscriber(ws, fan.clone())))
        .collect();

    let (mut pub_read, mut pub_write) = publisher.split(|s| s.into_split());
    // The publisher gets every broadcast too; read and drop them so its queue stays short.
    let drain = tokio::spawn(async move {
        let mut ignore = |_f: Frame<'_>| async { Ok::<_, WebSocketError>(()) };
        while let Ok(f) = pub_read.read_frame(&mut ignore).await {
            if f.opcode == OpCode::Close {
                break;
            }
        }
    });

    let template = Template::new(Kind::Broadcast, "", run.payload);
    let mut scratch = Vec::with_capacity(template.len());
    let mut sent = 0usize;
    while Instant::now() < clock.end && sent < max_broadcasts {
        match timeout_at(clock.end.into(), fan.window.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        fan.remaining[sent].store(fan.subscribers, Ordering::Release);
        fan.sent_ns[sent].store(clock.ns(Instant::now()), Ordering::Release);
        template.stamped_into(
            Stamp {
                sent_ns: clock.ns(Instant::now()),
                seq: sent as u64,
                from: n as u32,
            },
            &mut scratch,
        );
        if let Err(e) = pub_write
            .write_frame(Frame::text(Payload::BorrowedMut(&mut scratch)))
            .await
        {
            fan.error(format!("publisher: {e}"));
            break;
        }
        sent += 1;
    }
    // Let the broadcasts in flight land (bounded), then stop every reader.
    let all = inflight.max(1) as u32;
    let landed = timeout_at(clock.hard.into(), fan.window.acquire_many(all))
        .await
        .is_ok();
    if !landed {
        fan.error("some broadcasts never reached every subscriber");
    }
    for r in &readers {
        r.abort();
    }
    drain.abort();
    let (client_cpu, server_cpu) = cpu.await.unwrap_or((None, None));
    if fan.failed.load(Ordering::Relaxed) {
        fan.error("a subscriber's socket ended early");
    }
    let tta = Samples::new(std::mem::take(
        &mut *fan.time_to_all.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let errors = fan.errors.load(Ordering::Relaxed);
    if let Some(e) = &*fan.first_error.lock().unwrap_or_else(|e| e.into_inner()) {
        eprintln!("bench-client: {errors} errors, first: {e}");
    }
    let deliveries = fan.deliveries.load(Ordering::Relaxed);
    Ok(result_line(&[
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
        ("p50_us", format!("{:.1}", tta.percentile_us(50.0))),
        ("p99_us", format!("{:.1}", tta.percentile_us(99.0))),
        ("p999_us", format!("{:.1}", tta.percentile_us(99.9))),
        ("client_cpu", fmt_cores(client_cpu)),
        ("server_cpu", fmt_cores(server_cpu)),
        ("errors", errors.to_string()),
    ]))
}

async fn subscriber(mut ws: Ws, fan: Arc<Fanout>) {
    loop {
        match ws.read_frame().await {
            Ok(f) if f.opcode == OpCode::Text => fan.delivered(&f.payload),
            Ok(f) if f.opcode == OpCode::Close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    fan.failed.store(true, Ordering::Relaxed);
}
