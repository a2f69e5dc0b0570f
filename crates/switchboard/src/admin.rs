//! The admin listener: `/metrics`, `/healthz`, `/readyz` on an address of their own, off the
//! public port. A small hyper server; nothing here is reachable from the socket listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry as PromRegistry;
use switchboard_bus::Bus;
use switchboard_core::{plain_response, HttpResponse};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics;

/// What the endpoints read.
pub(crate) struct AdminState {
    pub(crate) registry: Arc<PromRegistry>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) draining: Arc<AtomicBool>,
}

/// A running admin listener; [`AdminServer::stop`] ends it and its connections.
pub(crate) struct AdminServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` and serves the admin endpoints.
    pub(crate) async fn bind(addr: SocketAddr, state: AdminState) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("admin listener {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept_loop = tokio::spawn(accept_loop(listener, Arc::new(state), stopped));
        Ok(AdminServer {
            local_addr,
            stop,
            accept_loop,
        })
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes open connections after their current request.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(true);
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req).map(Full::new)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> HttpResponse {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return plain_response(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut res = plain_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match path {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let text = metrics::render(&state.registry, openmetrics);
            let mut res = Response::new(Bytes::from(text));
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::content_type(openmetrics)),
            );
            res
        }
        "/healthz" => plain_response(StatusCode::OK, "ok\n"),
        _ => {
            if state.draining.load(Relaxed) {
                plain_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                )
            } else if !state.bus.is_ready() {
                plain_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: bus not ready\n",
                )
            } else {
                plain_response(StatusCode::OK, "ready\n")
            }
        }
    }
}
