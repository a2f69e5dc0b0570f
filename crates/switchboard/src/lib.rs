//! Switchboard: a WebSocket gateway wired to a pub/sub event bus, configured by the spec's
//! `conf/socket.yaml`.
//!
//! Depend on this crate to run a gateway inside your Rust service: build a [`Container`] from
//! the config, add handlers for the topics the config publishes to, and send to users with a
//! [`Producer`]. It is the only crate that knows the spec's semantics; it puts together
//! `switchboard-config`, `-bus`, `-registry` and `-transport`, which you may also use alone.
//!
//! - a socket connects → `onconnect.publish`; `msg.reply(p)` reaches it as
//!   `{"type":"onconnect","payload":p}`; `msg.fail(e)` sends `{"type":"error","payload":e}` and
//!   closes the socket (code 1008);
//! - a socket sends `{"type": T, ...}` → `onmessage.publish`, and also the `publish` topic of
//!   the `onmessage.types` entry for `T`; `msg.reply(p)` reaches it as
//!   `{"type":<topic>,"payload":p}`; `msg.fail(e)` sends an error frame, the socket stays open;
//! - anything else a socket sends gets an error frame and publishes nothing;
//! - data `{username, namespace?, type, payload}` on the `send` topic reaches that user's
//!   sockets in that namespace (or all of the user's sockets without `namespace`);
//!   `{type, payload, namespace?}` on `broadcast` reaches every socket (or one namespace's);
//! - data `{username, namespace?, code?, reason?}` on `disconnect` (our extension) closes that
//!   user's sockets (in that namespace) on every node with `code` ([`DISCONNECT_CODE`] by
//!   default);
//! - a socket ends, however it ends → `onclose.publish`, once.
//!
//! ```no_run
//! use switchboard::{Container, Message, Config};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_file("conf/socket.yaml")?;
//! let mut container = Container::new(config)?;
//! let producer = container.producer();
//! container.add_handler("socket:connection", |msg: Message| async move {
//!     let user = msg.context().username.clone();
//!     msg.reply(json!({"hello": user}));
//! })?;
//! container.add_handler("socket:generalMessage", move |msg: Message| {
//!     let producer = producer.clone();
//!     async move {
//!         // tell everyone in the sender's namespace
//!         let ns = msg.context().namespace.clone();
//!         producer.send("socket:broadcast", json!({
//!             "namespace": ns, "type": "echo", "payload": msg.data().clone(),
//!         }))
//!     }
//! })?;
//! container.run().await?; // until Ctrl-C or SIGTERM
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::SocketRef;
use switchboard_registry::{Registry, Target};

use crate::admin::{AdminState, Readiness};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::rate::RateLimit;
use crate::stats::GatewayStats;
use crate::transports::{Starter, Transports};

mod admin;
mod api;
mod auth;
mod delivery;
mod expiry;
mod gateway;
mod http_handlers;
mod inbound;
mod jwks;
mod listener;
mod metrics;
mod outbound;
mod presence;
mod rate;
mod runtime;
mod stats;
mod transports;
mod user_limit;

pub use api::API_ROUTES;
pub use auth::{AuthError, VerificationKey};
pub use delivery::DISCONNECT_CODE;
pub use gateway::{
    encode_frame, CONNECT_FAILED_CODE, CONNECT_HANDLER_ERROR_CODE, MAX_NAMESPACE_BYTES,
    RATE_LIMIT_CLOSE_CODE, REFRESHED_TYPE, REFRESH_MISMATCH_CODE, REFRESH_TYPE, TOKEN_EXPIRED_CODE,
};
pub use inbound::{decode_client_message, decode_client_text, BadMessage, ClientMessage};
pub use presence::{
    Connection, NamespacePresence, Presence, UserConnections, UserPresence, PRESENCE_TIMEOUT,
    PRESENCE_TOPIC,
};
pub use runtime::{runtime, MAX_WORKERS};
pub use stats::Stats;
pub use switchboard_bus::{
    Bus, BusCounters, Context, Handler, HandlerError, InProcessBus, JsonObject, Message, Producer,
    PublishError, Reply, ReplyTo, SubscribeError,
};
/// The config schema (`switchboard-config`), for its section types.
pub use switchboard_config as config;
pub use switchboard_config::{Config, ConfigError};
/// The seam between the gateway and its transports (`switchboard-core`), for writing a
/// transport of your own.
pub use switchboard_core as seam;
pub use switchboard_core::{
    http, plain_response, Bytes, HttpResponse, RequestParts, ShutdownReport, Transport,
    TransportCounters, OVER_BUDGET_CODE, SLOW_CONSUMER_CODE,
};
/// TLS for the listeners (`switchboard-tls`): a certificate reloadable in place.
pub use switchboard_tls::{MinVersion, ServerTls, ServerTlsFiles, TlsError};

/// The README's Rust examples, compiled (not run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// Makes a built-in subscriber from the registry and its topic's `messages_out` counter.
type MakeHandler =
    fn(Arc<Registry<SocketRef>>, prometheus_client::metrics::counter::Counter) -> Arc<dyn Handler>;

/// An extra HTTP endpoint served beside the socket path (the demo's page, a health check).
pub type Route = Arc<dyn Fn(&RequestParts) -> HttpResponse + Send + Sync>;
pub(crate) type Routes = HashMap<String, Route>;

/// Why a [`Container`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The auth section cannot be put to use (secret unset, key file unreadable).
    #[error("auth: {0}")]
    Auth(String),
    /// A built-in subscriber could not subscribe.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The config's sections contradict each other (a key path and why).
    #[error("config: {0}")]
    Config(String),
    /// The server API cannot be served (its key is unset or too short).
    #[error("api: {0}")]
    Api(String),
    /// `gateway.tls`'s certificate or key cannot be used (unreadable, not PEM, not a pair).
    #[error("gateway.tls: {0}")]
    Tls(#[from] switchboard_tls::TlsError),
}

/// The gateway: config, bus, sockets and handlers. Build it, add handlers, then
/// [`Container::start`] or [`Container::run`] it.
pub struct Container {
    config: Config,
    bus: Arc<dyn Bus>,
    registry: Arc<Registry<SocketRef>>,
    routes: Routes,
    verifier: auth::Verifier,
    metrics: Arc<Metrics>,
    admin_listen: Option<SocketAddr>,
    /// The server API's key (`gateway.api.key_env`, or [`Container::api_key`]).
    api_key: Option<Vec<u8>>,
    /// Transports given with [`Container::transport`], served beside the default one.
    transports: Vec<Starter>,
    /// [`Container::sse_fallback`]: serve SSE even without `socket.sse` in the config.
    sse_fallback: bool,
    /// The listeners' certificate (`gateway.tls`, or [`Container::tls`]).
    tls: Option<ServerTls>,
    /// Signing secrets of the HTTP handlers given with [`Container::http_handler_secret`],
    /// by the variable name they stand in for.
    handler_secrets: HashMap<String, Vec<u8>>,
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("listen", &self.config.gateway.listen)
            .field("path", &self.config.gateway.socket.path.as_str())
            .finish_non_exhaustive()
    }
}

impl Container {
    /// A container on the in-process bus.
    pub fn new(config: Config) -> Result<Self, BuildError> {
        Self::with_bus(config, Arc::new(InProcessBus::new()))
    }

    /// A container on any [`Bus`]. The key that verifies tokens is read as the config says
    /// (`auth.secret_env`, `auth.public_key_file`).
    pub fn with_bus(config: Config, bus: Arc<dyn Bus>) -> Result<Self, BuildError> {
        Self::build(config, bus, None)
    }

    /// A container on any [`Bus`], verifying tokens with `key` rather than the environment
    /// variable or file the config names (which are then not read).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchboard::{Config, Container, InProcessBus, VerificationKey};
    ///
    /// let config = Config::from_yaml_str("gateway:\n  socket: {}\n").unwrap();
    /// let secret = VerificationKey::Secret(b"a secret from a vault, 32 bytes".to_vec());
    /// let container = Container::with_key(config, Arc::new(InProcessBus::new()), secret).unwrap();
    /// # drop(container);
    /// ```
    pub fn with_key(
        config: Config,
        bus: Arc<dyn Bus>,
        key: VerificationKey,
    ) -> Result<Self, BuildError> {
        Self::build(config, bus, Some(&key))
    }

    fn build(
        config: Config,
        bus: Arc<dyn Bus>,
        key: Option<&VerificationKey>,
    ) -> Result<Self, BuildError> {
        let socket = &config.gateway.socket;
        if socket.sse_path().as_deref() == Some(socket.path.as_str()) {
            return Err(BuildError::Config(
                "gateway.socket.sse.path must differ from gateway.socket.path".into(),
            ));
        }
        let verifier = auth::Verifier::from_config(&config.gateway.auth, key)?;
        let registry = Arc::new(Registry::new());
        let metrics = Arc::new(Metrics::new(config_topics(&config)));
        // The built-in subscribers, on every node: each delivers to (or closes) its own
        // sockets; `messages_out` counts the frames queued (the sockets closed).
        let builtins: [(&Option<config::SubscribeHook>, MakeHandler); 3] = [
            (&socket.send, |r, out| {
                Arc::new(delivery::send_handler(r, out))
            }),
            (&socket.broadcast, |r, out| {
                Arc::new(delivery::broadcast_handler(r, out))
            }),
            (&socket.disconnect, |r, out| {
                Arc::new(delivery::disconnect_handler(r, out))
            }),
        ];
        for (hook, handler) in builtins {
            if let Some(hook) = hook {
                let topic = hook.subscribe.as_str();
                let out = metrics.topic(topic).messages_out().clone();
                bus.subscribe_every_node(topic, handler(registry.clone(), out))?;
            }
        }
        // Every node answers who is online on it.
        bus.subscribe_every_node(
            PRESENCE_TOPIC,
            Arc::new(presence::responder(
                registry.clone(),
                bus.node_name().map(String::from),
            )),
        )?;
        let admin_listen = config.gateway.admin.as_ref().map(|a| a.listen);
        let tls = match &config.gateway.tls {
            Some(tls) => Some(ServerTls::load(tls_files(tls))?),
            None => None,
        };
        Ok(Container {
            config,
            bus,
            registry,
            routes: HashMap::new(),
            verifier,
            metrics,
            admin_listen,
            api_key: None,
            transports: Vec::new(),
            sse_fallback: false,
            tls,
            handler_secrets: HashMap::new(),
        })
    }

    /// Serves TLS with `tls` on the public, admin and API listeners (as `gateway.tls` does,
    /// whose files are then not used; the listeners' own `tls: false` still opts out). Reload
    /// it with [`ServerTls::reload`] or [`Running::reload_tls`].
    pub fn tls(&mut self, tls: ServerTls) -> &mut Self {
        self.tls = Some(tls);
        self
    }

    /// Subscribes `handler` to `topic` (the spec's `addHandler`). Several handlers may share
    /// a topic; each gets every message. A topic bound to an HTTP endpoint
    /// (`gateway.http_handlers`) is not published on the bus, so its handlers here are not
    /// called (a warning says so).
    pub fn add_handler(
        &mut self,
        topic: &str,
        handler: impl Handler,
    ) -> Result<&mut Self, SubscribeError> {
        if self.config.gateway.http_handlers.for_topic(topic).is_some() {
            tracing::warn!(
                topic,
                "this topic is bound to an HTTP handler (gateway.http_handlers): \
                 the handler added here will not be called"
            );
        }
        self.bus.subscribe(topic, Arc::new(handler))?;
        Ok(self)
    }

    /// Serves `route` for GET (or any method) requests to exactly `path`.
    pub fn route(
        &mut self,
        path: &str,
        route: impl Fn(&RequestParts) -> HttpResponse + Send + Sync + 'static,
    ) -> &mut Self {
        self.routes.insert(path.to_string(), Arc::new(route));
        self
    }

    /// Serves `transport` too: its sockets reach the same handlers and are sent to by the same
    /// `send` and `broadcast` as every other socket. The WebSocket transport on the config's
    /// address is served by default ([`Container::start`]); [`Container::start_transports`]
    /// serves only the transports given here (an in-memory one in tests, say).
    pub fn transport(&mut self, transport: impl Transport) -> &mut Self {
        self.transports.push(transports::starter(transport));
        self
    }

    /// The server API's key, instead of the environment variable `gateway.api.key_env` names
    /// (which is then not read): at least 16 bytes of visible ASCII. Without either, starting
    /// fails.
    pub fn api_key(&mut self, key: impl Into<Vec<u8>>) -> Result<&mut Self, BuildError> {
        let key = key.into();
        if let Some(problem) = api::key_problem(&key) {
            return Err(BuildError::Api(problem));
        }
        self.api_key = Some(key);
        Ok(self)
    }

    /// The signing secret of the HTTP handlers whose `secret_env` is `variable`, instead of
    /// that environment variable (which is then not read): at least 16 bytes.
    pub fn http_handler_secret(&mut self, variable: &str, secret: impl Into<Vec<u8>>) -> &mut Self {
        self.handler_secrets
            .insert(variable.to_string(), secret.into());
        self
    }

    /// Serves the Server-Sent Events fallback beside the WebSocket transport, as
    /// `socket.sse` in the config does (at `socket.sse.path`, or the socket path + `/sse`),
    /// even when the config does not have that section.
    pub fn sse_fallback(&mut self) -> &mut Self {
        self.sse_fallback = true;
        self
    }

    /// Serves the admin endpoints (`/metrics`, `/healthz`, `/readyz`) on `addr` (port 0 for
    /// any), instead of the config's `gateway.admin.listen`, or even without that section.
    pub fn admin_listen(&mut self, addr: SocketAddr) -> &mut Self {
        self.admin_listen = Some(addr);
        self
    }

    /// A producer on this container's bus (the spec's `producer.send`).
    pub fn producer(&self) -> Producer {
        Producer::new(self.bus.clone())
    }

    /// Asks every node who is online (on NATS: every gateway node on the bus). Usable in
    /// handlers.
    pub fn presence(&self) -> Presence {
        Presence::new(self.bus.clone())
    }

    /// A read-only view of the connected sockets (of this node).
    pub fn sockets(&self) -> Sockets {
        Sockets(self.registry.clone())
    }

    /// The config this container was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Binds the configured `gateway.listen` address and starts serving.
    pub async fn start(self) -> std::io::Result<Running> {
        let addr = self.config.gateway.listen;
        self.start_on(addr).await
    }

    /// Binds `addr` (port 0 for any) and starts serving WebSockets there, and the transports
    /// given with [`Container::transport`]; also binds the admin listener when the config has
    /// `gateway.admin` (or [`Container::admin_listen`] was called).
    pub async fn start_on(mut self, addr: SocketAddr) -> std::io::Result<Running> {
        let defaults =
            transports::defaults(&self.config, addr, self.sse_fallback, self.tls.clone());
        self.transports.splice(0..0, defaults);
        self.start_transports().await
    }

    /// Starts serving only the transports given with [`Container::transport`] (no WebSocket
    /// listener), and the admin listener as [`Container::start_on`] does.
    pub async fn start_transports(mut self) -> std::io::Result<Running> {
        // The API key first: without it nothing starts.
        let api_key = match &self.config.gateway.api {
            Some(api) => match self.api_key.take() {
                Some(key) => Some(key),
                None => Some(api_key_from_env(&api.key_env).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                })?),
            },
            None => None,
        };
        // Then the HTTP handlers' secrets and clients (a CA file that cannot be used).
        let http_handlers = http_handlers::start(&self.config, &self.handler_secrets)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let starters = std::mem::take(&mut self.transports);
        let socket = &self.config.gateway.socket;
        let limits = &self.config.gateway.limits;
        let sse_path = socket.sse_path();
        for taken in [Some(socket.path.as_str()), sse_path.as_deref()]
            .into_iter()
            .flatten()
        {
            if self.routes.contains_key(taken) {
                tracing::warn!(path = taken, "a route is shadowed by a transport's path");
            }
        }
        let rate_limit = limits.messages_per_second.map(|rate| RateLimit {
            per_second: f64::from(rate),
            burst: f64::from(limits.message_burst.unwrap_or(rate.saturating_mul(2))),
        });
        let metrics = &self.metrics;
        let context_headers = http_handlers::kept_headers(&self.config);
        let auth = &self.config.gateway.auth;
        let expiries = auth
            .close_on_expiry
            .then(|| Arc::new(expiry::Expiries::new(auth.leeway)));
        if let Some(expiries) = &expiries {
            tokio::spawn(expiries.clone().run());
        }
        let gate_timeout = socket
            .onconnect
            .as_ref()
            .filter(|hook| hook.gate)
            .map(|hook| hook.gate_timeout);
        let hooks = gateway::Hooks {
            onconnect: socket.onconnect.as_ref().map(|h| h.publish.as_str().into()),
            onmessage: socket
                .onmessage
                .as_ref()
                .and_then(|m| m.publish.as_ref())
                .map(|t| gateway::Route::new(t.as_str(), metrics)),
            types: socket
                .onmessage
                .iter()
                .flat_map(|m| m.types.iter())
                .map(|t| {
                    let route = gateway::Route::new(t.publish.as_str(), metrics);
                    (t.message_type.clone(), route)
                })
                .collect(),
            onclose: socket.onclose.as_ref().map(|h| h.publish.as_str().into()),
        };
        let producer = self.producer();
        let sockets = self.sockets();
        let bus = self.bus.clone();
        let stats = Arc::new(GatewayStats::default());
        let drain = self.config.gateway.drain;
        let top_namespaces = self
            .config
            .gateway
            .admin
            .as_ref()
            .map_or(20, |a| a.top_namespaces);
        let registry = self.registry.clone();
        let registry_for_api = self.registry.clone();
        // With a key set: fetch it before serving, waiting for that first fetch at most
        // `startup_wait`; until one succeeds, upgrades get 503 and `/readyz` says why.
        let jwks = self.verifier.jwks().cloned();
        let jwks_task = match (&jwks, &self.config.gateway.auth.jwks) {
            (Some(jwks), Some(config)) => {
                let task = AbortOnDrop(jwks.spawn());
                jwks.first_attempt(config.startup_wait).await;
                if !jwks.has_keys() {
                    tracing::warn!(
                        url = %config.url,
                        "serving without signing keys: upgrades get 503 and /readyz is not ready until the key set is fetched"
                    );
                }
                Some(task)
            }
            _ => None,
        };
        let service = Arc::new(gateway::Gateway {
            hooks,
            bus: self.bus,
            registry: self.registry,
            verifier: self.verifier,
            routes: self.routes,
            observe: Arc::new(gateway::Observe {
                stats: stats.clone(),
                metrics: self.metrics.clone(),
            }),
            max_sockets_per_user: limits.max_sockets_per_user,
            user_limit: limits.max_sockets_per_user.map(user_limit::UserLimit::new),
            rate_limit,
            context_headers,
            gate_timeout,
            expiries: expiries.clone(),
            http_handlers: http_handlers.clone(),
        });
        let transports = match Transports::start(starters, service).await {
            Ok(transports) => Arc::new(transports),
            Err(e) => {
                if let Some(expiries) = &expiries {
                    expiries.stop();
                }
                return Err(e);
            }
        };
        let readiness = Readiness {
            draining: Arc::new(AtomicBool::new(false)),
            bus: bus.clone(),
            jwks,
        };
        let mut prometheus = self.metrics.registry(metrics::Scraped {
            gateway: stats.clone(),
            transports: transports.clone(),
            registry,
            readiness: readiness.clone(),
            top_namespaces,
        });
        if let Some(h) = &http_handlers {
            h.register_metrics(&mut prometheus);
        }
        let prometheus = Arc::new(prometheus);
        let admin = match self.admin_listen {
            Some(admin_addr) => {
                let state = AdminState {
                    registry: prometheus.clone(),
                    readiness: readiness.clone(),
                };
                let tls = self.config.gateway.admin.as_ref().is_none_or(|a| a.tls);
                let tls = self.tls.clone().filter(|_| tls);
                match admin::bind(admin_addr, state, tls).await {
                    Ok(admin) => Some(admin),
                    Err(e) => {
                        transports.shutdown(Duration::ZERO).await;
                        if let Some(expiries) = &expiries {
                            expiries.stop();
                        }
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let api = match (&self.config.gateway.api, api_key) {
            (Some(config), Some(key)) => {
                let socket = &self.config.gateway.socket;
                let topic = |hook: &Option<config::SubscribeHook>| {
                    hook.as_ref()
                        .map(|h| Arc::<str>::from(h.subscribe.as_str()))
                };
                let state = api::ApiState {
                    bus: bus.clone(),
                    registry: registry_for_api.clone(),
                    presence: Presence::new(bus.clone()),
                    send: topic(&socket.send),
                    broadcast: topic(&socket.broadcast),
                    disconnect: topic(&socket.disconnect),
                    key,
                    max_body: config.max_body,
                };
                let tls = self.tls.clone().filter(|_| config.tls);
                match Listener::bind(config.listen, "api", api::respond(state), tls).await {
                    Ok(api) => Some(api),
                    Err(e) => {
                        transports.shutdown(Duration::ZERO).await;
                        if let Some(expiries) = &expiries {
                            expiries.stop();
                        }
                        if let Some(admin) = admin {
                            admin.stop();
                        }
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        for (name, addr) in transports.describe() {
            let path = options_path(&self.config);
            match addr {
                Some(addr) => {
                    tracing::info!(transport = name, listen = %addr, path, "gateway listening")
                }
                None => tracing::info!(transport = name, "gateway serving"),
            }
        }
        if let Some(admin) = &admin {
            tracing::info!(listen = %admin.local_addr(), "admin listener: /metrics /healthz /readyz");
        }
        if let Some(api) = &api {
            tracing::info!(listen = %api.local_addr(), "api listener: /api/...");
        }
        let tls_watch = self.tls.as_ref().and_then(|tls| {
            let every = self.config.gateway.tls.as_ref()?.reload_interval;
            (!every.is_zero()).then(|| AbortOnDrop(tls.watch(every)))
        });
        Ok(Running {
            transports,
            producer,
            sockets,
            stats,
            drain,
            bus,
            admin,
            api,
            prometheus,
            readiness,
            expiries,
            tls: self.tls,
            _tls_watch: tls_watch,
            _jwks_task: jwks_task,
            http_handlers,
        })
    }

    /// Starts, serves until Ctrl-C or SIGTERM, then closes every socket (1001) and waits up
    /// to `gateway.drain` for them to finish.
    pub async fn run(self) -> std::io::Result<()> {
        let stop = shutdown_signal();
        let running = self.start().await?;
        stop.await;
        tracing::info!("shutting down");
        let drain = running.drain;
        running.shutdown(drain).await;
        Ok(())
    }
}

/// `gateway.tls` as the TLS crate takes it.
fn tls_files(tls: &config::Tls) -> ServerTlsFiles {
    let mut files = ServerTlsFiles::new(&tls.cert_file, &tls.key_file);
    files.min_version = match tls.min_version {
        config::TlsVersion::Tls13 => MinVersion::Tls13,
        _ => MinVersion::Tls12,
    };
    files
}

/// The server API's key from the environment variable `name`.
fn api_key_from_env(name: &str) -> Result<Vec<u8>, BuildError> {
    let key = match std::env::var(name) {
        Ok(key) => key,
        Err(std::env::VarError::NotPresent) => {
            return Err(BuildError::Api(format!(
                "gateway.api.key_env: the environment variable `{name}` is not set: it must \
                 hold the API key (at least 16 bytes)"
            )))
        }
        Err(std::env::VarError::NotUnicode(_)) => String::new(),
    };
    match api::key_problem(key.as_bytes()) {
        Some(problem) => Err(BuildError::Api(format!(
            "gateway.api.key_env: the environment variable `{name}` must hold the API key: \
             {problem}"
        ))),
        None => Ok(key.into_bytes()),
    }
}

/// Every topic the config names: the handles of their metrics are made up front.
fn config_topics(config: &Config) -> Vec<&str> {
    let s = &config.gateway.socket;
    let mut topics = s.published_topics();
    topics.extend(s.send.iter().map(|h| h.subscribe.as_str()));
    topics.extend(s.broadcast.iter().map(|h| h.subscribe.as_str()));
    topics.extend(s.disconnect.iter().map(|h| h.subscribe.as_str()));
    topics
}

fn options_path(config: &Config) -> &str {
    config.gateway.socket.path.as_str()
}

/// Resolves on Ctrl-C, or SIGTERM on Unix. The signals are caught from the moment this is
/// called, not from the first poll: call it before starting to serve and await it after, so
/// a SIGTERM that arrives in between is not lost (nor does it end the process at once, with
/// no drain, as an uncaught SIGTERM does). Call it within a tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                _ = received(term) => {}
                _ = received(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A started gateway.
pub struct Running {
    transports: Arc<Transports>,
    producer: Producer,
    sockets: Sockets,
    stats: Arc<GatewayStats>,
    drain: Duration,
    bus: Arc<dyn Bus>,
    admin: Option<Listener>,
    api: Option<Listener>,
    prometheus: Arc<prometheus_client::registry::Registry>,
    /// Whether it can serve (`/readyz`), and the flag shutdown sets first.
    readiness: Readiness,
    expiries: Option<Arc<expiry::Expiries>>,
    tls: Option<ServerTls>,
    /// Looks at `gateway.tls`'s files every `reload_interval`, until the gateway ends.
    _tls_watch: Option<AbortOnDrop>,
    /// The key set's refresher (`auth.jwks_url`), stopped with the gateway.
    _jwks_task: Option<AbortOnDrop>,
    http_handlers: Option<Arc<switchboard_http_handlers::HttpHandlers>>,
}

/// A task that ends when its owner is dropped: the key set's refresher ends with the
/// [`Running`] gateway, or with a start that failed half-way.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The address it listens on: the WebSocket transport's (the first transport's that
    /// listens; `None` when none does, as with only an in-memory transport).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.transports.local_addr()
    }

    /// A producer on its bus.
    pub fn producer(&self) -> Producer {
        self.producer.clone()
    }

    /// Asks every node who is online.
    pub fn presence(&self) -> Presence {
        Presence::new(self.bus.clone())
    }

    /// The connected sockets (of this node).
    pub fn sockets(&self) -> &Sockets {
        &self.sockets
    }

    /// Every counter, now.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot(self.transports.counters())
    }

    /// True while the gateway can do its job: listening, its bus ready (a broker bus
    /// connected) and, with `auth.jwks_url`, the key set fetched. For readiness probes; the
    /// admin listener's `/readyz` answers with it.
    pub fn is_ready(&self) -> bool {
        self.readiness.why_not().is_none()
    }

    /// The admin listener's address (`/metrics`, `/healthz`, `/readyz`), if it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Listener::local_addr)
    }

    /// The server API listener's address, if it has one (`gateway.api`).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(Listener::local_addr)
    }

    /// Every metric now, in the Prometheus text format: what the admin listener's `/metrics`
    /// serves. The names are listed in the README's "Operating" section.
    pub fn metrics_text(&self) -> String {
        metrics::render(&self.prometheus, false)
    }

    /// Reads `gateway.tls`'s certificate and key again (what SIGHUP does in `switchboard
    /// serve`): new connections get them, open sockets keep theirs. On error the old
    /// certificate stays in use. Without TLS, does nothing.
    pub fn reload_tls(&self) -> Result<(), switchboard_tls::TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// The listeners' TLS config, if they serve TLS.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// The configured shutdown drain deadline (`gateway.drain`).
    pub fn drain(&self) -> Duration {
        self.drain
    }

    /// Stops accepting, closes every socket with 1001 (each publishes `onclose`), and waits
    /// up to `drain` for them, then for the bus to send on what they published (within the
    /// same `drain`). `/readyz` answers 503 from the start; the admin listener stops at the end.
    pub async fn shutdown(self, drain: Duration) -> ShutdownReport {
        self.readiness.draining.store(true, Relaxed);
        let started = std::time::Instant::now();
        let report = self.transports.shutdown(drain).await;
        if let Some(expiries) = &self.expiries {
            expiries.stop();
        }
        // The sockets' `onclose` events may still be queued for a broker: send them on
        // within what is left of the drain time.
        let left = drain.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, self.bus.flush()).await;
        // And the ones bound to HTTP endpoints are sent (or given up) within it too.
        if let Some(h) = &self.http_handlers {
            let left = drain.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(left, h.idle()).await;
        }
        if let Some(admin) = self.admin {
            admin.stop();
        }
        if let Some(api) = self.api {
            api.stop();
        }
        report
    }
}

/// A read-only view of who is connected.
#[derive(Clone)]
pub struct Sockets(Arc<Registry<SocketRef>>);

impl fmt::Debug for Sockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sockets")
            .field("count", &self.count())
            .finish()
    }
}

impl Sockets {
    /// All connected sockets.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Sockets in `namespace`.
    pub fn count_in_namespace(&self, namespace: &str) -> usize {
        self.0.count(Target::Namespace(namespace))
    }

    /// Sockets of `username` (in `namespace`, if given).
    pub fn count_of_user(&self, username: &str, namespace: Option<&str>) -> usize {
        match namespace {
            Some(ns) => self.0.count(Target::UserInNamespace(username, ns)),
            None => self.0.count(Target::User(username)),
        }
    }

    /// Distinct usernames with a socket in `namespace`, sorted.
    pub fn users_in_namespace(&self, namespace: &str) -> Vec<String> {
        self.0
            .users_in_namespace(namespace)
            .iter()
            .map(|u| u.to_string())
            .collect()
    }
}
