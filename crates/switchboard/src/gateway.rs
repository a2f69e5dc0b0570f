//! The spec's semantics on top of the transport: what is published when, and what the
//! client sees of replies and failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::{json, Map, Value};
use switchboard_bus::{Bus, Context, Message, Reply, ReplyTo};
use switchboard_registry::{ConnId, Registry, Target};
use switchboard_transport::http::{header, HeaderValue, Response, StatusCode};
use switchboard_transport::{
    plain_response, Body, CloseReason, Inbound, RequestParts, Service, SocketHandle,
};

use crate::auth::{Identity, Verifier};
use crate::inbound::{decode_client_message, BadMessage};
use crate::metrics::Metrics;
use crate::rate::{Bucket, RateLimit, Verdict};
use crate::stats::GatewayStats;
use crate::Routes;

/// Close code sent after an `onconnect` handler's `fail`.
pub const CONNECT_FAILED_CODE: u16 = 1008;

/// Topics the gateway publishes to, from the config.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) onconnect: Option<Arc<str>>,
    pub(crate) onmessage: Option<Route>,
    pub(crate) types: HashMap<String, Route>,
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

pub(crate) struct Gateway {
    pub(crate) hooks: Hooks,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) registry: Arc<Registry<SocketHandle>>,
    pub(crate) verifier: Verifier,
    pub(crate) routes: Routes,
    pub(crate) stats: Arc<GatewayStats>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_sockets_per_user: Option<usize>,
    pub(crate) rate_limit: Option<RateLimit>,
}

/// Close code for a socket that kept sending over its rate limit.
pub const RATE_LIMIT_CLOSE_CODE: u16 = 1008;
/// Close code after a connect handler errors or panics.
pub const CONNECT_HANDLER_ERROR_CODE: u16 = 1011;

/// What admission learned, handed to `open`.
pub(crate) struct Admitted {
    identity: Identity,
    headers: Map<String, Value>,
    params: Map<String, Value>,
    namespace: Option<String>,
}

pub(crate) struct Session {
    id: ConnId,
    handle: SocketHandle,
    context: Arc<Context>,
    replies: Arc<SocketReplies>,
    bucket: Option<Mutex<Bucket>>,
}

/// Encodes `{"type": kind, "payload": payload}` once, for any number of sockets: the wire
/// shape of every frame the gateway sends (replies, `send`, `broadcast`, error frames).
pub fn encode_frame(kind: &str, payload: &Value) -> Bytes {
    #[derive(Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        payload: &'a Value,
    }
    // Serializing a `Value` with string keys cannot fail.
    Bytes::from(serde_json::to_vec(&Frame { kind, payload }).unwrap_or_default())
}

fn error_frame(payload: &Value) -> Bytes {
    encode_frame("error", payload)
}

fn internal_error(topic: &str) -> Value {
    json!({"message": "internal error in a handler", "topic": topic})
}

/// Replies to a socket: `{type: topic, payload}` (or `onconnect` on connect), `error` frames
/// for failures. A socket that has gone makes every send fail quietly.
///
/// On connect, the handler is the gatekeeper, so it fails closed: `fail` closes with 1008,
/// and an error or panic closes with 1011.
struct SocketReplies {
    handle: SocketHandle,
    on_connect: bool,
    stats: Arc<GatewayStats>,
    metrics: Arc<Metrics>,
}

/// The way back for one published message: remembers when it was published, for the reply
/// latency histogram.
struct Timed {
    replies: Arc<SocketReplies>,
    published: Instant,
}

impl ReplyTo for Timed {
    fn deliver(&self, topic: &str, reply: Reply) {
        let topic_metrics = self.replies.metrics.topic(topic);
        topic_metrics
            .reply_latency()
            .observe(self.published.elapsed().as_secs_f64());
        self.replies.answer(topic, topic_metrics, reply);
    }
}

impl SocketReplies {
    fn answer(&self, topic: &str, topic_metrics: &crate::metrics::TopicMetrics, reply: Reply) {
        let kind = if self.on_connect { "onconnect" } else { topic };
        let errors = &self.metrics.errors;
        let closing = match reply {
            Reply::Ok(payload) => {
                if self.handle.send_text(encode_frame(kind, &payload)).is_ok() {
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
                GatewayStats::bump(&self.stats.handler_failures);
                errors.handler_error.inc();
                let _ = self.handle.send_text(error_frame(&internal_error(topic)));
                Some((CONNECT_HANDLER_ERROR_CODE, "connect handler failed"))
            }
            _ => None,
        };
        if let (true, Some((code, reason))) = (self.on_connect, closing) {
            GatewayStats::bump(&self.stats.connect_failures);
            self.handle.close(code, reason);
        }
    }
}

impl Gateway {
    fn publish(&self, msg: Message) {
        if let Err(e) = self.bus.publish(msg) {
            GatewayStats::bump(&self.stats.publish_failures);
            tracing::warn!(error = %e, "publish failed");
            let topic = e.message.topic().to_string();
            e.message
                .fail(json!({"message": "could not publish", "topic": topic}));
        }
    }
}

impl Service for Gateway {
    type Admission = Admitted;
    type Session = Session;

    fn admit(&self, request: &RequestParts) -> Result<Admitted, Response<Body>> {
        let identity = self.verifier.verify(&request.headers).map_err(|e| {
            GatewayStats::bump(&self.stats.refused_unauthorized);
            tracing::debug!(error = %e, "refused upgrade");
            let mut res = Response::new(Body::from(format!("{e}\n")));
            *res.status_mut() = StatusCode::UNAUTHORIZED;
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            res
        })?;
        let params: Map<String, Value> = request
            .uri
            .query()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let namespace = params
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .map(str::to_string);
        if let Some(ns) = &namespace {
            if !self.verifier.namespace_allowed(&identity, ns) {
                GatewayStats::bump(&self.stats.refused_namespace);
                return Err(plain_response(
                    StatusCode::FORBIDDEN,
                    "namespace not allowed for this token\n",
                ));
            }
        }
        if let Some(max) = self.max_sockets_per_user {
            // Checked here, before the upgrade; concurrent handshakes of one user may
            // overshoot by the number in flight.
            if self.registry.count(Target::User(&identity.username)) >= max {
                GatewayStats::bump(&self.stats.refused_user_limit);
                let mut res = plain_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many sockets for this user\n",
                );
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return Err(res);
            }
        }
        let mut headers = Map::new();
        for (name, value) in &request.headers {
            // Credentials stay out of messages: handlers get the verified claims instead.
            if name == header::COOKIE || name == header::AUTHORIZATION {
                continue;
            }
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match headers.get_mut(name.as_str()) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_string(), Value::String(value));
                }
            }
        }
        headers.insert("jwt".into(), Value::Object(identity.claims.clone()));
        Ok(Admitted {
            identity,
            headers,
            params,
            namespace,
        })
    }

    fn open(&self, a: Admitted, handle: SocketHandle) -> Session {
        let id = self.registry.next_id();
        self.registry.insert_with_id(
            id,
            &a.identity.username,
            a.namespace.as_deref(),
            handle.clone(),
        );
        let context = Arc::new(Context::for_connection(
            id.0,
            a.identity.username,
            a.namespace,
            a.headers,
            a.params,
        ));
        tracing::debug!(connection = %id, username = ?context.username, namespace = ?context.namespace, "socket open");
        if let Some(topic) = &self.hooks.onconnect {
            let replies = Arc::new(Timed {
                replies: Arc::new(SocketReplies {
                    handle: handle.clone(),
                    on_connect: true,
                    stats: self.stats.clone(),
                    metrics: self.metrics.clone(),
                }),
                published: Instant::now(),
            });
            let data = json!({
                "connection_id": id.0,
                "username": context.username,
                "namespace": context.namespace,
            });
            self.publish(
                Message::new(topic.clone(), data)
                    .with_context(context.clone())
                    .with_reply_to(replies),
            );
        }
        Session {
            id,
            replies: Arc::new(SocketReplies {
                handle: handle.clone(),
                on_connect: false,
                stats: self.stats.clone(),
                metrics: self.metrics.clone(),
            }),
            handle,
            context,
            bucket: self.rate_limit.map(|l| Mutex::new(Bucket::new(l))),
        }
    }

    fn on_message(&self, s: &Session, message: Inbound) {
        if let (Some(bucket), Some(limit)) = (&s.bucket, self.rate_limit) {
            let verdict = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(limit, Instant::now());
            match verdict {
                Verdict::Accept => {}
                Verdict::Refuse { first } => {
                    GatewayStats::bump(&self.stats.rate_limited);
                    if first {
                        self.metrics.errors.rate_limited.inc();
                        let _ = s.handle.send_text(error_frame(&json!({
                            "message": "rate limit exceeded; messages are dropped until you slow down",
                        })));
                    }
                    return;
                }
                Verdict::Close => {
                    GatewayStats::bump(&self.stats.rate_limited);
                    GatewayStats::bump(&self.stats.rate_limit_closes);
                    s.handle.close(RATE_LIMIT_CLOSE_CODE, "rate limit exceeded");
                    return;
                }
            }
        }
        let decoded = match &message {
            Inbound::Text(text) => decode_client_message(text),
            Inbound::Binary(_) => Err(BadMessage::Binary),
        };
        let message = match decoded {
            Ok(m) => m,
            Err(bad) => {
                GatewayStats::bump(&self.stats.bad_messages);
                self.metrics.errors.bad_message.inc();
                let _ = s
                    .handle
                    .send_text(error_frame(&json!({"message": bad.to_string()})));
                return;
            }
        };
        GatewayStats::bump(&self.stats.messages_in);
        let typed_topic = self.hooks.types.get(message.message_type());
        if typed_topic.is_none() && self.hooks.onmessage.is_none() {
            return; // no topic for it
        }
        let data = message.into_data();
        let data = Arc::new(data);
        // One way back for both topics: it carries the publish time for the latency series.
        let reply_to: Arc<dyn ReplyTo> = Arc::new(Timed {
            replies: s.replies.clone(),
            published: Instant::now(),
        });
        let publish = |route: &Route| {
            route.messages_in.inc();
            self.publish(
                Message::new(route.topic.clone(), Value::Null)
                    .with_shared_data(data.clone())
                    .with_context(s.context.clone())
                    .with_reply_to(reply_to.clone()),
            )
        };
        if let Some(general) = &self.hooks.onmessage {
            publish(general);
        }
        if let Some(typed) = typed_topic {
            publish(typed);
        }
    }

    fn on_close(&self, s: Session, reason: CloseReason) {
        self.registry.remove(s.id);
        tracing::debug!(connection = %s.id, ?reason, "socket closed");
        if let Some(topic) = &self.hooks.onclose {
            let data = json!({
                "connection_id": s.id.0,
                "username": s.context.username,
                "namespace": s.context.namespace,
                "reason": describe_close(&reason),
            });
            self.publish(Message::new(topic.clone(), data).with_context(s.context));
        }
    }

    fn http(&self, request: &RequestParts) -> Response<Body> {
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
        CloseReason::Server { code, reason } => {
            json!({"by": "server", "kind": "closed", "code": code, "reason": reason})
        }
        CloseReason::Shutdown => json!({"by": "server", "kind": "shutdown", "code": 1001}),
        CloseReason::SlowConsumer => {
            json!({"by": "server", "kind": "slow_consumer", "code": switchboard_transport::SLOW_CONSUMER_CODE})
        }
        CloseReason::Io(e) => json!({"by": "network", "kind": "io_error", "reason": e}),
        _ => json!({"kind": "unknown"}),
    }
}
