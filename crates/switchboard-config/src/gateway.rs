//! The `gateway` section and its small subsections: `tls`, `admin`, `api` and `log`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::de::{de_byte_size, de_duration, de_env_name, de_listen};
use crate::{Auth, BusConfig, HttpHandlers, Limits, Socket};

/// The `gateway` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Gateway {
    /// Address the public listener binds (extension). Default `127.0.0.1:4000`.
    #[serde(default = "default_listen", deserialize_with = "de_listen")]
    pub listen: SocketAddr,
    /// The spec's socket section.
    pub socket: Socket,
    /// TLS on the public listener (`wss://`), and on the admin and API listeners unless they
    /// opt out (extension). Absent: plain TCP.
    #[serde(default)]
    pub tls: Option<Tls>,
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

impl Gateway {
    /// Every listener the section can set, by its key path, with its address (`None` where its
    /// section is absent): what must not share a port.
    pub fn listeners(&self) -> [(&'static [&'static str], Option<SocketAddr>); 3] {
        [
            (&["gateway", "listen"], Some(self.listen)),
            (
                &["gateway", "admin", "listen"],
                self.admin.as_ref().map(|a| a.listen),
            ),
            (
                &["gateway", "api", "listen"],
                self.api.as_ref().map(|a| a.listen),
            ),
        ]
    }
}

/// The `gateway.admin` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Admin {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(deserialize_with = "de_listen")]
    pub listen: SocketAddr,
    /// How many namespaces get their own `switchboard_sockets_open_by_namespace` series (the
    /// ones with the most sockets); the rest are summed under `namespace="(other)"`.
    /// Default 20; 0 turns the per-namespace series off.
    #[serde(default = "default_top_namespaces")]
    pub top_namespaces: usize,
    /// Serve it with `gateway.tls` when that section is present; `false` keeps it plain
    /// HTTP (a scraper on the same host, say). Default true.
    #[serde(default = "default_true")]
    pub tls: bool,
}

fn default_true() -> bool {
    true
}

/// The `gateway.tls` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Tls {
    /// The certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The oldest protocol version accepted. Default TLS 1.2.
    #[serde(default, deserialize_with = "de_tls_version")]
    pub min_version: TlsVersion,
    /// How often the files are looked at; a change reloads them for new connections. `0s`
    /// turns the look off (SIGHUP still reloads). Default 10 s.
    #[serde(default = "default_reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2.
    #[default]
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// `"1.2"` or `"1.3"`, quoted or not (YAML reads an unquoted `1.2` as a number).
fn de_tls_version<'de, D: Deserializer<'de>>(d: D) -> Result<TlsVersion, D::Error> {
    struct Version;
    impl de::Visitor<'_> for Version {
        type Value = TlsVersion;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("\"1.2\" or \"1.3\"")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<TlsVersion, E> {
            match text.trim() {
                "1.2" => Ok(TlsVersion::Tls12),
                "1.3" => Ok(TlsVersion::Tls13),
                other => Err(E::custom(format_args!(
                    "min_version must be \"1.2\" or \"1.3\", not `{other}`"
                ))),
            }
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<TlsVersion, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<TlsVersion, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<TlsVersion, E> {
            self.visit_str(&n.to_string())
        }
    }
    d.deserialize_any(Version)
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
    #[serde(deserialize_with = "de_listen")]
    pub listen: SocketAddr,
    /// The environment variable that holds the API key (at least 16 bytes), which callers
    /// send as `Authorization: Bearer <key>`. Default `SWITCHBOARD_API_KEY`.
    #[serde(default = "default_api_key_env", deserialize_with = "de_env_name")]
    pub key_env: String,
    /// Largest request body, in bytes; larger gets `413`. Default 64 KiB.
    #[serde(default = "default_api_max_body", deserialize_with = "de_byte_size")]
    pub max_body: usize,
    /// Serve it with `gateway.tls` when that section is present; `false` keeps it plain
    /// HTTP. Default true (the API key crosses this connection).
    #[serde(default = "default_true")]
    pub tls: bool,
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
