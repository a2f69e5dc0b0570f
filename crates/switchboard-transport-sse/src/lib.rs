//! A Server-Sent Events transport for Switchboard: the fallback for browsers behind proxies
//! that break WebSockets (what Socket.IO's polling and Centrifugo's SSE transport are for).
//!
//! Depend on it to give a [`Service`] (the `switchboard` gateway, or your own) sockets made of
//! plain HTTP: `GET` on [`SseOptions::path`] opens an `EventSource` stream that carries what
//! a WebSocket would get, one `data:` event per message; the client's messages arrive as
//! `POST`s to the same path with the session's id. It serves no port of its own: it is an
//! [`HttpEndpoint`] that an HTTP server hosts (the WebSocket transport serves it beside its
//! upgrade path, so both answer on one port).
//!
//! The wire:
//! - `GET {path}?…` (the same query, cookie or `Authorization` a WebSocket upgrade would
//!   carry; the service admits it exactly as an upgrade) → `200 text/event-stream`:
//!   - first `event: session` with `{"session": id, "post": "{path}?session={id}"}` (not
//!     `open`, which is `EventSource`'s own event);
//!   - then every message as `data:` lines (a message with line breaks takes several);
//!   - `:` comment lines every heartbeat interval;
//!   - last `event: close` with `{"code", "reason"}` (as a WebSocket close), and the end.
//! - `POST {path}?session={id}` with one message as its body (text) → `202`; `404` for an
//!   unknown session, `410` once it is closing, `413` over the size limit, `403` for an
//!   origin the policy refuses, `400` (and the session closed, 1007) for invalid UTF-8.
//!   Posts of one session reach the service in the order they are taken, one at a time.
//! - `DELETE {path}?session={id}&code={code}&reason={reason}` → `204`: the client closes the
//!   session, as a WebSocket close frame would (`code` 1005 when absent). A stream that just
//!   goes away ends the session too (`CloseReason::Dropped`).
//!
//! Bounds: each session's queue in events and bytes (full: the session ends as a slow
//! consumer); all queues together in bytes ([`SseOptions::buffer_budget`], as the WebSocket
//! transport's: the largest holders above their share are shed with `1013`); a client that takes nothing of its queue between two heartbeats is cut off
//! (its connection dropped); sessions at most [`SseOptions::max_sessions`]; a post's body at
//! most [`SseOptions::max_message_size`]. Session ids are 128 random bits from the OS: the id
//! is what ties a post to its stream, so it travels only in the stream and in the posts.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use switchboard_core::{
    http, plain_response, BoxFuture, HttpEndpoint, HttpReply, HttpRequest, OriginPolicy,
    RunningTransport, Service, ShutdownReport, Transport, TransportCounters,
};

mod sessions;
mod socket;
mod stats;

use sessions::{Bound, Sessions};

/// Options of the SSE transport; the `switchboard` facade fills them from `socket.sse`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SseOptions {
    /// The path of the stream and of the posts. Default `/connect/sse`.
    pub path: String,
    /// Interval of the heartbeat comments (and of the check for clients that stopped
    /// reading). Default 30 s.
    pub heartbeat_interval: Duration,
    /// Largest message a post may carry, in bytes. Default 64 KiB.
    pub max_message_size: usize,
    /// Events that may wait in one session's queue. Default 256.
    pub send_queue: usize,
    /// Bytes that may wait in one session's queue. Default 1 MiB.
    pub send_queue_bytes: usize,
    /// Bytes queued across all sessions, at most; at the budget, the sessions holding the
    /// most above their share are closed (`1013`, their connection dropped). Default 256 MiB.
    pub buffer_budget: usize,
    /// Most sessions open at once; more get `503`. Default: no limit.
    pub max_sessions: Option<usize>,
    /// How long a post waits while the session's reading is paused (the gateway's connect
    /// gate) before it is answered `503` with `Retry-After: 1`. Keep it below the hosting
    /// server's request deadline. Default 5 s.
    pub post_wait: Duration,
    /// How long an ended session's connection may take to deliver its last events before it
    /// is dropped. Default 2 s.
    pub close_timeout: Duration,
    /// Which pages may open streams and post. Default: same host.
    pub origins: OriginPolicy,
}

impl Default for SseOptions {
    fn default() -> Self {
        SseOptions {
            path: "/connect/sse".into(),
            heartbeat_interval: Duration::from_secs(30),
            max_message_size: 64 * 1024,
            send_queue: 256,
            send_queue_bytes: 1 << 20,
            buffer_budget: 256 << 20,
            max_sessions: None,
            post_wait: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            origins: OriginPolicy::SameHost,
        }
    }
}

/// The SSE transport: give [`SseTransport::endpoint`] to the HTTP server that will host it,
/// and the transport itself to whoever starts transports (`switchboard::Container`).
#[derive(Clone)]
pub struct SseTransport {
    inner: Arc<Inner>,
}

struct Inner {
    options: SseOptions,
    /// Set when started.
    sessions: OnceLock<Arc<dyn Sessions>>,
}

impl std::fmt::Debug for SseTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseTransport")
            .field("path", &self.inner.options.path)
            .field("started", &self.inner.sessions.get().is_some())
            .finish()
    }
}

impl SseTransport {
    /// A transport with these options, not yet started.
    pub fn new(options: SseOptions) -> Self {
        SseTransport {
            inner: Arc::new(Inner {
                options,
                sessions: OnceLock::new(),
            }),
        }
    }

    /// The endpoint an HTTP server hosts at [`SseOptions::path`]; it answers `503` until the
    /// transport is started.
    pub fn endpoint(&self) -> Arc<dyn HttpEndpoint> {
        Arc::new(Endpoint(self.inner.clone()))
    }
}

struct Endpoint(Arc<Inner>);

impl HttpEndpoint for Endpoint {
    fn path(&self) -> &str {
        &self.0.options.path
    }

    fn max_body(&self) -> usize {
        self.0.options.max_message_size
    }

    /// A `413` for a post too large carries the CORS headers a post's answer would, so that
    /// an allowed page of another origin reads it (the client closes with `1009`, not `1006`).
    fn decorate_refusal(
        &self,
        request: &switchboard_core::RequestParts,
        refusal: &mut switchboard_core::HttpResponse,
    ) {
        sessions::allow_origin(
            &request.headers,
            refusal.headers_mut(),
            &self.0.options.origins,
        );
    }

    fn call(&self, request: HttpRequest) -> BoxFuture<'static, HttpReply> {
        let Some(sessions) = self.0.sessions.get().cloned() else {
            let refusal = plain_response(http::StatusCode::SERVICE_UNAVAILABLE, "not started\n");
            return Box::pin(std::future::ready(HttpReply::Full(refusal)));
        };
        let reply =
            |reply| -> BoxFuture<'static, HttpReply> { Box::pin(std::future::ready(reply)) };
        // As the upgrade: HTTP/1.1 with exactly one `Host` (the origin check reads it).
        if let Some(refusal) = sessions::malformed(&request) {
            return reply(refusal);
        }
        match request.parts.method {
            http::Method::GET => sessions.stream(request),
            http::Method::OPTIONS => reply(sessions::preflight(&request, &self.0.options.origins)),
            http::Method::POST | http::Method::DELETE => sessions.post(request),
            _ => reply(sessions::method_not_allowed()),
        }
    }
}

impl Transport for SseTransport {
    async fn start<S: Service>(
        self,
        service: Arc<S>,
    ) -> std::io::Result<Box<dyn RunningTransport>> {
        let bound = Arc::new(Bound::new(service, self.inner.options.clone()));
        let sessions: Arc<dyn Sessions> = bound.clone();
        if self.inner.sessions.set(sessions.clone()).is_err() {
            return Err(std::io::Error::other(
                "this SSE transport was started already",
            ));
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let interval = sessions::sweep_interval(&self.inner.options);
        let sweeping = sessions.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => sweeping.heartbeat(),
                    _ = stopped.changed() => return,
                }
            }
        });
        let tasks = bound.tasks.subscribe();
        Ok(Box::new(Started {
            sessions,
            tasks,
            stop: Arc::new(stop),
        }))
    }
}

struct Started {
    sessions: Arc<dyn Sessions>,
    /// How many sessions' tasks are running.
    tasks: tokio::sync::watch::Receiver<usize>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl RunningTransport for Started {
    fn name(&self) -> &'static str {
        "sse"
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }

    fn counters(&self) -> TransportCounters {
        self.sessions.counters()
    }

    fn shutdown(&self, drain: Duration) -> BoxFuture<'static, ShutdownReport> {
        self.sessions.shut_down();
        let mut tasks = self.tasks.clone();
        let sessions = self.sessions.clone();
        let stop = self.stop.clone();
        Box::pin(async move {
            let drained = tokio::time::timeout(drain, tasks.wait_for(|n| *n == 0))
                .await
                .is_ok_and(|r| r.is_ok());
            if !drained {
                // Clients that did not take their close event in time: cut them off, so that
                // every session still ends (and the service hears of it).
                sessions.cut_all();
            }
            // The heartbeat sweep ran until now, cutting stalled streams during the drain.
            let _ = stop.send(true);
            ShutdownReport::new(drained)
        })
    }
}
