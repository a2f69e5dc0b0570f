//! The Switchboard side of the load benchmark: a gateway built through the facade, with the
//! handlers every peer in `benches/peers/` implements too.
//!
//! ```text
//! SWITCHBOARD_JWT_SECRET=... bench-server [PORT] [--threads N] [--nats nats://127.0.0.1:P | --floor]
//!                                         [--echo-over-http]
//! ```
//!
//! With `--nats`, the container runs on the NATS bus (`switchboard-bus-nats`) instead of the
//! in-process one, so a plain NATS client can publish to its topics (the cross-node run).
//! With `--floor`, it is not the gateway but the benchmark's floor (`floor.rs`): echo,
//! broadcast and handshakes on the transport alone.
//!
//! With `--echo-over-http`, `bench:echo` is bound to an HTTP endpoint (`gateway.http_handlers`)
//! that this process serves on loopback from a thread and runtime of its own (HTTP/1.1,
//! keep-alive), instead of the in-process handler: each echo is a signed `POST` and its answer.
//!
//! Prints `listening PORT` once it accepts connections; stops on SIGTERM or Ctrl-C.
//!
//! - `echo` → `bench:echo`: replies with the payload (`{"type":"bench:echo","payload":P}`);
//! - `send` → `bench:send`: publishes `{username: to, type: "bench.send", payload}` to the
//!   built-in `send` topic (every socket of that user);
//! - `broadcast` → `bench:broadcast`: publishes `{type: "bench.broadcast", payload}` to the
//!   built-in `broadcast` topic (every socket).

mod floor;

/// The allocator of the `switchboard` binary (its default feature `jemalloc`): the gateway
/// and the floor are measured as a user runs them.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Tokio worker threads (default: one per core this process may use; one is tokio's
    /// current-thread scheduler, as in the `switchboard` binary).
    #[arg(long)]
    threads: Option<usize>,
    /// Run on the NATS bus at this URL (loopback) instead of the in-process bus.
    #[arg(long, conflicts_with = "floor")]
    nats: Option<String>,
    /// Serve the floor instead of the gateway: echo, broadcast and handshakes on the
    /// transport alone.
    #[arg(long)]
    floor: bool,
    /// Answer `echo` from an HTTP endpoint (served here) instead of an in-process handler.
    #[arg(long)]
    echo_over_http: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // As the `switchboard` binary runs: one worker is the current-thread scheduler.
    let runtime = match switchboard::runtime(args.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-server: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = if args.floor {
        runtime.block_on(floor::serve(args.port))
    } else {
        runtime.block_on(serve(args.port, args.nats, args.echo_over_http))
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    port: u16,
    nats: Option<String>,
    echo_over_http: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut yaml = switchboard_bench::server_yaml();
    if echo_over_http {
        let backend = http_echo_backend()?;
        yaml.push_str(&format!(
            "  http_handlers:\n    - url: \"http://{backend}/echo\"\n      topics: [\"bench:echo\"]\n      \
             secret_env: {HTTP_SECRET_ENV}\n      concurrency: 64\n      queue: 4096\n"
        ));
    }
    let config = Config::from_yaml_str(&yaml)?;
    let nats = match nats {
        Some(url) => Some(Arc::new(NatsBus::connect(NatsOptions::new(url)).await?)),
        None => None,
    };
    let mut container = match &nats {
        Some(bus) => Container::with_bus(config, bus.clone())?,
        None => Container::new(config)?,
    };
    let producer = container.producer();

    if echo_over_http {
        container.http_handler_secret(HTTP_SECRET_ENV, "bench-http-handler-secret-0123456789");
    } else {
        container.add_handler("bench:echo", |msg: Message| async move {
            msg.reply(&msg.data()["payload"]);
        })?;
    }

    let p = producer.clone();
    let send_topic: Arc<str> = Arc::from("socket:send");
    container.add_handler("bench:send", move |msg: Message| {
        let p = p.clone();
        let send_topic = send_topic.clone();
        async move {
            let data = msg.data();
            let Some(to) = data.get("to").and_then(Value::as_str) else {
                msg.fail(json!({"message": "send needs a string `to`"}));
                return Ok(());
            };
            // `publish` moves the value; `send` would serialize it into a new one.
            p.publish(Message::new(
                send_topic.clone(),
                json!({"username": to, "type": "bench.send", "payload": data["payload"]}),
            ))
        }
    })?;

    let p = producer;
    let broadcast_topic: Arc<str> = Arc::from("socket:broadcast");
    container.add_handler("bench:broadcast", move |msg: Message| {
        let p = p.clone();
        let broadcast_topic = broadcast_topic.clone();
        async move {
            p.publish(Message::new(
                broadcast_topic.clone(),
                json!({"type": "bench.broadcast", "payload": msg.data()["payload"]}),
            ))
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

/// The variable the `--echo-over-http` binding names (never read: the secret is given).
const HTTP_SECRET_ENV: &str = "SWITCHBOARD_BENCH_HANDLER_SECRET";

/// An HTTP echo handler on 127.0.0.1 (any port), on a thread and a one-thread runtime of its
/// own, as a backend in another process would be: answers `{"reply": data.payload}`.
fn http_echo_backend() -> std::io::Result<SocketAddr> {
    use http_body_util::{BodyExt, Full};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                            let answer = json!({"reply": event["data"]["payload"]}).to_string();
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(
                                bytes::Bytes::from(answer),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    Ok(addr)
}
