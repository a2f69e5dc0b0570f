//! Keys from the identity provider (`auth.jwks_url`): a JWKS server on 127.0.0.1 in the test
//! (plain, or TLS with a CA of the test's own), real gateways and real clients. It counts the
//! requests it answers, so the tests assert how many fetches a flood of forged `kid`s caused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::{Config, Container};
use switchboard_test_support::{
    each_transport, http_json, now, request, start, wait_until, Gateway, Kind, WAIT,
};
use switchboard_tls::{ServerTls, ServerTlsFiles};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// A signing key of the test's and its public half as a JWK.
struct TestKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    fn ed25519(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        TestKey {
            kid: kid.into(),
            algorithm: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}),
        }
    }

    fn p256(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // An uncompressed point: 0x04, x, y.
        let raw = pair.public_key_raw();
        let (x, y) = raw[1..].split_at(32);
        TestKey {
            kid: kid.into(),
            algorithm: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
        }
    }

    /// The committed throwaway RSA key (tests/keys); its modulus and exponent read from the
    /// public key's DER by hand.
    fn rsa(kid: &str) -> TestKey {
        let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
        let public = std::fs::read_to_string(keys.join("rsa_public.pem")).unwrap();
        let b64: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        // SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { algorithm }, BIT STRING { 0, RSAPublicKey } }
        let (_, spki, _) = der_item(&der);
        let (_, _, rest) = der_item(spki);
        let (_, bits, _) = der_item(rest);
        // RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }
        let (_, rsa, _) = der_item(&bits[1..]);
        let (_, n, rest) = der_item(rsa);
        let (_, e, _) = der_item(rest);
        let unsigned =
            |i: &[u8]| URL_SAFE_NO_PAD.encode(&i[i.iter().take_while(|b| **b == 0).count()..]);
        TestKey {
            kid: kid.into(),
            algorithm: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(
                &std::fs::read(keys.join("rsa_private.pem")).unwrap(),
            )
            .unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "n": unsigned(n), "e": unsigned(e)}),
        }
    }

    /// A token for `user`, naming this key's `kid`.
    fn token(&self, user: &str) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        let claims = json!({"sub": user, "exp": now() + 600});
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

/// One DER item: its tag, its contents and what follows it.
fn der_item(data: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (data[0], data[1] as usize);
    let (len, start) = if first & 0x80 == 0 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = data[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (len, 2 + n)
    };
    (tag, &data[start..start + len], &data[start + len..])
}

/// A JWKS server: answers every request with the current set (`Cache-Control: max-age=3600`,
/// so only a refetch for an unknown `kid` fetches again), or with 503 while `down`, and
/// closes the connection after each answer. Counts the requests.
struct JwksServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Value>>>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[&TestKey], tls: Option<ServerTls>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = JwksServer {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            keys: Arc::new(Mutex::new(Vec::new())),
            down: Arc::default(),
            task: tokio::spawn(async {}),
        };
        server.publish(keys);
        let (requests, set, down) = (
            server.requests.clone(),
            server.keys.clone(),
            server.down.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (requests, set, down, tls) =
                    (requests.clone(), set.clone(), down.clone(), tls.clone());
                tokio::spawn(async move {
                    let answer = move || {
                        requests.fetch_add(1, SeqCst);
                        let body = json!({"keys": *set.lock().unwrap()}).to_string();
                        let status = if down.load(SeqCst) {
                            "503 Service Unavailable"
                        } else {
                            "200 OK"
                        };
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                             cache-control: public, max-age=3600\r\ncontent-length: {}\r\n\
                             connection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.acceptor().accept(tcp).await {
                                serve_one(stream, answer).await;
                            }
                        }
                        None => serve_one(tcp, answer).await,
                    }
                });
            }
        });
        JwksServer { task, ..server }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/.well-known/jwks.json", self.addr)
    }

    /// From now on the set holds exactly these keys.
    fn publish(&self, keys: &[&TestKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    /// Stops listening: connections are refused from now on.
    fn stop(&self) {
        self.task.abort();
    }
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    answer: impl FnOnce() -> String,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(answer().as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A container verifying with the key set at `url`; `jwks` is the `auth.jwks` section's
/// YAML (one line of flow style), `admin` adds an admin listener.
fn jwks_container(url: &str, jwks: &str) -> Container {
    let yaml = format!(
        "gateway:\n  socket:\n    onconnect: {{ publish: c }}\n  auth:\n    username_claim: sub\n    jwks_url: \"{url}\"\n    jwks: {jwks}\n"
    );
    let mut c = Container::new(Config::from_yaml_str(&yaml).unwrap()).unwrap();
    c.admin_listen("127.0.0.1:0".parse().unwrap());
    c
}

/// A provider serving `keys` over plain HTTP, and a WebSocket gateway using it with the
/// `auth.jwks` section `jwks`.
async fn serve(keys: &[&TestKey], jwks: &str) -> (JwksServer, Gateway) {
    let provider = JwksServer::start(keys, None).await;
    let gw = start(Kind::WebSocket, jwks_container(&provider.url("http"), jwks)).await;
    (provider, gw)
}

/// The HTTP status of a connect with `token` (101 when it opened).
async fn status(gw: &Gateway, token: &str) -> u16 {
    match gw.connect_request(request(token, Some("acme"))).await {
        Ok(_) => 101,
        Err(status) => status,
    }
}

/// A metric's value in the gateway's `/metrics` text.
fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = gw.metrics_text();
    let line = text
        .lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A key rotated in at the provider is fetched when the first token naming it arrives: that
/// connect waits for the one fetch and is accepted; the retired key no longer verifies. On
/// every transport (each awaits the service's `prepare_admit`).
async fn a_rotated_in_key_is_fetched_for_the_first_token_that_names_it(kind: Kind) {
    let old = TestKey::ed25519("2025-old");
    let new = TestKey::p256("2026-new");
    let provider = JwksServer::start(&[&old], None).await;
    let c = jwks_container(&provider.url("http"), "{ refetch_interval: 1h }");
    let gw = start(kind, c).await;
    assert_eq!(provider.requests(), 1, "one fetch at start");
    assert!(gw.is_ready());
    assert_eq!(status(&gw, &old.token("alex")).await, 101);

    provider.publish(&[&new]);
    assert_eq!(
        status(&gw, &new.token("sam")).await,
        101,
        "the new key after one fetch"
    );
    assert_eq!(provider.requests(), 2);
    assert_eq!(
        status(&gw, &old.token("alex")).await,
        401,
        "the retired key is gone"
    );
    assert_eq!(status(&gw, &new.token("kim")).await, 101);
    assert_eq!(provider.requests(), 2, "known keys fetch nothing");
    assert_eq!(metric(&gw, "switchboard_jwks_keys"), 1);
    assert_eq!(metric(&gw, "switchboard_jwks_refreshes_total"), 2);
}

each_transport!(a_rotated_in_key_is_fetched_for_the_first_token_that_names_it);

/// Fifty connects at once with forged `kid`s: every one is refused (401), and the provider
/// sees one fetch for all of them (plus the one at start), not fifty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_kids_are_refused_without_a_refetch_storm() {
    let key = TestKey::ed25519("real");
    let (provider, gw) = serve(&[&key], "{ refetch_interval: 1h }").await;
    let forged: Vec<TestKey> = (0..50)
        .map(|i| TestKey {
            kid: format!("forged-{i}"),
            ..TestKey::ed25519("x")
        })
        .collect();
    let statuses = futures_util::future::join_all(forged.iter().map(|k| {
        let token = k.token("mallory");
        let gw = &gw;
        async move { status(gw, &token).await }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert!(provider.requests() <= 2, "{} fetches", provider.requests());
    assert_eq!(metric(&gw, "switchboard_jwks_refetches_total"), 1);
    // Once that fetch has begun, a forged kid is refused at once, without a fetch.
    assert_eq!(status(&gw, &forged[0].token("mallory")).await, 401);
    assert!(metric(&gw, "switchboard_jwks_refetches_limited_total") >= 1);
    assert_eq!(
        status(&gw, &key.token("alex")).await,
        101,
        "real tokens still pass"
    );
    assert!(provider.requests() <= 2);
}

/// The provider goes away: the cached keys keep verifying, the failed refetch is counted,
/// and the gateway stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_working_while_the_provider_is_unreachable() {
    let key = TestKey::p256("k1");
    let (provider, gw) = serve(&[&key], "{ refetch_interval: 1h, timeout: 2s }").await;
    assert_eq!(status(&gw, &key.token("alex")).await, 101);
    provider.stop();
    // A token naming another key makes the gateway try the provider, which is gone.
    assert_eq!(status(&gw, &TestKey::p256("k2").token("alex")).await, 401);
    assert_eq!(metric(&gw, "switchboard_jwks_refresh_failures_total"), 1);
    assert_eq!(
        status(&gw, &key.token("alex")).await,
        101,
        "the cached key still works"
    );
    assert_eq!(metric(&gw, "switchboard_jwks_keys"), 1);
    assert!(metric(&gw, "switchboard_jwks_last_success_timestamp_seconds") > 0);
    let (ready, _) = http_json(gw.admin_addr().unwrap(), "GET", "/readyz", None, None).await;
    assert_eq!(ready, 200);
}

/// With `max_stale`, the cached keys stop verifying once the provider has not answered for
/// that long: upgrades get 503 (not 401) and `/readyz` is not ready; when it answers again,
/// both turn back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_stale_the_cached_keys_stop_verifying_until_a_fetch_succeeds() {
    let key = TestKey::p256("k1");
    let (provider, gw) = serve(
        &[&key],
        "{ min_refresh: 1s, max_refresh: 1s, timeout: 1s, max_stale: 3s }",
    )
    .await;
    let admin = gw.admin_addr().unwrap();
    assert_eq!(status(&gw, &key.token("alex")).await, 101);
    assert_eq!(http_json(admin, "GET", "/readyz", None, None).await.0, 200);

    provider.down.store(true, SeqCst);
    // Fetched every second; stale 3 s after the last good one.
    wait_until("the keys go stale", WAIT * 2, || !gw.is_ready()).await;
    assert_eq!(http_json(admin, "GET", "/readyz", None, None).await.0, 503);
    assert_eq!(status(&gw, &key.token("alex")).await, 503);
    assert_eq!(gw.stats().refused_no_keys, 1);
    assert_eq!(metric(&gw, "switchboard_jwks_keys"), 0);
    assert_eq!(metric(&gw, "switchboard_jwks_stale"), 1);
    assert!(metric(&gw, "switchboard_jwks_refresh_failures_total") >= 1);

    provider.down.store(false, SeqCst);
    wait_until("fresh keys", WAIT * 2, || gw.is_ready()).await;
    assert_eq!(http_json(admin, "GET", "/readyz", None, None).await.0, 200);
    assert_eq!(status(&gw, &key.token("alex")).await, 101);
    assert_eq!(metric(&gw, "switchboard_jwks_stale"), 0);
}

/// Until the first successful fetch: the gateway serves, `/readyz` answers 503, upgrades get
/// 503 (not 401). Once the provider answers (a retry), both turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_503_until_the_first_successful_fetch() {
    let key = TestKey::ed25519("k");
    let provider = JwksServer::start(&[&key], None).await;
    provider.down.store(true, SeqCst);
    let gw = start(
        Kind::WebSocket,
        jwks_container(&provider.url("http"), "{ startup_wait: 0s }"),
    )
    .await;
    let admin = gw.admin_addr().unwrap();
    wait_until("a failed first fetch", WAIT, || provider.requests() >= 1).await;
    assert!(!gw.is_ready());
    assert_eq!(http_json(admin, "GET", "/readyz", None, None).await.0, 503);
    assert_eq!(status(&gw, &key.token("alex")).await, 503);
    assert_eq!(gw.stats().refused_no_keys, 1);
    assert_eq!(gw.stats().refused_unauthorized, 0);
    assert!(gw.metrics_text().contains("switchboard_ready 0"));

    provider.down.store(false, SeqCst);
    // Retries back off from 0.5 s: a few seconds at most.
    wait_until("ready", WAIT * 2, || gw.is_ready()).await;
    assert_eq!(http_json(admin, "GET", "/readyz", None, None).await.0, 200);
    assert_eq!(status(&gw, &key.token("alex")).await, 101);
}

/// RS256, ES256 and EdDSA keys of one set each verify their tokens; a token whose `alg` is
/// not its key's is refused, and so is HS256 signed with a public key (algorithm confusion),
/// and a token without `kid` while the set has several keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_es256_and_eddsa_keys_verify_and_the_algorithm_is_the_keys() {
    let (rsa, ec, ed) = (TestKey::rsa("r"), TestKey::p256("e"), TestKey::ed25519("d"));
    let (_provider, gw) = serve(&[&rsa, &ec, &ed], "{}").await;
    assert_eq!(metric(&gw, "switchboard_jwks_keys"), 3);
    for key in [&rsa, &ec, &ed] {
        assert_eq!(
            status(&gw, &key.token("alex")).await,
            101,
            "{:?}",
            key.algorithm
        );
    }
    let claims = json!({"sub": "mallory", "exp": now() + 600});
    // HS256 with the RSA key's public PEM as the secret, naming the RSA key.
    let public = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys/rsa_public.pem"),
    )
    .unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("r".into());
    let confused =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public)).unwrap();
    assert_eq!(status(&gw, &confused).await, 401);
    // An RS256 token naming the Ed25519 key.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("d".into());
    let wrong = jsonwebtoken::encode(&header, &claims, &rsa.encoding).unwrap();
    assert_eq!(status(&gw, &wrong).await, 401);
    // No kid, three keys: which one is not for the token to leave open.
    let no_kid =
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &ed.encoding).unwrap();
    assert_eq!(status(&gw, &no_kid).await, 401);
}

/// A token without `kid` is verified with the set's key when the set has exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_kid_uses_the_only_key() {
    let key = TestKey::ed25519("only");
    let (_provider, gw) = serve(&[&key], "{}").await;
    let claims = json!({"sub": "alex", "exp": now() + 600});
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key.encoding).unwrap();
    assert_eq!(status(&gw, &token).await, 101);
}

/// The key set over TLS from a provider whose certificate a private CA signed: trusted with
/// `auth.jwks.ca_file`, refused without it (the gateway then has no keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_key_set_is_trusted_through_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_file = write("ca.pem", ca.pem());
    let files = ServerTlsFiles::new(
        write("leaf.pem", leaf.pem()),
        write("leaf-key.pem", leaf_key.serialize_pem()),
    );
    let key = TestKey::ed25519("tls");
    let provider = JwksServer::start(&[&key], Some(ServerTls::load(files).unwrap())).await;

    let jwks = format!("{{ ca_file: \"{}\" }}", ca_file.display());
    let gw = start(
        Kind::WebSocket,
        jwks_container(&provider.url("https"), &jwks),
    )
    .await;
    assert!(gw.is_ready());
    assert_eq!(status(&gw, &key.token("alex")).await, 101);

    let untrusted = start(
        Kind::WebSocket,
        jwks_container(&provider.url("https"), "{ startup_wait: 2s }"),
    )
    .await;
    assert!(
        !untrusted.is_ready(),
        "a certificate of an unknown CA is refused"
    );
    assert!(metric(&untrusted, "switchboard_jwks_refresh_failures_total") >= 1);
    assert_eq!(status(&untrusted, &key.token("alex")).await, 503);
}
