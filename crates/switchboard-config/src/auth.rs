//! The `gateway.auth` section: how a socket's JWT is found and verified.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::de::de_duration;

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
