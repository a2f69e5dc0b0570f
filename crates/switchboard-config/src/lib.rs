//! The schema of Switchboard's `conf/socket.yaml`: types, defaults and validation.
//!
//! Depend on this crate when you need to read, write or check a Switchboard config without
//! running a gateway (an operator tool, a config generator, a CI check). It has no runtime:
//! no tokio, no sockets, only serde. The facade crate `switchboard` maps a [`Config`] onto the
//! options of each layer.
//!
//! The spec's file loads unchanged; every hook (`onconnect`, `onmessage`, `onclose`, `send`,
//! `broadcast`) is optional, and every extension has a default:
//!
//! ```
//! let config = switchboard_config::Config::from_yaml_str(r#"
//! gateway:
//!   socket:
//!     path: "/connect"
//!     onconnect:
//!       publish: "socket:connection"
//! "#).unwrap();
//! assert_eq!(config.gateway.socket.path.as_str(), "/connect");
//! assert_eq!(config.gateway.socket.heartbeat, std::time::Duration::from_secs(30));
//! assert_eq!(config.gateway.listen.to_string(), "127.0.0.1:4000");
//! ```
//!
//! Errors name the key and where it is:
//!
//! ```
//! let err = switchboard_config::Config::from_yaml_str("gateway:\n  socket:\n    pth: /x\n")
//!     .unwrap_err();
//! assert!(err.to_string().contains("unknown field `pth`"), "{err}");
//! assert_eq!(err.line(), Some(3));
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

mod error;
mod expand;
mod reference;
pub use error::ConfigError;
pub use reference::{reference, KeyDoc, Origin, Section};

/// A whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The `gateway` section: everything Switchboard reads lives under it.
    pub gateway: Gateway,
}

impl Config {
    /// Parses and validates a config from YAML text. `${NAME}` in a string value is replaced
    /// by the environment variable `NAME` (an unset one is an error that names it); `$${` is
    /// a literal `${`.
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_str_with_env(text, &|name| {
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    }

    /// Like [`Config::from_yaml_str`], with `env` looking up the variables instead of the
    /// process environment.
    ///
    /// ```
    /// let env = |name: &str| (name == "PORT").then(|| "4001".to_string());
    /// let config = switchboard_config::Config::from_yaml_str_with_env(
    ///     "gateway:\n  listen: 127.0.0.1:${PORT}\n  socket: {}\n",
    ///     &env,
    /// ).unwrap();
    /// assert_eq!(config.gateway.listen.port(), 4001);
    ///
    /// let err = switchboard_config::Config::from_yaml_str_with_env(
    ///     "gateway:\n  socket:\n    path: /${NOPE}\n",
    ///     &env,
    /// ).unwrap_err();
    /// assert!(err.to_string().contains("environment variable `NOPE` is not set"), "{err}");
    /// assert_eq!(err.line(), Some(3));
    /// ```
    pub fn from_yaml_str_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        Config::deserialize(expand::Expand { de, env }).map_err(ConfigError::from_yaml)
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text).map_err(|e| e.in_file(path))
    }
}

/// The `gateway` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Gateway {
    /// Address the public listener binds (extension). Default `127.0.0.1:4000`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The spec's socket section.
    pub socket: Socket,
    /// How sockets are mapped to usernames (extension). Defaults: see [`Auth`].
    #[serde(default)]
    pub auth: Auth,
    /// Admission limits and abuse controls (extension). Defaults: see [`Limits`].
    #[serde(default)]
    pub limits: Limits,
    /// On shutdown, how long to wait for sockets to close (extension). Default 10 s.
    #[serde(default = "default_drain", deserialize_with = "de_duration")]
    pub drain: Duration,
    /// The admin listener: metrics and health checks, off the public port (extension).
    /// Absent: no admin listener.
    #[serde(default)]
    pub admin: Option<Admin>,
    /// Logging (extension).
    #[serde(default)]
    pub log: Log,
    /// Which bus carries the events (extension). Absent: the in-process bus.
    #[serde(default)]
    pub bus: Option<BusConfig>,
}

/// The `gateway.admin` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Admin {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub listen: SocketAddr,
    /// How many namespaces get their own `switchboard_sockets_open_by_namespace` series (the
    /// ones with the most sockets); the rest are summed under `namespace="(other)"`.
    /// Default 20; 0 turns the per-namespace series off.
    #[serde(default = "default_top_namespaces")]
    pub top_namespaces: usize,
}

fn default_top_namespaces() -> usize {
    20
}

/// The `gateway.log` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Log {
    /// `text` (default) or `json` (one object per line, for log shippers).
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `gateway.bus` section: a broker instead of the in-process bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BusConfig {
    /// NATS, for several gateway nodes and handlers in other processes.
    pub nats: NatsConfig,
}

/// The `gateway.bus.nats` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URL, or a list of them (members of one cluster), e.g. `nats://127.0.0.1:4222`.
    pub url: NatsUrls,
    /// How long a socket waits for a handler's reply before it gets an error frame.
    /// Default 10 s.
    #[serde(default = "default_reply_timeout", deserialize_with = "de_duration")]
    pub reply_timeout: Duration,
    /// This node's label in NATS (connection name, a token of its reply subjects; each
    /// process adds a random token, so replicas may share it). Default: `switchboard`.
    #[serde(default)]
    pub node_name: Option<NodeName>,
    /// How the node authenticates. Absent: no credentials.
    #[serde(default)]
    pub auth: Option<NatsCredentials>,
    /// TLS: a CA to trust, a client certificate. Present: TLS is required.
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// Most bytes of events waiting to be written to NATS; over it, publishing fails at once
    /// (the socket gets an error frame). Default 64 MiB.
    #[serde(default = "default_outbox_bytes", deserialize_with = "de_byte_size")]
    pub outbox_bytes: usize,
    /// Most events waiting for a handler's answer at once; over it, answerable events are
    /// refused with an error frame. Default 262,144.
    #[serde(
        default = "default_max_pending_answers",
        deserialize_with = "de_max_pending_answers"
    )]
    pub max_pending_answers: usize,
}

fn default_outbox_bytes() -> usize {
    64 << 20
}

fn default_max_pending_answers() -> usize {
    262_144
}

fn de_max_pending_answers<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("max_pending_answers must be at least 1"));
    }
    Ok(n)
}

/// `gateway.bus.nats.url`: one URL or a list, each `nats://`, `tls://` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls(Vec<String>);

impl NatsUrls {
    /// The URLs, in file order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for NatsUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let urls = match OneOrMany::deserialize(d)
            .map_err(|_| de::Error::custom("url must be a string or a list of strings"))?
        {
            OneOrMany::One(url) => vec![url],
            OneOrMany::Many(urls) => urls,
        };
        if urls.is_empty() {
            return Err(de::Error::custom("url must name at least one server"));
        }
        for url in &urls {
            let rest = url
                .strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"))
                .unwrap_or(url);
            if rest.is_empty() || rest.contains("://") || url.contains(char::is_whitespace) {
                return Err(de::Error::custom(format_args!(
                    "url `{url}` must be nats://host:port, tls://host:port or host:port"
                )));
            }
        }
        Ok(NatsUrls(urls))
    }
}

/// `gateway.bus.nats.node_name`: `.`-separated non-empty tokens without whitespace, `*` or
/// `>` (it is part of NATS subjects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName(String);

impl NodeName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad_char = |c: char| c.is_whitespace() || c.is_control();
        if s.is_empty()
            || s.contains(bad_char)
            || s.split('.').any(|t| t.is_empty() || t.contains(['*', '>']))
        {
            return Err(de::Error::custom(format_args!(
                "node_name `{s}` must be `.`-separated non-empty tokens without whitespace, \
                 `*` or `>` (it is part of NATS subjects)"
            )));
        }
        Ok(NodeName(s))
    }
}

/// `gateway.bus.nats.auth`: one way to authenticate. `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawNatsCredentials")]
#[non_exhaustive]
pub enum NatsCredentials {
    /// `user` and `password`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// `token`.
    Token(String),
    /// `nkey_seed`: an NKey user seed (`SU...`).
    NKeySeed(String),
    /// `creds_file`: a `.creds` file (user JWT and seed).
    CredsFile(PathBuf),
}

impl fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::NKeySeed(_) => f.write_str("NKeySeed(***)"),
            Self::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsCredentials {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    nkey_seed: Option<String>,
    #[serde(default)]
    creds_file: Option<PathBuf>,
}

impl TryFrom<RawNatsCredentials> for NatsCredentials {
    type Error = String;
    fn try_from(raw: RawNatsCredentials) -> Result<Self, String> {
        let chosen = [
            raw.user.is_some() || raw.password.is_some(),
            raw.token.is_some(),
            raw.nkey_seed.is_some(),
            raw.creds_file.is_some(),
        ];
        if chosen.iter().filter(|c| **c).count() != 1 {
            return Err(
                "auth takes exactly one of: user and password, token, nkey_seed, creds_file".into(),
            );
        }
        let non_empty = |key: &str, v: String| {
            if v.is_empty() {
                Err(format!("auth.{key} must not be empty"))
            } else {
                Ok(v)
            }
        };
        Ok(match raw {
            RawNatsCredentials {
                user: Some(user),
                password: Some(password),
                ..
            } => Self::UserPassword {
                user: non_empty("user", user)?,
                password: non_empty("password", password)?,
            },
            RawNatsCredentials { user: Some(_), .. } => {
                return Err("auth.user needs auth.password".into())
            }
            RawNatsCredentials {
                password: Some(_), ..
            } => return Err("auth.password needs auth.user".into()),
            RawNatsCredentials {
                token: Some(token), ..
            } => Self::Token(non_empty("token", token)?),
            RawNatsCredentials {
                nkey_seed: Some(seed),
                ..
            } => {
                if !seed.starts_with("SU") {
                    return Err("auth.nkey_seed must be a user seed (SU...)".into());
                }
                Self::NKeySeed(seed)
            }
            RawNatsCredentials {
                creds_file: Some(path),
                ..
            } => Self::CredsFile(path),
            _ => unreachable!("exactly one was chosen above"),
        })
    }
}

/// `gateway.bus.nats.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawNatsTls")]
#[non_exhaustive]
pub struct NatsTls {
    /// PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (with `key_file`), for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsTls {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
}

impl TryFrom<RawNatsTls> for NatsTls {
    type Error = String;
    fn try_from(raw: RawNatsTls) -> Result<Self, String> {
        if raw.cert_file.is_some() != raw.key_file.is_some() {
            return Err("tls.cert_file and tls.key_file go together".into());
        }
        Ok(NatsTls {
            ca_file: raw.ca_file,
            cert_file: raw.cert_file,
            key_file: raw.key_file,
        })
    }
}

fn default_reply_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

/// The `gateway.limits` section (extension): what one client or one user may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// Most sockets open at once; more get HTTP 503 before the upgrade. Default: no limit
    /// (the process's open-file limit still applies).
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub max_sockets: Option<usize>,
    /// Most sockets one username may hold at once; more get HTTP 429. Default: no limit.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub max_sockets_per_user: Option<usize>,
    /// How long a connection may take from being accepted to completing its upgrade.
    /// Default 10 s.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Connections that have not completed their upgrade, at most; more are closed as soon
    /// as they are accepted. Default 1,024.
    #[serde(default = "default_max_handshakes", deserialize_with = "de_positive")]
    pub max_handshakes: usize,
    /// The same, per client (an IPv4 address, an IPv6 /64). Default 64.
    #[serde(
        default = "default_max_handshakes_per_address",
        deserialize_with = "de_positive"
    )]
    pub max_handshakes_per_address: usize,
    /// Largest upgrade request head (request line and headers); larger gets `431`.
    /// Default 32 KiB.
    #[serde(
        default = "default_max_request_head",
        deserialize_with = "de_byte_size"
    )]
    pub max_request_head: usize,
    /// Bytes buffered across all sockets, at most: incomplete inbound messages and queued
    /// outbound frames. At the budget the sockets holding the most are closed (1013).
    /// Default 256 MiB.
    #[serde(default = "default_buffer_budget", deserialize_with = "de_byte_size")]
    pub buffer_budget: usize,
    /// Sustained inbound messages per second per socket; over it, messages are refused with
    /// an error frame, and a socket that keeps going is closed (1008). Default: off.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub messages_per_second: Option<u32>,
    /// Messages a socket may send in a burst above the rate. Default: twice the rate.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub message_burst: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sockets: None,
            max_sockets_per_user: None,
            handshake_timeout: default_handshake_timeout(),
            max_handshakes: default_max_handshakes(),
            max_handshakes_per_address: default_max_handshakes_per_address(),
            max_request_head: default_max_request_head(),
            buffer_budget: default_buffer_budget(),
            messages_per_second: None,
            message_burst: None,
        }
    }
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_max_handshakes_per_address() -> usize {
    64
}
fn default_max_request_head() -> usize {
    32 << 10
}
fn default_buffer_budget() -> usize {
    256 << 20
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4000))
}

/// The `gateway.socket` section: the spec's hooks plus our transport knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Socket {
    /// The HTTP path that accepts WebSocket upgrades. Must start with `/`. Default `/connect`.
    #[serde(default = "default_path")]
    pub path: UrlPath,
    /// Publish a message when a socket connects; optionally hold the socket until the
    /// handler answers (`gate`).
    #[serde(default)]
    pub onconnect: Option<ConnectHook>,
    /// Publish messages the sockets send: all of them, and by `type`.
    #[serde(default)]
    pub onmessage: Option<OnMessage>,
    /// Publish a message when a socket closes, whatever the reason.
    #[serde(default)]
    pub onclose: Option<PublishHook>,
    /// The topic whose messages are delivered to one user's sockets.
    #[serde(default)]
    pub send: Option<SubscribeHook>,
    /// The topic whose messages are delivered to every socket (or one namespace's).
    #[serde(default)]
    pub broadcast: Option<SubscribeHook>,
    /// Interval between server pings; a client that has not answered the previous ping by
    /// the next one is closed (extension). Human duration, e.g. `30s`. Default 30 s.
    #[serde(default = "default_heartbeat", deserialize_with = "de_heartbeat")]
    pub heartbeat: Duration,
    /// Largest inbound message, after reassembly of fragments, in bytes; accepts `64KiB`,
    /// `1MiB`, `1000`. Default 64 KiB (extension).
    #[serde(
        default = "default_max_message_size",
        deserialize_with = "de_byte_size"
    )]
    pub max_message_size: usize,
    /// Frames that may wait in one socket's send queue before it counts as a slow consumer
    /// and is closed (extension). Default 256.
    #[serde(default = "default_send_queue", deserialize_with = "de_send_queue")]
    pub send_queue: usize,
    /// Bytes that may wait in one socket's send queue (a frame is always taken into an empty
    /// queue) before it counts as a slow consumer (extension). Default 1 MiB.
    #[serde(
        default = "default_send_queue_bytes",
        deserialize_with = "de_byte_size"
    )]
    pub send_queue_bytes: usize,
    /// Request headers copied into the context handlers see (`context.headers`), by name
    /// (extension). `cookie`, `authorization` and `proxy-authorization` are never copied;
    /// the verified claims are always at `context.headers.jwt`. Default `user-agent`,
    /// `origin`, `x-forwarded-for`, `x-request-id`.
    #[serde(
        default = "default_context_headers",
        deserialize_with = "de_context_headers"
    )]
    pub context_headers: Vec<String>,
    /// Origins (`https://app.example.com`, or `"*"` for any) whose pages may open sockets;
    /// others get HTTP 403 (extension). Default, when absent: same host only, i.e. the
    /// `Origin` header's host must equal the `Host` header; requests without `Origin`
    /// (non-browser clients) are allowed either way.
    #[serde(default, deserialize_with = "de_origins")]
    pub allowed_origins: Option<Vec<String>>,
}

fn de_origins<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    for origin in &list {
        let valid = origin == "*"
            || ["http://", "https://"].iter().any(|scheme| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
            });
        if !valid {
            return Err(de::Error::custom(format_args!(
                "allowed_origins entry `{origin}` must be `*` or scheme://host[:port] without a path"
            )));
        }
    }
    Ok(Some(list))
}

fn default_path() -> UrlPath {
    UrlPath("/connect".into())
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_size() -> usize {
    64 * 1024
}
fn default_send_queue() -> usize {
    256
}
fn default_send_queue_bytes() -> usize {
    1 << 20
}
fn default_context_headers() -> Vec<String> {
    ["user-agent", "origin", "x-forwarded-for", "x-request-id"]
        .map(String::from)
        .to_vec()
}

/// Headers that carry credentials: never copied into a message's context.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["cookie", "authorization", "proxy-authorization"];

fn de_context_headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let lower = name.trim().to_ascii_lowercase();
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if lower.is_empty() || !lower.chars().all(token) {
            return Err(de::Error::custom(format_args!(
                "context_headers entry `{name}` is not a header name"
            )));
        }
        if CREDENTIAL_HEADERS.contains(&lower.as_str()) {
            return Err(de::Error::custom(format_args!(
                "context_headers entry `{name}` carries credentials and is never copied into \
                 messages (handlers get the verified claims at `context.headers.jwt`)"
            )));
        }
        if lower == "jwt" {
            return Err(de::Error::custom(
                "context_headers entry `jwt` is reserved for the verified claims",
            ));
        }
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

/// A hook that publishes to one topic (`onclose`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PublishHook {
    /// The topic to publish to.
    pub publish: Topic,
}

/// The `onconnect` hook: the topic, and whether the socket waits for the handler's verdict.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConnectHook {
    /// The topic to publish to.
    pub publish: Topic,
    /// Hold the socket until a connect handler answers (extension; AWS API Gateway's
    /// `$connect`): until its `reply`, nothing the socket sends is read or published and no
    /// `send`/`broadcast` reaches it; its `fail` closes the socket. Default false.
    #[serde(default)]
    pub gate: bool,
    /// With `gate`: how long to wait for the answer before closing the socket (1011).
    /// Default 10 s.
    #[serde(default = "default_gate_timeout", deserialize_with = "de_duration")]
    pub gate_timeout: Duration,
}

fn default_gate_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A built-in subscriber's topic (`send`, `broadcast`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SubscribeHook {
    /// The topic to subscribe to.
    pub subscribe: Topic,
}

/// The `onmessage` hook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OnMessage {
    /// Every message a socket sends is published here (optional).
    #[serde(default)]
    pub publish: Option<Topic>,
    /// Messages of one `type` are *also* published to that entry's topic.
    #[serde(default)]
    pub types: TypeRoutes,
}

/// One entry of `onmessage.types`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TypeRoute {
    /// The `type` of the incoming message this entry matches.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The topic such messages are published to.
    pub publish: Topic,
}

/// The message `type` a client sends to refresh its token in-band; never published.
pub const REFRESH_TYPE: &str = "$refresh";

/// `onmessage.types`: a list whose `type` values are unique.
#[derive(Debug, Clone, Default)]
pub struct TypeRoutes(Vec<TypeRoute>);

impl TypeRoutes {
    /// The entries, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, TypeRoute> {
        self.0.iter()
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a TypeRoutes {
    type Item = &'a TypeRoute;
    type IntoIter = std::slice::Iter<'a, TypeRoute>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for TypeRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TypeRoutes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of {type, publish} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TypeRoutes, A::Error> {
                let mut routes: Vec<TypeRoute> = Vec::new();
                while let Some(route) = seq.next_element::<TypeRoute>()? {
                    if route.message_type == REFRESH_TYPE {
                        return Err(de::Error::custom(format_args!(
                            "type `{REFRESH_TYPE}` is reserved: the gateway answers it (token refresh)"
                        )));
                    }
                    if let Some(first) = routes
                        .iter()
                        .position(|r| r.message_type == route.message_type)
                    {
                        return Err(de::Error::custom(format_args!(
                            "duplicate type `{}`: entries {} and {} of the list",
                            route.message_type,
                            first + 1,
                            routes.len() + 1
                        )));
                    }
                    routes.push(route);
                }
                Ok(TypeRoutes(routes))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A topic name: any non-empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(String);

impl Topic {
    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(de::Error::custom("topic must not be empty"));
        }
        Ok(Topic(s))
    }
}

/// An HTTP path starting with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPath(String);

impl UrlPath {
    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for UrlPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(de::Error::custom(format_args!(
                "path `{s}` must start with `/`"
            )));
        }
        if s.contains(['?', '#', ' ']) {
            return Err(de::Error::custom(format_args!(
                "path `{s}` must be a plain path (no query, fragment or spaces)"
            )));
        }
        Ok(UrlPath(s))
    }
}

/// JWT signature algorithms Switchboard accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC with SHA-256; the secret comes from `auth.secret_env`.
    HS256,
    /// HMAC with SHA-384.
    HS384,
    /// HMAC with SHA-512.
    HS512,
    /// RSA PKCS#1 v1.5 with SHA-256; the key comes from `auth.public_key_file`.
    RS256,
    /// RSA PKCS#1 v1.5 with SHA-384.
    RS384,
    /// RSA PKCS#1 v1.5 with SHA-512.
    RS512,
    /// ECDSA P-256 with SHA-256; the key comes from `auth.public_key_file`.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

impl Algorithm {
    /// True for the HMAC (shared secret) family.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }
}

/// The `gateway.auth` section: how a socket's JWT is found and verified (extension).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawAuth")]
#[non_exhaustive]
pub struct Auth {
    /// Name of the cookie that carries the token. Default `ID_TOKEN`. An
    /// `Authorization: Bearer` header is accepted too.
    pub cookie: String,
    /// Claim whose string value is the socket's username. Default `preferred_username`.
    pub username_claim: String,
    /// Signature algorithm. Default `HS256`.
    pub algorithm: Algorithm,
    /// For HS*: environment variable holding the shared secret. Default `SWITCHBOARD_JWT_SECRET`.
    pub secret_env: String,
    /// For RS*/ES*: PEM file with the public key.
    pub public_key_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`, in whole seconds (fractions are dropped).
    /// Default 0 s.
    pub leeway: Duration,
    /// If set, tokens must carry an `iss` claim equal to it.
    pub issuer: Option<String>,
    /// If set, tokens must carry an `aud` claim containing it.
    pub audience: Option<String>,
    /// If set, a socket may only ask for a namespace listed in this claim (a string or an
    /// array of strings); others get HTTP 403. Default: unset, any namespace (the spec's
    /// behaviour: the connect handler decides).
    pub namespace_claim: Option<String>,
    /// Close a socket when its token's `exp` (plus `leeway`) passes, unless the client has
    /// refreshed it in-band. Default true.
    pub close_on_expiry: bool,
}

impl Default for Auth {
    fn default() -> Self {
        Auth::try_from(RawAuth::default()).expect("default auth is valid")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default = "default_cookie")]
    cookie: String,
    #[serde(default = "default_username_claim")]
    username_claim: String,
    #[serde(default = "default_algorithm")]
    algorithm: Algorithm,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    public_key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    leeway: Duration,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    namespace_claim: Option<String>,
    #[serde(default = "default_true")]
    close_on_expiry: bool,
}

fn default_true() -> bool {
    true
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            cookie: default_cookie(),
            username_claim: default_username_claim(),
            algorithm: default_algorithm(),
            secret_env: None,
            public_key_file: None,
            leeway: Duration::ZERO,
            issuer: None,
            audience: None,
            namespace_claim: None,
            close_on_expiry: true,
        }
    }
}

fn default_cookie() -> String {
    "ID_TOKEN".into()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_algorithm() -> Algorithm {
    Algorithm::HS256
}

impl TryFrom<RawAuth> for Auth {
    type Error = String;
    fn try_from(raw: RawAuth) -> Result<Self, String> {
        if raw.cookie.is_empty() {
            return Err("auth.cookie must not be empty".into());
        }
        if raw.username_claim.is_empty() {
            return Err("auth.username_claim must not be empty".into());
        }
        if raw.algorithm.is_hmac() {
            if raw.public_key_file.is_some() {
                return Err(format!(
                    "auth.public_key_file is for RS*/ES* algorithms; {:?} uses auth.secret_env",
                    raw.algorithm
                ));
            }
        } else {
            if raw.public_key_file.is_none() {
                return Err(format!(
                    "auth.public_key_file is required for algorithm {:?}",
                    raw.algorithm
                ));
            }
            if raw.secret_env.is_some() {
                return Err(format!(
                    "auth.secret_env is for HS* algorithms; {:?} uses auth.public_key_file",
                    raw.algorithm
                ));
            }
        }
        Ok(Auth {
            cookie: raw.cookie,
            username_claim: raw.username_claim,
            algorithm: raw.algorithm,
            secret_env: raw
                .secret_env
                .unwrap_or_else(|| "SWITCHBOARD_JWT_SECRET".into()),
            public_key_file: raw.public_key_file,
            leeway: raw.leeway,
            issuer: raw.issuer,
            audience: raw.audience,
            namespace_claim: raw.namespace_claim,
            close_on_expiry: raw.close_on_expiry,
        })
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim())
        .map_err(|e| de::Error::custom(format_args!("invalid duration `{s}`: {e} (try `30s`)")))
}

fn de_heartbeat<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let interval = de_duration(d)?;
    if interval < Duration::from_millis(10) {
        return Err(de::Error::custom("heartbeat must be at least 10ms"));
    }
    Ok(interval)
}

fn de_opt_positive<'de, D, N>(d: D) -> Result<Option<N>, D::Error>
where
    D: Deserializer<'de>,
    N: Deserialize<'de> + Default + PartialEq,
{
    let n = N::deserialize(d)?;
    if n == N::default() {
        return Err(de::Error::custom(
            "limits must be at least 1 (leave the key out for no limit)",
        ));
    }
    Ok(Some(n))
}

fn de_positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

fn de_send_queue<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("send_queue must be at least 1"));
    }
    Ok(n)
}

/// Parses `1000`, `64KiB`, `64 KB`, `1MiB`, `1M` into bytes (K = 1024).
pub fn parse_byte_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}` (try `64KiB`)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size unit in `{text}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size `{text}` is too large"))?;
    if bytes == 0 {
        return Err("size must be at least 1 byte".into());
    }
    Ok(bytes)
}

fn de_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    let text = match Size::deserialize(d)? {
        Size::Int(n) => n.to_string(),
        Size::Text(s) => s,
    };
    parse_byte_size(&text).map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1000"), Ok(1000));
        assert_eq!(parse_byte_size("64KiB"), Ok(65536));
        assert_eq!(parse_byte_size("2 MB"), Ok(2 << 20));
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("").is_err());
    }

    #[test]
    fn defaults_apply() {
        let c = Config::from_yaml_str("gateway:\n  socket: {}\n").unwrap();
        let s = &c.gateway.socket;
        assert_eq!(s.path.as_str(), "/connect");
        assert!(s.onconnect.is_none() && s.onmessage.is_none() && s.send.is_none());
        assert_eq!(s.max_message_size, 65536);
        assert_eq!(s.send_queue, 256);
        assert_eq!(c.gateway.auth.secret_env, "SWITCHBOARD_JWT_SECRET");
        assert_eq!(c.gateway.auth.algorithm, Algorithm::HS256);
    }
}
