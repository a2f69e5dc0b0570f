//! The `gateway.auth` section: how a socket's JWT is found and verified, with one key from
//! the environment or a file, or with the identity provider's key set (`jwks_url`).

use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::de::{de_duration, de_opt_duration};

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
    /// Ed25519 (EdDSA); the key comes from `auth.public_key_file` or the key set.
    EdDSA,
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
    /// Present when keys come from the identity provider's key set (`auth.jwks_url`) instead
    /// of `secret_env` / `public_key_file`; `algorithm` then does not apply.
    pub jwks: Option<Jwks>,
}

/// Where the identity provider's keys are and how they are cached (`auth.jwks_url` and the
/// `auth.jwks` section).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Jwks {
    /// The key set's URL (`http://` or `https://`); nothing in a token can change it.
    pub url: String,
    /// The key set is kept at least this long, whatever its `Cache-Control` says. Default 1 min.
    pub min_refresh: Duration,
    /// ... and at most this long (also the lifetime when the answer has no `max-age`).
    /// Default 1 h.
    pub max_refresh: Duration,
    /// A token naming an unknown `kid` refetches the set at most once per this interval.
    /// Default 30 s.
    pub refetch_interval: Duration,
    /// The whole fetch (connect, TLS, answer, body) must finish within it. Default 5 s.
    pub timeout: Duration,
    /// How long starting waits for the first fetch before serving anyway. Default 5 s.
    pub startup_wait: Duration,
    /// A CA (PEM) trusted beside the system's roots, for a provider with a private CA.
    pub ca_file: Option<PathBuf>,
    /// The algorithms a key of the set may be used with. Default `[RS256, ES256, EdDSA]`.
    pub algorithms: Vec<Algorithm>,
    /// If set, the cached set is trusted only this long after the last successful fetch
    /// (fail closed); absent, it is kept while the provider cannot be reached (fail open).
    pub max_stale: Option<Duration>,
}

/// `auth.jwks_url`: an absolute `http://` or `https://` URL with a host.
struct JwksUrl(String);

impl<'de> Deserialize<'de> for JwksUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let url = String::deserialize(d)?;
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or_default());
        let ok = host.is_some_and(|h| !h.is_empty() && !h.contains('@'))
            && !url.contains(|c: char| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(de::Error::custom(format_args!(
                "jwks_url `{}` must be an http:// or https:// URL with a host (and no \
                 user:password@)",
                crate::de::redacted_url(&url)
            )));
        }
        // Whoever serves the key set decides who may connect: over plain HTTP, anyone on the
        // path to the provider could. Plain HTTP only to this machine.
        if url.starts_with("http://") && !host.is_some_and(is_loopback_host) {
            return Err(de::Error::custom(format_args!(
                "jwks_url `{url}` must be https:// (plain http:// only to a loopback host: \
                 anyone on the path to the provider could serve keys of their own)"
            )));
        }
        Ok(JwksUrl(url))
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwks {
    #[serde(default = "default_min_refresh", deserialize_with = "de_duration")]
    min_refresh: Duration,
    #[serde(default = "default_max_refresh", deserialize_with = "de_duration")]
    max_refresh: Duration,
    #[serde(default = "default_refetch_interval", deserialize_with = "de_duration")]
    refetch_interval: Duration,
    #[serde(default = "default_jwks_timeout", deserialize_with = "de_duration")]
    timeout: Duration,
    #[serde(default = "default_jwks_timeout", deserialize_with = "de_duration")]
    startup_wait: Duration,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "default_jwks_algorithms")]
    algorithms: Vec<Algorithm>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    max_stale: Option<Duration>,
}

impl Default for RawJwks {
    fn default() -> Self {
        RawJwks {
            min_refresh: default_min_refresh(),
            max_refresh: default_max_refresh(),
            refetch_interval: default_refetch_interval(),
            timeout: default_jwks_timeout(),
            startup_wait: default_jwks_timeout(),
            ca_file: None,
            algorithms: default_jwks_algorithms(),
            max_stale: None,
        }
    }
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(60)
}
fn default_max_refresh() -> Duration {
    Duration::from_secs(3600)
}
fn default_refetch_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_jwks_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
}

impl Jwks {
    fn new(url: String, raw: RawJwks) -> Result<Self, String> {
        if raw.min_refresh < Duration::from_secs(1) {
            return Err("auth.jwks.min_refresh must be at least 1s".into());
        }
        if raw.max_refresh < raw.min_refresh {
            return Err("auth.jwks.max_refresh must be at least auth.jwks.min_refresh".into());
        }
        if raw.refetch_interval < Duration::from_secs(1) {
            return Err("auth.jwks.refetch_interval must be at least 1s".into());
        }
        if raw.timeout.is_zero() {
            return Err("auth.jwks.timeout must be more than 0s".into());
        }
        // A provider that answers is asked every `max_refresh` at most, and a fetch may take
        // `timeout`: room for that and one failed fetch, so that a well provider (or one
        // blip) never makes the keys stale.
        let least_stale = raw.max_refresh * 2 + raw.timeout;
        if let Some(stale) = raw.max_stale.filter(|stale| *stale < least_stale) {
            return Err(format!(
                "auth.jwks.max_stale ({}) must be at least twice auth.jwks.max_refresh plus \
                 auth.jwks.timeout ({} here), so that a provider that answers never makes the \
                 keys stale",
                humantime::format_duration(stale),
                humantime::format_duration(least_stale)
            ));
        }
        if raw.algorithms.is_empty() {
            return Err("auth.jwks.algorithms must list at least one algorithm".into());
        }
        if let Some(hmac) = raw.algorithms.iter().find(|a| a.is_hmac()) {
            return Err(format!(
                "auth.jwks.algorithms: {hmac:?} is a shared-secret algorithm; a key set only \
                 gives public keys (RS*, ES*, EdDSA)"
            ));
        }
        Ok(Jwks {
            url,
            min_refresh: raw.min_refresh,
            max_refresh: raw.max_refresh,
            refetch_interval: raw.refetch_interval,
            timeout: raw.timeout,
            startup_wait: raw.startup_wait,
            ca_file: raw.ca_file,
            algorithms: raw.algorithms,
            max_stale: raw.max_stale,
        })
    }
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
    #[serde(default)]
    algorithm: Option<Algorithm>,
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
    #[serde(default)]
    jwks_url: Option<JwksUrl>,
    #[serde(default)]
    jwks: Option<RawJwks>,
}

fn default_true() -> bool {
    true
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            cookie: default_cookie(),
            username_claim: default_username_claim(),
            algorithm: None,
            secret_env: None,
            public_key_file: None,
            leeway: Duration::ZERO,
            issuer: None,
            audience: None,
            namespace_claim: None,
            close_on_expiry: true,
            jwks_url: None,
            jwks: None,
        }
    }
}

fn default_cookie() -> String {
    "ID_TOKEN".into()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}

impl TryFrom<RawAuth> for Auth {
    type Error = String;
    fn try_from(raw: RawAuth) -> Result<Self, String> {
        if raw.cookie.is_empty() {
            return Err("auth.cookie must not be empty".into());
        }
        // A cookie name is an HTTP token (RFC 6265 4.1.1): `a=b; c` would never be found.
        let separator = |c: char| "()<>@,;:\\\"/[]?={}".contains(c);
        if !raw
            .cookie
            .chars()
            .all(|c| c.is_ascii_graphic() && !separator(c))
        {
            return Err(format!(
                "auth.cookie `{}` is not a cookie name (visible ASCII without spaces, `=`, `;` \
                 or other separators)",
                raw.cookie.escape_debug()
            ));
        }
        if raw.username_claim.trim().is_empty() {
            return Err("auth.username_claim must name a claim (not empty or blank)".into());
        }
        for (value, key) in [
            (&raw.issuer, "auth.issuer"),
            (&raw.audience, "auth.audience"),
            (&raw.namespace_claim, "auth.namespace_claim"),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!(
                    "{key} must not be empty or blank (leave the key out not to check it)"
                ));
            }
        }
        if let Some(name) = &raw.secret_env {
            crate::de::env_name(name).map_err(|why| format!("auth.secret_env {why}"))?;
        }
        let jwks = match (raw.jwks_url, raw.jwks) {
            (Some(url), jwks) => {
                // One source of keys: a key set rules out a secret or a key file, and its
                // keys say their own algorithm (`auth.jwks.algorithms` bounds them).
                for (set, key) in [
                    (raw.secret_env.is_some(), "auth.secret_env"),
                    (raw.public_key_file.is_some(), "auth.public_key_file"),
                    (raw.algorithm.is_some(), "auth.algorithm"),
                ] {
                    if set {
                        return Err(format!(
                            "auth.jwks_url conflicts with {key}: keys come from the key set \
                             (list accepted algorithms in auth.jwks.algorithms)"
                        ));
                    }
                }
                Some(Jwks::new(url.0, jwks.unwrap_or_default())?)
            }
            (None, Some(_)) => return Err("auth.jwks is set without auth.jwks_url".into()),
            (None, None) => None,
        };
        let algorithm = raw.algorithm.unwrap_or(Algorithm::HS256);
        if jwks.is_none() {
            if algorithm.is_hmac() {
                if raw.public_key_file.is_some() {
                    return Err(format!(
                        "auth.public_key_file is for RS*/ES*/EdDSA algorithms; {algorithm:?} uses \
                         auth.secret_env"
                    ));
                }
            } else {
                if raw.public_key_file.is_none() {
                    return Err(format!(
                        "auth.public_key_file is required for algorithm {algorithm:?} (or \
                         auth.jwks_url, without algorithm)"
                    ));
                }
                if raw.secret_env.is_some() {
                    return Err(format!(
                        "auth.secret_env is for HS* algorithms; {algorithm:?} uses \
                         auth.public_key_file"
                    ));
                }
            }
        }
        Ok(Auth {
            cookie: raw.cookie,
            username_claim: raw.username_claim,
            algorithm,
            secret_env: raw
                .secret_env
                .unwrap_or_else(|| "SWITCHBOARD_JWT_SECRET".into()),
            public_key_file: raw.public_key_file,
            leeway: raw.leeway,
            issuer: raw.issuer,
            audience: raw.audience,
            namespace_claim: raw.namespace_claim,
            close_on_expiry: raw.close_on_expiry,
            jwks,
        })
    }
}
