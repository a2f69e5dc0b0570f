//! Scenario `handshake`: connect, upgrade with a JWT and reset, as fast as possible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout_at;

use switchboard_bench::client;

use crate::measure::{latency_result, sample_cpu, Clock, Tally};
use crate::sockets::Run;

/// Scenario 5: handshakes per second. Each worker connects, upgrades with a JWT, and resets
/// the connection (linger 0: no TIME_WAIT to exhaust ports), again and again.
pub(crate) async fn handshakes(
    run: Arc<Run>,
    concurrency: usize,
    tokens: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..tokens.max(1))
            .map(|i| switchboard_bench::mint_token(&run.secret, &format!("user-{i}"), 3600))
            .collect(),
    );
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let run = run.clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = w;
                while Instant::now() < clock.end {
                    let t0 = Instant::now();
                    let token = &tokens[i % tokens.len()];
                    let attempt = timeout_at(
                        clock.hard.into(),
                        client::handshake(&run.ep, run.source(i), token),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(stream)) => {
                            let at = Instant::now();
                            if clock.measured(at) {
                                tally.samples.push((at - t0).as_nanos() as u64);
                            }
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        }
                        Ok(Err(e)) => {
                            tally.error(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => {
                            tally.error("handshake timed out");
                            break;
                        }
                    }
                    i += concurrency;
                }
                tally
            })
        })
        .collect();
    Ok(latency_result(
        vec![
            ("scenario", "handshake".into()),
            ("concurrency", concurrency.to_string()),
        ],
        workers,
        cpu,
        &clock,
        run.samples_file.as_deref(),
    )
    .await)
}
