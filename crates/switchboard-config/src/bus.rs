//! The `gateway.bus` section: NATS, its URLs, node name, credentials and TLS.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::de::{de_byte_size, de_duration, redacted_url, url_parts};

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
    /// Most bytes of `send`/`broadcast`/`disconnect` messages one of the node's every-node
    /// subscriptions holds, received and not yet handled; over it, newer ones are dropped
    /// (logged, counted). Default 64 MiB.
    #[serde(default = "default_outbox_bytes", deserialize_with = "de_byte_size")]
    pub every_node_bytes: usize,
    /// Most bytes of messages one of the node's handler subscriptions (topics its handlers
    /// take in the queue group) holds, received and whose handler has not finished; over it,
    /// newer ones are dropped (logged, counted). Default 64 MiB.
    #[serde(default = "default_outbox_bytes", deserialize_with = "de_byte_size")]
    pub handler_bytes: usize,
    /// How long a presence question across nodes waits for another node's answer once one
    /// has come. Default 50 ms; at most 1 s (the question's own bound).
    #[serde(default = "default_gather_quiet", deserialize_with = "de_gather_quiet")]
    pub gather_quiet: Duration,
}

fn default_gather_quiet() -> Duration {
    Duration::from_millis(50)
}

fn de_gather_quiet<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let quiet = de_duration(d)?;
    if quiet.is_zero() || quiet > Duration::from_secs(1) {
        return Err(de::Error::custom(
            "gather_quiet must be more than 0 and at most 1s (a presence question waits 1s at most)",
        ));
    }
    Ok(quiet)
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
/// `Debug` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrls(Vec<String>);

impl fmt::Debug for NatsUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|url| redacted_url(url)))
            .finish()
    }
}

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
            // What follows `user:password@`, up to a path.
            let (_, _, after) = url_parts(rest);
            let host_port = after.split('/').next().unwrap_or_default();
            let port = match host_port.strip_prefix('[') {
                Some(v6) => v6.split_once(']').map(|(_, p)| p.strip_prefix(':')),
                None => Some(host_port.rsplit_once(':').map(|(_, p)| p)),
            };
            let port_ok =
                port.is_some_and(|port| port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0)));
            if rest.is_empty()
                || rest.contains("://")
                || url.contains(char::is_whitespace)
                || host_port.is_empty()
                || host_port.starts_with(':')
                || !port_ok
            {
                // Never the password a URL may carry.
                return Err(de::Error::custom(format_args!(
                    "url `{}` must be nats://host:port, tls://host:port or host:port (a port \
                     from 1 to 65535)",
                    redacted_url(url)
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
