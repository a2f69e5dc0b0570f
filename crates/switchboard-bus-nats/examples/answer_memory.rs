//! By-hand measurement for docs/PERFORMANCE.md (never a test: RSS depends on the machine):
//! the RSS of one process holding a node bus and a handler bus, before and after 3,000
//! answered events of 32 KB, and 2 s later.
//!
//! ```text
//! nats-server -a 127.0.0.1 -p 14999 &
//! cargo run -p switchboard-bus-nats --example answer_memory -- nats://127.0.0.1:14999
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard_bus::{Bus, Message, Reply, ReplyTo};
use switchboard_bus_nats::{NatsBus, NatsOptions};

/// A socket stand-in that counts its answers.
struct Counting(Arc<AtomicUsize>);

impl ReplyTo for Counting {
    fn deliver(&self, _: &str, _: Reply) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: answer_memory NATS_URL")?;
    let handler = NatsBus::connect(NatsOptions::new(url.clone())).await?;
    handler.subscribe("big", Arc::new(|m: Message| async move { m.reply("ok") }))?;
    handler.subscriptions_ready().await?;
    let node = NatsBus::connect(NatsOptions::new(url)).await?;
    let answered = Arc::new(AtomicUsize::new(0));
    let payload = json!({"blob": "x".repeat(32 * 1024)});
    let before = rss_kib();
    for batch in 1..=12 {
        for _ in 0..250 {
            let socket = Arc::new(Counting(answered.clone()));
            node.publish(Message::new("big", payload.clone()).with_reply_to(socket))?;
        }
        while answered.load(Ordering::SeqCst) < batch * 250 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let after = rss_kib();
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "RSS KiB: before {before}, after 3,000 answered 32 KB events {after}, 2 s later {}",
        rss_kib()
    );
    Ok(())
}
