//! The identity provider's signing keys (`auth.jwks_url`): fetched with the gateway's HTTP
//! client, kept for the answer's `Cache-Control: max-age` within `min_refresh..max_refresh`,
//! fetched again at once when a token names a `kid` the set lacks (a rotation), at most once
//! per `refetch_interval`, and kept while the provider is unreachable (for `max_stale` at
//! most, if set: past it no token verifies until a fetch succeeds).
//!
//! Read as an attacker: a token chooses only which cached key is looked up (its `kid`), never
//! what is fetched (`jku`/`x5u` are ignored) nor which algorithm a key verifies with (the
//! key's own). A flood of forged `kid`s costs one fetch per `refetch_interval`; tokens that
//! arrive while that fetch runs wait for it (within the handshake deadline) and hold nothing
//! but their connection. What is fetched is bounded: 1 MiB of body, 100 usable keys, RSA
//! moduli of 4096 bits, `timeout` for the whole exchange.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use switchboard_core::http::{self, header, HeaderMap, StatusCode};
use switchboard_core::BoxFuture;
use switchboard_http_client::{ClientOptions, HttpClient};
use tokio::sync::{watch, Notify};

use crate::gateway::lock;
use crate::BuildError;

/// The most bytes of a key set's answer that are read; a larger one is a failed fetch.
pub(crate) const MAX_BODY: usize = 1 << 20;
/// The most usable keys kept from one answer; the rest are left out (and logged).
pub(crate) const MAX_KEYS: usize = 100;
/// An RSA modulus of 4096 bits (and a sign byte) in base64url: a larger key is left out, so
/// a key set cannot make each verification arbitrarily slow.
const MAX_RSA_MODULUS_CHARS: usize = 684;
/// An RSA modulus of 2048 bits in base64url: a smaller key (1024 bits can be factored) is
/// left out, so tokens cannot be forged with one a provider still lists.
const MIN_RSA_MODULUS_CHARS: usize = 342;
/// The first retry after a failed fetch; each failure in a row doubles it, up to
/// `min_refresh` (and [`UNUSABLE_RETRY`] while no key is usable).
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between retries while no key is usable.
const UNUSABLE_RETRY: Duration = Duration::from_secs(5);

/// One usable key and the one algorithm it verifies with.
pub(crate) struct Key {
    pub(crate) decoding: DecodingKey,
    pub(crate) algorithm: Algorithm,
}

/// The keys of one successful fetch.
#[derive(Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// The key, when the set has exactly one: a token without `kid` may use it.
    single: Option<Arc<Key>>,
    len: usize,
    /// When the fetch that brought it succeeded (kept with the keys, so that a reader never
    /// sees new keys with an old time or the other way round).
    fetched_at: Option<Instant>,
}

impl KeySet {
    /// The key a token's `kid` names; without `kid`, the set's only key if it has one.
    pub(crate) fn find(&self, kid: Option<&str>) -> Option<&Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.single.as_ref(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct JwksStats {
    pub(crate) refreshes: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Fetches started because a token named an unknown `kid`.
    pub(crate) refetches: AtomicU64,
    /// Tokens with an unknown `kid` refused without a fetch (within `refetch_interval`).
    pub(crate) refetches_limited: AtomicU64,
    /// Seconds since the Unix epoch of the last successful fetch; 0 before the first.
    pub(crate) last_success: AtomicU64,
}

/// Who waits for which fetch. Under one lock with the attempt count, so that a token's wait
/// and the fetch it waits for cannot miss each other.
#[derive(Default)]
struct Misses {
    /// A fetch is running now.
    in_flight: bool,
    /// The attempt number that serves the tokens waiting now (a refetch they asked for).
    wanted: Option<u64>,
    /// When the last refetch for an unknown `kid` was asked for.
    last_refetch: Option<Instant>,
}

/// The key set of one provider, and the state of its refresher.
pub(crate) struct Jwks {
    config: switchboard_config::Jwks,
    uri: http::Uri,
    client: HttpClient,
    allowed: Vec<Algorithm>,
    keys: RwLock<Arc<KeySet>>,
    misses: Mutex<Misses>,
    /// Fetches finished (with success or not).
    attempts: watch::Sender<u64>,
    /// Asks the refresher for a fetch now.
    wake: Arc<Notify>,
    pub(crate) stats: JwksStats,
}

/// Maps the config's algorithm onto jsonwebtoken's.
pub(crate) fn algorithm(a: switchboard_config::Algorithm) -> Option<Algorithm> {
    use switchboard_config::Algorithm as A;
    Some(match a {
        A::HS256 => Algorithm::HS256,
        A::HS384 => Algorithm::HS384,
        A::HS512 => Algorithm::HS512,
        A::RS256 => Algorithm::RS256,
        A::RS384 => Algorithm::RS384,
        A::RS512 => Algorithm::RS512,
        A::ES256 => Algorithm::ES256,
        A::ES384 => Algorithm::ES384,
        A::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl Jwks {
    /// The key set the config names; nothing is fetched until [`Jwks::spawn`].
    pub(crate) fn new(config: &switchboard_config::Jwks) -> Result<Self, BuildError> {
        let uri: http::Uri = config
            .url
            .parse()
            .map_err(|e| BuildError::Auth(format!("auth.jwks_url `{}`: {e}", config.url)))?;
        let mut options = ClientOptions::default();
        options.ca_file = config.ca_file.clone();
        options.connect_timeout = config.timeout;
        let client = HttpClient::new(&options)
            .map_err(|e| BuildError::Auth(format!("auth.jwks.ca_file: {e}")))?;
        Ok(Jwks {
            config: config.clone(),
            uri,
            client,
            allowed: config
                .algorithms
                .iter()
                .filter_map(|a| algorithm(*a))
                .collect(),
            keys: RwLock::new(Arc::default()),
            misses: Mutex::default(),
            attempts: watch::Sender::new(0),
            wake: Arc::new(Notify::new()),
            stats: JwksStats::default(),
        })
    }

    /// The algorithms a key may verify with.
    pub(crate) fn allowed(&self) -> &[Algorithm] {
        &self.allowed
    }

    /// The keys tokens may be verified with now: the last set fetched, or none when it is
    /// older than `max_stale`.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        let cached = self.cached();
        if self.too_old(&cached) {
            static NONE: std::sync::OnceLock<Arc<KeySet>> = std::sync::OnceLock::new();
            return NONE.get_or_init(Arc::default).clone();
        }
        cached
    }

    /// The last set fetched, however old.
    fn cached(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when `max_stale` is set and the last successful fetch is older than it.
    pub(crate) fn is_stale(&self) -> bool {
        self.config.max_stale.is_some() && self.too_old(&self.cached())
    }

    fn too_old(&self, set: &KeySet) -> bool {
        self.config
            .max_stale
            .is_some_and(|max| set.fetched_at.is_some_and(|at| at.elapsed() > max))
    }

    /// True while tokens can be verified: a fetch has succeeded (the set is never emptied
    /// after), within `max_stale` if set.
    pub(crate) fn has_keys(&self) -> bool {
        self.current().len() > 0
    }

    /// Starts the refresher: a fetch now, then one whenever the cached set is due or a token
    /// asks. It ends when the key set is dropped (or the task is aborted).
    pub(crate) fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(refresh(weak, wake))
    }

    /// Waits until the first fetch has finished (well or not), at most `within`.
    pub(crate) async fn first_attempt(&self, within: Duration) {
        let mut rx = self.attempts.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|n| *n >= 1)).await;
    }

    /// For a token naming `kid`: `None` when there is nothing to wait for (the key is known,
    /// or a refetch is not allowed now); else a future that ends when a fetch started after
    /// this call has finished (one fetch shared by every token asking meanwhile), or after
    /// twice the fetch timeout.
    pub(crate) fn refetch_for(&self, kid: Option<&str>) -> Option<BoxFuture<'static, ()>> {
        let keys = self.current();
        // A token without `kid` is helped by no fetch, unless there are no keys at all.
        let wanted = match kid {
            Some(kid) => !keys.by_kid.contains_key(kid),
            None => keys.len() == 0,
        };
        if !wanted {
            return None;
        }
        let mut misses = lock(&self.misses);
        let target = match misses.wanted {
            Some(target) => target,
            None => {
                let limited = misses
                    .last_refetch
                    .is_some_and(|at| at.elapsed() < self.config.refetch_interval);
                if limited {
                    self.stats.refetches_limited.fetch_add(1, Relaxed);
                    return None;
                }
                // A fetch running now may have started before the key was published: the
                // token waits for the next one.
                let done = *self.attempts.borrow();
                let target = done + if misses.in_flight { 2 } else { 1 };
                misses.wanted = Some(target);
                misses.last_refetch = Some(Instant::now());
                self.stats.refetches.fetch_add(1, Relaxed);
                self.wake.notify_one();
                target
            }
        };
        let mut rx = self.attempts.subscribe();
        drop(misses);
        let limit = self.config.timeout * 2;
        Some(Box::pin(async move {
            let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n >= target)).await;
        }))
    }

    fn begin_attempt(&self) {
        let mut misses = lock(&self.misses);
        misses.in_flight = true;
        // This fetch starts after every waiting token asked: it serves them.
        misses.wanted = None;
    }

    fn end_attempt(&self) {
        let mut misses = lock(&self.misses);
        self.attempts.send_modify(|n| *n += 1);
        misses.in_flight = false;
    }

    /// One fetch: the new set and how long the answer says to keep it.
    async fn fetch(&self) -> Result<(KeySet, usize, Option<Duration>), String> {
        let request = http::Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Bytes::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .send(request, self.config.timeout, MAX_BODY)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let max_age = max_age(response.headers());
        let (set, left_out) = parse(response.body(), &self.allowed)?;
        Ok((set, left_out, max_age))
    }

    /// Fetches once, installs the set on success, and says when to fetch next.
    async fn refresh_once(&self, failures: &mut u32) -> Duration {
        let (min, max) = (self.config.min_refresh, self.config.max_refresh);
        match self.fetch().await {
            Ok((mut set, left_out, max_age)) => {
                let was_failing = *failures > 0;
                *failures = 0;
                let count = set.len();
                set.fetched_at = Some(Instant::now());
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                self.stats.refreshes.fetch_add(1, Relaxed);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                self.stats.last_success.store(now.as_secs(), Relaxed);
                let next = max_age.unwrap_or(max).clamp(min, max);
                if was_failing || left_out > 0 {
                    tracing::info!(url = %redacted(&self.uri), keys = count, left_out, next_in = ?next, "JWKS fetched");
                } else {
                    tracing::debug!(url = %redacted(&self.uri), keys = count, next_in = ?next, "JWKS fetched");
                }
                next
            }
            Err(error) => {
                *failures = failures.saturating_add(1);
                self.stats.failures.fetch_add(1, Relaxed);
                // Without usable keys (none yet, or stale) no token verifies: try again soon
                // however long `min_refresh` is, so the gateway is back as soon as the
                // provider is.
                let cap = if self.has_keys() {
                    min
                } else {
                    min.min(UNUSABLE_RETRY)
                };
                let retry = FIRST_RETRY
                    .saturating_mul(1 << (*failures - 1).min(16))
                    .min(cap);
                // One line per failed fetch: fetches are bounded by the backoff and the
                // refetch interval, not by tokens.
                if self.is_stale() {
                    tracing::warn!(
                        url = %redacted(&self.uri),
                        %error,
                        cached_keys = self.cached().len(),
                        retry_in = ?retry,
                        "JWKS fetch failed; the cached keys are older than auth.jwks.max_stale: \
                         upgrades get 503 until a fetch succeeds"
                    );
                } else {
                    tracing::warn!(
                        url = %redacted(&self.uri),
                        %error,
                        cached_keys = self.cached().len(),
                        retry_in = ?retry,
                        "JWKS fetch failed; the cached keys stay in use"
                    );
                }
                retry
            }
        }
    }
}

/// The refresher: fetch, sleep until the set is due or a token asks, again.
async fn refresh(weak: Weak<Jwks>, wake: Arc<Notify>) {
    let mut failures = 0;
    loop {
        let next = {
            let Some(jwks) = weak.upgrade() else { return };
            jwks.begin_attempt();
            let next = jwks.refresh_once(&mut failures).await;
            jwks.end_attempt();
            next
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = wake.notified() => {}
        }
    }
}

/// The `max-age` of a `Cache-Control` answer; `no-cache` and `no-store` are zero.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let directives = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for d in directives {
        if d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store") {
            return Some(Duration::ZERO);
        }
        let Some((name, value)) = d.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("max-age") {
            if let Ok(secs) = value.trim().trim_matches('"').parse::<u64>() {
                return Some(Duration::from_secs(secs));
            }
        }
    }
    None
}

/// The usable keys of a JWKS document (at most [`MAX_KEYS`]) and how many were left out.
/// A key is left out when it does not parse, is for encryption, has no algorithm in
/// `allowed` (its `alg`, or the one its type implies), repeats a `kid`, or is too large. A
/// document with no usable key is an error: the cached keys stay.
fn parse(body: &[u8], allowed: &[Algorithm]) -> Result<(KeySet, usize), String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    let total = doc.keys.len();
    let mut usable: Vec<(Option<String>, Arc<Key>)> = Vec::new();
    for value in doc.keys {
        if usable.len() == MAX_KEYS {
            break;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Some(algorithm) = key_algorithm(&jwk).filter(|a| allowed.contains(a)) else {
            continue;
        };
        let kid = jwk.common.key_id.clone();
        if kid
            .as_ref()
            .is_some_and(|k| usable.iter().any(|(other, _)| other.as_ref() == Some(k)))
        {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        usable.push((
            kid,
            Arc::new(Key {
                decoding,
                algorithm,
            }),
        ));
    }
    if usable.is_empty() {
        return Err(format!("no usable key among {total}"));
    }
    let left_out = total - usable.len();
    let single = (usable.len() == 1).then(|| usable[0].1.clone());
    let len = usable.len();
    let by_kid = usable
        .into_iter()
        .filter_map(|(kid, key)| Some((kid?, key)))
        .collect();
    Ok((
        KeySet {
            by_kid,
            single,
            len,
            fetched_at: None,
        },
        left_out,
    ))
}

/// The URL without its query (which may carry a token), for log lines.
fn redacted(uri: &http::Uri) -> String {
    let mut text = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    );
    if uri.query().is_some() {
        text.push_str("?…");
    }
    text
}

/// The one algorithm a key verifies with: its `alg` when it has one (which must suit its
/// type), else the one its type implies. Shared-secret (`oct`) keys have none: an HMAC key
/// never comes from a key set.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let (implied, fits): (Algorithm, &[Algorithm]) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p)
            if (MIN_RSA_MODULUS_CHARS..=MAX_RSA_MODULUS_CHARS).contains(&p.n.len()) =>
        {
            (
                Algorithm::RS256,
                &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
            )
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (Algorithm::ES256, &[Algorithm::ES256]),
            EllipticCurve::P384 => (Algorithm::ES384, &[Algorithm::ES384]),
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, &[Algorithm::EdDSA])
        }
        _ => return None,
    };
    let Some(stated) = &jwk.common.key_algorithm else {
        return Some(implied);
    };
    let stated = match stated {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    fits.contains(&stated).then_some(stated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::http::HeaderValue;

    const ALL: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

    fn ed_key(kid: &str, x: &str) -> serde_json::Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x})
    }

    const X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn max_age_is_read_from_cache_control() {
        let mut h = HeaderMap::new();
        assert_eq!(max_age(&h), None);
        h.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=300"),
        );
        assert_eq!(max_age(&h), Some(Duration::from_secs(300)));
        h.insert("cache-control", HeaderValue::from_static("no-store"));
        assert_eq!(max_age(&h), Some(Duration::ZERO));
        h.insert("cache-control", HeaderValue::from_static("max-age=soon"));
        assert_eq!(max_age(&h), None);
    }

    #[test]
    fn only_usable_signature_keys_are_kept_and_bounded() {
        let doc = serde_json::json!({"keys": [
            ed_key("a", X),
            // a shared secret in a key set is never a key
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
            // for encryption
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": X},
            // its alg does not suit its type
            {"kty": "OKP", "crv": "Ed25519", "kid": "odd", "alg": "RS256", "x": X},
            // an unknown type
            {"kty": "XYZ", "kid": "future"},
            // a repeated kid: the first stays
            ed_key("a", X),
            ed_key("b", X),
        ]});
        let (set, left_out) = parse(doc.to_string().as_bytes(), ALL).unwrap();
        assert_eq!((set.len(), left_out), (2, 5));
        assert!(set.find(Some("a")).is_some() && set.find(Some("b")).is_some());
        assert!(set.find(Some("hmac")).is_none());
        assert!(set.find(None).is_none(), "no kid: only with a single key");
        let (set, _) = parse(
            serde_json::json!({"keys": [ed_key("a", X)]})
                .to_string()
                .as_bytes(),
            ALL,
        )
        .unwrap();
        assert!(
            set.find(None).is_some(),
            "a token without kid may use the only key"
        );
        // Not allowed by the config: no usable key, an error (the cached keys stay).
        let Err(err) = parse(doc.to_string().as_bytes(), &[Algorithm::RS256]) else {
            panic!("no key is allowed");
        };
        assert!(err.contains("no usable key among 7"), "{err}");
        assert!(parse(b"<html>", ALL).is_err());
        // At most MAX_KEYS are kept.
        let many: Vec<_> = (0..MAX_KEYS + 20)
            .map(|i| ed_key(&i.to_string(), X))
            .collect();
        let (set, left_out) = parse(
            serde_json::json!({"keys": many}).to_string().as_bytes(),
            ALL,
        )
        .unwrap();
        assert_eq!((set.len(), left_out), (MAX_KEYS, 20));
    }

    #[test]
    fn an_oversized_or_undersized_rsa_modulus_is_left_out() {
        for n in [
            "A".repeat(MAX_RSA_MODULUS_CHARS + 1),
            "A".repeat(MIN_RSA_MODULUS_CHARS - 1), // 1024-bit keys and the like
        ] {
            let doc =
                serde_json::json!({"keys": [{"kty": "RSA", "kid": "k", "n": n, "e": "AQAB"}]});
            assert!(parse(doc.to_string().as_bytes(), ALL).is_err());
        }
    }
}
