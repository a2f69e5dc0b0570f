//! The `gateway.socket` section: the spec's hooks plus our transport knobs, and the
//! validation of its headers, origins, heartbeat and send queue.

use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::de::{de_byte_size, de_duration};
use crate::values::UrlPath;
use crate::{ConnectHook, OnMessage, PublishHook, SubscribeHook};

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
    /// The topic whose messages close one user's sockets on every node (logout, ban, a
    /// revoked token): `{username, namespace?, code?, reason?}` (extension).
    #[serde(default)]
    pub disconnect: Option<SubscribeHook>,
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
    /// The Server-Sent Events fallback (extension): present (`sse: {}` for the defaults), the
    /// same sockets are also served as an event stream plus posts, for clients whose proxies
    /// break WebSockets. Absent: WebSocket only.
    #[serde(default)]
    pub sse: Option<Sse>,
}

/// The `gateway.socket.sse` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Sse {
    /// The path of the event stream (`GET`) and of the client's messages (`POST`). Default:
    /// the socket path followed by `/sse` (`/connect/sse`). Must differ from the socket path.
    #[serde(default)]
    pub path: Option<UrlPath>,
}

impl Socket {
    /// The SSE path, if the fallback is on: `sse.path`, or [`Socket::default_sse_path`].
    pub fn sse_path(&self) -> Option<String> {
        let sse = self.sse.as_ref()?;
        Some(match &sse.path {
            Some(path) => path.as_str().to_string(),
            None => self.default_sse_path(),
        })
    }

    /// The SSE path when `sse.path` does not say: the socket path + `/sse`.
    pub fn default_sse_path(&self) -> String {
        format!("{}/sse", self.path.as_str().trim_end_matches('/'))
    }
}

fn de_origins<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    for origin in &list {
        if origin != "*" && !is_web_origin(origin) {
            return Err(de::Error::custom(format_args!(
                "allowed_origins entry `{origin}` must be `*` or http(s)://host[:port] (no \
                 path, user or wildcard; a port up to 65535)"
            )));
        }
    }
    Ok(Some(list))
}

/// Whether `entry` is an origin a browser could send: `http` or `https` (any case), a host
/// (an IPv6 one in brackets) without user, path, query or wildcard, and a port that fits in
/// 16 bits. An entry that is not can never match a page's `Origin`: refused at load, where the
/// mistake can be named, rather than refusing every page at run time.
fn is_web_origin(entry: &str) -> bool {
    let Some((scheme, authority)) = entry.split_once("://") else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return false;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((inside, rest)) if !inside.is_empty() => (inside, rest.strip_prefix(':')),
            _ => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let host_ok = !host.is_empty()
        && !host
            .chars()
            .any(|c| matches!(c, '/' | '?' | '#' | '@' | '*' | '[' | ']') || c.is_whitespace());
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    // After a bracketed host, nothing but `:port` may follow.
    let tail_ok = !authority.starts_with('[') || authority.ends_with(']') || port.is_some();
    host_ok && port_ok && tail_ok
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

impl Socket {
    /// The topics the hooks publish to (`onconnect`, `onmessage`, its `types`, `onclose`).
    pub fn published_topics(&self) -> Vec<&str> {
        let mut topics: Vec<&str> = Vec::new();
        topics.extend(self.onconnect.iter().map(|h| h.publish.as_str()));
        if let Some(m) = &self.onmessage {
            topics.extend(m.publish.iter().map(|t| t.as_str()));
            topics.extend(m.types.iter().map(|t| t.publish.as_str()));
        }
        topics.extend(self.onclose.iter().map(|h| h.publish.as_str()));
        topics
    }
}

fn de_context_headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    header_names(Vec::<String>::deserialize(d)?, "context_headers").map_err(de::Error::custom)
}

/// Header names, lower-cased and deduplicated; refuses what is not a header name, the
/// credential headers and `jwt` (reserved for the verified claims). `key` names the list.
pub(crate) fn header_names(names: Vec<String>, key: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let lower = name.trim().to_ascii_lowercase();
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if lower.is_empty() || !lower.chars().all(token) {
            return Err(format!("{key} entry `{name}` is not a header name"));
        }
        if CREDENTIAL_HEADERS.contains(&lower.as_str()) {
            return Err(format!(
                "{key} entry `{name}` carries credentials and is never copied into \
                 messages (handlers get the verified claims at `context.headers.jwt`)"
            ));
        }
        if lower == "jwt" {
            return Err(format!(
                "{key} entry `jwt` is reserved for the verified claims"
            ));
        }
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

fn de_heartbeat<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let interval = de_duration(d)?;
    if interval < Duration::from_millis(10) {
        return Err(de::Error::custom("heartbeat must be at least 10ms"));
    }
    Ok(interval)
}

fn de_send_queue<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("send_queue must be at least 1"));
    }
    Ok(n)
}
