//! The transports a container serves. The only module that names concrete transports: the
//! WebSocket one, which `Container::start` serves by default on the config's address, and the
//! Server-Sent Events fallback it hosts when the config asks. Every other transport comes in
//! through `switchboard_core::Transport`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Config;
use switchboard_core::{
    BoxFuture, OriginPolicy, RunningTransport, ShutdownReport, Transport, TransportCounters,
};
use switchboard_transport::{ServerTls, TransportOptions, WebSocketTransport};
use switchboard_transport_sse::{SseOptions, SseTransport};

use crate::gateway::Gateway;

/// A transport waiting for the gateway it will serve.
pub(crate) type Starter = Box<
    dyn FnOnce(Arc<Gateway>) -> BoxFuture<'static, io::Result<Box<dyn RunningTransport>>> + Send,
>;

pub(crate) fn starter<T: Transport>(transport: T) -> Starter {
    Box::new(move |gateway| Box::pin(transport.start(gateway)))
}

/// The default transports as the config sets them up: WebSocket upgrades on `addr`, and the
/// Server-Sent Events fallback on the same port when `socket.sse` is present (or `sse_anyway`),
/// both over TLS with `tls`.
pub(crate) fn defaults(
    config: &Config,
    addr: SocketAddr,
    sse_anyway: bool,
    tls: Option<ServerTls>,
) -> Vec<Starter> {
    // Without `limits.max_sockets`: read the open-file limit once, for both transports.
    let socket = &config.gateway.socket;
    let sse_path = socket
        .sse_path()
        .or_else(|| sse_anyway.then(|| socket.default_sse_path()));
    let caps = config
        .gateway
        .limits
        .max_sockets
        .is_none()
        .then(|| {
            DefaultCaps::of_this_process(config.gateway.limits.max_handshakes, sse_path.is_some())
        })
        .flatten();
    let sse = sse_path.map(|path| sse(config, path, caps));
    let mut options = websocket_options(config, caps);
    options.tls = tls;
    let mut starters = Vec::new();
    if let Some(sse) = sse {
        // Hosted by the WebSocket transport's HTTP server; started first, so that it is ready
        // before the port takes connections.
        options.endpoints.0.push(sse.endpoint());
        starters.push(starter(sse));
    }
    starters.push(starter(WebSocketTransport::bind(addr, options)));
    starters
}

fn sse(config: &Config, path: String, caps: Option<DefaultCaps>) -> SseTransport {
    let socket = &config.gateway.socket;
    let limits = &config.gateway.limits;
    let mut options = SseOptions::default();
    options.path = path;
    options.heartbeat_interval = socket.heartbeat;
    options.max_message_size = socket.max_message_size;
    options.send_queue = socket.send_queue;
    options.send_queue_bytes = socket.send_queue_bytes;
    options.max_sessions = limits.max_sockets.or(caps.map(|c| c.sockets));
    options.buffer_budget = limits.buffer_budget;
    options.origins = origin_policy(config);
    // A post waiting for the connect gate is answered (`503`, try again) before the hosting
    // server's request deadline would cut it off unanswered.
    options.post_wait = limits
        .handshake_timeout
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_millis(500));
    SseTransport::new(options)
}

fn websocket_options(config: &Config, caps: Option<DefaultCaps>) -> TransportOptions {
    let socket = &config.gateway.socket;
    let limits = &config.gateway.limits;
    let mut options = TransportOptions::default();
    options.path = socket.path.as_str().to_string();
    options.heartbeat_interval = socket.heartbeat;
    options.max_message_size = socket.max_message_size;
    options.send_queue = socket.send_queue;
    options.send_queue_bytes = socket.send_queue_bytes;
    options.handshake_timeout = limits.handshake_timeout;
    options.max_connections = limits.max_sockets;
    options.max_handshakes = limits.max_handshakes;
    if let Some(caps) = caps {
        options.max_connections = Some(caps.sockets);
        options.max_handshakes = caps.handshakes;
    }
    options.max_handshakes_per_address = limits.max_handshakes_per_address;
    options.max_request_head = limits.max_request_head;
    options.buffer_budget = limits.buffer_budget;
    options.origins = origin_policy(config);
    options
}

/// Without `limits.max_sockets`, what the process's open-file limit has room for, so that
/// past it an upgrade gets `503` and `Retry-After`. Without a cap, `accept` failed with
/// `EMFILE` and every later connection, health checks included, waited unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DefaultCaps {
    /// Sockets per transport (`max_connections`, SSE's `max_sessions`).
    pub(crate) sockets: usize,
    /// Connections still in their upgrade (`max_handshakes`), each also a descriptor.
    pub(crate) handshakes: usize,
}

impl DefaultCaps {
    /// From this process's limit (`/proc/self/limits`); `None` where it cannot be read or is
    /// unlimited (then there is no cap, as before).
    pub(crate) fn of_this_process(max_handshakes: usize, sse_too: bool) -> Option<Self> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        Some(Self::under(
            soft_open_file_limit(&limits)?,
            max_handshakes,
            sse_too,
        ))
    }

    /// The soft limit less a reserve for everything else a gateway opens (listeners, admin
    /// connections, the NATS connection, HTTP handler pools, key fetches) of 128 or a fiftieth,
    /// whichever is more; of that room, at most half for upgrades in progress
    /// (`max_handshakes`, lowered to fit), the rest for sockets, split in two when SSE
    /// sessions are counted apart from WebSocket sockets.
    fn under(soft: usize, max_handshakes: usize, sse_too: bool) -> Self {
        let room = soft.saturating_sub((soft / 50).max(128)).max(2);
        let handshakes = max_handshakes.min(room / 2).max(1);
        let sockets = (room - handshakes).max(1);
        DefaultCaps {
            sockets: if sse_too {
                (sockets / 2).max(1)
            } else {
                sockets
            },
            handshakes,
        }
    }
}

/// The soft open-file limit in the text of `/proc/self/limits` ("unlimited" does not parse).
fn soft_open_file_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files  SOFT  HARD  files"
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `socket.allowed_origins` as a policy; absent, same host only, and `https` pages only where
/// the gateway ends TLS itself.
pub(crate) fn origin_policy(config: &Config) -> OriginPolicy {
    match &config.gateway.socket.allowed_origins {
        None if config.gateway.tls.is_some() => OriginPolicy::SameHostOverTls,
        None => OriginPolicy::SameHost,
        Some(list) if list.iter().any(|o| o == "*") => OriginPolicy::Any,
        Some(list) => OriginPolicy::List(list.clone()),
    }
}

/// The started transports of one gateway.
pub(crate) struct Transports {
    running: Vec<Box<dyn RunningTransport>>,
}

impl Transports {
    /// Starts each, in order; if one fails, those started are stopped and the error returned.
    pub(crate) async fn start(starters: Vec<Starter>, gateway: Arc<Gateway>) -> io::Result<Self> {
        let mut running: Vec<Box<dyn RunningTransport>> = Vec::with_capacity(starters.len());
        for start in starters {
            match start(gateway.clone()).await {
                Ok(started) => running.push(started),
                Err(e) => {
                    Transports { running }.shutdown(Duration::ZERO).await;
                    return Err(e);
                }
            }
        }
        Ok(Transports { running })
    }

    /// The first listening address.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.running.iter().find_map(|s| s.local_addr())
    }

    /// Every transport's name and address.
    pub(crate) fn describe(&self) -> Vec<(&'static str, Option<SocketAddr>)> {
        self.running
            .iter()
            .map(|s| (s.name(), s.local_addr()))
            .collect()
    }

    /// The counters of all transports, summed.
    pub(crate) fn counters(&self) -> TransportCounters {
        self.running
            .iter()
            .map(|s| s.counters())
            .fold(TransportCounters::default(), |sum, c| sum + c)
    }

    /// Shuts every transport down at once and waits for all (within `drain`).
    pub(crate) async fn shutdown(&self, drain: Duration) -> ShutdownReport {
        // Each starts closing its sockets when asked, before its future is awaited.
        let stopping: Vec<_> = self.running.iter().map(|s| s.shutdown(drain)).collect();
        let mut report = ShutdownReport::new(true);
        for stop in stopping {
            report = report.and(stop.await);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_that_ends_tls_itself_takes_only_https_pages_of_its_host() {
        let policy = |extra: &str| {
            let yaml = format!("gateway:\n  socket: {{{extra}}}\n  auth:\n    secret_env: X\n");
            origin_policy(&Config::from_yaml_str(&yaml).unwrap())
        };
        assert_eq!(policy(""), OriginPolicy::SameHost);
        let mut tls = Config::from_yaml_str(
            "gateway:\n  socket: {}\n  auth:\n    secret_env: X\n  tls:\n    cert_file: c.pem\n    key_file: k.pem\n",
        )
        .unwrap();
        assert_eq!(origin_policy(&tls), OriginPolicy::SameHostOverTls);
        // A list given is the list, with TLS or without.
        tls.gateway.socket.allowed_origins = Some(vec!["https://app.example.com".into()]);
        assert!(matches!(origin_policy(&tls), OriginPolicy::List(_)));
        assert_eq!(policy("allowed_origins: [\"*\"]"), OriginPolicy::Any);
    }

    #[test]
    fn the_default_caps_leave_a_reserve_and_room_for_upgrades_in_progress() {
        let limits = |soft: &str| {
            format!(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max processes             63711                63711                processes\n\
                 Max open files            {soft:<20} 20000                files\n"
            )
        };
        assert_eq!(soft_open_file_limit(&limits("20000")), Some(20_000));
        assert_eq!(soft_open_file_limit(&limits("unlimited")), None);
        assert_eq!(soft_open_file_limit("nothing here"), None);
        let caps = |soft, sse| DefaultCaps::under(soft, 1024, sse);
        // 20,000 less 400: 1,024 upgrades in progress and 18,576 sockets, together 19,600.
        assert_eq!(
            caps(20_000, false),
            DefaultCaps {
                sockets: 18_576,
                handshakes: 1024
            }
        );
        assert_eq!(caps(20_000, true).sockets, 9_288);
        // 300 less 128: half of the 172 for upgrades in progress (1,024 lowered to 86).
        assert_eq!(
            caps(300, false),
            DefaultCaps {
                sockets: 86,
                handshakes: 86
            }
        );
        assert_eq!(caps(10, false).sockets, 1);
        for soft in [10, 300, 1024, 4096, 20_000, 1 << 20] {
            for sse in [false, true] {
                let c = caps(soft, sse);
                let transports = if sse { 2 } else { 1 };
                assert!(
                    c.sockets * transports + c.handshakes <= soft.max(4),
                    "{soft} {sse}"
                );
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_processs_limit_is_read() {
        let caps = DefaultCaps::of_this_process(1024, false).expect("/proc/self/limits");
        assert!(caps.sockets >= 1 && caps.handshakes >= 1);
    }
}
