//! The admin listener: `/metrics`, `/healthz`, `/readyz` on an address of their own, off the
//! public port. A small hyper server; nothing here is reachable from the socket listener.
//! Readiness (`/readyz`) is shared with the `switchboard_ready` gauge and `Running::is_ready`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry as PromRegistry;
use switchboard_bus::Bus;
use switchboard_core::{plain_response, HttpResponse};

use crate::jwks::Jwks;
use crate::listener::{Listener, Respond};
use crate::metrics;

/// What the endpoints read.
pub(crate) struct AdminState {
    pub(crate) registry: Arc<PromRegistry>,
    pub(crate) readiness: Readiness,
}

/// What `/readyz`, the `switchboard_ready` gauge and `Running::is_ready` answer from.
#[derive(Clone)]
pub(crate) struct Readiness {
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) bus: Arc<dyn Bus>,
    /// With `auth.jwks_url`: not ready until a key set has been fetched.
    pub(crate) jwks: Option<Arc<Jwks>>,
}

impl Readiness {
    /// Why the gateway cannot do its job now, as `/readyz` says it; `None` when it can.
    pub(crate) fn why_not(&self) -> Option<&'static str> {
        if self.draining.load(Relaxed) {
            Some("not ready: shutting down\n")
        } else if !self.bus.is_ready() {
            Some("not ready: bus not ready\n")
        } else if self.jwks.as_ref().is_some_and(|j| !j.has_keys()) {
            Some("not ready: no signing keys yet (JWKS not fetched, or older than max_stale)\n")
        } else {
            None
        }
    }
}

/// Binds `addr` and serves the admin endpoints there.
pub(crate) async fn bind(
    addr: SocketAddr,
    state: AdminState,
    tls: Option<switchboard_tls::ServerTls>,
) -> std::io::Result<Listener> {
    let state = Arc::new(state);
    let respond: Respond = Arc::new(move |req| {
        let answer = respond(&state, &req);
        Box::pin(std::future::ready(answer))
    });
    Listener::bind(addr, "admin", respond, tls).await
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
            let openmetrics = wants_openmetrics(
                req.headers()
                    .get_all(ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let text = metrics::render(&state.registry, openmetrics);
            let mut res = Response::new(Bytes::from(text));
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::content_type(openmetrics)),
            );
            res
        }
        "/healthz" => plain_response(StatusCode::OK, "ok\n"),
        _ => match state.readiness.why_not() {
            Some(why) => plain_response(StatusCode::SERVICE_UNAVAILABLE, why),
            None => plain_response(StatusCode::OK, "ready\n"),
        },
    }
}

/// Whether the `Accept` header values prefer OpenMetrics to the Prometheus text format: an
/// `application/openmetrics-text` range with a `q` above 0 and at least that of the best range
/// the text format matches (`text/plain`, `text/*`, `*/*`). As Prometheus asks, OpenMetrics
/// first; `q=0` refuses it.
fn wants_openmetrics<'a>(accept: impl Iterator<Item = &'a str>) -> bool {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.flat_map(|v| v.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

#[cfg(test)]
mod accept_tests {
    use super::wants_openmetrics;

    #[test]
    fn openmetrics_is_chosen_only_when_preferred_and_never_at_q_0() {
        let wants = |accept: &str| wants_openmetrics(std::iter::once(accept));
        // What Prometheus sends.
        assert!(wants(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;\
             version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(wants("application/openmetrics-text"));
        assert!(!wants(
            "text/plain;version=0.0.4, application/openmetrics-text;q=0"
        ));
        assert!(!wants("text/plain, application/openmetrics-text;q=0.5"));
        assert!(!wants("text/plain"));
        assert!(!wants("*/*"));
        assert!(!wants("application/openmetrics-text;q=nonsense"));
        assert!(!wants(""));
    }
}
