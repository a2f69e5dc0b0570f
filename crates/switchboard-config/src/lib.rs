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

use std::path::Path;

use serde::Deserialize;

mod auth;
mod bus;
mod de;
mod error;
mod expand;
mod gateway;
mod hooks;
mod http_handlers;
mod limits;
mod reference;
mod socket;
mod values;

pub use auth::{Algorithm, Auth, Jwks};
pub use bus::{BusConfig, NatsConfig, NatsCredentials, NatsTls, NatsUrls, NodeName};
pub use de::{parse_byte_size, parse_duration};
pub use error::ConfigError;
pub use gateway::{Admin, Api, Gateway, Log, LogFormat, Tls, TlsVersion};
pub use hooks::{
    ConnectHook, OnMessage, PublishHook, SubscribeHook, TypeRoute, TypeRoutes, REFRESH_TYPE,
};
pub use http_handlers::{
    HandlerUrl, HttpHandler, HttpHandlers, MAX_ONCLOSE_RETRIES, MAX_PASS_HEADERS,
    RESERVED_HANDLER_HEADERS,
};
pub use limits::Limits;
pub use reference::{reference, KeyDoc, Origin, Section};
pub use socket::{Socket, Sse, CREDENTIAL_HEADERS};
pub use values::{Topic, UrlPath};

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
        refuse_deep_nesting(text)?;
        let de = serde_yaml::Deserializer::from_str(text);
        let config = Config::deserialize(expand::Expand { de, env }).map_err(|e| {
            let e = placed(ConfigError::from_yaml(e), text);
            let e = placed_again(at_named_auth_key(e, text), |message, line| {
                named_entry_line(message, line, text)
                    .or_else(|| numbered_item_line(message, line, text))
                    .or_else(|| second_of_duplicate_line(message, line, text))
                    .or_else(|| named_key_line(message, line, text))
            });
            with_tab_hint(e, text)
        })?;
        config.check_bindings(text)?;
        config.check_routes(text)?;
        config.check_paths_and_addresses(text)?;
        config.check_limits(text)?;
        config.check_nats_credentials(text)?;
        Ok(config)
    }

    /// No socket hook publishes to the gateway's own `send` or `disconnect` topic: a client's
    /// message there would name its own `username` (and `type`), so any client could message
    /// any user in another's name, or close anyone's sockets. A handler that checks and
    /// forwards does it safely. (`broadcast` may take a type straight, as the spec's own
    /// example does: every socket hears it, which is what routing it there asks for.) The
    /// line is the first that names both `publish` and the topic.
    fn check_routes(&self, text: &str) -> Result<(), ConfigError> {
        let socket = &self.gateway.socket;
        // The built-ins must not share a topic: with `send` and `broadcast` on one, every
        // private send would also go to everyone in every namespace; with `send` and
        // `disconnect`, every send would close its target.
        let builtins = [
            ("send", socket.send.as_ref()),
            ("broadcast", socket.broadcast.as_ref()),
            ("disconnect", socket.disconnect.as_ref()),
        ];
        for (i, (later, hook)) in builtins.iter().enumerate() {
            let Some(hook) = hook else { continue };
            let topic = hook.subscribe.as_str();
            let earlier = builtins[..i]
                .iter()
                .find(|(_, h)| h.is_some_and(|h| h.subscribe.as_str() == topic));
            if let Some((earlier, _)) = earlier {
                return Err(ConfigError::at_line(
                    format!(
                        "gateway.socket.{later}.subscribe: `{topic}` is the topic of \
                         gateway.socket.{earlier} too; each built-in needs a topic of its own \
                         (one message there would be both a {earlier} and a {later})"
                    ),
                    key_line(text, &["gateway", "socket", later]),
                ));
            }
        }
        let published = socket.published_topics();
        let guarded = [
            (
                socket.send.as_ref(),
                "send",
                "message any user in another's name",
            ),
            (
                socket.disconnect.as_ref(),
                "disconnect",
                "close any user's sockets",
            ),
        ];
        for (hook, name, would) in guarded {
            let Some(hook) = hook else { continue };
            let topic = hook.subscribe.as_str();
            if !published.contains(&topic) {
                continue;
            }
            let line = text
                .lines()
                .position(|l| l.contains("publish") && l.contains(topic))
                .map(|n| n + 1);
            return Err(ConfigError::at_line(
                format!(
                    "gateway.socket: a hook publishes to `{topic}`, the topic of the built-in \
                     `{name}` (gateway.socket.{name}.subscribe): any client could then {would}; \
                     publish to a topic of your own and have a handler check the message and \
                     forward it"
                ),
                line,
            ));
        }
        Ok(())
    }

    /// Credentials in a NATS URL (`nats://user:password@host`) are used as `auth` would be:
    /// given there and in `auth` too, or differently in two URLs, which ones count would be
    /// a guess.
    fn check_nats_credentials(&self, text: &str) -> Result<(), ConfigError> {
        let Some(bus) = &self.gateway.bus else {
            return Ok(());
        };
        // As the bus reads them (`switchboard_bus_nats`): compared as written, and an empty
        // one is none.
        let given: Vec<&str> = bus
            .nats
            .url
            .as_slice()
            .iter()
            .filter_map(|url| de::url_parts(url).1)
            .filter(|userinfo| !userinfo.is_empty())
            .collect();
        let Some(first) = given.first() else {
            return Ok(());
        };
        if bus.nats.auth.is_some() {
            return Err(ConfigError::at_line(
                "gateway.bus.nats.auth: credentials are given both in a server URL and in auth: \
                 give them once"
                    .to_string(),
                key_line(text, &["gateway", "bus", "nats", "auth"]),
            ));
        }
        if given.iter().any(|g| g != first) {
            return Err(ConfigError::at_line(
                "gateway.bus.nats.url: two server URLs carry different credentials: give them \
                 once, in auth"
                    .to_string(),
                key_line(text, &["gateway", "bus", "nats", "url"]),
            ));
        }
        Ok(())
    }

    /// Limits that would refuse everything, or that say nothing on their own.
    fn check_limits(&self, text: &str) -> Result<(), ConfigError> {
        let limits = &self.gateway.limits;
        let invalid = |key: &str, problem: String| {
            ConfigError::at_line(
                format!("gateway.limits.{key}: {problem}"),
                key_line(text, &["gateway", "limits", key]),
            )
        };
        if limits.message_burst.is_some() && limits.messages_per_second.is_none() {
            return Err(invalid(
                "message_burst",
                "is set without messages_per_second: a burst is allowed above a rate, so set \
                 the rate too"
                    .into(),
            ));
        }
        if limits.max_request_head < MIN_REQUEST_HEAD {
            return Err(invalid(
                "max_request_head",
                format!(
                    "{} bytes would refuse every browser's upgrade request; at least 1KiB",
                    limits.max_request_head
                ),
            ));
        }
        let largest = self.gateway.socket.max_message_size;
        if limits.buffer_budget < largest {
            return Err(invalid(
                "buffer_budget",
                format!(
                    "{} bytes is less than gateway.socket.max_message_size ({largest} bytes): \
                     a message of the largest size could never be buffered",
                    limits.buffer_budget
                ),
            ));
        }
        Ok(())
    }

    /// Checks across sections that serde cannot place: the SSE fallback's path must not be
    /// the socket path, and no two listeners may take the same address (`serve` would stop
    /// with "address in use" for its own config, and `check-config` would pass it). The line
    /// is the later key's, or its section's when the key is written in flow style.
    fn check_paths_and_addresses(&self, text: &str) -> Result<(), ConfigError> {
        let invalid = |key: &[&str], problem: String| {
            ConfigError::at_line(format!("{}: {problem}", key.join(".")), key_line(text, key))
        };
        let socket = &self.gateway.socket;
        if let Some(sse) = socket.sse_path() {
            if sse == socket.path.as_str() {
                return Err(invalid(
                    &["gateway", "socket", "sse", "path"],
                    format!(
                        "`{sse}` is gateway.socket.path too: the event stream needs a path of \
                         its own (leave the key out for `{}`)",
                        socket.default_sse_path()
                    ),
                ));
            }
        }
        // (address, key, the line it is written on: 0 for the default `gateway.listen`)
        let listeners: Vec<(std::net::SocketAddr, &[&str], usize)> = self
            .gateway
            .listeners()
            .into_iter()
            .filter_map(|(key, addr)| {
                // A key in flow style (`api: {listen: ...}`) is placed at its section's line;
                // only `gateway.listen` may be left out, for its default.
                let line = match key_position(text, key) {
                    // `gateway:` found but not `listen` under it: the default, unless the section
                    // is written in flow style with the key on its line.
                    Some((depth, line)) if depth < key.len() && key.len() == 2 => {
                        let on_line = text.lines().nth(line - 1).unwrap_or_default();
                        if on_line.contains("listen") {
                            line
                        } else {
                            0
                        }
                    }
                    found => found.map_or(0, |(_, line)| line),
                };
                Some((addr?, key, line))
            })
            .collect();
        let addresses: Vec<_> = listeners.iter().map(|(addr, _, _)| *addr).collect();
        let Some((i, j)) = clashing_listeners(&addresses) else {
            return Ok(());
        };
        let ((addr, key, line), (other, other_key, other_line)) = (listeners[i], listeners[j]);
        // Named at the one written later in the file; the other as written, or as the default.
        let ((addr, key), (earlier_key, earlier_line)) = if other_line >= line {
            ((other, other_key), (key, line))
        } else {
            ((addr, key), (other_key, other_line))
        };
        let default = if earlier_line == 0 {
            " (its default)"
        } else {
            ""
        };
        Err(invalid(
            key,
            format!(
                "{addr} is also the address of {}{default}: each listener needs a port of its \
                 own",
                earlier_key.join(".")
            ),
        ))
    }

    /// Every topic bound to an HTTP endpoint must be one the socket hooks publish to (not a
    /// typo, nor a `send`/`broadcast`/`disconnect` topic, which the gateway subscribes to).
    /// A check across sections, so serde cannot place it: the line is the first one under
    /// `http_handlers:` that names the topic.
    fn check_bindings(&self, text: &str) -> Result<(), ConfigError> {
        let published = self.gateway.socket.published_topics();
        for (i, entry) in self.gateway.http_handlers.iter().enumerate() {
            for topic in &entry.topics {
                if published.contains(&topic.as_str()) {
                    continue;
                }
                let line = line_under(text, "http_handlers:", topic.as_str());
                return Err(ConfigError::at_line(
                    format!(
                        "gateway.http_handlers[{i}].topics: topic `{topic}` is not published by \
                         any socket hook (onconnect, onmessage, onmessage.types, onclose)"
                    ),
                    line,
                ));
            }
        }
        Ok(())
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        use std::io::Read;
        let path = path.as_ref();
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Bounded: `--config /dev/zero` (or a log file named by mistake) ends with an error.
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_CONFIG_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() > MAX_CONFIG_BYTES {
            return Err(read(std::io::Error::other(
                "larger than 1 MiB: not a config file",
            )));
        }
        Self::from_yaml_str(&text).map_err(|e| e.in_file(path))
    }
}

/// The largest config file read: a real one is a few KiB.
const MAX_CONFIG_BYTES: usize = 1 << 20;

/// An error the YAML parser gave no position: it leaves out the position of the document's
/// very first character (line 1, column 1), so a wrong top-level key on the first line, or a
/// top-level list, came without one. Placed there, or said plainly when there is no document
/// (an empty file) or more than one.
fn placed(e: ConfigError, text: &str) -> ConfigError {
    let ConfigError::Invalid {
        file,
        message,
        line,
        column,
    } = e
    else {
        return e;
    };
    let content = |l: &str| !blank_or_comment(l);
    if !text.lines().any(content) {
        return ConfigError::Invalid {
            file,
            message: "the config is empty: it needs a `gateway:` section".into(),
            line: None,
            column: None,
        };
    }
    if let Some(line) = line {
        // Known, but not in the message (the parser's text leaves out line 1, column 1).
        let message = if message.contains(" at line ") {
            message
        } else {
            format!("{message} at line {line} column {}", column.unwrap_or(1))
        };
        return ConfigError::Invalid {
            file,
            message,
            line: Some(line),
            column,
        };
    }
    let (message, line, column) = if message.contains("more than one document") {
        // The `---` that starts a second document: one after some content.
        let mut seen = false;
        let second = text.lines().position(|l| {
            let starts = l.starts_with("---") && seen;
            seen |= content(l) && !l.starts_with("---");
            starts
        });
        let line = second.map(|n| n + 1);
        let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
        (
            format!("the file holds more than one YAML document (`---`); a config is one{at}"),
            line,
            None,
        )
    } else {
        (format!("{message} at line 1 column 1"), Some(1), Some(1))
    };
    ConfigError::Invalid {
        file,
        message,
        line,
        column,
    }
}

/// The smallest `limits.max_request_head` taken: a browser's upgrade request (its cookies
/// aside) is several hundred bytes.
const MIN_REQUEST_HEAD: usize = 1024;

/// Flow collections (`[`, `{`) nested deeper than this are refused before parsing: the YAML
/// parser takes time quadratic in the depth (200,000 levels ran for minutes).
const MAX_NESTING: usize = 128;

fn refuse_deep_nesting(text: &str) -> Result<(), ConfigError> {
    // Brackets in quoted strings and comments do not count.
    let (mut depth, mut quote) = (0usize, None::<char>);
    for (n, line) in text.lines().enumerate() {
        let mut chars = line.chars().peekable();
        let mut after_space = true;
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('"'), '\\') => {
                    chars.next(); // an escaped character
                }
                (Some(q), c) if c == q => {
                    if q == '\'' && chars.peek() == Some(&'\'') {
                        chars.next(); // '' inside single quotes
                    } else {
                        quote = None;
                    }
                }
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if after_space => break, // a comment, to the end of the line
                (None, '[' | '{') => depth += 1,
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            after_space = c.is_whitespace();
            if depth > MAX_NESTING {
                return Err(ConfigError::at_line(
                    format!("brackets nest deeper than {MAX_NESTING} levels"),
                    Some(n + 1),
                ));
            }
        }
    }
    Ok(())
}

/// A tab in the line of a syntax error is the likely cause (the parser says only `found
/// character that cannot start any token`): say so.
fn with_tab_hint(mut e: ConfigError, text: &str) -> ConfigError {
    if let ConfigError::Invalid {
        message,
        line: Some(line),
        ..
    } = &mut e
    {
        let tab = text
            .lines()
            .nth(*line - 1)
            .is_some_and(|l| l[..l.len() - l.trim_start().len()].contains('\t'));
        if tab {
            message.push_str(&format!(
                " (line {line} is indented with a tab: YAML indents with spaces only)"
            ));
        }
    }
    e
}

/// The `auth` section's checks of one key against another run once the section is read, so
/// the parser places their errors at the enclosing section. When the message names an
/// `auth.KEY` that the text has, the error is placed at that key's line instead, and at the
/// `auth:` line when the keys it names are all missing.
fn at_named_auth_key(mut e: ConfigError, text: &str) -> ConfigError {
    let ConfigError::Invalid {
        message,
        line,
        column,
        ..
    } = &mut e
    else {
        return e;
    };
    // Otherwise placed by the parser at the value itself, or not about `auth`.
    if !message.starts_with("gateway: auth.") {
        return e;
    }
    // The keys the message names (`auth.jwks.max_stale` whole), the one to change first: in
    // `X conflicts with Y`, Y.
    let mut keys: Vec<String> = message
        .split("auth.")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == '.')
                .collect::<String>()
                .trim_end_matches('.')
                .to_string()
        })
        .filter(|key| !key.is_empty())
        .collect();
    if message.contains(" conflicts with auth.") {
        keys.reverse();
    }
    let named = keys.iter().find_map(|key| {
        let Some((first, nested)) = key.split_once('.') else {
            return auth_line(text, Some(key));
        };
        // A key of a subsection (`auth.jwks.max_stale`): its own line, or its section's when
        // written in flow style.
        auth_line(text, Some(first))?;
        let path: Vec<&str> = ["gateway", "auth", first]
            .into_iter()
            .chain(nested.split('.'))
            .collect();
        key_line(text, &path)
    });
    // A key that is missing (`auth.public_key_file is required`): the section's own line.
    if let Some(at) = named.or_else(|| auth_line(text, None)) {
        message.truncate(message.rfind(" at line ").unwrap_or(message.len()));
        message.push_str(&format!(" at line {at}"));
        (*line, *column) = (Some(at), None);
    }
    e
}

/// An error the parser placed, moved to the (line, column) `find` gives for its message and
/// the parser's line, if it gives one (the message's `at line` is rewritten with it).
fn placed_again(
    mut e: ConfigError,
    find: impl FnOnce(&str, usize) -> Option<(usize, usize)>,
) -> ConfigError {
    if let ConfigError::Invalid {
        message,
        line: Some(line),
        column,
        ..
    } = &mut e
    {
        if let Some((found, at)) = find(message, *line) {
            message.truncate(message.rfind(" at line ").unwrap_or(message.len()));
            message.push_str(&format!(" at line {found} column {at}"));
            (*line, *column) = (found, Some(at));
        }
    }
    e
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Whether `line` says nothing to the parser: blank, or only a comment.
fn blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// Whether `line` holds `key:` (quoted or not, as a list item's first key too).
fn holds_key(line: &str, key: &str) -> bool {
    let t = line.trim_start();
    let t = t
        .strip_prefix("- ")
        .unwrap_or(t)
        .trim_start_matches(['"', '\'']);
    t.strip_prefix(key)
        .is_some_and(|r| r.trim_start_matches(['"', '\'']).starts_with(':'))
}

/// A list's entry is checked once the whole list is read, so the parser places its error at
/// the section that holds the list. When the message names it (`allowed_origins entry
/// `x``), this is the entry's own place: the list item equal to it (without quotes or case)
/// under the first `key:` from the parser's `line`, or the key's line for a list in flow
/// style that mentions it. Nothing when the entry is not written there (it came from a
/// `${VAR}`, say): the section's line stays.
fn named_entry_line(message: &str, line: usize, text: &str) -> Option<(usize, usize)> {
    let at = message.find(" entry `")?;
    let key = message[..at]
        .rsplit(|c: char| c.is_whitespace() || c == ':' || c == '.')
        .next()
        .filter(|key| !key.is_empty())?;
    let entry = message[at + " entry `".len()..]
        .split('`')
        .next()
        .filter(|entry| !entry.is_empty())?;
    let lines: Vec<&str> = text.lines().collect();
    let start = (line.saturating_sub(1)..lines.len()).find(|&n| holds_key(lines[n], key))?;
    let key_line = lines[start];
    let (_, value) = key_line.split_once(':')?;
    if !blank_or_comment(value) {
        // Flow style, `key: [a, b]`: the entry is on this line, if anywhere.
        let lower = key_line.to_ascii_lowercase();
        let column = lower.find(&entry.to_ascii_lowercase())?;
        return Some((start + 1, column + 1));
    }
    let key_indent = indent(key_line);
    for (n, l) in lines.iter().enumerate().skip(start + 1) {
        let t = l.trim_start();
        if blank_or_comment(l) {
            continue;
        }
        // The list ends at a line less indented, or at the key's indent but not an item.
        if indent(l) < key_indent || (indent(l) == key_indent && !t.starts_with('-')) {
            return None;
        }
        let Some(item) = t.strip_prefix('-') else {
            continue;
        };
        let item = item.split(" #").next().unwrap_or_default().trim();
        if item.trim_matches(['"', '\'']).eq_ignore_ascii_case(entry) {
            return Some((n + 1, indent(l) + 1 + t.len() - t[1..].trim_start().len()));
        }
    }
    None
}

/// A key's own check runs once its value is read, and the parser places its error at the
/// section that holds the key. When the message starts with the key (`gateway.limits:
/// max_sockets must be ...`), this is the key's line, if the text has it below the parser's.
fn named_key_line(message: &str, line: usize, text: &str) -> Option<(usize, usize)> {
    let (path, rest) = message.split_once(": ")?;
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
        .collect();
    if word.is_empty() || !rest[word.len()..].starts_with(' ') || path.contains(' ') {
        return None;
    }
    if path.ends_with(']') {
        return key_in_list_item(text, line, &word);
    }
    if path.contains('[') {
        return None;
    }
    let mut keys: Vec<&str> = path.split('.').collect();
    keys.push(&word);
    match key_position(text, &keys)? {
        (depth, found) if depth == keys.len() && found > line => {
            Some((found, indent(text.lines().nth(found - 1)?) + 1))
        }
        _ => None,
    }
}

/// A list's check of one entry against the others runs once the list is read, and the parser
/// places its error at the list. When the message names the entry (`entry 2: ...`, or
/// `entries 1 and 3` for the later of two), this is that item's line: the n-th `- ` at the
/// indent of the first item at or below the parser's `line`.
fn numbered_item_line(message: &str, line: usize, text: &str) -> Option<(usize, usize)> {
    let rest = message.split_once(": ").map_or(message, |(_, rest)| rest);
    let number = |s: &str| -> Option<usize> {
        s.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
    };
    let n = match rest.strip_prefix("entry ") {
        Some(after) => number(after)?,
        None => {
            // The last `entries ` of the message: a type's name may hold the word.
            let (_, pair) = rest.rsplit_once("entries ")?;
            let (_, later) = pair.split_once(" and ")?;
            number(later)?
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    let is_item = |l: &str| {
        let t = l.trim_start();
        t.starts_with("- ") || t == "-"
    };
    // The parser's line is the list's first item, or the key of a block list right above
    // it; a list in flow style (`key: [...]`) has no item lines to point at.
    let at = line.checked_sub(1)?;
    let first = if is_item(lines.get(at)?) {
        at
    } else {
        let (_, value) = lines[at].split_once(':')?;
        if !blank_or_comment(value) {
            return None;
        }
        let next = (at + 1..lines.len()).find(|&i| !blank_or_comment(lines[i]))?;
        is_item(lines[next]).then_some(next)?
    };
    let item_indent = indent(lines[first]);
    let mut count = 1;
    for (i, l) in lines.iter().enumerate().skip(first) {
        if blank_or_comment(l) || i == first {
            continue;
        }
        if indent(l) < item_indent {
            return None; // the list ended
        }
        if indent(l) == item_indent && is_item(l) {
            count += 1;
            if count == n {
                return Some((i + 1, item_indent + 3));
            }
        }
    }
    (n == 1).then_some((first + 1, item_indent + 3))
}

/// The place of `key:` in the list item (of maps) whose first line is `line`, as the parser
/// places an error of the item (`gateway.http_handlers[1]: ...`), if it is below that line.
fn key_in_list_item(text: &str, line: usize, key: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let first = *lines.get(line.checked_sub(1)?)?;
    let t = first.trim_start();
    // The column of the item's keys: after its `- `.
    let column = indent(first) + if t.starts_with("- ") { 2 } else { 0 };
    for (n, l) in lines.iter().enumerate().skip(line) {
        if blank_or_comment(l) {
            continue;
        }
        if indent(l) < column {
            return None; // the next item, or the list's end
        }
        if indent(l) == column && holds_key(l, key) {
            return Some((n + 1, column + 1));
        }
    }
    None
}

/// The parser places a `duplicate field `x`` at the first of the two: this is the place of
/// the second, the one to take out (the first `x:` from the parser's `line`, then the next at
/// the same indent before the section ends).
fn second_of_duplicate_line(message: &str, line: usize, text: &str) -> Option<(usize, usize)> {
    let (_, rest) = message.split_once("duplicate field `")?;
    let field = rest.split('`').next()?;
    // The column of the first key's name (after `- ` in a list item of maps).
    let mut first_column = None;
    for (n, l) in text.lines().enumerate().skip(line.saturating_sub(1)) {
        let t = l.trim_start();
        if blank_or_comment(l) {
            continue;
        }
        let item = t.starts_with("- ");
        match first_column {
            None if holds_key(l, field) => first_column = Some(indent(l) + 2 * usize::from(item)),
            None => {}
            // The section ended, or the next item of a list began.
            Some(c) if indent(l) < c => return None,
            Some(c) if indent(l) == c && !item && holds_key(l, field) => {
                return Some((n + 1, c + 1))
            }
            Some(_) => {}
        }
    }
    None
}

/// The 1-based line of `key:` within the gateway's `auth:` section, or of the `auth:` line
/// itself for `None`. Comments are skipped; the section is the lines indented under it.
fn auth_line(text: &str, key: Option<&str>) -> Option<usize> {
    let (mut in_gateway, mut child_indent, mut auth_indent) = (false, None, None);
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if blank_or_comment(line) {
            continue;
        }
        let ind = indent(line);
        if ind == 0 {
            (in_gateway, child_indent, auth_indent) = (t.starts_with("gateway:"), None, None);
            continue;
        }
        if !in_gateway {
            continue;
        }
        if let Some(a) = auth_indent {
            if ind > a {
                if key.is_some_and(|k| t.strip_prefix(k).is_some_and(|r| r.starts_with(':'))) {
                    return Some(n + 1);
                }
                continue;
            }
            auth_indent = None; // the section ended
        }
        let child = *child_indent.get_or_insert(ind);
        if ind == child && t.strip_prefix("auth").is_some_and(|r| r.starts_with(':')) {
            if key.is_none() {
                return Some(n + 1);
            }
            auth_indent = Some(ind);
        }
    }
    None
}

/// The indexes of the first two of `addresses` that would take the same port, for listeners
/// given outside the file (command-line options), where the file's own check cannot see them.
pub fn clashing_listeners(addresses: &[std::net::SocketAddr]) -> Option<(usize, usize)> {
    (0..addresses.len()).find_map(|i| {
        (i + 1..addresses.len())
            .find(|&j| same_listener(addresses[i], addresses[j]))
            .map(|j| (i, j))
    })
}

/// Whether two listeners would take the same port: the same address, or the same port on a
/// wildcard address that covers the other (`0.0.0.0` every IPv4 address; `[::]` every
/// address, IPv4 included, as Linux binds it by default). Port 0 is any free port: never the
/// same.
fn same_listener(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V6(w) => w.is_unspecified(),
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
    };
    x == y || covers(x, y) || covers(y, x)
}

/// The 1-based line of the key at `path` (`["gateway", "admin", "listen"]`) in block-style
/// YAML, or of the deepest section on the way that is there (a key written in flow style,
/// `admin: {listen: ...}`, is on its section's line). Comments and blank lines are skipped.
fn key_line(text: &str, path: &[&str]) -> Option<usize> {
    key_position(text, path).map(|(_, line)| line)
}

/// [`key_line`], with how deep the key it found is (`path.len()` when the key itself is
/// there).
fn key_position(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    let mut open: Vec<(usize, String)> = Vec::new(); // (indent, key) of the enclosing keys
    let mut best: Option<(usize, usize)> = None; // (depth, line)
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if blank_or_comment(line) || t.starts_with("---") {
            continue;
        }
        let indent = line.len() - t.len();
        while open.last().is_some_and(|(i, _)| *i >= indent) {
            open.pop();
        }
        let Some((key, _)) = t.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        open.push((indent, key.to_string()));
        let depth = open.len();
        let on_path = depth <= path.len() && open.iter().zip(path).all(|((_, k), p)| k == p);
        if on_path && best.is_none_or(|(d, _)| depth > d) {
            best = Some((depth, n + 1));
            if depth == path.len() {
                break;
            }
        }
    }
    best
}

/// The 1-based line of the first mention of `needle` after the line holding `key`.
fn line_under(text: &str, key: &str, needle: &str) -> Option<usize> {
    let start = text.lines().position(|l| l.contains(key))?;
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains(needle))
        .map(|(n, _)| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_hook_feeds_the_built_in_send_or_disconnect() {
        for (topic, says) in [
            ("socket:send", "message any user"),
            ("socket:kick", "close any user's sockets"),
        ] {
            let yaml = format!(
                "gateway:\n  socket:\n    send: {{subscribe: \"socket:send\"}}\n    \
                 disconnect: {{subscribe: \"socket:kick\"}}\n    onmessage:\n      types:\n        \
                 - {{type: x, publish: \"{topic}\"}}\n"
            );
            let e = Config::from_yaml_str(&yaml).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
            assert_eq!(e.line(), Some(7), "{e}");
        }
        // The spec's own example: a type straight to `broadcast`.
        Config::from_yaml_str(
            "gateway:\n  socket:\n    broadcast: {subscribe: \"socket:broadcast\"}\n    \
             onmessage:\n      types:\n        - {type: x, publish: \"socket:broadcast\"}\n",
        )
        .unwrap();
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
