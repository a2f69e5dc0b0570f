//! The `gateway.http_handlers` section: topics bound to HTTP endpoints, which the node that
//! holds the socket calls (signed `POST`s of the event envelope) instead of publishing them
//! on the bus.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::de::{de_byte_size, de_duration, de_env_name};
use crate::socket::header_names;
use crate::Topic;

/// Headers the gateway sets on a handler request itself; `pass_headers` may not name them.
pub const RESERVED_HANDLER_HEADERS: [&str; 9] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "user-agent",
    "keep-alive",
];

/// Most `pass_headers` one endpoint may name (their values are bounded by the 4 KiB of
/// headers a socket keeps).
pub const MAX_PASS_HEADERS: usize = 16;

/// Most `onclose_retries`.
pub const MAX_ONCLOSE_RETRIES: u32 = 10;

/// One entry of `gateway.http_handlers`: an endpoint and the topics it handles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpHandler {
    /// `http://` or `https://` URL the events are `POST`ed to.
    pub url: HandlerUrl,
    /// The topics this endpoint handles: topics the socket hooks publish to.
    pub topics: Vec<Topic>,
    /// Label of the endpoint's metrics and logs. Default: the URL's `host:port`.
    #[serde(default)]
    pub name: Option<String>,
    /// How long a socket waits for the answer, queueing included. Default 10 s; at most 1 h.
    #[serde(default = "default_timeout", deserialize_with = "de_timeout")]
    pub timeout: Duration,
    /// Most requests in flight to this endpoint at once. Default 32; at most 4,096.
    #[serde(default = "default_concurrency", deserialize_with = "de_concurrency")]
    pub concurrency: usize,
    /// Most events waiting for a free request slot. Default 256; 0: none wait; at most
    /// 1,000,000.
    #[serde(default = "default_queue", deserialize_with = "de_queue")]
    pub queue: usize,
    /// Most bytes of event bodies the endpoint holds (waiting, in flight, waiting to retry).
    /// Default 16 MiB.
    #[serde(default = "default_queue_bytes", deserialize_with = "de_byte_size")]
    pub queue_bytes: usize,
    /// Most events of one socket held at once by this endpoint. Default 16.
    #[serde(default = "default_per_socket", deserialize_with = "de_per_socket")]
    pub per_socket: usize,
    /// Most events of one username (all its sockets) held at once by this endpoint. Default
    /// (absent): half of `concurrency`, at least 1.
    #[serde(default, deserialize_with = "de_per_user")]
    pub per_user: Option<usize>,
    /// Largest answer body, in bytes. Default 64 KiB.
    #[serde(default = "default_max_response", deserialize_with = "de_byte_size")]
    pub max_response: usize,
    /// A CA (PEM) trusted beside the system's roots, for an endpoint with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The environment variable holding the signing secret (at least 16 bytes). Default
    /// `SWITCHBOARD_HANDLER_SECRET`.
    #[serde(default = "default_secret_env", deserialize_with = "de_env_name")]
    pub secret_env: String,
    /// Headers of the socket's upgrade request sent along with each of its events (kept per
    /// socket like `socket.context_headers`, within the same 4 KiB).
    #[serde(default, deserialize_with = "de_pass_headers")]
    pub pass_headers: Vec<String>,
    /// How many times an `onclose` event (which nobody waits for) is sent again after a
    /// network error, a timeout, a `429` or a `5xx`. Default 2; at most 10.
    #[serde(default = "default_onclose_retries", deserialize_with = "de_retries")]
    pub onclose_retries: u32,
    /// Wait before the first retry; each next one waits twice as long. Default 500 ms.
    #[serde(default = "default_retry_backoff", deserialize_with = "de_duration")]
    pub retry_backoff: Duration,
}

impl HttpHandler {
    /// An entry for `url` and `topics` with every other key at its default, validated as the
    /// config file's entries are (for a program that binds topics itself, like the demo's
    /// `--handlers-url`).
    pub fn new(url: &str, topics: &[&str]) -> Result<Self, String> {
        let url = HandlerUrl::parse(url)?;
        let topics = topics
            .iter()
            .map(|t| {
                if t.trim().is_empty() {
                    Err("topic must not be empty".to_string())
                } else {
                    Ok(Topic(t.to_string()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(HttpHandler {
            url,
            topics,
            name: None,
            timeout: default_timeout(),
            concurrency: default_concurrency(),
            queue: default_queue(),
            queue_bytes: default_queue_bytes(),
            per_socket: default_per_socket(),
            per_user: None,
            max_response: default_max_response(),
            ca_file: None,
            secret_env: default_secret_env(),
            pass_headers: Vec::new(),
            onclose_retries: default_onclose_retries(),
            retry_backoff: default_retry_backoff(),
        })
    }

    /// The label of the endpoint's metrics: `name`, else the URL's `host:port`.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.url.authority().to_string())
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_concurrency() -> usize {
    32
}
fn default_queue() -> usize {
    256
}
fn default_queue_bytes() -> usize {
    16 << 20
}
fn default_per_socket() -> usize {
    16
}
fn default_max_response() -> usize {
    64 * 1024
}
fn default_secret_env() -> String {
    "SWITCHBOARD_HANDLER_SECRET".into()
}
fn default_onclose_retries() -> u32 {
    2
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(500)
}

fn de_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let t = de_duration(d)?;
    if t < Duration::from_millis(1) {
        return Err(de::Error::custom("timeout must be at least 1ms"));
    }
    // A socket waits this long, and deadlines are computed from it.
    if t > Duration::from_secs(3600) {
        return Err(de::Error::custom("timeout must be at most 1h"));
    }
    Ok(t)
}

fn between<'de, D: Deserializer<'de>>(d: D, key: &str, most: usize) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 || n > most {
        return Err(de::Error::custom(format_args!(
            "{key} must be between 1 and {most}"
        )));
    }
    Ok(n)
}

/// Each is a task per endpoint, started with the gateway.
fn de_concurrency<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    between(d, "concurrency", 4096)
}

fn de_per_socket<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    between(d, "per_socket", 65_536)
}

/// At most the largest `concurrency` plus the largest `queue`: more could never bind.
fn de_per_user<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    between(d, "per_user", 4096 + 1_000_000).map(Some)
}

fn de_queue<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n > 1_000_000 {
        return Err(de::Error::custom("queue must be at most 1000000"));
    }
    Ok(n)
}

fn de_retries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n > MAX_ONCLOSE_RETRIES {
        return Err(de::Error::custom(format_args!(
            "onclose_retries must be at most {MAX_ONCLOSE_RETRIES}"
        )));
    }
    Ok(n)
}

fn de_pass_headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names =
        header_names(Vec::<String>::deserialize(d)?, "pass_headers").map_err(de::Error::custom)?;
    if names.len() > MAX_PASS_HEADERS {
        return Err(de::Error::custom(format_args!(
            "pass_headers may name at most {MAX_PASS_HEADERS} headers"
        )));
    }
    if let Some(bad) = names
        .iter()
        .find(|n| RESERVED_HANDLER_HEADERS.contains(&n.as_str()) || n.starts_with("x-switchboard-"))
    {
        return Err(de::Error::custom(format_args!(
            "pass_headers entry `{bad}` is set by the gateway itself"
        )));
    }
    Ok(names)
}

/// `http_handlers[].url`: `http://` or `https://`, a host, no credentials or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerUrl(String);

impl HandlerUrl {
    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `host[:port]`.
    pub fn authority(&self) -> &str {
        let rest = self.0.split_once("://").map_or("", |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or_default()
    }

    fn parse(url: &str) -> Result<Self, String> {
        // What a message shows: never a password the URL carries.
        let shown = crate::de::redacted_url(url);
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| format!("url `{shown}` must start with http:// or https://"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("url `{shown}` has no host"));
        }
        if authority.contains('@') {
            return Err(format!(
                "url `{shown}` must not carry credentials (the requests are signed: secret_env)"
            ));
        }
        if url.contains('#') || url.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "url `{shown}` must not have a fragment, spaces or control characters"
            ));
        }
        Ok(HandlerUrl(url.to_string()))
    }
}

impl<'de> Deserialize<'de> for HandlerUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HandlerUrl::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// `gateway.http_handlers`: entries whose topics and names are unique across the list.
#[derive(Debug, Clone, Default)]
pub struct HttpHandlers(pub(crate) Vec<HttpHandler>);

impl HttpHandlers {
    /// The entries, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, HttpHandler> {
        self.0.iter()
    }
    /// True when no topic is bound.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Adds an entry (the demo's `--handlers-url`); refuses a topic or name already bound.
    pub fn push(&mut self, entry: HttpHandler) -> Result<(), String> {
        check_unique(&self.0, &entry)?;
        self.0.push(entry);
        Ok(())
    }
    /// The entry that handles `topic`.
    pub fn for_topic(&self, topic: &str) -> Option<&HttpHandler> {
        self.0
            .iter()
            .find(|h| h.topics.iter().any(|t| t.as_str() == topic))
    }
}

/// `entry` against the entries before it. A message names the entry it is about first
/// (`entry 2: ...`), which the config's error is placed at.
fn check_unique(seen: &[HttpHandler], entry: &HttpHandler) -> Result<(), String> {
    let this = seen.len() + 1;
    if entry.topics.is_empty() {
        return Err(format!("entry {this}: topics must name at least one topic"));
    }
    for (i, topic) in entry.topics.iter().enumerate() {
        if entry.topics[..i].contains(topic) {
            return Err(format!("entry {this}: topic `{topic}` is listed twice"));
        }
        if let Some(n) = seen.iter().position(|h| h.topics.contains(topic)) {
            return Err(format!(
                "entry {this}: topic `{topic}` is already bound by entry {} of the list",
                n + 1
            ));
        }
    }
    let label = entry.label();
    if let Some(n) = seen.iter().position(|h| h.label() == label) {
        return Err(format!(
            "entry {this} has the same name `{label}` as entry {} (set `name` to tell them \
             apart in the metrics)",
            n + 1
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for HttpHandlers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HttpHandlers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of {url, topics, ...} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HttpHandlers, A::Error> {
                let mut list = HttpHandlers::default();
                while let Some(entry) = seq.next_element::<HttpHandler>()? {
                    list.push(entry).map_err(de::Error::custom)?;
                }
                Ok(list)
            }
        }
        d.deserialize_seq(V)
    }
}
