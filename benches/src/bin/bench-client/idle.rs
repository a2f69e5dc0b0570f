//! Scenario `idle`: hold N proven sockets while the caller reads the server's memory.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::OpCode;
use tokio::sync::Semaphore;

use switchboard_bench::result_line;

use crate::sockets::{open_one, probe, Run};

/// Scenario 4: hold N proven sockets until told to stop. The caller reads the server's RSS
/// between `READY` and closing our stdin. Each socket is connected, proven with one echo and
/// then read (answering heartbeats) by its own task from the start, so a slow setup of many
/// sockets never misses a ping.
pub(crate) async fn idle(run: Arc<Run>, n: usize, hold: f64) -> Result<String, String> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(run.connect_concurrency));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let lost = Arc::new(AtomicU64::new(0));
    let holders: Vec<_> = (0..n)
        .map(|i| {
            let (run, gate, ready, lost) =
                (run.clone(), gate.clone(), ready_tx.clone(), lost.clone());
            tokio::spawn(async move {
                let permit = gate.acquire().await;
                let opened = match open_one(&run, i).await {
                    Ok(ws) => probe(ws, i as u32, run.payload).await,
                    Err(e) => Err(e),
                };
                drop(permit);
                let mut ws = match opened {
                    Ok(ws) => ws,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                // Answer heartbeats (auto-pong) until the socket or the process ends.
                while let Ok(f) = ws.read_frame().await {
                    if f.opcode == OpCode::Close {
                        break;
                    }
                }
                lost.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(format!("a socket failed to open or echo: {e}")),
            None => return Err("a socket task ended early".into()),
        }
    }
    let setup = started.elapsed().as_secs_f64();
    eprintln!("bench-client: {n} sockets open and proven in {setup:.2}s");
    println!("READY sockets={n} setup_s={setup:.2}");
    let _ = std::io::stdout().flush();

    // Hold until stdin closes (the orchestrator is done measuring) or `hold` passes.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = tx.send(());
    });
    let _ = tokio::time::timeout(Duration::from_secs_f64(hold.max(0.0)), rx).await;
    let lost = lost.load(Ordering::Relaxed);
    for h in holders {
        h.abort();
    }
    Ok(result_line(&[
        ("scenario", "idle".into()),
        ("sockets", n.to_string()),
        ("setup_s", format!("{setup:.2}")),
        ("errors", lost.to_string()),
    ]))
}
