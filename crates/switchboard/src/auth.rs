//! Identity: find the socket's JWT (cookie or bearer header), verify it, take the username.
//! The key is one secret or public key from the config, or the one the token's `kid` names
//! in the identity provider's key set (`jwks.rs`).

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use switchboard_config::Auth;
use switchboard_core::http::{HeaderMap, HeaderValue};

use crate::jwks::{self, Jwks};
use crate::BuildError;

/// Why a request was refused before the upgrade (HTTP 401, but 503 for
/// [`AuthError::NoKeys`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Neither the cookie nor an `Authorization: Bearer` header carried a token.
    #[error("no token: send the `{0}` cookie or an `Authorization: Bearer` header")]
    Missing(String),
    /// No cookie, and more than one `Authorization` header: which one is meant is not for the
    /// gateway to guess (a proxy in front may check one and forward both).
    #[error("more than one Authorization header: send one")]
    TwoAuthorizations,
    /// The token cookie twice, with different values (a cookie set for another path or by a
    /// sibling domain beside the real one): which identity is meant is not for the gateway to
    /// guess.
    #[error("more than one `{0}` cookie: send one")]
    TwoCookies(String),
    /// The token failed verification (signature, expiry, not-before, issuer, audience, shape).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is valid but lacks the username claim (or it is not a non-empty string).
    #[error("token has no string `{0}` claim")]
    MissingClaim(String),
    /// With `auth.jwks_url`: no key set has been fetched yet (or none within
    /// `auth.jwks.max_stale`), so no token can be verified (answered with 503, not 401: the
    /// token may well be good).
    #[error(
        "no signing keys yet: the identity provider's key set has not been fetched (or not \
         within auth.jwks.max_stale)"
    )]
    NoKeys,
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

/// Where the verification key comes from. (One verifier per gateway: the variants' sizes
/// do not matter.)
#[allow(clippy::large_enum_variant)]
enum Keys {
    /// One key, and the one algorithm the config names.
    One {
        key: DecodingKey,
        validation: Validation,
    },
    /// The key the token's `kid` names in the provider's set; a validation per algorithm a
    /// key may have (the key's, never the token's, picks it).
    Set {
        jwks: Arc<Jwks>,
        validations: Vec<(Algorithm, Validation)>,
    },
}

/// Verifies tokens with the configured key and rules.
pub(crate) struct Verifier {
    keys: Keys,
    cookie: String,
    username_claim: String,
    namespace_claim: Option<String>,
    /// `auth.leeway` in seconds.
    leeway: u64,
}

impl Verifier {
    /// A verifier as the config says; the key from `key` when given, else from the
    /// environment variable or the file the config names.
    pub(crate) fn from_config(
        auth: &Auth,
        key: Option<&VerificationKey>,
    ) -> Result<Self, BuildError> {
        let mut validation = Validation::new(Algorithm::HS256);
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
        let for_algorithm = |algorithm: Algorithm| {
            let mut v = validation.clone();
            v.algorithms = vec![algorithm];
            v
        };
        let keys = match &auth.jwks {
            Some(config) => {
                if key.is_some() {
                    return Err(BuildError::Auth(
                        "a key was given, but the config takes keys from auth.jwks_url".into(),
                    ));
                }
                let jwks = Arc::new(Jwks::new(config)?);
                let validations = jwks
                    .allowed()
                    .iter()
                    .map(|a| (*a, for_algorithm(*a)))
                    .collect();
                Keys::Set { jwks, validations }
            }
            None => {
                let algorithm = jwks::algorithm(auth.algorithm).ok_or_else(|| {
                    BuildError::Auth(format!("algorithm {:?} is not supported", auth.algorithm))
                })?;
                let key = Self::one_key(auth, key)?;
                Keys::One {
                    key,
                    validation: for_algorithm(algorithm),
                }
            }
        };
        Ok(Verifier {
            keys,
            cookie: auth.cookie.clone(),
            username_claim: auth.username_claim.clone(),
            namespace_claim: auth.namespace_claim.clone(),
            leeway: auth.leeway.as_secs(),
        })
    }

    /// The one key of `auth.secret_env` / `auth.public_key_file`, or `key` when given.
    fn one_key(auth: &Auth, key: Option<&VerificationKey>) -> Result<DecodingKey, BuildError> {
        use switchboard_config::Algorithm as A;
        Ok(if auth.algorithm.is_hmac() {
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
                    let pem = switchboard_tls::read_pem_file(path).map_err(|e| {
                        BuildError::Auth(format!("cannot read {}: {e}", path.display()))
                    })?;
                    (pem, path.display().to_string())
                }
            };
            check_public_pem(&pem, &from, auth.algorithm)?;
            let parsed = match auth.algorithm {
                A::ES256 | A::ES384 => DecodingKey::from_ec_pem(&pem),
                A::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            };
            parsed.map_err(|e| {
                BuildError::Auth(format!(
                    "{from} is not a usable {:?} public key ({e}): auth.public_key_file takes \
                     the PEM public key that matches auth.algorithm",
                    auth.algorithm
                ))
            })?
        })
    }

    /// The provider's key set, when keys come from one.
    pub(crate) fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Set { jwks, .. } => Some(jwks),
            Keys::One { .. } => None,
        }
    }

    /// With a key set: when the request's token names a key the set lacks, the wait for the
    /// refetch it may trigger ([`Jwks::refetch_for`]); `None` otherwise.
    pub(crate) fn prepare(
        &self,
        headers: &HeaderMap,
    ) -> Option<switchboard_core::BoxFuture<'static, ()>> {
        // Without a key set, nothing to do (and no token to look at).
        self.jwks()?;
        let token = token_from_headers(headers, &self.cookie).ok()?;
        self.prepare_token(token)
    }

    /// [`Verifier::prepare`] for a token on its own (an in-band refresh, which does not wait:
    /// the fetch it may start serves the client's next try).
    pub(crate) fn prepare_token(
        &self,
        token: &str,
    ) -> Option<switchboard_core::BoxFuture<'static, ()>> {
        let Keys::Set { jwks, .. } = &self.keys else {
            return None;
        };
        let header = jsonwebtoken::decode_header(token).ok()?;
        jwks.refetch_for(header.kid.as_deref())
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
        let token = token_from_headers(headers, &self.cookie)?;
        self.verify_token(token)
    }

    /// Verifies one token exactly as at the upgrade (an in-band refresh uses it too).
    pub(crate) fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let data = match &self.keys {
            Keys::One { key, validation } => {
                jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            }
            Keys::Set { jwks, validations } => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|e| AuthError::Invalid(describe(&e)))?;
                let keys = jwks.current();
                if keys.len() == 0 {
                    return Err(AuthError::NoKeys);
                }
                let key = keys
                    .find(header.kid.as_deref())
                    .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?;
                // The key's algorithm, which the token's `alg` must equal.
                let (_, validation) = validations
                    .iter()
                    .find(|(a, _)| *a == key.algorithm)
                    .ok_or_else(|| AuthError::Invalid("unexpected algorithm".into()))?;
                jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation)
            }
        }
        .map_err(|e| AuthError::Invalid(describe_for(token, &e)))?;
        // RFC 7515 4.1.11: extensions listed in `crit` must be understood, and none are.
        if data.header.crit.is_some() {
            return Err(AuthError::Invalid(
                "the header's `crit` names extensions this gateway does not understand".into(),
            ));
        }
        let username = match data.claims.get(&self.username_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::MissingClaim(self.username_claim.clone())),
        };
        // `exp` is required and checked by the validation, so it is a number here.
        // A whole number is taken exactly (through f64, 2^63 - 1 came back as 2^63); a
        // fractional one is cut to its second.
        let exp = match data.claims.get("exp") {
            Some(n) => n
                .as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .unwrap_or(0),
            None => 0,
        };
        // RFC 7519 4.1.4: a token is expired *at* its `exp` (jsonwebtoken lets that second
        // itself pass), plus the leeway, as the expiry close counts it.
        if exp.saturating_add(self.leeway) <= crate::expiry::now_secs() {
            return Err(AuthError::Invalid(describe(
                &jsonwebtoken::errors::ErrorKind::ExpiredSignature.into(),
            )));
        }
        Ok(Identity {
            username,
            claims: data.claims,
            exp,
        })
    }
}

/// [`describe`], but a required claim that is there with the wrong type (jsonwebtoken reports
/// it missing) is named as such. Only on this error path, after the signature was verified, is
/// the payload read again.
fn describe_for(token: &str, e: &jsonwebtoken::errors::Error) -> String {
    use base64::Engine as _;
    if let jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) = e.kind() {
        let present = token
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|p| serde_json::from_slice::<Map<String, Value>>(&p).ok())
            .is_some_and(|claims| claims.contains_key(claim.as_str()));
        if present {
            let wanted = match claim.as_str() {
                "aud" | "iss" => "a string or an array of strings",
                _ => "a number of seconds",
            };
            return format!("`{claim}` claim is not {wanted}");
        }
    }
    describe(e)
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
        // jsonwebtoken reports it for `exp` and `nbf`, which are numbers of seconds.
        K::InvalidClaimFormat(c) => format!("`{c}` claim is not a number of seconds"),
        _ => "malformed".into(),
    }
}

/// The token from the `cookie_name` cookie, else from the one `Authorization: Bearer` header.
pub(crate) fn token_from_headers<'h>(
    headers: &'h HeaderMap,
    cookie_name: &str,
) -> Result<&'h str, AuthError> {
    let mut from_cookies = headers
        .get_all(switchboard_core::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == cookie_name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|v| !v.is_empty());
    if let Some(token) = from_cookies.next() {
        if from_cookies.any(|other| other != token) {
            return Err(AuthError::TwoCookies(cookie_name.to_string()));
        }
        return Ok(token);
    }
    let value = single_authorization(headers)?
        .ok_or_else(|| AuthError::Missing(cookie_name.to_string()))?;
    bearer_token(value.to_str().ok()).ok_or_else(|| AuthError::Missing(cookie_name.to_string()))
}

/// The `Authorization` header, when there is exactly one; two or more are refused.
pub(crate) fn single_authorization(headers: &HeaderMap) -> Result<Option<&HeaderValue>, AuthError> {
    let mut values = headers
        .get_all(switchboard_core::http::header::AUTHORIZATION)
        .iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        _ => Err(AuthError::TwoAuthorizations),
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 11.1): `Bearer`, `bearer`, `BEARER`.
pub(crate) fn bearer_token(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|v| !v.is_empty())
}

/// A key file must be a PEM public key. A private key parses too (the PEM decoder takes
/// either) and every token would then fail as a bad signature, far from the cause: refuse it
/// at start-up, naming the file, and refuse text that is not PEM at all. Likewise an EC key
/// of the other curve (a P-384 key for ES256), which the decoder does not check.
fn check_public_pem(
    pem: &[u8],
    from: &str,
    algorithm: switchboard_config::Algorithm,
) -> Result<(), BuildError> {
    use switchboard_config::Algorithm as A;
    let text = String::from_utf8_lossy(pem);
    let mut labels = text.lines().filter_map(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")?
            .strip_suffix("-----")
    });
    // Any block, not only the first that the decoder reads: a public key with its private key
    // after it in one file would still put the private key on the gateway.
    let private = labels.clone().find(|label| label.contains("PRIVATE"));
    let label = match private.or_else(|| labels.next()) {
        None => {
            return Err(BuildError::Auth(format!(
                "{from} is not a PEM file (no `-----BEGIN ...-----` line): auth.public_key_file \
                 takes a PEM public key"
            )))
        }
        Some(label) if label.contains("PRIVATE") => {
            return Err(BuildError::Auth(format!(
                "{from} holds a private key (`{label}`): auth.public_key_file takes the public \
                 key only (`openssl pkey -in KEY -pubout` writes it); keep the private key off \
                 the gateway"
            )))
        }
        Some(label) => label,
    };
    let (wanted, curve) = match algorithm {
        A::ES256 => (P256_OID, "P-256"),
        A::ES384 => (P384_OID, "P-384"),
        _ => return Ok(()),
    };
    // The key's DER names its curve by OID; one that does not name the algorithm's is
    // another curve's (the decoder will have refused what is not an EC key at all).
    let der = pem_body(&text, label);
    if der.is_some_and(|der| !der.windows(wanted.len()).any(|w| w == wanted)) {
        return Err(BuildError::Auth(format!(
            "{from} is not a {curve} key, which {algorithm:?} verifies with (ES256 takes P-256, \
             ES384 P-384)"
        )));
    }
    Ok(())
}

/// The curve OIDs (DER, tag and length included) of P-256 and P-384.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// The DER between the `BEGIN label` and `END label` lines, or `None` if it does not decode.
fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|line| *line != begin)
        .skip(1)
        .take_while(|line| *line != end)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_found_in_cookie_or_bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), Some("abc"));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let value = HeaderValue::from_str(&format!("{scheme}  abc ")).unwrap();
            h.insert("authorization", value);
            assert_eq!(
                token_from_headers(&h, "ID_TOKEN").ok(),
                Some("abc"),
                "{scheme}"
            );
        }
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        h.insert("cookie", HeaderValue::from_static("a=1; ID_TOKEN=xyz; b=2"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), Some("xyz"));
        assert_eq!(token_from_headers(&h, "OTHER").ok(), Some("abc"));
        h.insert("cookie", HeaderValue::from_static("MY_ID_TOKEN=no"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), Some("abc"));
        // Two bearer headers: neither is taken, and the refusal says why.
        h.append("authorization", HeaderValue::from_static("Bearer other"));
        assert_eq!(
            token_from_headers(&h, "ID_TOKEN"),
            Err(AuthError::TwoAuthorizations)
        );
        // The cookie, when there is one, still wins.
        assert_eq!(token_from_headers(&h, "MY_ID_TOKEN").ok(), Some("no"));
        // The token cookie twice: the same value passes, two values are refused, in one
        // header or in two.
        h.insert(
            "cookie",
            HeaderValue::from_static("ID_TOKEN=a; x=1; ID_TOKEN=a"),
        );
        assert_eq!(token_from_headers(&h, "ID_TOKEN").ok(), Some("a"));
        h.insert(
            "cookie",
            HeaderValue::from_static("ID_TOKEN=a; x=1; ID_TOKEN=b"),
        );
        let two = Err(AuthError::TwoCookies("ID_TOKEN".into()));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), two);
        h.insert("cookie", HeaderValue::from_static("ID_TOKEN=a"));
        h.append("cookie", HeaderValue::from_static("ID_TOKEN=b"));
        assert_eq!(token_from_headers(&h, "ID_TOKEN"), two);
    }
}
