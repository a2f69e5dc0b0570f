//! The Switchboard side of the load benchmark: a gateway built through the facade, with the
//! handlers every peer in `benches/peers/` implements too.
//!
//! ```text
//! SWITCHBOARD_JWT_SECRET=... bench-server [PORT] [--threads N] [--nats nats://127.0.0.1:P | --floor]
//! ```
//!
//! With `--nats`, the container runs on the NATS bus (`switchboard-bus-nats`) instead of the
//! in-process one, so a plain NATS client can publish to its topics (the cross-node run).
//! With `--floor`, it is not the gateway but the benchmark's floor (`floor.rs`): echo,
//! broadcast and handshakes on the transport alone.
//!
//! Prints `listening PORT` once it accepts connections; stops on SIGTERM or Ctrl-C.
//!
//! - `echo` → `bench:echo`: replies with the payload (`{"type":"bench:echo","payload":P}`);
//! - `send` → `bench:send`: publishes `{username: to, type: "bench.send", payload}` to the
//!   built-in `send` topic (every socket of that user);
//! - `broadcast` → `bench:broadcast`: publishes `{type: "bench.broadcast", payload}` to the
//!   built-in `broadcast` topic (every socket).

mod floor;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use switchboard::{Config, Container, Message};
use switchboard_bus_nats::{NatsBus, NatsOptions};

/// Switchboard's load-benchmark server.
#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(default_value_t = 0)]
    port: u16,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Run on the NATS bus at this URL (loopback) instead of the in-process bus.
    #[arg(long, conflicts_with = "floor")]
    nats: Option<String>,
    /// Serve the floor instead of the gateway: echo, broadcast and handshakes on the
    /// transport alone.
    #[arg(long)]
    floor: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-server: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = if args.floor {
        runtime.block_on(floor::serve(args.port))
    } else {
        runtime.block_on(serve(args.port, args.nats))
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(port: u16, nats: Option<String>) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_yaml_str(&switchboard_bench::server_yaml())?;
    let nats = match nats {
        Some(url) => Some(Arc::new(NatsBus::connect(NatsOptions::new(url)).await?)),
        None => None,
    };
    let mut container = match &nats {
        Some(bus) => Container::with_bus(config, bus.clone())?,
        None => Container::new(config)?,
    };
    let producer = container.producer();

    container.add_handler("bench:echo", |msg: Message| async move {
        msg.reply(&msg.data()["payload"]);
    })?;

    let p = producer.clone();
    container.add_handler("bench:send", move |msg: Message| {
        let p = p.clone();
        async move {
            let data = msg.data();
            let Some(to) = data.get("to").and_then(Value::as_str) else {
                msg.fail(json!({"message": "send needs a string `to`"}));
                return Ok(());
            };
            p.send(
                "socket:send",
                json!({"username": to, "type": "bench.send", "payload": data["payload"]}),
            )
        }
    })?;

    let p = producer;
    container.add_handler("bench:broadcast", move |msg: Message| {
        let p = p.clone();
        async move {
            p.send(
                "socket:broadcast",
                json!({"type": "bench.broadcast", "payload": msg.data()["payload"]}),
            )
        }
    })?;

    if let Some(bus) = &nats {
        // Subscriptions must be live before the first socket (or NATS client) publishes.
        bus.subscriptions_ready().await?;
    }
    let stop = switchboard::shutdown_signal();
    let running = container
        .start_on(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    {
        let mut out = std::io::stdout().lock();
        let port = running.local_addr().map_or(port, |a| a.port());
        writeln!(out, "listening {port}")?;
        out.flush()?;
    }
    stop.await;
    running.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
