//! The `gateway` section and its small subsections: `admin`, `api` and `log`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::de::{de_byte_size, de_duration};
use crate::{Auth, BusConfig, HttpHandlers, Limits, Socket};

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
    /// The server API: send, broadcast, disconnect and presence over HTTP, for backends that
    /// do not join the bus, on its own address (extension). Absent: no API listener.
    #[serde(default)]
    pub api: Option<Api>,
    /// Logging (extension).
    #[serde(default)]
    pub log: Log,
    /// Which bus carries the events (extension). Absent: the in-process bus.
    #[serde(default)]
    pub bus: Option<BusConfig>,
    /// Topics bound to HTTP endpoints (extension): the node that holds the socket `POST`s
    /// their events there instead of publishing them on the bus. Absent: none.
    #[serde(default)]
    pub http_handlers: HttpHandlers,
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

/// The `gateway.api` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Api {
    /// Address of the API listener. Keep it off the public network.
    pub listen: SocketAddr,
    /// The environment variable that holds the API key (at least 16 bytes), which callers
    /// send as `Authorization: Bearer <key>`. Default `SWITCHBOARD_API_KEY`.
    #[serde(default = "default_api_key_env")]
    pub key_env: String,
    /// Largest request body, in bytes; larger gets `413`. Default 64 KiB.
    #[serde(default = "default_api_max_body", deserialize_with = "de_byte_size")]
    pub max_body: usize,
}

fn default_api_key_env() -> String {
    "SWITCHBOARD_API_KEY".into()
}

fn default_api_max_body() -> usize {
    64 * 1024
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

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4000))
}
