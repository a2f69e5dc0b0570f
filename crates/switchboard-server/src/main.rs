//! The `switchboard` binary: run a gateway from a config file, check a config file, or run
//! the bundled demo chat.
//!
//! ```text
//! switchboard serve [--config conf/socket.yaml] [--listen 127.0.0.1:4000]
//!                   [--admin-listen 127.0.0.1:9090] [--log-format json] [--drain 10s]
//!                   [--workers N]
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

use clap::{Parser, Subcommand, ValueEnum};
use switchboard::config::LogFormat;
use switchboard::{Config, Container};

/// `println!`, but a stdout that went away (a closed pipe, a log collector that ended) is
/// not a panic: the gateway keeps serving, and still drains on SIGTERM.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!`, likewise for stderr.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod demo;

/// jemalloc rather than glibc's malloc: per message the gateway allocates a dozen small
/// objects and frees them at once; on jemalloc an echo, a send and a handshake take 12-18%
/// fewer instructions, and an idle socket about 70 bytes less, after a start about 0.7 MiB
/// larger (docs/PERFORMANCE.md). Not on MSVC, where jemalloc does not build.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A WebSocket gateway wired to a pub/sub event bus.
#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about,
    long_about = "A WebSocket gateway wired to a pub/sub event bus.\n\n\
        Sockets connect with a JWT; what they send is published to the topics named in the \
        config (conf/socket.yaml), and what is published to its `send` and `broadcast` topics \
        reaches them. Every config key: docs/CONFIG.md.",
    after_help = "Examples:\n  \
        switchboard serve --demo                     # the demo chat on http://127.0.0.1:4000/\n  \
        switchboard serve -c conf/socket.yaml --admin-listen 127.0.0.1:9090\n  \
        switchboard check-config conf/socket.yaml    # exit 0 and a summary, or 2 and the error\n\n\
        Environment:\n  \
        RUST_LOG                    which log events to write (default `info`)\n  \
        SWITCHBOARD_JWT_SECRET      the HS* secret (the name is `gateway.auth.secret_env`)\n  \
        SWITCHBOARD_API_KEY         the server API's key (`gateway.api.key_env`)\n  \
        SWITCHBOARD_HANDLER_SECRET  HTTP handlers' signing secret (`http_handlers[].secret_env`)\n  \
        TOKIO_WORKER_THREADS        worker threads when `serve --workers` is not given\n  \
        ${NAME} in the config's string values is replaced by the variable NAME."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until Ctrl-C or SIGTERM, then close every socket (1001) and exit.
    #[command(
        long_about = "Run the gateway until Ctrl-C or SIGTERM, then close every socket (1001), \
            wait for them to finish (--drain) and exit 0.\n\n\
            On start it prints the config it loaded and the addresses it listens on (stdout); \
            logs go to stderr. Exit status: 0 after a clean shutdown, 1 if it cannot start \
            (address in use, JWT secret unset, broker unreachable), 2 for an invalid config.",
        after_help = "Examples:\n  \
            switchboard serve --demo --listen 127.0.0.1:0\n  \
            RUST_LOG=switchboard=debug switchboard serve -c conf/socket.yaml --log-format json"
    )]
    Serve {
        /// The config file (YAML; `${NAME}` in string values is read from the environment).
        /// With `--demo` and without this flag, the built-in demo config is used when
        /// conf/socket.yaml is not there.
        ///
        /// [default: conf/socket.yaml]
        #[arg(long, short, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// Listen on this address instead of the config's `gateway.listen` (port 0: any).
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<SocketAddr>,
        /// Serve `/metrics`, `/healthz` and `/readyz` on this address instead of the config's
        /// `gateway.admin.listen` (port 0: any). Keep it off the public network.
        #[arg(long, value_name = "IP:PORT")]
        admin_listen: Option<SocketAddr>,
        /// Log format, instead of the config's `gateway.log.format` (default text). Which events
        /// are logged is set by `RUST_LOG`.
        #[arg(long, value_enum, value_name = "FORMAT")]
        log_format: Option<LogFormatArg>,
        /// Run the bundled demo chat (page at `/`, tokens from `/demo/login`). Uses a demo
        /// secret when the config's secret variable is unset. Never in production.
        #[arg(long)]
        demo: bool,
        /// How long shutdown waits for sockets to close (default: the config's
        /// `gateway.drain`, 10 s unless set), e.g. `30s`.
        #[arg(long, value_parser = duration_arg, value_name = "DURATION")]
        drain: Option<Duration>,
        /// Worker threads (default: `TOKIO_WORKER_THREADS` if set, 1 to 1024, else one per
        /// core this process may use, so `taskset` and cgroup CPU limits count). With 1, one
        /// thread runs everything on tokio's current-thread scheduler, the cheapest per
        /// message; more threads serve more sockets at once on a machine with the cores to
        /// spare.
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..=switchboard::MAX_WORKERS as i64))]
        workers: Option<u16>,
    },
    /// Validate a config file: exit 0 with a summary, or non-zero naming the key and line.
    #[command(
        long_about = "Validate a config file without starting the gateway.\n\n\
            Exit 0 and print `FILE: ok (listen ..., path ..., N message type route(s), auth ALG)`, \
            or exit 2 and print `error: FILE: <key path>: <problem> at line L column C` on \
            stderr. Variables named as `${NAME}` must be set; the JWT secret variable and the \
            public key file are only read by `serve`.",
        after_help = "Example:\n  switchboard check-config conf/socket.yaml"
    )]
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
}

/// A duration as the config reads one (so at most ten years, as `gateway.drain`).
fn duration_arg(s: &str) -> Result<Duration, String> {
    switchboard::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::from_file(&file) {
            Ok(config) => {
                say!("{}: ok ({})", file.display(), summary(&config));
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve {
            config,
            listen,
            admin_listen,
            log_format,
            demo,
            drain,
            workers,
        } => {
            let loaded = match load_config(config, demo) {
                Ok(c) => c,
                Err(e) => {
                    say_err!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = check_overrides(&loaded.1, listen, admin_listen) {
                say_err!("error: {e}");
                return ExitCode::from(2);
            }
            init_logging(match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => loaded.1.gateway.log.format,
            });
            if demo {
                demo::use_demo_secret_if_unset(&loaded.1);
            }
            let runtime = match switchboard::runtime(workers.map(usize::from)) {
                Ok(r) => r,
                Err(e) => {
                    say_err!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(loaded, listen, admin_listen, demo, drain)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    say_err!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The config and where it came from.
type Loaded = (String, Config);

/// `--listen` and `--admin-listen` replace addresses the config file's check has passed: each
/// listener, as it will be, still needs a port of its own (else the second bind fails as if
/// another process held the port).
fn check_overrides(
    config: &Config,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> Result<(), String> {
    let options = [
        (["gateway", "listen"].as_slice(), "--listen", listen),
        (
            ["gateway", "admin", "listen"].as_slice(),
            "--admin-listen",
            admin_listen,
        ),
    ];
    if options.iter().all(|(_, _, given)| given.is_none()) {
        return Ok(());
    }
    // Each listener as it will be: named by its option where one replaces it.
    let (names, addresses): (Vec<String>, Vec<SocketAddr>) = config
        .gateway
        .listeners()
        .into_iter()
        .filter_map(|(key, in_file)| {
            match options
                .iter()
                .find(|(k, _, given)| *k == key && given.is_some())
            {
                Some((_, option, given)) => Some((option.to_string(), (*given)?)),
                None => Some((key.join("."), in_file?)),
            }
        })
        .unzip();
    let Some((first, second)) = switchboard::config::clashing_listeners(&addresses) else {
        return Ok(());
    };
    // Named at an option (the file's own addresses passed its check): the later one if both.
    let (at, other) = match names[second].starts_with("--") {
        true => (second, first),
        false => (first, second),
    };
    Err(format!(
        "{} {} is also the address of {}: each listener needs a port of its own",
        names[at], addresses[at], names[other]
    ))
}

/// The config file when `--config` is not given.
const DEFAULT_CONFIG: &str = "conf/socket.yaml";

fn load_config(path: Option<PathBuf>, demo: bool) -> Result<Loaded, switchboard::ConfigError> {
    let path = match path {
        Some(path) => path,
        None if demo && !std::path::Path::new(DEFAULT_CONFIG).exists() => {
            // `serve --demo` works from any directory: fall back to the repo's config. Only
            // when no file was named: a `--config` that is not there is an error, not the
            // demo's config in its place.
            let config = Config::from_yaml_str(demo::BUNDLED_CONFIG)?;
            return Ok(("built-in conf/socket.yaml".into(), config));
        }
        None => PathBuf::from(DEFAULT_CONFIG),
    };
    Ok((path.display().to_string(), Config::from_file(&path)?))
}

fn summary(config: &Config) -> String {
    let s = &config.gateway.socket;
    let types = s.onmessage.as_ref().map_or(0, |m| m.types.len());
    let auth = &config.gateway.auth;
    let keys = match &auth.jwks {
        Some(jwks) => format!("JWKS {}", jwks.url),
        None => format!("{:?}", auth.algorithm),
    };
    let g = &config.gateway;
    let mut summary = format!(
        "listen {}, path {}, {} message type route(s), auth {keys}",
        g.listen,
        s.path.as_str(),
        types,
    );
    if let Some(sse) = s.sse_path() {
        summary.push_str(&format!(", sse {sse}"));
    }
    if g.tls.is_some() {
        summary.push_str(", tls");
    }
    if let Some(admin) = &g.admin {
        summary.push_str(&format!(", admin {}", admin.listen));
    }
    if let Some(api) = &g.api {
        summary.push_str(&format!(", api {}", api.listen));
    }
    if let Some(bus) = &g.bus {
        // The URLs may carry credentials: only their count is shown.
        let servers = bus.nats.url.as_slice().len();
        summary.push_str(&format!(", bus nats ({servers} server URL(s))"));
    }
    if !g.http_handlers.is_empty() {
        let n = g.http_handlers.iter().count();
        summary.push_str(&format!(", {n} HTTP handler endpoint(s)"));
    }
    summary
}

async fn serve(
    (source, config): Loaded,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    demo: bool,
    drain: Option<Duration>,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = listen.unwrap_or(config.gateway.listen);
    let path = config.gateway.socket.path.as_str().to_string();
    let sse_path = config.gateway.socket.sse_path();
    let tls = config.gateway.tls.is_some();
    let admin_tls = tls && config.gateway.admin.as_ref().is_none_or(|a| a.tls);
    let api_tls = tls && config.gateway.api.as_ref().is_some_and(|a| a.tls);
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
    if let Some(admin) = admin_listen {
        container.admin_listen(admin);
    }
    if let Some(bus) = &nats {
        // Subscriptions must be live before the first socket can publish.
        bus.subscriptions_ready().await?;
        say!("switchboard: bus nats, node {}", bus.node_name());
    }
    // Caught from before the first socket: a SIGTERM once serving drains the sockets.
    let stop = switchboard::shutdown_signal();
    tokio::pin!(stop);
    // Listened for from here, so that a SIGHUP during start-up (which may wait for the key
    // set) reloads nothing rather than ends the process. Without TLS too: there is nothing
    // to reload, but its default action would end the process at once, every socket dropped
    // without a close frame and no `onclose` published.
    let hangups = hangup_signal();
    // Start-up may wait (for the key set, up to `auth.jwks.startup_wait`): a SIGTERM then
    // ends it at once rather than after the wait. The wait comes before anything listens, so
    // there is nothing to drain; only a signal in the microseconds while the admin and API
    // listeners are bound, after the public one, would drop what that one had accepted.
    let running = tokio::select! {
        started = container.start_on(addr) => started?,
        () = &mut stop => {
            say!("switchboard: stopped during start-up");
            return Ok(());
        }
    };
    let local = running.local_addr().unwrap_or(addr);
    let (ws, http) = if running.tls().is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let scheme = |tls: bool| if tls { "https" } else { "http" };
    say!("switchboard: config {source}");
    say!("switchboard: listening on {ws}://{local}{path}");
    if let Some(sse) = sse_path {
        say!("switchboard: sse fallback on {http}://{local}{sse}");
    }
    if let Some(admin) = running.admin_addr() {
        let http = scheme(admin_tls);
        say!("switchboard: admin on {http}://{admin} (/metrics, /healthz, /readyz)");
    }
    if let Some(api) = running.api_addr() {
        let http = scheme(api_tls);
        say!("switchboard: api on {http}://{api} (docs/API.md)");
    }
    if demo {
        say!("switchboard: demo chat at {http}://{local}/ (open it in two browser windows)");
    }
    let tls = running.tls().cloned();
    let reloads = hangups.map(|hangups| tokio::spawn(reload_on_sighup(tls, hangups)));
    stop.await;
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    say!("switchboard: shutting down");
    let drain = drain.unwrap_or(running.drain());
    let report = running.shutdown(drain).await;
    if !report.drained {
        say_err!("switchboard: some sockets did not close within {drain:?}");
    }
    Ok(())
}

/// SIGHUPs from now on, when the platform has them.
#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangup_signal() -> Option<Hangups> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(e) => {
            say_err!(
                "switchboard: cannot listen for SIGHUP ({e}); a SIGHUP may end the process, and TLS (if any) reloads on file change only"
            );
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<Hangups> {
    None
}

/// Reloads the listeners' certificate and key on every SIGHUP (the old ones stay in use when
/// the files do not load; the log says why). Without TLS, says there is nothing to reload.
async fn reload_on_sighup(tls: Option<switchboard::ServerTls>, hangups: Hangups) {
    #[cfg(unix)]
    {
        let mut hangups = hangups;
        while hangups.recv().await.is_some() {
            match &tls {
                Some(tls) => tls.reload_logged("SIGHUP", true),
                None => tracing::info!("SIGHUP: nothing to reload (no gateway.tls); still serving"),
            }
        }
    }
    #[cfg(not(unix))]
    drop((tls, hangups));
}

async fn connect_nats(
    config: &switchboard::config::NatsConfig,
) -> Result<switchboard_bus_nats::NatsBus, Box<dyn std::error::Error>> {
    use switchboard::config::NatsCredentials;
    use switchboard_bus_nats::{NatsAuth, NatsOptions, NatsTls};
    let mut options = NatsOptions::cluster(config.url.as_slice().iter().cloned());
    options.reply_timeout = config.reply_timeout;
    options.node_name = config.node_name.as_ref().map(|n| n.as_str().to_string());
    options.outbox_bytes = config.outbox_bytes;
    options.max_pending_answers = config.max_pending_answers;
    options.every_node_bytes = config.every_node_bytes;
    options.handler_bytes = config.handler_bytes;
    options.gather_quiet = config.gather_quiet;
    options.auth = match &config.auth {
        None => NatsAuth::None,
        Some(NatsCredentials::UserPassword { user, password }) => NatsAuth::UserPassword {
            user: user.clone(),
            password: password.clone(),
        },
        Some(NatsCredentials::Token(token)) => NatsAuth::Token(token.clone()),
        Some(NatsCredentials::NKeySeed(seed)) => NatsAuth::NKeySeed(seed.clone()),
        Some(NatsCredentials::CredsFile(path)) => NatsAuth::CredsFile(path.clone()),
        Some(other) => return Err(format!("unsupported gateway.bus.nats.auth: {other:?}").into()),
    };
    options.tls = config.tls.as_ref().map(|tls| {
        let mut t = NatsTls::default();
        t.ca_file.clone_from(&tls.ca_file);
        t.cert_file.clone_from(&tls.cert_file);
        t.key_file.clone_from(&tls.key_file);
        t
    });
    Ok(switchboard_bus_nats::NatsBus::connect(options).await?)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or one JSON object a line.
/// Text is coloured only on a terminal, and not when `NO_COLOR` is set (a log file or a
/// collector gets no escape codes); a `RUST_LOG` that does not parse is named in a warning, the
/// default `info` used instead.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let asked = std::env::var_os("RUST_LOG").filter(|v| !v.to_string_lossy().trim().is_empty());
    let parsed = asked.as_ref().map(|v| match v.to_str() {
        Some(text) => EnvFilter::try_new(text).map_err(|e| e.to_string()),
        None => Err("not UTF-8".to_string()),
    });
    let (filter, refused) = match parsed {
        None => (EnvFilter::new("info"), None),
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (EnvFilter::new("info"), Some(e)),
    };
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !no_color);
    match format {
        LogFormat::Json => builder.json().init(),
        _ => builder.init(),
    }
    if let Some(error) = refused {
        tracing::warn!(
            RUST_LOG = %asked.unwrap_or_default().to_string_lossy(),
            %error,
            "RUST_LOG is not a valid filter; logging at `info` instead"
        );
    }
}
