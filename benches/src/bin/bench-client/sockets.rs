//! The shared setup of a run, and opening and proving its sockets.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout_at;

use switchboard_bench::client::{self, Endpoint};
use switchboard_bench::wire::{self, Kind, Stamp, Template};

/// The shared setup of a run.
#[derive(Clone)]
pub(crate) struct Run {
    pub(crate) ep: Endpoint,
    pub(crate) sources: Vec<IpAddr>,
    pub(crate) secret: String,
    pub(crate) server_pid: Option<u32>,
    pub(crate) connect_concurrency: usize,
    pub(crate) payload: usize,
    /// Where to pool latency samples with earlier slices (`--samples-file`).
    pub(crate) samples_file: Option<std::path::PathBuf>,
    /// Poll loops never sleep (`--spin`).
    pub(crate) spin: bool,
}

impl Run {
    pub(crate) fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

pub(crate) type Ws = WebSocket<TcpStream>;

/// Opens socket `i` as `user-{i}`, retrying up to three times.
pub(crate) async fn open_one(run: &Run, i: usize) -> Result<Ws, String> {
    let token = switchboard_bench::mint_token(&run.secret, &format!("user-{i}"), 3600);
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        let connect = client::connect(&run.ep, run.source(i), &token);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(format!("socket {i}: {last}"))
}

/// Opens `n` sockets, `user-{i}` each, at most `connect_concurrency` at a time. Fails if any
/// cannot be opened.
pub(crate) async fn open_sockets(run: &Arc<Run>, n: usize) -> Result<Vec<Ws>, String> {
    let gate = Arc::new(Semaphore::new(run.connect_concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let run = run.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            open_one(&run, i).await
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(ws)) => sockets.push(ws),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(format!(
            "{} of {n} sockets failed to open (first: {})",
            failures.len(),
            failures[0]
        ));
    }
    eprintln!(
        "bench-client: {n} sockets open in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(sockets)
}

pub(crate) async fn send_text(ws: &mut Ws, scratch: &mut [u8]) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::text(Payload::BorrowedMut(scratch)))
        .await
}

/// One echo round trip: proves the server has registered the socket.
pub(crate) async fn probe(mut ws: Ws, me: u32, payload: usize) -> Result<Ws, String> {
    let template = Template::new(Kind::Echo, "", payload);
    let mut scratch = Vec::new();
    template.stamped_into(
        Stamp {
            sent_ns: 0,
            seq: 0,
            from: me,
        },
        &mut scratch,
    );
    send_text(&mut ws, &mut scratch)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let frame = timeout_at(deadline.into(), ws.read_frame())
            .await
            .map_err(|_| "no echo within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        match frame.opcode {
            OpCode::Text if wire::frame_type(&frame.payload) == Some("bench:echo") => break,
            OpCode::Text => {
                return Err(format!(
                    "unexpected frame: {}",
                    String::from_utf8_lossy(&frame.payload)
                ))
            }
            OpCode::Close => return Err("closed".into()),
            _ => {}
        }
    }
    Ok(ws)
}
