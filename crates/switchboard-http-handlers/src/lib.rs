//! Handlers over plain HTTP: topics bound to endpoints that the gateway node holding the socket
//! calls itself, instead of publishing the event on the bus.
//!
//! Depend on it to put a socket's events in front of a web backend in any language: each event
//! on a bound topic is `POST`ed, signed, as the JSON envelope handlers get over NATS
//! (`{"topic", "data", "context"}`), and the answer body is the handler's answer: `{"reply": P}`,
//! `{"fail": E}` or `{}` (an empty body too), delivered through the event's own way back
//! ([`Message::deliver`]), so the socket sees exactly what the bus paths produce. The facade
//! (`switchboard`) routes bound topics here from the node that owns the socket; the bus never
//! sees them, so on any number of nodes each event is sent once.
//!
//! Per endpoint everything is bounded: `concurrency` requests in flight (one worker task
//! each), `queue` events waiting, `queue_bytes` of bodies held, `per_socket` events of one
//! socket, `per_user` events of one username (all its sockets together), `max_response` bytes
//! of answer, and `timeout` from the event to its answer. Over a bound, an event is refused at
//! once (the socket gets an error frame); a slow endpoint fills its own queue and no other, and
//! one user fills at most `per_user` of it. Events that are answered are sent once; an event nobody waits
//! for (`onclose`) is sent again after a network error, a timeout, a `429` or a `5xx`, up to
//! `onclose_retries` times with doubling backoff, keeping its place in `queue_bytes` meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, Uri};
use serde::Serialize;
use serde_json::{json, Value};
use switchboard_bus::{Context, Message, Reply};
use switchboard_http_client::{ClientError, ClientOptions, HttpClient};
use tokio::sync::Notify;
use tokio::time::Instant;

mod metrics;
mod sign;

use metrics::{EndpointMetrics, ErrorKind, Families};
pub use sign::{signature, verify, SIGNATURE_HEADER};

/// The message of the error frame for an event refused because the endpoint is full.
pub const QUEUE_FULL: &str = "handler queue full";
/// The message of the error frame for an answer that is not one (as on NATS).
pub const MALFORMED: &str = "malformed answer from a handler";
/// Shortest secret accepted.
pub const MIN_SECRET: usize = 16;

impl std::fmt::Debug for EndpointOptions {
    /// Never shows the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointOptions")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("topics", &self.topics)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("queue", &self.queue)
            .field("queue_bytes", &self.queue_bytes)
            .field("per_socket", &self.per_socket)
            .field("per_user", &self.per_user)
            .field("max_response", &self.max_response)
            .field("secret", &format_args!("({} bytes)", self.secret.len()))
            .field("pass_headers", &self.pass_headers)
            .field("onclose_retries", &self.onclose_retries)
            .finish_non_exhaustive()
    }
}

/// One endpoint, as the config describes it.
#[derive(Clone)]
#[non_exhaustive]
pub struct EndpointOptions {
    /// Label of its metrics and logs.
    pub name: String,
    /// Where events are `POST`ed.
    pub url: Uri,
    /// The topics it handles.
    pub topics: Vec<String>,
    /// From the event to its answer, queueing included; per attempt for `onclose`.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Events waiting for a request slot.
    pub queue: usize,
    /// Bytes of request bodies held (waiting, in flight, waiting to retry).
    pub queue_bytes: usize,
    /// Events of one socket held at once.
    pub per_socket: usize,
    /// Events of one username held at once, all its sockets together; `None`: half of
    /// `concurrency`, at least 1 ([`EndpointOptions::user_share`]).
    pub per_user: Option<usize>,
    /// Largest answer body.
    pub max_response: usize,
    /// A CA trusted beside the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The signing secret.
    pub secret: Vec<u8>,
    /// Headers copied from the event's `context.headers` onto its request.
    pub pass_headers: Vec<HeaderName>,
    /// Retries of an event nobody waits for.
    pub onclose_retries: u32,
    /// Wait before the first retry; doubled each time.
    pub retry_backoff: Duration,
    /// Tests only: each request panics once its answer is in, as a bug in the HTTP stack
    /// would, to check what a caught panic leaves behind.
    #[cfg(test)]
    panic_in_request: bool,
}

impl EndpointOptions {
    /// The most answerable events one username may have held at once: `per_user`, or by
    /// default half of `concurrency` (at least 1), so that one token holder, however many
    /// sockets it opens, leaves at least half the endpoint's requests in flight to everyone
    /// else. (Half of `concurrency + queue`, as before, let one user's queued events take
    /// every worker: another user's event waited for them to time out.)
    pub fn user_share(&self) -> usize {
        self.per_user
            .unwrap_or_else(|| (self.concurrency / 2).max(1))
    }

    /// An endpoint with the config's defaults for everything but these.
    pub fn new(name: &str, url: Uri, topics: Vec<String>, secret: Vec<u8>) -> Self {
        EndpointOptions {
            name: name.to_string(),
            url,
            topics,
            timeout: Duration::from_secs(10),
            concurrency: 32,
            queue: 256,
            queue_bytes: 16 << 20,
            per_socket: 16,
            per_user: None,
            max_response: 64 * 1024,
            ca_file: None,
            secret,
            pass_headers: Vec::new(),
            onclose_retries: 2,
            retry_backoff: Duration::from_millis(500),
            #[cfg(test)]
            panic_in_request: false,
        }
    }
}

/// Why the endpoints could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The client for an endpoint could not be built (its CA file).
    #[error("http handler `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint's name.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

/// The envelope, as on NATS.
#[derive(Serialize)]
struct Envelope<'a> {
    topic: &'a str,
    data: &'a Value,
    context: &'a Context,
}

/// One event on its way to an endpoint.
struct Job {
    /// The way back (topic and `ReplyTo`; its data and context are dropped), `None` for an
    /// event nobody waits for.
    way_back: Option<Message>,
    body: Bytes,
    id: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// When the socket stops waiting (answered events only).
    deadline: Option<Instant>,
    connection: Option<u64>,
    /// Its socket's username (answered events only), for `per_user`.
    user: Option<Arc<str>>,
    attempt: u32,
}

/// Answerable events held, by socket and by username (`per_socket`, `per_user`).
#[derive(Default)]
struct Holders {
    sockets: HashMap<u64, usize>,
    users: HashMap<Arc<str>, usize>,
}

impl Holders {
    /// Counts one more event of `connection` and `user`, unless either is at its bound.
    fn take(
        &mut self,
        connection: Option<u64>,
        user: Option<&Arc<str>>,
        per_socket: usize,
        per_user: usize,
    ) -> bool {
        let socket_full =
            connection.is_some_and(|c| self.sockets.get(&c).copied().unwrap_or(0) >= per_socket);
        let user_full = user.is_some_and(|u| self.users.get(u).copied().unwrap_or(0) >= per_user);
        if socket_full || user_full {
            return false;
        }
        if let Some(c) = connection {
            *self.sockets.entry(c).or_insert(0) += 1;
        }
        if let Some(u) = user {
            *self.users.entry(u.clone()).or_insert(0) += 1;
        }
        true
    }

    /// Gives back what `take` counted.
    fn give_back(&mut self, connection: Option<u64>, user: Option<&Arc<str>>) {
        if let Some(c) = connection {
            if let Some(n) = self.sockets.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.sockets.remove(&c);
                }
            }
        }
        if let Some(u) = user {
            if let Some(n) = self.users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    self.users.remove(u);
                }
            }
        }
    }
}

struct Endpoint {
    options: EndpointOptions,
    client: HttpClient,
    queue: flume::Sender<Job>,
    held_bytes: AtomicUsize,
    held_events: AtomicUsize,
    /// Of those, the events a socket waits for an answer to: only these count against
    /// `concurrency + queue`, so a backlog of closes never refuses a socket's next message.
    held_answered: AtomicUsize,
    /// Answerable events held per socket and per username.
    holders: Mutex<Holders>,
    /// [`EndpointOptions::user_share`], worked out once.
    per_user: usize,
    metrics: EndpointMetrics,
    idle: Arc<Notify>,
}

/// The endpoints and their topics; see the crate docs.
pub struct HttpHandlers {
    by_topic: HashMap<String, Arc<Endpoint>>,
    endpoints: Vec<Arc<Endpoint>>,
    families: Families,
    next_id: AtomicU64,
    /// Random per process, so event ids of different nodes never collide.
    token: String,
    idle: Arc<Notify>,
}

impl std::fmt::Debug for HttpHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandlers")
            .field("topics", &self.by_topic.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HttpHandlers {
    /// Builds a client per endpoint and starts its `concurrency` workers. Call within a tokio
    /// runtime.
    pub fn start(endpoints: Vec<EndpointOptions>) -> Result<Self, SetupError> {
        let families = Families::new();
        let idle = Arc::new(Notify::new());
        let mut by_topic = HashMap::new();
        let mut all = Vec::new();
        for options in endpoints {
            let mut client_options = ClientOptions::default();
            client_options.ca_file.clone_from(&options.ca_file);
            client_options.max_idle_per_host = options.concurrency;
            // No request waits longer than `timeout`: a connection the pool finishes for itself
            // gets no more, and an HTTP/2 connection silent about as long (to a PING too) is
            // dropped, or it would fail every next event of the endpoint.
            client_options.connect_timeout = options.timeout.min(Duration::from_secs(5));
            client_options.http2_keep_alive = options
                .timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(5));
            let client = HttpClient::new(&client_options).map_err(|e| SetupError::Endpoint {
                endpoint: options.name.clone(),
                reason: e.to_string(),
            })?;
            // Bounded by `admit` (events held ≤ concurrency + queue), not by the channel.
            let (tx, rx) = flume::unbounded();
            let endpoint = Arc::new(Endpoint {
                metrics: families.endpoint(&options.name),
                client,
                queue: tx,
                held_bytes: AtomicUsize::new(0),
                held_events: AtomicUsize::new(0),
                held_answered: AtomicUsize::new(0),
                holders: Mutex::new(Holders::default()),
                per_user: options.user_share(),
                idle: idle.clone(),
                options,
            });
            for _ in 0..endpoint.options.concurrency {
                // Workers hold the endpoint weakly: they end with the dispatcher.
                tokio::spawn(work(Arc::downgrade(&endpoint), rx.clone()));
            }
            for topic in &endpoint.options.topics {
                by_topic.insert(topic.clone(), endpoint.clone());
            }
            all.push(endpoint);
        }
        let mut random = [0u8; 8];
        let _ = getrandom::getrandom(&mut random);
        Ok(HttpHandlers {
            by_topic,
            endpoints: all,
            families,
            next_id: AtomicU64::new(1),
            token: sign::hex(&random),
            idle,
        })
    }

    /// True when `topic` is bound to an endpoint.
    pub fn binds(&self, topic: &str) -> bool {
        self.by_topic.contains_key(topic)
    }

    /// Hands `msg` to its topic's endpoint: queued, or refused at once (an answerable event
    /// then gets the error frame [`QUEUE_FULL`]). Never blocks. Returns the message when its
    /// topic is not bound.
    pub fn dispatch(&self, msg: Message) -> Result<(), Message> {
        let Some(endpoint) = self.by_topic.get(msg.topic()) else {
            return Err(msg);
        };
        let body = match serde_json::to_vec(&Envelope {
            topic: msg.topic(),
            data: msg.data(),
            context: msg.context(),
        }) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(topic = msg.topic(), error = %e, "event is not serializable");
                msg.deliver(Reply::HandlerFailed);
                return Ok(());
            }
        };
        let headers = endpoint.pass_headers(msg.context());
        let answered = msg.can_reply();
        // The per-socket bound is for what a socket can send; an event without a way back
        // (`onclose`, one per socket) is never refused for it, or a socket could flood the
        // endpoint and then disconnect to keep its close from the backend.
        let connection = msg.context().connection_id.filter(|_| answered);
        let user = msg.context().username.clone().filter(|_| answered);
        let id = format!(
            "{}-{}",
            self.token,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let way_back = answered.then(|| msg.way_back());
        let job = Job {
            way_back,
            deadline: answered.then(|| Instant::now() + endpoint.options.timeout),
            body,
            id,
            headers,
            connection,
            user,
            attempt: 0,
        };
        if let Err(way_back) = endpoint.admit(job) {
            endpoint.metrics.error(ErrorKind::QueueFull);
            tracing::debug!(endpoint = %endpoint.options.name, topic = msg.topic(), "event refused: endpoint full");
            if let Some(way_back) = way_back {
                way_back.deliver(Reply::Fail(json!({
                    "message": QUEUE_FULL,
                    "topic": way_back.topic(),
                })));
            }
        }
        Ok(())
    }

    /// Registers the endpoints' series (latency, requests, errors by kind, retries, events
    /// held, requests in flight; label `endpoint`).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.families.register(registry);
    }

    /// Events held by every endpoint now.
    pub fn held_events(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| e.held_events.load(Ordering::Acquire))
            .sum()
    }

    /// Resolves when no endpoint holds an event (shutdown awaits it, bounded by the drain
    /// time, so the last `onclose` events are sent before the process exits).
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.held_events() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Endpoint {
    /// The configured headers the event's socket had, as request headers.
    fn pass_headers(&self, context: &Context) -> Vec<(HeaderName, HeaderValue)> {
        if self.options.pass_headers.is_empty() {
            return Vec::new();
        }
        let map = context.headers.as_map();
        self.options
            .pass_headers
            .iter()
            .filter_map(|name| {
                let value = map.get(name.as_str())?.as_str()?;
                // From a valid request head, so valid again; checked all the same.
                Some((name.clone(), HeaderValue::from_str(value).ok()?))
            })
            .collect()
    }

    /// Takes `job` in within every bound, or hands back its way back.
    ///
    /// An event that waits for an answer counts against its socket's `per_socket`, its
    /// username's `per_user` and `concurrency + queue` answerable events; one without
    /// (`onclose`) against all events held, 64 times that count, so that a mass disconnect or
    /// a shutdown still sends every socket's close, and a backlog of closes never refuses a
    /// socket's messages. Both count against `queue_bytes`.
    fn admit(&self, job: Job) -> Result<(), Option<Message>> {
        // The socket's and the user's bounds first: an event over them must not take, even
        // for a moment, room that other users' events are counted against.
        if !lock(&self.holders).take(
            job.connection,
            job.user.as_ref(),
            self.options.per_socket,
            self.per_user,
        ) {
            return Err(job.way_back);
        }
        let answered = job.way_back.is_some();
        let most = self.options.concurrency.saturating_add(self.options.queue);
        let held = self.held_events.fetch_add(1, Ordering::AcqRel);
        let over = if answered {
            self.held_answered.fetch_add(1, Ordering::AcqRel) >= most
        } else {
            held >= most.saturating_mul(64)
        };
        let bytes = job.body.len();
        let refused = over || {
            let before = self.held_bytes.fetch_add(bytes, Ordering::AcqRel);
            if before + bytes > self.options.queue_bytes {
                self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
                true
            } else {
                false
            }
        };
        if refused {
            self.refuse_event(answered);
            self.give_back_holders(&job);
            return Err(job.way_back);
        }
        self.metrics.held.inc();
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                let job = e.into_inner();
                self.release(&job);
                Err(job.way_back)
            }
        }
    }

    /// Gives back what `job` counted against its socket and its user.
    fn give_back_holders(&self, job: &Job) {
        if job.connection.is_some() || job.user.is_some() {
            lock(&self.holders).give_back(job.connection, job.user.as_ref());
        }
    }

    /// Takes back the counts of an event just refused; wakes `idle` if that was the last.
    fn refuse_event(&self, answered: bool) {
        if answered {
            self.held_answered.fetch_sub(1, Ordering::AcqRel);
        }
        if self.held_events.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Gives back what `job` held.
    fn release(&self, job: &Job) {
        self.held_bytes.fetch_sub(job.body.len(), Ordering::AcqRel);
        if job.way_back.is_some() {
            self.held_answered.fetch_sub(1, Ordering::AcqRel);
        }
        self.give_back_holders(job);
        self.metrics.held.dec();
        if self.held_events.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// One request for `job`, within `within`.
    async fn send(
        &self,
        job: &Job,
        within: Duration,
    ) -> Result<http::Response<Bytes>, ClientError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.options.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("switchboard/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                SIGNATURE_HEADER,
                signature(&self.options.secret, now, &job.id, &job.body),
            );
        for (name, value) in &job.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(job.body.clone())
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        self.metrics.requests.inc();
        // Counted down on drop: a request that panics (caught by `guarded`) or is dropped
        // half-way is no longer in flight either.
        let _in_flight = self.metrics.in_flight();
        let started = std::time::Instant::now();
        let result = self
            .client
            .send(request, within, self.options.max_response)
            .await;
        #[cfg(test)]
        assert!(!self.options.panic_in_request, "a request panicked");
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// What became of one attempt.
enum Outcome {
    /// A 2xx and its body.
    Answered(Bytes),
    /// Worth trying again (for an event nobody waits for).
    Transient(ErrorKind),
    /// Not worth trying again.
    Final(ErrorKind),
}

fn classify(result: Result<http::Response<Bytes>, ClientError>) -> Outcome {
    match result {
        Ok(response) if response.status().is_success() => Outcome::Answered(response.into_body()),
        Ok(response) => {
            let status = response.status();
            if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
                Outcome::Transient(ErrorKind::Status)
            } else {
                Outcome::Final(ErrorKind::Status)
            }
        }
        Err(ClientError::Timeout(_)) => Outcome::Transient(ErrorKind::Timeout),
        Err(ClientError::TooLarge(_) | ClientError::HeadTooLarge(_)) => {
            Outcome::Final(ErrorKind::Malformed)
        }
        Err(_) => Outcome::Transient(ErrorKind::Network),
    }
}

/// One request for `job`, classified. A panic on the way (a bug here or in the HTTP stack
/// below) is a failed request: without this, it ended the worker (the endpoint served one
/// fewer at a time from then on) and the event's place in the bounds was never given back.
async fn send_guarded(endpoint: &Endpoint, job: &Job, within: Duration) -> Outcome {
    guarded(&endpoint.options.name, async {
        classify(endpoint.send(job, within).await)
    })
    .await
}

/// `outcome`, or a final network failure if it panics.
async fn guarded(endpoint: &str, outcome: impl std::future::Future<Output = Outcome>) -> Outcome {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(outcome).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::error!(endpoint = %endpoint, "http handler request panicked");
            Outcome::Final(ErrorKind::Network)
        }
    }
}

/// A worker: one request at a time, for as long as the endpoint lives.
async fn work(endpoint: std::sync::Weak<Endpoint>, jobs: flume::Receiver<Job>) {
    while let Ok(job) = jobs.recv_async().await {
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        match &job.way_back {
            Some(way_back) => {
                let reply = answer(&endpoint, &job, way_back).await;
                // Free first: a socket that hears its answer may send again at once.
                endpoint.release(&job);
                if let Some(reply) = reply {
                    way_back.deliver(reply);
                }
            }
            None => deliver_once(endpoint, job).await,
        }
    }
}

/// An answered event: one attempt within the socket's deadline; what to tell the socket.
async fn answer(endpoint: &Endpoint, job: &Job, way_back: &Message) -> Option<Reply> {
    let timeout = endpoint.options.timeout;
    let left = job
        .deadline
        .map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
    let timed_out = || {
        endpoint.metrics.error(ErrorKind::Timeout);
        Some(Reply::NoAnswer(json!({
            "message": format!("no handler answered within {timeout:?}"),
            "topic": way_back.topic(),
        })))
    };
    if left.is_zero() {
        return timed_out(); // it waited its whole time in the queue
    }
    let name = &endpoint.options.name;
    match send_guarded(endpoint, job, left).await {
        Outcome::Answered(body) => parse_answer(endpoint, &body),
        Outcome::Transient(ErrorKind::Timeout) => timed_out(),
        Outcome::Final(ErrorKind::Malformed) => {
            endpoint.metrics.error(ErrorKind::Malformed);
            tracing::warn!(endpoint = %name, "answer over max_response, or its head over 64 KiB");
            Some(Reply::Fail(json!({"message": MALFORMED})))
        }
        Outcome::Transient(kind) | Outcome::Final(kind) => {
            // A handler that cannot be reached or answers 500 is a handler that failed.
            endpoint.metrics.error(kind);
            tracing::warn!(endpoint = %name, kind = ?kind, "http handler failed");
            Some(Reply::HandlerFailed)
        }
    }
}

fn parse_answer(endpoint: &Endpoint, body: &[u8]) -> Option<Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None; // an empty body is `{}`: handled, nothing to say
    }
    match Reply::from_answer(body) {
        Ok(answer) => answer,
        Err(e) => {
            endpoint.metrics.error(ErrorKind::Malformed);
            tracing::warn!(endpoint = %endpoint.options.name, error = %e, "malformed answer");
            Some(Reply::Fail(json!({"message": MALFORMED})))
        }
    }
}

/// An event nobody waits for (`onclose`): sent until a 2xx or a final failure, retried after
/// a transient one with doubling backoff, at most `onclose_retries` times. Between attempts
/// it waits off the worker (a timer task), still counted in the endpoint's bounds, and goes
/// back through the queue.
async fn deliver_once(endpoint: Arc<Endpoint>, mut job: Job) {
    let timeout = endpoint.options.timeout;
    let kind = match send_guarded(&endpoint, &job, timeout).await {
        Outcome::Answered(_) => return endpoint.release(&job),
        Outcome::Final(kind) => {
            endpoint.metrics.error(kind);
            endpoint.metrics.error(ErrorKind::GaveUp);
            return endpoint.release(&job);
        }
        Outcome::Transient(kind) => kind,
    };
    endpoint.metrics.error(kind);
    if job.attempt >= endpoint.options.onclose_retries {
        endpoint.metrics.error(ErrorKind::GaveUp);
        tracing::warn!(endpoint = %endpoint.options.name, attempts = job.attempt + 1, "onclose event given up");
        return endpoint.release(&job);
    }
    let backoff = endpoint
        .options
        .retry_backoff
        .saturating_mul(1 << job.attempt.min(16));
    job.attempt += 1;
    tokio::spawn(async move {
        tokio::time::sleep(backoff).await;
        endpoint.metrics.retries.inc();
        // Already counted in the bounds: straight to the queue (an error only when the
        // dispatcher is gone).
        if let Err(e) = endpoint.queue.try_send(job) {
            endpoint.metrics.error(ErrorKind::GaveUp);
            endpoint.release(&e.into_inner());
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_that_panics_is_a_failed_request() {
        let fine = guarded("e", async { Outcome::Transient(ErrorKind::Timeout) }).await;
        assert!(matches!(fine, Outcome::Transient(ErrorKind::Timeout)));
        // An index out of bounds, as a bug below would panic.
        let kinds = [ErrorKind::Status];
        let at = std::hint::black_box(3);
        let panicked = guarded("e", async move { Outcome::Final(kinds[at]) }).await;
        assert!(matches!(panicked, Outcome::Final(ErrorKind::Network)));
    }

    /// Answers every request on `listener` with `200 {}`, each connection once.
    async fn answer_every_request(listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0; 64 * 1024];
                let _ = stream.read(&mut head).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
            });
        }
    }

    /// Collects what is delivered to a socket.
    struct Delivered(flume::Sender<Reply>);

    impl switchboard_bus::ReplyTo for Delivered {
        fn deliver(&self, _topic: &str, reply: Reply) {
            let _ = self.0.send(reply);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_panics_leaves_nothing_in_flight() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("http://{}/events", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(answer_every_request(listener));
        let mut options = EndpointOptions::new(
            "panics",
            url,
            vec!["chat:say".into()],
            b"0123456789abcdef".to_vec(),
        );
        options.panic_in_request = true;
        let handlers = HttpHandlers::start(vec![options]).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        handlers.register_metrics(&mut registry);
        let in_flight = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with("switchboard_http_handler_in_flight{"))
                .unwrap_or_else(|| panic!("no in_flight series in\n{text}"))
                .to_string();
            line.rsplit(' ').next().unwrap().to_string()
        };

        for _ in 0..3 {
            let (tx, rx) = flume::unbounded();
            let msg = Message::new("chat:say", json!({"text": "hi"}))
                .with_reply_to(Arc::new(Delivered(tx)));
            handlers.dispatch(msg).unwrap();
            // The panic is caught: the socket hears that the handler failed.
            assert_eq!(rx.recv_async().await.unwrap(), Reply::HandlerFailed);
            handlers.idle().await;
            assert_eq!(in_flight(), "0", "after a request that panicked");
        }
    }

    #[test]
    fn a_users_share_is_half_the_room_unless_set() {
        let url: Uri = "http://127.0.0.1:1/".parse().unwrap();
        let mut o = EndpointOptions::new("e", url, vec![], b"0123456789abcdef".to_vec());
        assert_eq!(o.user_share(), 32 / 2);
        (o.concurrency, o.queue) = (1, 2);
        assert_eq!(o.user_share(), 1);
        o.queue = 0;
        assert_eq!(o.user_share(), 1, "never 0");
        o.per_user = Some(7);
        assert_eq!(o.user_share(), 7);
    }

    #[test]
    fn holders_bound_each_socket_and_each_user_and_give_back_exactly() {
        let mut h = Holders::default();
        let (alex, sam): (Arc<str>, Arc<str>) = (Arc::from("alex"), Arc::from("sam"));
        // per_socket 2, per_user 3: alex's first socket takes 2, the second 1 more.
        assert!(h.take(Some(1), Some(&alex), 2, 3));
        assert!(h.take(Some(1), Some(&alex), 2, 3));
        assert!(
            !h.take(Some(1), Some(&alex), 2, 3),
            "socket 1 at per_socket"
        );
        assert!(h.take(Some(2), Some(&alex), 2, 3));
        assert!(!h.take(Some(2), Some(&alex), 2, 3), "alex at per_user");
        assert!(h.take(Some(3), Some(&sam), 2, 3));
        // A refusal counted nothing: giving back what was taken empties both maps.
        for (conn, user) in [(1, &alex), (1, &alex), (2, &alex), (3, &sam)] {
            h.give_back(Some(conn), Some(user));
        }
        assert!(h.sockets.is_empty() && h.users.is_empty());
        // An event without a username (none comes from a socket today) is bound by its
        // socket alone.
        assert!(h.take(Some(4), None, 1, 1));
        assert!(!h.take(Some(4), None, 1, 1));
        assert!(h.take(Some(5), None, 1, 1));
    }
}
