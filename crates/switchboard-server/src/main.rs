//! The `switchboard` binary: run a gateway from a config file, check a config file, or run
//! the bundled demo chat.
//!
//! ```text
//! switchboard serve [--config conf/socket.yaml] [--listen 127.0.0.1:4000]
//! switchboard serve --demo
//! switchboard check-config conf/socket.yaml
//! ```
//!
//! As a standalone gateway (no handlers of your own) it serves sockets and the built-in
//! `send` and `broadcast` subscribers; handlers come with a broker-backed bus. To add Rust
//! handlers, depend on the `switchboard` crate instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard::{Config, Container};

mod demo;

/// A WebSocket gateway wired to a pub/sub event bus.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until Ctrl-C or SIGTERM, then close every socket (1001) and exit.
    Serve {
        /// The config file.
        #[arg(long, short, default_value = "conf/socket.yaml")]
        config: PathBuf,
        /// Listen on this address instead of the config's `gateway.listen` (port 0: any).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Run the bundled demo chat (page at `/`, tokens from `/demo/login`). Uses a demo
        /// secret when the config's secret variable is unset. Never in production.
        #[arg(long)]
        demo: bool,
        /// How long shutdown waits for sockets to close (default: the config's
        /// `gateway.drain`, 10 s unless set).
        #[arg(long, value_parser = humantime_duration)]
        drain: Option<Duration>,
    },
    /// Validate a config file: exit 0 with a summary, or non-zero naming the key and line.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e} (try 10s)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::from_file(&file) {
            Ok(config) => {
                println!("{}: ok ({})", file.display(), summary(&config));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve {
            config,
            listen,
            demo,
            drain,
        } => {
            init_logging();
            let loaded = match load_config(&config, demo) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if demo {
                demo::use_demo_secret_if_unset(&loaded.1);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(loaded, listen, demo, drain)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The config and where it came from.
type Loaded = (String, Config);

fn load_config(path: &PathBuf, demo: bool) -> Result<Loaded, switchboard::ConfigError> {
    if demo && !path.exists() {
        // `serve --demo` works from any directory: fall back to the repo's config.
        let config = Config::from_yaml_str(demo::BUNDLED_CONFIG)?;
        return Ok(("built-in conf/socket.yaml".into(), config));
    }
    Ok((path.display().to_string(), Config::from_file(path)?))
}

fn summary(config: &Config) -> String {
    let s = &config.gateway.socket;
    let types = s.onmessage.as_ref().map_or(0, |m| m.types.len());
    format!(
        "listen {}, path {}, {} message type route(s), auth {:?}",
        config.gateway.listen,
        s.path.as_str(),
        types,
        config.gateway.auth.algorithm
    )
}

async fn serve(
    (source, config): Loaded,
    listen: Option<SocketAddr>,
    demo: bool,
    drain: Option<Duration>,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = listen.unwrap_or(config.gateway.listen);
    let path = config.gateway.socket.path.as_str().to_string();
    let nats = match &config.gateway.bus {
        Some(bus) => Some(Arc::new(connect_nats(&bus.nats).await?)),
        None => None,
    };
    let mut container = match &nats {
        Some(bus) => Container::with_bus(config, bus.clone())?,
        None => Container::new(config)?,
    };
    if demo {
        demo::install(&mut container)?;
    }
    if let Some(bus) = &nats {
        // Subscriptions must be live before the first socket can publish.
        bus.subscriptions_ready().await?;
        println!("switchboard: bus nats, node {}", bus.node_name());
    }
    let running = container.start_on(addr).await?;
    let local = running.local_addr();
    println!("switchboard: config {source}");
    println!("switchboard: listening on ws://{local}{path}");
    if demo {
        println!("switchboard: demo chat at http://{local}/ (open it in two browser windows)");
    }
    switchboard::shutdown_signal().await;
    println!("switchboard: shutting down");
    let drain = drain.unwrap_or(running.drain());
    let report = running.shutdown(drain).await;
    if !report.drained {
        eprintln!("switchboard: some sockets did not close within {drain:?}");
    }
    Ok(())
}

async fn connect_nats(
    config: &switchboard::config::NatsConfig,
) -> Result<switchboard_bus_nats::NatsBus, switchboard_bus_nats::NatsError> {
    let mut options = switchboard_bus_nats::NatsOptions::new(config.url.clone());
    options.reply_timeout = config.reply_timeout;
    options.node_name = config.node_name.clone();
    switchboard_bus_nats::NatsBus::connect(options).await
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
