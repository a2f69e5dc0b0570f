//! The spec's semantics on top of the transport: what is published when, and what the
//! client sees of replies and failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Map, Value};
use switchboard_bus::{Bus, Context, JsonObject, Message, Reply, ReplyTo};
use switchboard_core::http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use switchboard_core::{
    plain_response, BoxFuture, CloseReason, HttpResponse, Inbound, RequestParts, Service, SocketRef,
};
use switchboard_http_handlers::HttpHandlers;
use switchboard_registry::{ConnId, Registry, Target};

use crate::auth::{AuthError, Identity, Verifier};
use crate::expiry::Expiries;
use crate::inbound::{decode_client_message, decode_client_text, BadMessage, ClientMessage};
use crate::metrics::Metrics;
use crate::rate::{Bucket, RateLimit, Verdict};
use crate::stats::GatewayStats;
use crate::Routes;

/// The longest namespace an upgrade may ask for, in bytes once percent-decoded (longer gets
/// `400`). Namespaces are kept per socket, sent to handlers and used as a metrics label: a
/// request head's worth (kilobytes) of name is not a tenant. Centrifugo's default channel
/// length limit is 255.
pub const MAX_NAMESPACE_BYTES: usize = 256;
/// The refusal's text, which names the bound: a static body, so the number is written out,
/// and the assertion keeps the two together.
const NAMESPACE_TOO_LONG: &str = "namespace longer than 256 bytes\n";
const _: () = assert!(MAX_NAMESPACE_BYTES == 256, "update NAMESPACE_TOO_LONG");

/// Close code sent after an `onconnect` handler's `fail`.
pub const CONNECT_FAILED_CODE: u16 = 1008;
/// Close code for a socket that kept sending over its rate limit.
pub const RATE_LIMIT_CLOSE_CODE: u16 = 1008;
/// Close code after a connect handler errors or panics, or (with the connect gate) does not
/// answer in time.
pub const CONNECT_HANDLER_ERROR_CODE: u16 = 1011;
/// Close code when a socket's token expires (`auth.close_on_expiry`).
pub const TOKEN_EXPIRED_CODE: u16 = 4001;
/// Close code when an in-band refresh brings a token for another user, or one that does not
/// allow the socket's namespace.
pub const REFRESH_MISMATCH_CODE: u16 = 1008;
/// The message `type` of an in-band token refresh (answered by the gateway, never published).
pub use switchboard_config::REFRESH_TYPE;
/// The `type` of the gateway's answer to an accepted refresh.
pub const REFRESHED_TYPE: &str = "$refreshed";

/// At most this many bytes of a socket's context text are request headers (beside the claims
/// at `jwt`), counted as JSON text ([`json_len`]).
const MAX_CONTEXT_HEADER_BYTES: usize = 4096;
/// At most this many bytes of JSON text are a socket's query parameters ([`json_len`]).
const MAX_CONTEXT_PARAM_BYTES: usize = 4096;
/// At most this many query parameters are kept: a parsed parameter costs about 100 bytes
/// however short, so 4 KiB of two-letter ones would make a map of some 200 KiB.
const MAX_CONTEXT_PARAMS: usize = 64;
/// A socket may have one `$refresh` verified per this interval; more are refused unverified.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The longest token a `$refresh` may bring.
const MAX_REFRESH_TOKEN: usize = 16 * 1024;

/// Topics the gateway publishes to, from the config.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) onconnect: Option<Arc<str>>,
    pub(crate) onmessage: Option<Route>,
    /// Looked up per message by the client's `type`; the table is fixed at start-up, so a
    /// fast hash (foldhash) is safe here: lookups cannot grow or skew it.
    pub(crate) types: foldhash::HashMap<String, Route>,
    pub(crate) onclose: Option<Arc<str>>,
}

/// A topic socket messages are published to, with its `messages_in` counter.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) topic: Arc<str>,
    pub(crate) messages_in: Counter,
}

impl Route {
    pub(crate) fn new(topic: &str, metrics: &Metrics) -> Self {
        Route {
            topic: topic.into(),
            messages_in: metrics.topic(topic).messages_in().clone(),
        }
    }
}

/// What replies need from the gateway: the counters and the metrics.
pub(crate) struct Observe {
    pub(crate) stats: Arc<GatewayStats>,
    pub(crate) metrics: Arc<Metrics>,
}

pub(crate) struct Gateway {
    pub(crate) hooks: Hooks,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) registry: Arc<Registry<SocketRef>>,
    pub(crate) verifier: Verifier,
    pub(crate) routes: Routes,
    pub(crate) observe: Arc<Observe>,
    pub(crate) max_sockets_per_user: Option<usize>,
    /// The same limit at admission, with the upgrades in flight counted.
    pub(crate) user_limit: Option<Arc<crate::user_limit::UserLimit>>,
    pub(crate) rate_limit: Option<RateLimit>,
    /// `socket.context_headers`, parsed.
    pub(crate) context_headers: Vec<HeaderName>,
    /// `onconnect.gate`: how long a socket waits for its verdict.
    pub(crate) gate_timeout: Option<Duration>,
    /// `auth.close_on_expiry`: the sockets' expiry times.
    pub(crate) expiries: Option<Arc<Expiries>>,
    /// `gateway.http_handlers`: topics this node sends to HTTP endpoints itself.
    pub(crate) http_handlers: Option<Arc<HttpHandlers>>,
}

/// What admission learned, handed to `open`.
pub(crate) struct Admitted {
    username: Arc<str>,
    namespace: Option<Arc<str>>,
    exp: u64,
    context: SocketContext,
    /// The user's place under `max_sockets_per_user`, until the socket is registered.
    reserved: Option<crate::user_limit::Reservation>,
}

/// What handlers see of a socket, kept as JSON text: the copied request headers with the
/// verified claims at `jwt`, and the query parameters. Each message gets a [`Context`] that
/// shares this text and parses it only if a handler reads it, so an idle socket holds two
/// strings rather than three maps.
struct SocketContext {
    headers: Arc<str>,
    params: Arc<str>,
}

pub(crate) struct Session {
    id: ConnId,
    handle: SocketRef,
    username: Arc<str>,
    namespace: Option<Arc<str>>,
    /// What every message of this socket carries as its context, built once: each message
    /// shares it (one reference count) instead of a context of its own. Replaced when the
    /// client refreshes its token (the claims in its headers change).
    context: Mutex<Arc<Context>>,
    /// The current token's `exp` (seconds since the epoch), where the expiry queue files this
    /// socket. Only the socket's own task changes it (a `$refresh`).
    exp: AtomicU64,
    /// When the last `$refresh` was verified, in milliseconds on the gateway's clock (0: never).
    last_refresh: AtomicU64,
    /// Boxed: only with `limits.messages_per_second`.
    bucket: Option<Box<Mutex<Bucket>>>,
    /// With the connect gate: whether the verdict has let the socket in.
    gate: Option<Arc<Gate>>,
}

impl Session {
    /// The context of one message from this socket.
    fn context(&self) -> Arc<Context> {
        lock(&self.context).clone()
    }

    /// After a message (or the connect event) was published: the shared context is kept for
    /// the next message only if nothing else holds it and nobody read its headers or params.
    /// A handler that read them made their maps, which may be many times the text's size
    /// (and a handler still at work may yet read them): the socket then takes a fresh
    /// context from the same text, so that it never holds the maps for as long as it lives,
    /// idle or not. The old one goes with the last message that holds it.
    fn settle_context(&self) {
        let mut context = lock(&self.context);
        let shared = Arc::strong_count(&context) > 1 || Arc::weak_count(&context) > 0;
        if !shared && !context.headers.is_parsed() && !context.params.is_parsed() {
            return;
        }
        let fresh = Session::context_of(
            self.id,
            &self.username,
            &self.namespace,
            shared_text(&context.headers),
            shared_text(&context.params),
        );
        let old = std::mem::replace(&mut *context, fresh);
        drop(context);
        drop(old); // maps freed outside the lock, if this was the last holder
    }

    /// The context of a socket, from its identity and the JSON text of its headers and
    /// query parameters.
    fn context_of(
        id: ConnId,
        username: &Arc<str>,
        namespace: &Option<Arc<str>>,
        headers: Arc<str>,
        params: Arc<str>,
    ) -> Arc<Context> {
        Arc::new(Context::for_connection(
            id.0,
            username.clone(),
            namespace.clone(),
            JsonObject::from_json_text(headers),
            JsonObject::from_json_text(params),
        ))
    }
}

/// The JSON text a context's object was made from, shared (contexts are only ever made from
/// text; `{}` otherwise).
fn shared_text(object: &JsonObject) -> Arc<str> {
    object
        .shared_json_text()
        .cloned()
        .unwrap_or_else(|| Arc::from("{}"))
}

/// Milliseconds since the first call, from a monotonic clock (never 0).
fn clock_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub use crate::outbound::encode_frame;

fn error_frame(payload: &Value) -> Bytes {
    encode_frame("error", payload)
}

fn internal_error(topic: &str) -> Value {
    json!({"message": "internal error in a handler", "topic": topic})
}

/// Where a message's replies go, and what they mean there.
enum Answering {
    /// A socket's message: `{type: topic, payload}`; `fail` sends an error frame.
    Message,
    /// The connect handler: `onconnect` frames; it is the gatekeeper, so it fails closed
    /// (`fail` closes with 1008, an error or panic with 1011).
    Connect,
    /// The connect handler with the gate on: as `Connect`, and its first `reply` lets the
    /// socket in.
    Gate(Arc<Gate>),
}

/// The way back to a socket for one published message. Remembers when it was published, for
/// the reply latency histogram. A socket that has gone makes every send fail quietly.
struct Replies {
    handle: SocketRef,
    answering: Answering,
    observe: Arc<Observe>,
    published: Instant,
}

impl ReplyTo for Replies {
    fn deliver(&self, topic: &str, reply: Reply) {
        let metrics = &self.observe.metrics;
        let topic_metrics = metrics.topic(topic);
        topic_metrics
            .reply_latency()
            .observe(self.published.elapsed().as_secs_f64());
        let on_connect = !matches!(self.answering, Answering::Message);
        let kind = if on_connect { "onconnect" } else { topic };
        let errors = &metrics.errors;
        let closing = match reply {
            Reply::Ok(payload) => {
                // With the gate, the socket is let in (or turned away) before it hears yes.
                let let_in = match &self.answering {
                    Answering::Gate(gate) => gate.let_in(),
                    _ => true,
                };
                if let_in && self.handle.send_text(encode_frame(kind, &payload)).is_ok() {
                    topic_metrics.messages_out().inc();
                }
                None
            }
            Reply::Fail(error) => {
                errors.fail.inc();
                let _ = self.handle.send_text(error_frame(&error));
                Some((CONNECT_FAILED_CODE, "connection refused by handler"))
            }
            Reply::HandlerFailed => {
                GatewayStats::bump(&self.observe.stats.handler_failures);
                errors.handler_error.inc();
                let _ = self.handle.send_text(error_frame(&internal_error(topic)));
                Some((CONNECT_HANDLER_ERROR_CODE, "connect handler failed"))
            }
            Reply::NoAnswer(error) => {
                errors.fail.inc();
                let _ = self.handle.send_text(error_frame(&error));
                // Silence is no verdict: only a socket waiting at the gate for one is closed
                // (as at the gate's own timeout); otherwise the connect event was news.
                matches!(self.answering, Answering::Gate(_))
                    .then_some((CONNECT_HANDLER_ERROR_CODE, "connect handler did not answer"))
            }
            _ => None,
        };
        if let (true, Some((code, reason))) = (on_connect, closing) {
            if let Answering::Gate(gate) = &self.answering {
                gate.shut();
            }
            GatewayStats::bump(&self.observe.stats.connect_failures);
            self.handle.close(code, reason);
        }
    }
}

/// With the connect gate on: a socket that waits for its connect handler's verdict. Until
/// then it is not in the registry (no `send`/`broadcast` reaches it) and its reading is
/// paused (nothing it sends is read, so nothing is published). The state is behind a lock so
/// that a verdict and the socket's end cannot cross: a socket is registered at most once, and
/// never after it has ended.
pub(crate) struct Gate {
    state: Mutex<GateState>,
    id: ConnId,
    username: Arc<str>,
    namespace: Option<Arc<str>>,
    handle: SocketRef,
    registry: Arc<Registry<SocketRef>>,
    /// `limits.max_sockets_per_user`, checked again at the verdict: sockets that waited at
    /// the gate were not counted at admission.
    max_sockets_per_user: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    Waiting,
    Open,
    Shut,
}

impl Gate {
    /// The verdict is yes: register the socket and read what it sent meanwhile, unless its
    /// user has reached `max_sockets_per_user` while it waited (then it is closed). True if
    /// the socket is in (a later `reply` of an open gate too).
    fn let_in(&self) -> bool {
        let mut state = lock(&self.state);
        match *state {
            GateState::Open => return true,
            GateState::Shut => return false,
            GateState::Waiting => {}
        }
        if let Some(max) = self.max_sockets_per_user {
            // Verdicts of one user's sockets at the same moment may overshoot by their number,
            // as handshakes do at admission.
            if self.registry.count(Target::User(&self.username)) >= max {
                *state = GateState::Shut;
                drop(state);
                self.handle
                    .close(CONNECT_FAILED_CODE, "too many sockets for this user");
                return false;
            }
        }
        self.registry.insert_shared(
            self.id,
            self.username.clone(),
            self.namespace.clone(),
            self.handle.clone(),
        );
        *state = GateState::Open;
        drop(state);
        self.handle.resume_reading();
        true
    }

    /// The verdict is no, or the socket has ended: it will never be let in (and leaves the
    /// registry if it was).
    fn shut(&self) {
        let mut state = lock(&self.state);
        if *state == GateState::Open {
            self.registry.remove(self.id);
        }
        *state = GateState::Shut;
    }

    /// The wait is over: shuts the gate if no verdict came; true if it did that.
    fn expire(&self) -> bool {
        let mut state = lock(&self.state);
        let waiting = *state == GateState::Waiting;
        if waiting {
            *state = GateState::Shut;
        }
        waiting
    }
}

impl Gateway {
    fn publish(&self, msg: Message) {
        // A topic bound to an HTTP endpoint is called from here, the node that holds the
        // socket, and never reaches the bus: once per event however many nodes there are.
        let msg = match &self.http_handlers {
            Some(http) => match http.dispatch(msg) {
                Ok(()) => return,
                Err(unbound) => unbound,
            },
            None => msg,
        };
        if let Err(e) = self.bus.publish(msg) {
            GatewayStats::bump(&self.observe.stats.publish_failures);
            tracing::warn!(error = %e, "publish failed");
            let topic = e.message.topic().to_string();
            e.message
                .fail(json!({"message": "could not publish", "topic": topic}));
        }
    }

    fn replies(&self, handle: &SocketRef, answering: Answering) -> Arc<dyn ReplyTo> {
        Arc::new(Replies {
            handle: handle.clone(),
            answering,
            observe: self.observe.clone(),
            published: Instant::now(),
        })
    }

    fn stats(&self) -> &GatewayStats {
        &self.observe.stats
    }

    /// The headers handlers see: the configured ones (at most
    /// [`MAX_CONTEXT_HEADER_BYTES`] of them) and the verified claims at `jwt`, as JSON text.
    fn context_headers(&self, headers: &HeaderMap, claims: &Map<String, Value>) -> Arc<str> {
        let mut copied = Map::new();
        let mut bytes = 0;
        for name in &self.context_headers {
            let mut values = headers.get_all(name).iter();
            let Some(first) = values.next() else {
                continue;
            };
            let mut value = String::from_utf8_lossy(first.as_bytes()).into_owned();
            for more in values {
                value.push_str(", ");
                value.push_str(&String::from_utf8_lossy(more.as_bytes()));
            }
            bytes += json_len(name.as_str()) + json_len(&value) + ENTRY_SYNTAX;
            if bytes > MAX_CONTEXT_HEADER_BYTES {
                break;
            }
            copied.insert(name.as_str().to_string(), Value::String(value));
        }
        copied.insert("jwt".into(), Value::Object(claims.clone()));
        serde_json::to_string(&copied).unwrap_or_default().into()
    }

    /// Answers `{"type":"$refresh","payload":{"token":...}}`: a fresh token for the same user,
    /// verified exactly as at the upgrade, moves the socket's expiry and claims; a token for
    /// another user (or one that does not allow the socket's namespace) closes the socket; an
    /// invalid one gets an error frame and changes nothing.
    fn refresh(&self, s: &Session, data: &Value) {
        let stats = self.stats();
        let token = data
            .get("payload")
            .and_then(|p| p.get("token"))
            .and_then(Value::as_str);
        let Some(token) = token else {
            return self.refuse_refresh(s, "send {\"payload\":{\"token\":\"...\"}}");
        };
        if token.len() > MAX_REFRESH_TOKEN {
            return self.refuse_refresh(
                s,
                &format!("the token is longer than {MAX_REFRESH_TOKEN} bytes"),
            );
        }
        // Each verification costs a signature check: one per second per socket. (Refreshes of
        // one socket come from its task, one at a time.)
        let now = clock_millis();
        let last = s.last_refresh.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MIN_REFRESH_INTERVAL.as_millis() as u64 {
            return self.refuse_refresh(s, "too frequent: at most one per second");
        }
        s.last_refresh.store(now, Ordering::Relaxed);
        // A token of a key rotated in starts the (rate-limited) refetch; this refresh is
        // refused, the client's next try finds the key.
        drop(self.verifier.prepare_token(token));
        let identity = match self.verifier.verify_token(token) {
            Ok(identity) => identity,
            Err(e) => return self.refuse_refresh(s, &e.to_string()),
        };
        if *identity.username != *s.username {
            return self.close_for_mismatch(s, "the token is for another user");
        }
        if let Some(ns) = &s.namespace {
            if !self.verifier.namespace_allowed(&identity, ns) {
                return self.close_for_mismatch(s, "the token does not allow this namespace");
            }
        }
        // The claims handlers see become the new token's.
        let mut context = lock(&s.context);
        let mut headers: Map<String, Value> =
            serde_json::from_str(context.headers.json_text().unwrap_or("{}")).unwrap_or_default();
        headers.insert("jwt".into(), Value::Object(identity.claims));
        let headers = serde_json::to_string(&headers).unwrap_or_default().into();
        let params = shared_text(&context.params);
        *context = Session::context_of(s.id, &s.username, &s.namespace, headers, params);
        drop(context);
        if let Some(expiries) = &self.expiries {
            let old = s.exp.swap(identity.exp, Ordering::AcqRel);
            expiries.refile(old, identity.exp, s.id, &s.handle);
        }
        GatewayStats::bump(&stats.refreshes);
        let _ = s
            .handle
            .send_text(encode_frame(REFRESHED_TYPE, &json!({"exp": identity.exp})));
    }

    /// A verified token that cannot be this socket's: the error frame, then close `1008`
    /// (the socket may not go on under a token that does not cover it).
    fn close_for_mismatch(&self, s: &Session, why: &str) {
        GatewayStats::bump(&self.stats().refresh_mismatches);
        self.send_refresh_refusal(s, why);
        s.handle
            .close(REFRESH_MISMATCH_CODE, &format!("refresh: {why}"));
    }

    fn refuse_refresh(&self, s: &Session, why: &str) {
        GatewayStats::bump(&self.stats().refreshes_refused);
        self.send_refresh_refusal(s, why);
    }

    /// The error frame of a refused `$refresh`.
    fn send_refresh_refusal(&self, s: &Session, why: &str) {
        self.observe.metrics.errors.refresh.inc();
        let frame = json!({"message": format!("refresh refused: {why}"), "type": REFRESH_TYPE});
        let _ = s.handle.send_text(error_frame(&frame));
    }

    /// The rate limit's verdict on one message or ping; `false` drops it (the first of a run
    /// of refusals gets an error frame, and a socket that goes on is closed).
    fn within_rate(&self, s: &Session) -> bool {
        let (Some(bucket), Some(limit)) = (&s.bucket, self.rate_limit) else {
            return true;
        };
        let verdict = lock(bucket).take(limit, Instant::now());
        let stats = self.stats();
        match verdict {
            Verdict::Accept => true,
            Verdict::Refuse { first } => {
                GatewayStats::bump(&stats.rate_limited);
                if first {
                    self.observe.metrics.errors.rate_limited.inc();
                    let _ = s.handle.send_text(error_frame(&json!({
                        "message": "rate limit exceeded; messages are dropped until you slow down",
                    })));
                }
                false
            }
            Verdict::Close => {
                GatewayStats::bump(&stats.rate_limited);
                GatewayStats::bump(&stats.rate_limit_closes);
                s.handle.close(RATE_LIMIT_CLOSE_CODE, "rate limit exceeded");
                false
            }
        }
    }
}

/// The query parameters as a JSON object's text (`{}` shared by every socket without any), at
/// most [`MAX_CONTEXT_PARAM_BYTES`] of text and [`MAX_CONTEXT_PARAMS`] parameters (in order;
/// `namespace` is read apart from them).
fn params_text(query: Option<&str>) -> Arc<str> {
    static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
    let mut params = Map::new();
    let mut bytes = 1; // the `{`; each entry brings its `,` or the closing `}`
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        bytes += json_len(&k) + json_len(&v) + ENTRY_SYNTAX;
        if bytes > MAX_CONTEXT_PARAM_BYTES || params.len() >= MAX_CONTEXT_PARAMS {
            break;
        }
        params.insert(k.into_owned(), Value::String(v.into_owned()));
    }
    if params.is_empty() {
        return EMPTY.get_or_init(|| Arc::from("{}")).clone();
    }
    serde_json::to_string(&params).unwrap_or_default().into()
}

/// The bytes of an object entry's text besides its name and value: their quotes, the `:`, and
/// the `,` (or `}`) after it.
const ENTRY_SYNTAX: usize = 6;

/// The bytes `s` takes inside the quotes of a JSON string as serde_json writes it: what a
/// socket's context text holds, not the decoded bytes. A control character (`%01` in a query)
/// is six bytes there (`\u0001`), a quote or backslash two, so counting decoded bytes let a
/// client make a context's text several times the bound.
fn json_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
                0..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
}

impl Gateway {
    /// Answers a decoded client message: an error frame if it was bad, the gateway's own
    /// answer to a `$refresh`, else publishes it to its topics.
    fn on_decoded(&self, s: &Session, decoded: Result<ClientMessage, BadMessage>) {
        let message = match decoded {
            Ok(m) => m,
            Err(bad) => {
                GatewayStats::bump(&self.stats().bad_messages);
                self.observe.metrics.errors.bad_message.inc();
                let _ = s
                    .handle
                    .send_text(error_frame(&json!({"message": bad.to_string()})));
                return;
            }
        };
        let kind = message.message_type();
        if kind == REFRESH_TYPE {
            return self.refresh(s, &message.into_data());
        }
        GatewayStats::bump(&self.stats().messages_in);
        let typed_topic = self.hooks.types.get(kind);
        let (first, last) = match (&self.hooks.onmessage, typed_topic) {
            (None, None) => return, // no topic for it
            (Some(general), Some(typed)) => (Some(general), typed),
            (Some(only), None) | (None, Some(only)) => (None, only),
        };
        let data = Arc::new(message.into_data());
        let context = s.context();
        // One way back for both topics: it carries the publish time for the latency series.
        let reply_to = self.replies(&s.handle, Answering::Message);
        let publish = |route: &Route, data, context, reply_to| {
            route.messages_in.inc();
            self.publish(
                Message::shared(route.topic.clone(), data, context).with_reply_to(reply_to),
            )
        };
        if let Some(general) = first {
            publish(general, data.clone(), context.clone(), reply_to.clone());
        }
        // The last (usually the only) topic takes the shared parts instead of clones.
        publish(last, data, context, reply_to);
        s.settle_context();
    }
}

impl Service for Gateway {
    type Admission = Admitted;
    type Session = Session;

    fn prepare_admit(&self, headers: &HeaderMap) -> Option<BoxFuture<'static, ()>> {
        self.verifier.prepare(headers)
    }

    fn admit(&self, request: &RequestParts) -> Result<Admitted, HttpResponse> {
        let identity: Identity = self.verifier.verify(&request.headers).map_err(|e| {
            tracing::debug!(error = %e, "refused upgrade");
            let mut res = Response::new(Bytes::from(format!("{e}\n")));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if e == AuthError::NoKeys {
                // Not the client's fault: it may try again once the keys are fetched.
                GatewayStats::bump(&self.stats().refused_no_keys);
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return res;
            }
            GatewayStats::bump(&self.stats().refused_unauthorized);
            *res.status_mut() = StatusCode::UNAUTHORIZED;
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            res
        })?;
        let query = request.uri.query().unwrap_or_default();
        let mut asked = query.split('&').filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (crate::api::form_decode(name).ok()? == "namespace").then_some(value)
        });
        let namespace = asked.next();
        if asked.next().is_some() {
            // One value is checked against the token; handlers read `params`, where another
            // would win: a second `namespace` could name a tenant nobody checked.
            GatewayStats::bump(&self.stats().refused_namespace_repeated);
            return Err(plain_response(
                StatusCode::BAD_REQUEST,
                "namespace given more than once\n",
            ));
        }
        // Decoded strictly: bytes that are not UTF-8 would otherwise become U+FFFD, a
        // namespace the client did not name, checked against the token and shown to handlers.
        let Ok(namespace) = namespace.map(crate::api::form_decode).transpose() else {
            GatewayStats::bump(&self.stats().refused_namespace_not_utf8);
            return Err(plain_response(
                StatusCode::BAD_REQUEST,
                "namespace is not UTF-8 once percent-decoded\n",
            ));
        };
        if namespace
            .as_ref()
            .is_some_and(|ns| ns.len() > MAX_NAMESPACE_BYTES)
        {
            GatewayStats::bump(&self.stats().refused_namespace_too_long);
            return Err(plain_response(StatusCode::BAD_REQUEST, NAMESPACE_TOO_LONG));
        }
        let namespace = namespace
            .filter(|ns| !ns.is_empty())
            .map(|ns| Arc::<str>::from(ns.as_str()));
        if let Some(ns) = &namespace {
            if !self.verifier.namespace_allowed(&identity, ns) {
                GatewayStats::bump(&self.stats().refused_namespace);
                return Err(plain_response(
                    StatusCode::FORBIDDEN,
                    "namespace not allowed for this token\n",
                ));
            }
        }
        let username: Arc<str> = identity.username.as_str().into();
        let mut reserved = None;
        if let Some(limit) = &self.user_limit {
            // Checked here, before the upgrade, with this user's upgrades in flight counted.
            reserved = limit.reserve(&username, || {
                self.registry.count(Target::User(&identity.username))
            });
            if reserved.is_none() {
                GatewayStats::bump(&self.stats().refused_user_limit);
                let mut res = plain_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many sockets for this user\n",
                );
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return Err(res);
            }
        }
        let context = SocketContext {
            headers: self.context_headers(&request.headers, &identity.claims),
            params: params_text(request.uri.query()),
        };
        Ok(Admitted {
            username,
            namespace,
            exp: identity.exp,
            context,
            reserved,
        })
    }

    fn open(&self, a: Admitted, handle: SocketRef) -> Session {
        let id = self.registry.next_id();
        let gate = self.gate_timeout.map(|timeout| {
            // Nothing is read until the verdict; the socket is registered by it.
            handle.pause_reading();
            let gate = Arc::new(Gate {
                state: Mutex::new(GateState::Waiting),
                id,
                username: a.username.clone(),
                namespace: a.namespace.clone(),
                handle: handle.clone(),
                registry: self.registry.clone(),
                max_sockets_per_user: self.max_sockets_per_user,
            });
            // Weak: a socket that has ended is not kept (nor its file descriptor) by the timer.
            let waiting: Weak<Gate> = Arc::downgrade(&gate);
            let observe = self.observe.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let Some(gate) = waiting.upgrade() else {
                    return;
                };
                if gate.expire() {
                    GatewayStats::bump(&observe.stats.gate_timeouts);
                    gate.handle
                        .close(CONNECT_HANDLER_ERROR_CODE, "connect handler did not answer");
                }
            });
            gate
        });
        if gate.is_none() {
            self.registry.insert_shared(
                id,
                a.username.clone(),
                a.namespace.clone(),
                handle.clone(),
            );
        }
        // Registered (or waiting at the gate, which checks the limit again at its verdict):
        // the registry counts it from here.
        drop(a.reserved);
        if let Some(expiries) = &self.expiries {
            expiries.file(a.exp, id, &handle);
        }
        let context = Session::context_of(
            id,
            &a.username,
            &a.namespace,
            a.context.headers,
            a.context.params,
        );
        let session = Session {
            id,
            handle,
            username: a.username,
            namespace: a.namespace,
            context: Mutex::new(context),
            exp: AtomicU64::new(a.exp),
            last_refresh: AtomicU64::new(0),
            bucket: self
                .rate_limit
                .map(|l| Box::new(Mutex::new(Bucket::new(l)))),
            gate,
        };
        // Escaped: a username (a token's claim) may hold newlines or escape codes.
        // As `&str` values: the text format quotes and escapes them (a username cannot pass
        // for another field), and JSON writes them as plain strings.
        tracing::debug!(
            connection = %id,
            username = &*session.username,
            namespace = session.namespace.as_deref().unwrap_or(""),
            "socket open"
        );
        if let Some(topic) = &self.hooks.onconnect {
            let answering = match &session.gate {
                Some(gate) => Answering::Gate(gate.clone()),
                None => Answering::Connect,
            };
            let data = json!({
                "connection_id": id.0,
                "username": &*session.username,
                "namespace": session.namespace.as_deref(),
            });
            self.publish(
                Message::new(topic.clone(), data)
                    .with_context(session.context())
                    .with_reply_to(self.replies(&session.handle, answering)),
            );
            session.settle_context();
        } else if let Some(gate) = &session.gate {
            gate.let_in(); // nobody to ask
        }
        session
    }

    fn on_ping(&self, s: &Session) -> bool {
        self.within_rate(s)
    }

    fn on_message(&self, s: &Session, message: Inbound) {
        if !self.within_rate(s) {
            return;
        }
        let decoded = match &message {
            Inbound::Text(text) => decode_client_message(text),
            Inbound::Binary(_) => Err(BadMessage::Binary),
        };
        self.on_decoded(s, decoded);
    }

    /// A text message lent by the transport: parsed where it lies, without a copy.
    fn on_text(&self, s: &Session, text: &str) {
        if !self.within_rate(s) {
            return;
        }
        self.on_decoded(s, decode_client_text(text));
    }

    fn on_close(&self, s: Session, reason: CloseReason) {
        match &s.gate {
            Some(gate) => gate.shut(),
            None => {
                self.registry.remove(s.id);
            }
        }
        if let Some(expiries) = &self.expiries {
            expiries.unfile(s.exp.load(Ordering::Acquire), s.id);
        }
        if matches!(
            reason,
            CloseReason::Server {
                code: TOKEN_EXPIRED_CODE,
                ..
            }
        ) {
            GatewayStats::bump(&self.stats().token_expiry_closes);
        }
        tracing::debug!(connection = %s.id, ?reason, "socket closed");
        if let Some(topic) = &self.hooks.onclose {
            let data = json!({
                "connection_id": s.id.0,
                "username": &*s.username,
                "namespace": s.namespace.as_deref(),
                "reason": describe_close(&reason),
            });
            self.publish(Message::new(topic.clone(), data).with_context(s.context()));
        }
    }

    fn http(&self, request: &RequestParts) -> HttpResponse {
        match self.routes.get(request.uri.path()) {
            Some(route) => route(request),
            None => plain_response(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// The `reason` object of an `onclose` message.
fn describe_close(reason: &CloseReason) -> Value {
    match reason {
        CloseReason::Client { code, reason } => {
            json!({"by": "client", "code": code, "reason": reason})
        }
        CloseReason::Dropped => json!({"by": "client", "kind": "dropped"}),
        CloseReason::HeartbeatTimeout => json!({"by": "server", "kind": "heartbeat_timeout"}),
        CloseReason::Protocol { code, detail } => {
            json!({"by": "server", "kind": "protocol_error", "code": code, "reason": detail})
        }
        CloseReason::Server { code, reason } if *code == TOKEN_EXPIRED_CODE => {
            json!({"by": "server", "kind": "token_expired", "code": code, "reason": reason})
        }
        CloseReason::Server { code, reason } => {
            json!({"by": "server", "kind": "closed", "code": code, "reason": reason})
        }
        CloseReason::Shutdown => json!({"by": "server", "kind": "shutdown", "code": 1001}),
        CloseReason::SlowConsumer => {
            json!({"by": "server", "kind": "slow_consumer", "code": switchboard_core::SLOW_CONSUMER_CODE})
        }
        CloseReason::OverBudget => {
            json!({"by": "server", "kind": "over_budget", "code": switchboard_core::OVER_BUDGET_CODE})
        }
        CloseReason::Io(e) => json!({"by": "network", "kind": "io_error", "reason": e}),
        _ => json!({"kind": "unknown"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_what_serde_json_writes() {
        let mut every: String = (0u8..0x80).map(char::from).collect();
        every.push_str("é€😀\u{2028}");
        for s in [every.as_str(), "", "plain", "\"\\", "\u{1}\u{1f}\u{7f}"] {
            assert_eq!(
                json_len(s) + 2,
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn the_params_kept_are_bounded_in_bytes_and_in_number() {
        let many: Vec<String> = (0..2048).map(|i| format!("k{i}=")).collect();
        let kept: Map<String, Value> =
            serde_json::from_str(&params_text(Some(&many.join("&")))).unwrap();
        assert_eq!(kept.len(), MAX_CONTEXT_PARAMS);
        let long = format!("a={}&b=1", "x".repeat(MAX_CONTEXT_PARAM_BYTES));
        assert_eq!(&*params_text(Some(&long)), "{}");
        assert_eq!(
            &*params_text(Some("namespace=acme&x=%C3%A9")),
            r#"{"namespace":"acme","x":"é"}"#
        );
    }
}
