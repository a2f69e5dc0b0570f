//! Identity: find the socket's JWT (cookie or bearer header), verify it, take the username.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use switchboard_config::Auth;
use switchboard_core::http::HeaderMap;

use crate::BuildError;

/// Why a request was refused before the upgrade (all answered with HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Neither the cookie nor an `Authorization: Bearer` header carried a token.
    #[error("no token: send the `{0}` cookie or an `Authorization: Bearer` header")]
    Missing(String),
    /// The token failed verification (signature, expiry, not-before, issuer, audience, shape).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is valid but lacks the username claim (or it is not a non-empty string).
    #[error("token has no string `{0}` claim")]
    MissingClaim(String),
}

/// The key tokens are verified with, given directly (to [`crate::Container::with_key`])
/// instead of read as the config says (`auth.secret_env`, `auth.public_key_file`): for a
/// library user whose secrets come from elsewhere, and for tests.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerificationKey {
    /// For HS256/384/512: the shared secret, at least 16 bytes.
    Secret(Vec<u8>),
    /// For RS*/ES*: a public key in PEM (RSA for RS*, EC for ES*).
    PublicKeyPem(Vec<u8>),
}

impl fmt::Debug for VerificationKey {
    /// Never shows the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerificationKey::Secret(s) => write!(f, "Secret({} bytes)", s.len()),
            VerificationKey::PublicKeyPem(p) => write!(f, "PublicKeyPem({} bytes)", p.len()),
        }
    }
}

/// A verified identity.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) username: String,
    pub(crate) claims: Map<String, Value>,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub(crate) exp: u64,
}

/// Verifies tokens with the configured key and rules.
pub(crate) struct Verifier {
    key: DecodingKey,
    validation: Validation,
    cookie: String,
    username_claim: String,
    namespace_claim: Option<String>,
}

impl Verifier {
    /// A verifier as the config says; the key from `key` when given, else from the
    /// environment variable or the file the config names.
    pub(crate) fn from_config(
        auth: &Auth,
        key: Option<&VerificationKey>,
    ) -> Result<Self, BuildError> {
        use switchboard_config::Algorithm as A;
        let algorithm = match auth.algorithm {
            A::HS256 => Algorithm::HS256,
            A::HS384 => Algorithm::HS384,
            A::HS512 => Algorithm::HS512,
            A::RS256 => Algorithm::RS256,
            A::RS384 => Algorithm::RS384,
            A::RS512 => Algorithm::RS512,
            A::ES256 => Algorithm::ES256,
            A::ES384 => Algorithm::ES384,
            other => {
                return Err(BuildError::Auth(format!(
                    "algorithm {other:?} is not supported"
                )))
            }
        };
        let key = if auth.algorithm.is_hmac() {
            let (secret, from) = match key {
                Some(VerificationKey::Secret(secret)) => {
                    (secret.clone(), "the given secret".into())
                }
                Some(VerificationKey::PublicKeyPem(_)) => {
                    return Err(BuildError::Auth(format!(
                        "{:?} verifies with a secret, not a public key",
                        auth.algorithm
                    )))
                }
                None => {
                    let secret = std::env::var(&auth.secret_env).map_err(|_| {
                        BuildError::Auth(format!(
                            "environment variable {} (auth.secret_env) is not set",
                            auth.secret_env
                        ))
                    })?;
                    (
                        secret.into_bytes(),
                        format!("the secret in {}", auth.secret_env),
                    )
                }
            };
            if secret.len() < 16 {
                return Err(BuildError::Auth(format!("{from} is shorter than 16 bytes")));
            }
            DecodingKey::from_secret(&secret)
        } else {
            let (pem, from) = match key {
                Some(VerificationKey::PublicKeyPem(pem)) => (pem.clone(), "the given key".into()),
                Some(VerificationKey::Secret(_)) => {
                    return Err(BuildError::Auth(format!(
                        "{:?} verifies with a public key, not a secret",
                        auth.algorithm
                    )))
                }
                None => {
                    let path = auth.public_key_file.as_ref().ok_or_else(|| {
                        BuildError::Auth("auth.public_key_file is not set".into())
                    })?;
                    let pem = std::fs::read(path).map_err(|e| {
                        BuildError::Auth(format!("cannot read {}: {e}", path.display()))
                    })?;
                    (pem, path.display().to_string())
                }
            };
            let parsed = if matches!(auth.algorithm, A::ES256 | A::ES384) {
                DecodingKey::from_ec_pem(&pem)
            } else {
                DecodingKey::from_rsa_pem(&pem)
            };
            parsed
                .map_err(|e| BuildError::Auth(format!("{from} is not a usable public key: {e}")))?
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = auth.leeway.as_secs();
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss`/`aud` only when present unless they are required.
        let mut required = vec!["exp"];
        match &auth.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &auth.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            key,
            validation,
            cookie: auth.cookie.clone(),
            username_claim: auth.username_claim.clone(),
            namespace_claim: auth.namespace_claim.clone(),
        })
    }

    /// Whether `identity` may join `namespace`: always, unless `auth.namespace_claim` is set,
    /// in which case that claim (a string or an array of strings) must list it.
    pub(crate) fn namespace_allowed(&self, identity: &Identity, namespace: &str) -> bool {
        let Some(claim) = &self.namespace_claim else {
            return true;
        };
        match identity.claims.get(claim) {
            Some(Value::String(s)) => s == namespace,
            Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(namespace)),
            _ => false,
        }
    }

    /// Verifies the token an upgrade request carries (cookie, else bearer header).
    pub(crate) fn verify(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        let token = token_from_headers(headers, &self.cookie)
            .ok_or_else(|| AuthError::Missing(self.cookie.clone()))?;
        self.verify_token(token)
    }

    /// Verifies one token exactly as at the upgrade (an in-band refresh uses it too).
    pub(crate) fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let username = match data.claims.get(&self.username_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::MissingClaim(self.username_claim.clone())),
        };
        // `exp` is required and checked by the validation, so it is a number here.
        let exp = data
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as u64;
        Ok(Identity {
            username,
            claims: data.claims,
            exp,
        })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm => "unexpected algorithm".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::MissingRequiredClaim(c) => format!("missing `{c}` claim"),
        _ => "malformed".into(),
    }
}

/// The token from the `cookie_name` cookie, else from `Authorization: Bearer`.
pub(crate) fn token_from_headers<'h>(headers: &'h HeaderMap, cookie_name: &str) -> Option<&'h str> {
    let from_cookie = headers
        .get_all(switchboard_core::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie_name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|v| !v.is_empty());
    from_cookie.or_else(|| {
        let value = headers
            .get(switchboard_core::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        // The scheme is case-insensitive (RFC 9110 11.1): `Bearer`, `bearer`, `BEARER`.
        let (scheme, token) = value.trim_start().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::http::HeaderValue;

    #[test]
    fn token_is_found_in_cookie_or_bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), Some("abc"));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let value = HeaderValue::from_str(&format!("{scheme}  abc ")).unwrap();
            h.insert("authorization", value);
            assert_eq!(token_from_headers(&h, "ID_TOKEN"), Some("abc"), "{scheme}");
        }
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        h.insert("cookie", HeaderValue::from_static("a=1; ID_TOKEN=xyz; b=2"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), Some("xyz"));
        assert_eq!(token_from_headers(&h, "OTHER"), Some("abc"));
        h.insert("cookie", HeaderValue::from_static("MY_ID_TOKEN=no"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), Some("abc"));
    }
}
