//! A handler backend over HTTP on loopback, for the tests of `gateway.http_handlers`: a small
//! hyper server that records every request (envelope, headers, HTTP version, whether its
//! signature checks out), counts the TCP connections it accepted (keep-alive), and answers as
//! the test says; plain, or TLS with a private CA offering HTTP/2 and HTTP/1.1 by ALPN.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::Value;
use sha2::Sha256;

/// The secret the test configs sign with.
pub const HANDLER_SECRET: &str = "http-handler-test-secret-0123456789";
/// The variable the test configs name in `secret_env` (never set: the secret is given to the
/// container, [`switchboard::Container::http_handler_secret`]).
pub const HANDLER_SECRET_ENV: &str = "SWITCHBOARD_IT_HANDLER_SECRET";

/// How the backend answers one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body, as sent.
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Then wait until this gate is open, if any.
    pub gate: Option<Gate>,
}

/// Holds the answers given it ([`Answer::held_by`]) until it is opened: a test's steps run
/// while events are in flight however slow the machine, with no delay to guess.
#[derive(Debug, Clone)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Lets every answer it holds, and every later one, go.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn opened(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

impl Answer {
    /// `200` with `body` as JSON.
    pub fn json(body: Value) -> Answer {
        Answer::raw(200, &body.to_string())
    }

    /// `status` with `body` as it is.
    pub fn raw(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.to_string(),
            delay: Duration::ZERO,
            gate: None,
        }
    }

    /// The same, after `delay`.
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }

    /// The same, once `gate` is open.
    pub fn held_by(mut self, gate: &Gate) -> Answer {
        self.gate = Some(gate.clone());
        self
    }
}

/// One request the backend got.
#[derive(Debug, Clone)]
pub struct Request {
    /// The body, parsed: `{topic, data, context}`.
    pub envelope: Value,
    /// The request headers.
    pub headers: http::HeaderMap,
    /// True when `X-Switchboard-Signature` is HMAC-SHA256 of `<t>.<id>.<body>` with
    /// [`HANDLER_SECRET`], and `t` is within five minutes of now.
    pub signed: bool,
    /// The signature's `id` (the same across the retries of one event).
    pub event_id: String,
    /// The HTTP version it came in.
    pub version: http::Version,
}

impl Request {
    /// The envelope's topic.
    pub fn topic(&self) -> &str {
        self.envelope["topic"].as_str().unwrap_or_default()
    }
}

type Script = dyn Fn(&Request) -> Answer + Send + Sync;

/// The running backend; stops when dropped.
pub struct HttpBackend {
    addr: SocketAddr,
    scheme: &'static str,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpBackend {
    /// Starts on 127.0.0.1, answering each request with what `script` says.
    pub async fn start(script: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Self {
        Self::serve(None, Arc::new(script)).await
    }

    /// The same over TLS with a certificate for `127.0.0.1` from a private CA, whose PEM it
    /// writes to `ca_file`; it offers HTTP/2 and HTTP/1.1 (ALPN).
    pub async fn start_tls(
        ca_file: &std::path::Path,
        script: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> Self {
        Self::serve(Some(tls_acceptor(ca_file)), Arc::new(script)).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>, script: Arc<Script>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (seen, accepted) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (seen, script, tls) = (seen.clone(), script.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request = record(parts.headers, parts.version, &body);
                            let answer = script(&request);
                            seen.lock().unwrap().push(request);
                            tokio::time::sleep(answer.delay).await;
                            if let Some(gate) = &answer.gate {
                                gate.opened().await;
                            }
                            let mut res = hyper::Response::new(Full::new(Bytes::from(answer.body)));
                            *res.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let server = Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                server.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => return,
                        },
                        None => server.serve_connection(TokioIo::new(stream), service).await,
                    };
                });
            }
        });
        HttpBackend {
            addr,
            scheme,
            requests,
            connections,
            task,
        }
    }

    /// Its URL, `http://127.0.0.1:PORT/events` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}/events", self.scheme, self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests so far on `topic`.
    pub fn on_topic(&self, topic: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.topic() == topic)
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn record(headers: http::HeaderMap, version: http::Version, body: &[u8]) -> Request {
    let signature = headers
        .get("x-switchboard-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let field = |name: &str| {
        signature
            .split(',')
            .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    let (t, id, v1) = (field("t"), field("id"), field("v1"));
    let mut mac = Hmac::<Sha256>::new_from_slice(HANDLER_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{id}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = t.parse::<u64>().is_ok_and(|t| t.abs_diff(now) <= 300);
    Request {
        envelope: serde_json::from_slice(body).unwrap_or(Value::Null),
        headers,
        signed: fresh && !v1.is_empty() && v1 == expected,
        event_id: id,
        version,
    }
}

/// A CA (written to `ca_file`) and a server certificate for 127.0.0.1 it signed, as an
/// acceptor offering HTTP/2 and HTTP/1.1.
fn tls_acceptor(ca_file: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(ca_file, ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
