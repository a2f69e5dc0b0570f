//! The sessions of one started SSE transport: opening a stream, taking posts, the heartbeat
//! sweep and shutdown, for one [`Service`].

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use switchboard_core::{
    plain_response, CloseReason, HttpReply, HttpRequest, Inbound, Service, Socket, SocketRef,
    StreamReply, TransportCounters,
};

use crate::socket::{EventStream, QueueLimits, Shedder, SseSocket};
use crate::stats::SseStats;
use crate::SseOptions;

/// A session id: 128 random bits, as 32 hex digits. It is the capability that ties a post to
/// its stream.
type SessionId = u128;

/// What the endpoint asks of the started transport, whatever its service.
pub(crate) trait Sessions: Send + Sync + 'static {
    fn stream(self: Arc<Self>, request: HttpRequest) -> HttpReply;
    fn post(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply>;
    fn heartbeat(&self);
    fn shut_down(&self);
    fn open_count(&self) -> usize;
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn refuse(status: StatusCode, text: &'static str) -> HttpReply {
    HttpReply::Full(plain_response(status, text))
}

fn session_id(request: &HttpRequest) -> Option<SessionId> {
    let query = request.parts.uri.query()?;
    let (_, id) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "session")?;
    if id.len() != 32 {
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

    fn get(&self, id: SessionId) -> Option<Arc<Session<S>>> {
        lock(&self.sessions).get(&id).cloned()
    }

    /// The session's task: waits for its end, then tells the service, once.
    async fn run(self: Arc<Self>, id: SessionId, session: Arc<Session<S>>) {
        let socket = session.socket.clone();
        if !socket.has_ended() {
            socket.ended.notified().await;
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
    }
}

impl<S: Service> Sessions for Bound<S> {
    fn stream(self: Arc<Self>, request: HttpRequest) -> HttpReply {
        open_stream(&self, request)
    }

    fn post(
        self: Arc<Self>,
        request: HttpRequest,
    ) -> switchboard_core::BoxFuture<'static, HttpReply> {
        Box::pin(async move { self.take_post(request).await })
    }

    fn heartbeat(&self) {
        let sockets: Vec<Arc<SseSocket>> = lock(&self.sessions)
            .values()
            .map(|s| s.socket.clone())
            .collect();
        for socket in sockets {
            socket.heartbeat();
        }
    }

    fn shut_down(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let sockets: Vec<Arc<SseSocket>> = lock(&self.sessions)
            .values()
            .map(|s| s.socket.clone())
            .collect();
        for socket in sockets {
            socket.shut_down();
        }
    }

    fn open_count(&self) -> usize {
        lock(&self.sessions).len()
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
    if !options.origins.allows(&request.parts.headers) {
        stats.refused_origin.fetch_add(1, Relaxed);
        return refuse(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    if bound.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if options
        .max_sessions
        .is_some_and(|max| bound.open_count() >= max)
    {
        stats.refused_capacity.fetch_add(1, Relaxed);
        let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "too many sockets\n");
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return HttpReply::Full(res);
    }
    let admission = match bound.service.admit(&request.parts) {
        Ok(admission) => admission,
        Err(refusal) => {
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
    let session = Arc::new(Session {
        socket: socket.clone(),
        session: tokio::sync::Mutex::new(None),
    });
    lock(&bound.sessions).insert(id, session.clone());
    stats.sessions_open.fetch_add(1, Relaxed);
    stats.sessions_opened.fetch_add(1, Relaxed);
    bound.tasks.send_modify(|n| *n += 1);
    let shared: SocketRef = socket.clone();
    let state = bound.service.open(admission, shared);
    // Not yet shared with any post: the session is unknown to clients until its first event.
    if let Ok(mut slot) = session.session.try_lock() {
        *slot = Some(state);
    }
    tokio::spawn(bound.clone().run(id, session));
    // Listed before this check: a shutdown that started meanwhile has swept the table already.
    if bound.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        socket.shut_down();
    }
    let mut head = http::Response::new(());
    let headers = head.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Tells nginx-like proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    HttpReply::Stream(StreamReply {
        head,
        abort: socket.abort.clone(),
        chunks: Box::pin(EventStream(socket)),
    })
}

impl<S: Service> Bound<S> {
    /// `POST ?session=…`: one message from the client, handed to the service in order;
    /// `DELETE ?session=…`: the client's close.
    async fn take_post(&self, request: HttpRequest) -> HttpReply {
        let closing = request.parts.method == Method::DELETE;
        if request.parts.method != Method::POST && !closing {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET opens the stream, POST sends, DELETE closes\n",
            );
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
            socket.set_reason(CloseReason::Protocol {
                code: 1007,
                detail: "message is not valid UTF-8".into(),
            });
            socket.cut();
            return refuse(StatusCode::BAD_REQUEST, "message is not valid UTF-8\n");
        }
        // The connect gate: wait (as a WebSocket's bytes wait in the kernel) until reading
        // resumes or the session ends.
        loop {
            let resumed = socket.resumed.notified();
            if socket.has_ended() || socket.is_closing() {
                return refuse(StatusCode::GONE, "session closed\n");
            }
            if !socket.is_paused() {
                break;
            }
            resumed.await;
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
        let sockets: Vec<Arc<SseSocket>> = lock(&self.sessions)
            .values()
            .map(|s| s.socket.clone())
            .collect();
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

/// How long the heartbeat sweep waits between rounds.
pub(crate) fn sweep_interval(options: &SseOptions) -> Duration {
    options.heartbeat_interval.max(Duration::from_millis(10))
}
