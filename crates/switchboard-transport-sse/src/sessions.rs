//! The sessions of one started SSE transport: opening a stream, taking posts, the heartbeat
//! sweep and shutdown, for one [`Service`].

use std::collections::HashMap;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use switchboard_core::{
    plain_response, HttpReply, HttpRequest, Inbound, Service, Socket, SocketRef, StreamReply,
    TransportCounters,
};

use crate::socket::{lock, EventStream, QueueLimits, Shedder, SseSocket};
use crate::stats::SseStats;
use crate::SseOptions;

/// A session id: 128 random bits, as 32 hex digits. It is the capability that ties a post to
/// its stream.
type SessionId = u128;

/// What the endpoint asks of the started transport, whatever its service.
pub(crate) trait Sessions: Send + Sync + 'static {
    fn stream(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply>;
    fn post(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply>;
    fn heartbeat(&self);
    fn shut_down(&self);
    /// Ends every session now, dropping its connection (after the drain time).
    fn cut_all(&self);
    fn counters(&self) -> TransportCounters;
}

struct Session<S: Service> {
    socket: Arc<SseSocket>,
    /// The service's session: taken once, at close. The async lock also keeps posts of one
    /// session from calling the service concurrently, and the close from overtaking them.
    session: tokio::sync::Mutex<Option<S::Session>>,
}

pub(crate) struct Bound<S: Service> {
    service: Arc<S>,
    options: SseOptions,
    sessions: Mutex<HashMap<SessionId, Arc<Session<S>>>>,
    pub(crate) stats: Arc<SseStats>,
    /// Counts the sessions' tasks: shutdown waits for it to reach zero.
    pub(crate) tasks: tokio::sync::watch::Sender<usize>,
    /// Set by shutdown: no session opens from then on.
    stopping: std::sync::atomic::AtomicBool,
}

fn refuse(status: StatusCode, text: &'static str) -> HttpReply {
    HttpReply::Full(plain_response(status, text))
}

/// The `session` parameter: exactly 32 lowercase hex digits, as the stream gave it.
fn session_id(request: &HttpRequest) -> Option<SessionId> {
    let query = request.parts.uri.query()?;
    let (_, id) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "session")?;
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if id.len() != 32 || !id.bytes().all(hex) {
        return None;
    }
    u128::from_str_radix(&id, 16).ok()
}

fn new_session_id() -> SessionId {
    let mut bytes = [0u8; 16];
    // The OS's generator; if it fails there is no safe id to give.
    getrandom::getrandom(&mut bytes).expect("the operating system's random number generator");
    u128::from_le_bytes(bytes)
}

impl<S: Service> Bound<S> {
    pub(crate) fn new(service: Arc<S>, options: SseOptions) -> Self {
        let stats = Arc::new(SseStats::default());
        stats.set_budget(options.buffer_budget);
        Bound {
            service,
            options,
            sessions: Mutex::default(),
            stats,
            tasks: tokio::sync::watch::Sender::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The open sessions' sockets, copied out of the table (no lock held while they are used).
    fn sockets(&self) -> Vec<Arc<SseSocket>> {
        lock(&self.sessions)
            .values()
            .map(|s| s.socket.clone())
            .collect()
    }

    fn get(&self, id: SessionId) -> Option<Arc<Session<S>>> {
        lock(&self.sessions).get(&id).cloned()
    }

    /// The session's task: waits for its end, then tells the service, once.
    async fn run(self: Arc<Self>, id: SessionId, session: Arc<Session<S>>) {
        let socket = session.socket.clone();
        let close_timeout = self.options.close_timeout;
        if !socket.has_ended() {
            tokio::select! {
                _ = socket.ended.notified() => {}
                _ = socket.closing_started.notified() => {
                    // Closing (by the server, the client's `DELETE` or shutdown): the close
                    // event waits behind what was queued, and nothing more is queued. A client
                    // that takes nothing of it for a close timeout is cut off, as a WebSocket
                    // that does not take its close frame: its queue and its session do not
                    // wait for the heartbeat sweep. One that reads, however slowly, gets to
                    // the close event.
                    let mut taken = socket.taken_total();
                    while !socket.has_ended()
                        && tokio::time::timeout(close_timeout, socket.ended.notified())
                            .await
                            .is_err()
                    {
                        let now = socket.taken_total();
                        if now == taken {
                            socket.cut();
                            break;
                        }
                        taken = now;
                    }
                }
            }
        }
        lock(&self.sessions).remove(&id);
        self.stats.sessions_open.fetch_sub(1, Relaxed);
        // After any post that is calling the service for this session.
        let state = session.session.lock().await.take();
        let reason = socket.reason();
        self.stats.closed(&reason);
        if let Some(state) = state {
            self.service.on_close(state, reason);
        }
        self.tasks.send_modify(|n| *n -= 1);
        // The session is over, but its connection may not be: a client that does not read
        // the last events would hold it (and hyper's buffer) for ever. Give it the close
        // timeout to take them, then drop it (a no-op if it is gone already).
        tokio::time::sleep(close_timeout).await;
        socket.abort.abort();
    }
}

impl<S: Service> Sessions for Bound<S> {
    fn stream(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply> {
        // What the service must do before it can admit (fetch keys a token names) is
        // awaited first; almost always there is nothing, and no task is involved.
        match self.service.prepare_admit(&request.parts.headers) {
            None => Box::pin(std::future::ready(open_stream(&self, request))),
            Some(prepare) => Box::pin(async move {
                prepare.await;
                open_stream(&self, request)
            }),
        }
    }

    fn post(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply> {
        Box::pin(async move { self.take_post(request).await })
    }

    fn heartbeat(&self) {
        for socket in self.sockets() {
            socket.heartbeat();
        }
    }

    fn cut_all(&self) {
        for socket in self.sockets() {
            socket.cut();
        }
    }

    fn shut_down(&self) {
        self.stopping.store(true, SeqCst);
        for socket in self.sockets() {
            socket.shut_down();
        }
    }

    fn counters(&self) -> TransportCounters {
        self.stats.snapshot()
    }
}

/// `GET`: admits the request as a WebSocket upgrade would be, opens a session and answers
/// with its event stream.
fn open_stream<S: Service>(bound: &Arc<Bound<S>>, request: HttpRequest) -> HttpReply {
    let options = &bound.options;
    let stats = &bound.stats;
    let headers = &request.parts.headers;
    if !options.origins.allows(headers) || foreign_page_without_origin(headers) {
        stats.refused_origin.fetch_add(1, Relaxed);
        return refuse(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    // An `<img>` or `<script>` of another site asks for something else: only an event
    // source's request opens a session.
    let accepts_events = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")));
    if !accepts_events {
        return refuse(
            StatusCode::NOT_ACCEPTABLE,
            "this endpoint answers `Accept: text/event-stream`\n",
        );
    }
    if bound.stopping.load(SeqCst) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    // Reserved before the (costlier) admission, given back if nothing opens.
    let before = stats.sessions_open.fetch_add(1, SeqCst);
    if options.max_sessions.is_some_and(|max| before >= max as u64) {
        stats.sessions_open.fetch_sub(1, SeqCst);
        stats.refused_capacity.fetch_add(1, Relaxed);
        let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "too many sockets\n");
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return HttpReply::Full(res);
    }
    let admission = match bound.service.admit(&request.parts) {
        Ok(admission) => admission,
        Err(refusal) => {
            stats.sessions_open.fetch_sub(1, SeqCst);
            stats.refused_by_service.fetch_add(1, Relaxed);
            return HttpReply::Full(refusal);
        }
    };
    let limits = QueueLimits {
        frames: options.send_queue,
        bytes: options.send_queue_bytes,
    };
    let shedder: std::sync::Weak<Bound<S>> = Arc::downgrade(bound);
    let socket = Arc::new(SseSocket::new(request.peer, limits, stats.clone(), shedder));
    let id = new_session_id();
    let hex = format!("{id:032x}");
    socket.open_event(&hex, &format!("{}?session={hex}", options.path));
    // The body holds the session's end: were `open` to panic, dropping it ends the session
    // (and nothing is listed yet).
    let stream = EventStream(socket.clone());
    let state = bound.service.open(admission, socket.clone() as SocketRef);
    let session = Arc::new(Session {
        socket: socket.clone(),
        session: tokio::sync::Mutex::new(Some(state)),
    });
    lock(&bound.sessions).insert(id, session.clone());
    stats.sessions_opened.fetch_add(1, Relaxed);
    bound.tasks.send_modify(|n| *n += 1);
    tokio::spawn(bound.clone().run(id, session));
    // Listed before this check: a shutdown that started meanwhile has swept the table already.
    if bound.stopping.load(SeqCst) {
        socket.shut_down();
    }
    let mut head = http::Response::new(());
    let out = head.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Tells nginx-like proxies not to buffer the stream.
    out.insert("x-accel-buffering", HeaderValue::from_static("no"));
    allow_origin(headers, out, &options.origins);
    // A client gone without a word (no ACK for two heartbeats) is dropped by the kernel.
    let unacked_limit = sweep_interval(options)
        .saturating_mul(2)
        .max(MIN_UNACKED_LIMIT);
    HttpReply::Stream(
        StreamReply::new(head, Box::pin(stream), socket.abort.clone())
            .with_unacked_limit(unacked_limit),
    )
}

/// A browser's request from a page of another origin that carries no `Origin` (an `<img>`,
/// a link, a `no-cors` fetch from a sibling subdomain): it would bring the visitor's cookies,
/// so it opens nothing. An event source of another origin always sends `Origin`, and the
/// policy judges it; without one, only the page's own origin (`same-origin`) or the visitor
/// (`none`: typed in, a bookmark) may open a stream. `Sec-Fetch-Site` is sent by browsers
/// only (a page cannot set it); other clients are not affected.
fn foreign_page_without_origin(headers: &http::HeaderMap) -> bool {
    headers.get(header::ORIGIN).is_none()
        && headers
            .get("sec-fetch-site")
            .is_some_and(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"))
}

/// A request the WebSocket upgrade would refuse as malformed (`400`): not HTTP/1.1, or
/// without exactly one `Host` (RFC 9112 3.2; the same-host origin check reads it).
pub(crate) fn malformed(request: &HttpRequest) -> Option<HttpReply> {
    let parts = &request.parts;
    (!switchboard_core::http11_with_one_host(parts.version, &parts.headers)).then(|| {
        refuse(
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request with one Host header\n",
        )
    })
}

/// `405` for a method the endpoint does not take, saying which it does.
pub(crate) fn method_not_allowed() -> HttpReply {
    let mut res = plain_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "GET opens the stream, POST sends, DELETE closes\n",
    );
    res.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    HttpReply::Full(res)
}

/// CORS for a page of another origin that the policy allows: it may read the answer, with
/// credentials. (A same-origin page needs none of it; a refused origin gets none.)
pub(crate) fn allow_origin(
    request: &http::HeaderMap,
    response: &mut http::HeaderMap,
    policy: &switchboard_core::OriginPolicy,
) {
    let Some(origin) = request.get(header::ORIGIN) else {
        return;
    };
    if !policy.allows(request) {
        return;
    }
    response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    response.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    response.append(header::VARY, HeaderValue::from_static("origin"));
}

/// `OPTIONS`: the preflight a browser sends before a cross-origin `DELETE` (or a post with
/// another content type).
pub(crate) fn preflight(
    request: &HttpRequest,
    policy: &switchboard_core::OriginPolicy,
) -> HttpReply {
    let headers = &request.parts.headers;
    if headers.get(header::ORIGIN).is_none() || !policy.allows(headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    let mut res = empty(StatusCode::NO_CONTENT);
    let out = res.headers_mut();
    allow_origin(headers, out, policy);
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE"),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, authorization"),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    HttpReply::Full(res)
}

impl<S: Service> Bound<S> {
    /// `POST ?session=…` (one message) or `DELETE ?session=…` (the client's close), with
    /// CORS headers for an allowed page of another origin.
    async fn take_post(&self, request: HttpRequest) -> HttpReply {
        let origin = request.parts.headers.clone();
        match self.post_or_delete(request).await {
            HttpReply::Full(mut res) => {
                allow_origin(&origin, res.headers_mut(), &self.options.origins);
                HttpReply::Full(res)
            }
            other => other,
        }
    }

    async fn post_or_delete(&self, request: HttpRequest) -> HttpReply {
        let closing = request.parts.method == Method::DELETE;
        if request.parts.method != Method::POST && !closing {
            return method_not_allowed();
        }
        if !self.options.origins.allows(&request.parts.headers) {
            self.stats.refused_origin.fetch_add(1, Relaxed);
            return refuse(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
        let Some(session) = session_id(&request).and_then(|id| self.get(id)) else {
            return refuse(StatusCode::NOT_FOUND, "no such session\n");
        };
        let socket = &session.socket;
        if closing {
            // The client's close, as a WebSocket close frame would say it; echoed as the
            // stream's last event, as a WebSocket close is.
            let (code, reason) = client_close(&request);
            socket.close_by_client(code, reason);
            return HttpReply::Full(empty(StatusCode::NO_CONTENT));
        }
        if std::str::from_utf8(&request.body).is_err() {
            socket.end_for_protocol(1007, "message is not valid UTF-8");
            return refuse(StatusCode::BAD_REQUEST, "message is not valid UTF-8\n");
        }
        // The connect gate: wait (as a WebSocket's bytes wait in the kernel) until reading
        // resumes or the session ends, for at most `post_wait` (then `503`: try again).
        let waited = tokio::time::timeout(self.options.post_wait, async {
            loop {
                let resumed = socket.resumed.notified();
                if socket.has_ended() || socket.is_closing() || !socket.is_paused() {
                    return;
                }
                resumed.await;
            }
        })
        .await;
        if socket.has_ended() || socket.is_closing() {
            return refuse(StatusCode::GONE, "session closed\n");
        }
        if waited.is_err() {
            let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "not let in yet\n");
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return HttpReply::Full(res);
        }
        let state = session.session.lock().await;
        let Some(state) = state.as_ref() else {
            return refuse(StatusCode::GONE, "session closed\n");
        };
        self.service
            .on_message(state, Inbound::Text(Bytes::clone(&request.body)));
        HttpReply::Full(empty(StatusCode::ACCEPTED))
    }
}

fn empty(status: StatusCode) -> switchboard_core::HttpResponse {
    let mut res = http::Response::new(Bytes::new());
    *res.status_mut() = status;
    res
}

/// A `DELETE`'s `code` (1005, "none given", when absent or not a code a client may send) and
/// `reason` (at most 123 bytes).
fn client_close(request: &HttpRequest) -> (u16, String) {
    let query = request.parts.uri.query().unwrap_or_default();
    let mut code = 1005;
    let mut reason = String::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => {
                code = v
                    .parse()
                    .ok()
                    .filter(|c| switchboard_core::is_sendable_close_code(*c))
                    .unwrap_or(1005)
            }
            "reason" => reason = switchboard_core::truncate_close_reason(&v).to_string(),
            _ => {}
        }
    }
    (code, reason)
}

impl<S: Service> Shedder for Bound<S> {
    fn make_room(&self, asking: &SseSocket, n: usize) -> bool {
        let sockets = self.sockets();
        let fair = self.stats.budget() / sockets.len().max(1);
        if asking.held() + n > fair {
            return false;
        }
        let mut holders: Vec<(usize, Arc<SseSocket>)> = sockets
            .into_iter()
            .filter(|s| !std::ptr::eq(&**s, asking))
            .map(|s| (s.held(), s))
            .filter(|(held, _)| *held > fair)
            .collect();
        holders.sort_by_key(|(held, _)| std::cmp::Reverse(*held));
        for (_, holder) in holders {
            holder.end_over_budget();
            if self.stats.try_reserve(n) {
                return true;
            }
        }
        self.stats.try_reserve(n)
    }
}

/// The shortest time a stream's bytes may go unacknowledged before the kernel drops it: a
/// short test heartbeat must not make a slow network look like a dead client.
const MIN_UNACKED_LIMIT: Duration = Duration::from_secs(10);

/// How long the heartbeat sweep waits between rounds.
pub(crate) fn sweep_interval(options: &SseOptions) -> Duration {
    options.heartbeat_interval.max(Duration::from_millis(10))
}
