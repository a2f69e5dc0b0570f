//! Admission: every bad-token case is a 401 with nothing published; RS256 and ES256 keys;
//! 404 and 426; the spec's literal curl handshake.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use switchboard::{Config, Container};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::harness::*;

/// Connects with exactly these extra headers; returns the HTTP status of a refusal, or 101.
async fn status_with(gw: &switchboard::Running, headers: &[(&'static str, String)]) -> u16 {
    answer_with(gw, headers).await.0
}

/// Connects with exactly these extra headers (a name given twice is sent twice); returns the
/// HTTP status and, for a refusal, its body.
async fn answer_with(
    gw: &switchboard::Running,
    headers: &[(&'static str, String)],
) -> (u16, String) {
    let url = format!("ws://{}/connect?namespace=acme", gw.local_addr().unwrap());
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_ws, resp)) => (resp.status().as_u16(), String::new()),
        Err(WsError::Http(resp)) => {
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            (resp.status().as_u16(), body.into_owned())
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn cookie(token: &str) -> Vec<(&'static str, String)> {
    vec![("cookie", format!("ID_TOKEN={token}"))]
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_publishes_nothing() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:connection", "socket:close"]);
    let gw = start(c).await;
    let t = now();
    let cases: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        ("no token", vec![]),
        ("empty cookie", cookie("")),
        ("garbage", cookie("not.a.jwt")),
        (
            "bad signature",
            cookie(&token_with(
                json!({"preferred_username": "alex", "exp": t + 600}),
                "some-other-secret-0123456789",
            )),
        ),
        (
            "expired",
            cookie(&token_with(
                json!({"preferred_username": "alex", "exp": t - 120}),
                SECRET,
            )),
        ),
        (
            // RFC 7519: expired *at* `exp` (was: the second of `exp` itself still passed).
            "exp is now",
            cookie(&token_with(
                json!({"preferred_username": "alex", "exp": t}),
                SECRET,
            )),
        ),
        (
            "not yet valid",
            cookie(&token_with(
                json!({"preferred_username": "alex", "exp": t + 600, "nbf": t + 300}),
                SECRET,
            )),
        ),
        (
            "no exp",
            cookie(&token_with(json!({"preferred_username": "alex"}), SECRET)),
        ),
        (
            "missing username claim",
            cookie(&token_with(json!({"sub": "alex", "exp": t + 600}), SECRET)),
        ),
        (
            "username claim not a string",
            cookie(&token_with(
                json!({"preferred_username": 42, "exp": t + 600}),
                SECRET,
            )),
        ),
        (
            "wrong algorithm (alg none)",
            cookie(&format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&json!({"preferred_username": "alex", "exp": t + 600}).to_string())
            )),
        ),
        (
            // RFC 7515 4.1.11: an extension the verifier must understand, which it does not.
            "crit header",
            cookie(
                &jsonwebtoken::encode(
                    &jsonwebtoken::Header {
                        crit: Some(vec!["x-unknown".into()]),
                        ..Default::default()
                    },
                    &json!({"preferred_username": "alex", "exp": t + 600}),
                    &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .unwrap(),
            ),
        ),
        (
            "bad bearer",
            vec![("authorization", "Bearer nope".to_string())],
        ),
    ];
    for (name, headers) in cases {
        assert_eq!(status_with(&gw, &headers).await, 401, "{name}");
    }
    // a good token by bearer header is accepted
    assert_eq!(
        status_with(
            &gw,
            &[("authorization", format!("Bearer {}", token("alex")))]
        )
        .await,
        101
    );
    let (topic, data, _) = next_published(&mut seen).await;
    assert_eq!(
        (topic.as_str(), &data["username"]),
        ("socket:connection", &json!("alex"))
    );
    // the refused ones published nothing, before or after
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let rest: Vec<_> = std::iter::from_fn(|| seen.try_recv().ok())
        .filter(|(t, _, _)| t == "socket:connection")
        .collect();
    assert!(rest.is_empty(), "{rest:?}");
}

fn b64(s: &str) -> String {
    // URL-safe base64 without padding, by hand to keep dev-dependencies small.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

async fn asymmetric_case(alg: &str, algorithm: Algorithm, private: &str, public: &str) {
    let yaml = format!(
        "gateway:\n  socket:\n    onconnect:\n      publish: c\n  auth:\n    algorithm: {alg}\n    public_key_file: {}\n    username_claim: sub\n",
        keys_dir().join(public).display()
    );
    let mut c = Container::new(Config::from_yaml_str(&yaml).unwrap()).unwrap();
    let mut seen = recorder(&mut c, &["c"]);
    let gw = start(c).await;
    let pem = std::fs::read(keys_dir().join(private)).unwrap();
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let claims = json!({"sub": "robin", "exp": now() + 600});
    let good = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap();
    assert_eq!(status_with(&gw, &cookie(&good)).await, 101, "{alg}");
    assert_eq!(next_published(&mut seen).await.1["username"], "robin");
    // an HS256 token signed with the public key's bytes (key confusion) is refused
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&std::fs::read(keys_dir().join(public)).unwrap()),
    )
    .unwrap();
    assert_eq!(
        status_with(&gw, &cookie(&confused)).await,
        401,
        "{alg} key confusion"
    );
}

#[tokio::test]
async fn rs256_with_a_pem_public_key() {
    asymmetric_case(
        "RS256",
        Algorithm::RS256,
        "rsa_private.pem",
        "rsa_public.pem",
    )
    .await;
}

#[tokio::test]
async fn es256_with_a_pem_public_key() {
    asymmetric_case("ES256", Algorithm::ES256, "ec_private.pem", "ec_public.pem").await;
}

/// Builds a container whose tokens `algorithm` verifies with the key in `path`; the error as
/// text.
fn with_key_file(algorithm: &str, path: &Path) -> Result<Container, String> {
    let yaml = format!(
        "gateway:\n  socket: {{}}\n  auth:\n    algorithm: {algorithm}\n    public_key_file: {}\n",
        path.display()
    );
    Container::new(Config::from_yaml_str(&yaml).unwrap()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn unusable_auth_settings_fail_at_build_time() {
    let c = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  auth:\n    secret_env: SWITCHBOARD_IT_UNSET_VARIABLE\n",
    )
    .unwrap();
    let e = Container::new(c).unwrap_err().to_string();
    assert!(e.contains("SWITCHBOARD_IT_UNSET_VARIABLE"), "{e}");
    let e = with_key_file("RS256", Path::new("/nonexistent/key.pem")).unwrap_err();
    assert!(e.contains("/nonexistent/key.pem"), "{e}");
    // A file without end (named by mistake) is refused, not read whole.
    let e = with_key_file("RS256", Path::new("/dev/zero")).unwrap_err();
    assert!(
        e.contains("/dev/zero") && e.contains("larger than 1 MiB"),
        "{e}"
    );
    // A key file that is not the algorithm's public key fails here, naming the file, rather
    // than every token later as a bad signature (a private key parses as a key too).
    for (alg, file, says) in [
        (
            "RS256",
            "rsa_private.pem",
            "holds a private key (`PRIVATE KEY`)",
        ),
        ("ES256", "ec_private.pem", "holds a private key"),
        ("RS256", "README", "is not a PEM file"),
        ("RS256", "ec_public.pem", "is not a usable RS256 public key"),
    ] {
        let path = keys_dir().join(file);
        let e = with_key_file(alg, &path).unwrap_err();
        assert!(
            e.contains(says) && e.contains(&*path.to_string_lossy()),
            "{alg} {file}: {e}"
        );
    }
    // The public key with its private key after it, in one file: refused too (the decoder
    // reads the first block only).
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both.pem");
    let mut pem = std::fs::read(keys_dir().join("rsa_public.pem")).unwrap();
    pem.extend(std::fs::read(keys_dir().join("rsa_private.pem")).unwrap());
    std::fs::write(&both, pem).unwrap();
    let e = with_key_file("RS256", &both).unwrap_err();
    assert!(e.contains("holds a private key"), "{e}");
    // An EC key of the other curve parses too: named, at start-up.
    for (alg, curve, says) in [
        (
            "ES256",
            &rcgen::PKCS_ECDSA_P384_SHA384,
            "is not a P-256 key",
        ),
        (
            "ES384",
            &rcgen::PKCS_ECDSA_P256_SHA256,
            "is not a P-384 key",
        ),
    ] {
        let path = dir.path().join(format!("{alg}.pem"));
        let pair = rcgen::KeyPair::generate_for(curve).unwrap();
        std::fs::write(&path, pair.public_key_pem()).unwrap();
        let e = with_key_file(alg, &path).unwrap_err();
        assert!(e.contains(says), "{alg}: {e}");
        // The curve the algorithm wants is taken.
        let pair = rcgen::KeyPair::generate_for(if alg == "ES256" {
            &rcgen::PKCS_ECDSA_P256_SHA256
        } else {
            &rcgen::PKCS_ECDSA_P384_SHA384
        })
        .unwrap();
        std::fs::write(&path, pair.public_key_pem()).unwrap();
        with_key_file(alg, &path).expect(alg);
    }
    // A key given directly must suit the algorithm, and a secret be long enough.
    let bus = || std::sync::Arc::new(switchboard::InProcessBus::new());
    let hs256 = || Config::from_yaml_str("gateway:\n  socket: {}\n").unwrap();
    let pem = switchboard::VerificationKey::PublicKeyPem(b"-----BEGIN".to_vec());
    let e = Container::with_key(hs256(), bus(), pem)
        .unwrap_err()
        .to_string();
    assert!(e.contains("verifies with a secret"), "{e}");
    let short = switchboard::VerificationKey::Secret(b"short".to_vec());
    let e = Container::with_key(hs256(), bus(), short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shorter than 16 bytes"), "{e}");
    assert!(!format!(
        "{:?}",
        switchboard::VerificationKey::Secret(b"hunter2-hunter2-hunter2".to_vec())
    )
    .contains("hunter2"));
}

async fn http_first_line(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn other_paths_404_and_plain_get_at_path_426() {
    let gw = start(container(spec_config(""))).await;
    let addr = gw.local_addr().unwrap();
    let first = http_first_line(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(first.contains(" 404"), "{first}");
    let first = http_first_line(addr, "GET /connect HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(first.contains(" 426"), "{first}");
    let up = format!(
        "GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: SGVsbG8sIHdvcmxkIQ==\r\nCookie: ID_TOKEN={}\r\n\r\n",
        token("alex")
    );
    let first = http_first_line(addr, &up).await;
    assert!(first.contains(" 404"), "{first}");
}

#[tokio::test]
async fn the_specs_curl_handshake_gets_101() {
    let gw = start(container(spec_config(""))).await;
    let port = gw.local_addr().unwrap().port();
    // The spec's command, verbatim but for the port and a real token; --max-time ends it.
    let out = tokio::process::Command::new("curl")
        .args([
            "--include",
            "--no-buffer",
            "--max-time",
            "2",
            "--header",
            "Connection: Upgrade",
            "--header",
            "Upgrade: websocket",
            "--header",
            &format!("Host: localhost:{port}"),
            "--header",
            &format!("Origin: http://localhost:{port}"),
            "--header",
            "Sec-WebSocket-Key: SGVsbG8sIHdvcmxkIQ==",
            "--header",
            &format!("Cookie: ID_TOKEN={}", token("alex")),
            "--header",
            "Sec-WebSocket-Version: 13",
            &format!("http://localhost:{port}/connect?namespace=alex"),
        ])
        .output()
        .await
        .expect("curl must be installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // base64(sha1(key + RFC 6455 GUID)), computed independently
    assert!(
        text.contains("sec-websocket-accept: qGEgH3En71di5rrssAZTmtRTyFk="),
        "{text}"
    );
}

#[tokio::test]
async fn a_refusal_names_a_claim_of_the_wrong_type_and_two_tokens() {
    let gw = start(container(spec_config(""))).await;
    let t = now() + 600;
    let bearer = |claims: serde_json::Value| {
        (
            "authorization",
            format!("Bearer {}", token_with(claims, SECRET)),
        )
    };
    let cases = [
        (
            vec![bearer(
                json!({"preferred_username": "a", "exp": "tomorrow"}),
            )],
            "invalid token: `exp` claim is not a number of seconds",
        ),
        (
            vec![bearer(
                json!({"preferred_username": "a", "exp": t, "nbf": "later"}),
            )],
            "invalid token: `nbf` claim is not a number of seconds",
        ),
        (
            vec![
                bearer(json!({"preferred_username": "a", "exp": t})),
                bearer(json!({"preferred_username": "b", "exp": t})),
            ],
            "more than one Authorization header: send one",
        ),
        (
            vec![(
                "cookie",
                format!(
                    "ID_TOKEN={}; ID_TOKEN={}",
                    token_with(json!({"preferred_username": "a", "exp": t}), SECRET),
                    token_with(json!({"preferred_username": "b", "exp": t}), SECRET)
                ),
            )],
            "more than one `ID_TOKEN` cookie: send one",
        ),
    ];
    for (headers, want) in cases {
        let (status, body) = answer_with(&gw, &headers).await;
        assert_eq!((status, body.trim()), (401, want), "{headers:?}");
    }
    // Each of those on its own is let in.
    let (status, _) =
        answer_with(&gw, &[bearer(json!({"preferred_username": "a", "exp": t}))]).await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let _ = spec_config(""); // sets the test secret variable
    let yaml = format!(
        "gateway:\n  socket: {{}}\n  auth:\n    secret_env: {SECRET_ENV}\n    issuer: https://id.example\n    audience: switchboard\n"
    );
    let gw = start(container(Config::from_yaml_str(&yaml).unwrap())).await;
    let t = now() + 600;
    let cases = [
        (json!({"preferred_username": "a", "exp": t}), 401),
        (
            json!({"preferred_username": "a", "exp": t, "aud": "switchboard"}),
            401,
        ),
        (
            json!({"preferred_username": "a", "exp": t, "iss": "https://id.example"}),
            401,
        ),
        (
            json!({"preferred_username": "a", "exp": t, "iss": "https://evil.example", "aud": "switchboard"}),
            401,
        ),
        (
            json!({"preferred_username": "a", "exp": t, "iss": "https://id.example", "aud": "other"}),
            401,
        ),
        (
            json!({"preferred_username": "a", "exp": t, "iss": "https://id.example", "aud": ["x", "switchboard"]}),
            101,
        ),
    ];
    for (claims, want) in cases {
        let got = status_with(&gw, &cookie(&token_with(claims.clone(), SECRET))).await;
        assert_eq!(got, want, "{claims}");
    }
    // An audience of the wrong type is named as such, not as missing.
    let claims =
        json!({"preferred_username": "a", "exp": t, "iss": "https://id.example", "aud": 42});
    let (status, body) = answer_with(&gw, &cookie(&token_with(claims, SECRET))).await;
    assert_eq!(
        (status, body.trim()),
        (
            401,
            "invalid token: `aud` claim is not a string or an array of strings"
        )
    );
}
