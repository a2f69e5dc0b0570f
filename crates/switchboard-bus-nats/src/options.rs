//! [`NatsOptions`]: servers, credentials, TLS and bounds, and how they become the client's
//! connect options.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::NatsError;

/// Default queue group of handlers.
pub const DEFAULT_GROUP: &str = "switchboard-handlers";

/// How to reach NATS and how to behave there.
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsOptions {
    /// Server URLs (`nats://host:4222`, `tls://host:4222`): one server, or several members of
    /// a cluster; the client connects to one and fails over to the others.
    pub servers: Vec<String>,
    /// A label for humans: the NATS connection name, and a token of this node's reply
    /// subjects (so permissions can name it). Replies stay per process whatever it is: each
    /// process adds a random token of its own. Default `switchboard`. See [`check_node_name`].
    pub node_name: Option<String>,
    /// How long a message that can be answered waits for an answer. Default 10 s.
    pub reply_timeout: Duration,
    /// Queue group of [`switchboard_bus::Bus::subscribe`]rs. Default [`DEFAULT_GROUP`].
    pub group: String,
    /// How this node proves who it is. Default: no credentials.
    pub auth: NatsAuth,
    /// TLS beyond what `tls://` URLs ask for: a CA to trust, a client certificate. Present:
    /// TLS is required.
    pub tls: Option<NatsTls>,
    /// Most messages waiting to be handed to the client; over it, publishing fails at once.
    /// Default 65,536.
    pub outbox_messages: usize,
    /// Most bytes of messages waiting to be handed to the client. Default 64 MiB.
    pub outbox_bytes: usize,
    /// Most published events waiting for their answer (each keeps the way back to its
    /// socket until answered or timed out); over it, publishing an answerable event fails.
    /// Default 262,144.
    pub max_pending_answers: usize,
    /// Most bytes of messages one every-node subscription (`send`, `broadcast`,
    /// `disconnect`, presence) holds, received and not yet handled; over it, newer ones are
    /// dropped ([`crate::NatsBus::every_node_dropped`]). A message is always taken when its
    /// subscription holds none. Default 64 MiB.
    pub every_node_bytes: usize,
    /// Most bytes of messages one handler subscription (a topic this node handles in the
    /// queue group) holds, received and whose handler has not finished (each handler runs on
    /// a task of its own, so handlers that wait add up); over it, newer ones are dropped
    /// ([`crate::NatsBus::handlers_dropped`]), and one that asks for an answer is answered
    /// that the handlers are busy. A message is always taken when its subscription holds
    /// none. Counted as bytes on the wire: the parsed values a waiting handler holds take
    /// more. Default 64 MiB.
    pub handler_bytes: usize,
    /// How long a gather (a presence question across nodes) waits for another answer once one
    /// has come: nodes on one NATS answer within milliseconds of each other, but a node whose
    /// process is held up longer than this is left out of that answer. Default
    /// [`crate::DEFAULT_GATHER_QUIET`].
    pub gather_quiet: Duration,
}

impl NatsOptions {
    /// Options with defaults for one server `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self::cluster([url.into()])
    }

    /// Options with defaults for several servers (members of one cluster).
    pub fn cluster(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        NatsOptions {
            servers: urls.into_iter().map(Into::into).collect(),
            node_name: None,
            reply_timeout: Duration::from_secs(10),
            group: DEFAULT_GROUP.into(),
            auth: NatsAuth::None,
            tls: None,
            outbox_messages: 65_536,
            outbox_bytes: 64 << 20,
            max_pending_answers: 262_144,
            every_node_bytes: 64 << 20,
            handler_bytes: 64 << 20,
            gather_quiet: crate::DEFAULT_GATHER_QUIET,
        }
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("servers", &servers_for_humans(&self.servers))
            .field("node_name", &self.node_name)
            .field("reply_timeout", &self.reply_timeout)
            .field("group", &self.group)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("outbox_messages", &self.outbox_messages)
            .field("outbox_bytes", &self.outbox_bytes)
            .field("max_pending_answers", &self.max_pending_answers)
            .field("every_node_bytes", &self.every_node_bytes)
            .field("handler_bytes", &self.handler_bytes)
            .field("gather_quiet", &self.gather_quiet)
            .finish()
    }
}

/// `url` with any credentials in it (`nats://user:password@host`) shown as `***`: what logs
/// and errors may print.
pub fn redacted_url(url: &str) -> String {
    match url_parts(url) {
        (scheme, Some(_), rest) => format!("{scheme}***@{rest}"),
        (_, None, _) => url.to_string(),
    }
}

/// `url` as `scheme://` (or nothing), its `user:password@` or `token@` without the `@`
/// (what comes before the last `@`: a password may hold a `/`), and the rest. The config
/// crate reads URLs with a copy of this (`switchboard_config`'s `url_parts`), as it depends
/// on no other crate of the workspace.
fn url_parts(url: &str) -> (&str, Option<&str>, &str) {
    let (scheme, rest) = url.split_at(url.find("://").map_or(0, |at| at + 3));
    match rest.rsplit_once('@') {
        Some((userinfo, after)) => (scheme, Some(userinfo), after),
        None => (scheme, None, rest),
    }
}

/// The servers' URLs for humans, credentials redacted ([`redacted_url`]).
pub(crate) fn servers_for_humans(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redacted_url(s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a node authenticates to NATS. `Debug` never shows a secret.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A user and password from the server's `authorization.users`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token (`authorization.token`).
    Token(String),
    /// An NKey user seed (`SU...`); the server knows the public key.
    NKeySeed(String),
    /// A `.creds` file: a user JWT and its NKey seed (decentralized auth, operator mode).
    CredsFile(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::NKeySeed(_) => f.write_str("NKeySeed(***)"),
            NatsAuth::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

/// TLS settings: what to trust and what to present.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct NatsTls {
    /// PEM file of CA certificates to trust (besides the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl NatsTls {
    /// Trust `ca_file`, present no certificate.
    pub fn with_ca(ca_file: impl Into<PathBuf>) -> Self {
        NatsTls {
            ca_file: Some(ca_file.into()),
            ..NatsTls::default()
        }
    }
}

/// Checks a node name: one or more `.`-separated tokens, none empty, no whitespace or
/// control characters, no `*` or `>` (it becomes part of reply subjects).
pub fn check_node_name(name: &str) -> Result<(), String> {
    let bad_char = |c: char| c.is_whitespace() || c.is_control();
    if name.is_empty()
        || name.contains(bad_char)
        || name
            .split('.')
            .any(|t| t.is_empty() || t.contains(['*', '>']))
    {
        return Err(format!(
            "node name `{name}` must be `.`-separated non-empty tokens without whitespace, `*` or `>`"
        ));
    }
    Ok(())
}

/// The servers' URLs as the client is given them, without credentials, and the credentials
/// to use: `options.auth`, or what the URLs carry (`nats://user:password@host`,
/// `nats://token@host`). The client never sees a URL with credentials, so it cannot log one
/// (it logs every connection attempt's URL at debug). Refused: credentials both in a URL and
/// in `auth`, or different ones in two URLs.
pub(crate) fn servers_and_auth(
    options: &NatsOptions,
) -> Result<(Vec<String>, NatsAuth), NatsError> {
    let refuse = |reason: &str| NatsError::Option {
        option: "url",
        reason: reason.into(),
    };
    let mut servers = Vec::with_capacity(options.servers.len());
    // As written (the config compares them so too), and as the client takes them.
    let mut from_urls: Option<(&str, NatsAuth)> = None;
    for url in &options.servers {
        let (server, given) = split_credentials(url);
        servers.push(server);
        match (given, &from_urls) {
            (None, _) => {}
            (Some(given), None) => from_urls = Some(given),
            (Some((text, _)), Some((earlier, _))) if text == *earlier => {}
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "two server URLs carry different credentials: give them once, in `auth`",
                ))
            }
        }
    }
    let auth = match from_urls {
        Some(_) if options.auth != NatsAuth::None => {
            return Err(refuse(
                "credentials are given both in a server URL and in `auth`: give them once",
            ))
        }
        Some((_, auth)) => auth,
        None => options.auth.clone(),
    };
    Ok((servers, auth))
}

/// `url` without its `user:password@` or `token@`, and that text with what it says (none
/// for an empty one, `nats://@host`).
fn split_credentials(url: &str) -> (String, Option<(&str, NatsAuth)>) {
    let (scheme, userinfo, host) = url_parts(url);
    let Some(userinfo) = userinfo.filter(|userinfo| !userinfo.is_empty()) else {
        return (format!("{scheme}{host}"), None);
    };
    let auth = match userinfo.split_once(':') {
        Some((user, password)) => NatsAuth::UserPassword {
            user: percent_decoded(user),
            password: percent_decoded(password),
        },
        None => NatsAuth::Token(percent_decoded(userinfo)),
    };
    (format!("{scheme}{host}"), Some((userinfo, auth)))
}

/// `%XX` escapes decoded (as in a URL's user and password); anything else kept as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// The client's connect options for `options`, with `auth` ([`servers_and_auth`]); `name` is
/// the connection name.
pub(crate) async fn connect_options(
    options: &NatsOptions,
    auth: &NatsAuth,
    name: &str,
) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                // The client dropped messages of a subscription this node did not take fast
                // enough (core NATS delivers at most once): a warning, not news.
                // One event per dropped message: one line a second, with the count.
                async_nats::Event::SlowConsumer(_) => {
                    static DROPPED: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();
                    if let Some(dropped) = DROPPED.note() {
                        tracing::warn!(%event, dropped, "nats: messages dropped");
                    }
                }
                event => tracing::info!(%event, "nats"),
            }
        });
    connect = with_auth(connect, auth).await?;
    if let Some(tls) = &options.tls {
        connect = with_tls(connect, tls)?;
    }
    Ok(connect)
}

async fn with_auth(
    connect: async_nats::ConnectOptions,
    auth: &NatsAuth,
) -> Result<async_nats::ConnectOptions, NatsError> {
    Ok(match auth {
        NatsAuth::None => connect,
        NatsAuth::UserPassword { user, password } => {
            connect.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => connect.token(token.clone()),
        NatsAuth::NKeySeed(seed) => {
            // async-nats only finds a bad seed when it signs the server's nonce; say so now.
            nkeys::KeyPair::from_seed(seed).map_err(|e| NatsError::Option {
                option: "nkey_seed",
                reason: e.to_string(),
            })?;
            connect.nkey(seed.clone())
        }
        NatsAuth::CredsFile(path) => {
            readable("creds_file", path)?;
            connect
                .credentials_file(path)
                .await
                .map_err(|e| NatsError::Option {
                    option: "creds_file",
                    reason: format!("{}: {e}", path.display()),
                })?
        }
    })
}

fn with_tls(
    mut connect: async_nats::ConnectOptions,
    tls: &NatsTls,
) -> Result<async_nats::ConnectOptions, NatsError> {
    connect = connect.require_tls(true);
    if let Some(ca) = &tls.ca_file {
        readable("tls.ca_file", ca)?;
        connect = connect.add_root_certificates(ca.clone());
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            readable("tls.cert_file", cert)?;
            readable("tls.key_file", key)?;
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => {
            return Err(NatsError::Option {
                option: "tls",
                reason: "cert_file and key_file go together".into(),
            })
        }
    }
    Ok(connect)
}

/// The client reads these files while connecting and reports a missing one vaguely; it
/// also reads them whole, so a file over 1 MiB or a device (`/dev/zero` named by mistake)
/// is refused here rather than read into memory.
fn readable(option: &'static str, path: &std::path::Path) -> Result<(), NatsError> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |reason: String| NatsError::Option {
        option,
        reason: format!("{}: {reason}", path.display()),
    };
    let meta = std::fs::metadata(path).map_err(|e| refuse(e.to_string()))?;
    let kind = meta.file_type();
    if kind.is_char_device() || kind.is_block_device() {
        return Err(refuse("a device, not a file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(refuse(
            "larger than 1 MiB: not a credentials, key or certificate file".into(),
        ));
    }
    Ok(())
}

/// The largest credentials, key or certificate file the client is given.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        for (url, shown) in [
            ("nats://alice:pw@h:4222", "nats://***@h:4222"),
            ("tls://a:b@c@h:4222/x", "tls://***@h:4222/x"),
            ("alice:pw@h:4222", "***@h:4222"),
            ("nats://h:4222", "nats://h:4222"),
            ("nats://alice:pa/ss@h:4222", "nats://***@h:4222"),
        ] {
            assert_eq!(redacted_url(url), shown);
        }
        let options = NatsOptions::cluster(["nats://alice:TopSecret@127.0.0.1:4222"]);
        assert!(!format!("{options:?}").contains("TopSecret"));
    }

    #[test]
    fn credentials_leave_the_urls_for_auth() {
        let split = |urls: &[&str]| servers_and_auth(&NatsOptions::cluster(urls.iter().copied()));
        let (servers, auth) =
            split(&["nats://al%69ce:p%2Fw:x@h:1", "h:2", "al%69ce:p%2Fw:x@h:3"]).unwrap();
        assert_eq!(servers, ["nats://h:1", "h:2", "h:3"]);
        let user = NatsAuth::UserPassword {
            user: "alice".into(),
            password: "p/w:x".into(),
        };
        assert_eq!(auth, user);
        assert_eq!(
            split(&["tls://t0k@h:1"]).unwrap().1,
            NatsAuth::Token("t0k".into())
        );
        // An empty `@` is none; written differently is different, as the config reads it.
        assert_eq!(
            split(&["nats://@h:1"]).unwrap(),
            (vec!["nats://h:1".to_string()], NatsAuth::None)
        );
        assert!(split(&["nats://a:b%21@h:1", "nats://a:b!@h:2"]).is_err());
    }

    #[test]
    fn files_the_client_reads_whole_are_bounded() {
        assert!(readable("tls.ca_file", std::path::Path::new("/dev/zero"))
            .unwrap_err()
            .to_string()
            .contains("a device, not a file"));
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let e = readable("tls.ca_file", &big).unwrap_err().to_string();
        assert!(e.contains("larger than 1 MiB"), "{e}");
        let small = dir.path().join("small.pem");
        std::fs::write(&small, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(readable("tls.ca_file", &small).is_ok());
    }

    #[test]
    fn node_names_are_checked() {
        for good in ["gw", "gw-1", "eu.gw-1", "ü"] {
            assert!(check_node_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "gw 1", "gw.*", "a>", ">", "a..b", ".a", "a.", "\tx", "a\nb",
        ] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut o = NatsOptions::new("nats://127.0.0.1:4222");
        o.auth = NatsAuth::UserPassword {
            user: "gw".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{o:?}").contains("hunter2"));
        for auth in [
            NatsAuth::Token("t0k".into()),
            NatsAuth::NKeySeed("SUAB".into()),
        ] {
            let text = format!("{auth:?}");
            assert!(!text.contains("t0k") && !text.contains("SUAB"), "{text}");
        }
    }
}
