//! A handler backend over HTTP on loopback, for the tests of `gateway.http_handlers`: a small
//! hyper server that records every request (envelope, headers, whether its signature checks
//! out), counts the TCP connections it accepted (keep-alive), and answers as the test says.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
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
        }
    }

    /// The same, after `delay`.
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        let (seen, accepted) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (seen, script) = (seen.clone(), script.clone());
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
                            let request = record(parts.headers, &body);
                            let answer = script(&request);
                            seen.lock().unwrap().push(request);
                            tokio::time::sleep(answer.delay).await;
                            let mut res = hyper::Response::new(Full::new(Bytes::from(answer.body)));
                            *res.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        HttpBackend {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// Its URL, `http://127.0.0.1:PORT/events`.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
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

fn record(headers: http::HeaderMap, body: &[u8]) -> Request {
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
    }
}
