//! The spec's semantics on top of the transport: what is published when, and what the
//! client sees of replies and failures.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};
use switchboard_bus::{Bus, Context, Message, Reply, ReplyTo};
use switchboard_registry::{ConnId, Registry};
use switchboard_transport::http::{header, HeaderValue, Response, StatusCode};
use switchboard_transport::{
    plain_response, Body, CloseReason, Inbound, RequestParts, Service, SocketHandle,
};

use crate::auth::{Identity, Verifier};
use crate::inbound::{decode_client_message, BadMessage};
use crate::Routes;

/// Close code sent after an `onconnect` handler's `fail`.
pub const CONNECT_FAILED_CODE: u16 = 1008;

/// Topics the gateway publishes to, from the config.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) onconnect: Option<Arc<str>>,
    pub(crate) onmessage: Option<Arc<str>>,
    pub(crate) types: HashMap<String, Arc<str>>,
    pub(crate) onclose: Option<Arc<str>>,
}

pub(crate) struct Gateway {
    pub(crate) hooks: Hooks,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) registry: Arc<Registry<SocketHandle>>,
    pub(crate) verifier: Verifier,
    pub(crate) routes: Routes,
}

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
    replies: Arc<dyn ReplyTo>,
}

/// Encodes `{"type": kind, "payload": payload}` once, for any number of sockets.
pub(crate) fn encode_frame(kind: &str, payload: &Value) -> Bytes {
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
struct SocketReplies {
    handle: SocketHandle,
    on_connect: bool,
}

impl ReplyTo for SocketReplies {
    fn deliver(&self, topic: &str, reply: Reply) {
        let kind = if self.on_connect { "onconnect" } else { topic };
        let _ = match reply {
            Reply::Ok(payload) => self.handle.send_text(encode_frame(kind, &payload)),
            Reply::Fail(error) => {
                let sent = self.handle.send_text(error_frame(&error));
                if self.on_connect {
                    self.handle
                        .close(CONNECT_FAILED_CODE, "connection refused by handler");
                }
                sent
            }
            Reply::HandlerFailed => self.handle.send_text(error_frame(&internal_error(topic))),
            _ => Ok(()),
        };
    }
}

impl Gateway {
    fn publish(&self, msg: Message) {
        if let Err(e) = self.bus.publish(msg) {
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
            let replies = Arc::new(SocketReplies {
                handle: handle.clone(),
                on_connect: true,
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
            }),
            handle,
            context,
        }
    }

    fn on_message(&self, s: &Session, message: Inbound) {
        let decoded = match &message {
            Inbound::Text(text) => decode_client_message(text),
            Inbound::Binary(_) => Err(BadMessage::Binary),
        };
        let message = match decoded {
            Ok(m) => m,
            Err(bad) => {
                let _ = s
                    .handle
                    .send_text(error_frame(&json!({"message": bad.to_string()})));
                return;
            }
        };
        let typed_topic = self.hooks.types.get(message.message_type());
        let data = message.into_data();
        let data = Arc::new(data);
        let publish = |topic: &Arc<str>| {
            self.publish(
                Message::new(topic.clone(), Value::Null)
                    .with_shared_data(data.clone())
                    .with_context(s.context.clone())
                    .with_reply_to(s.replies.clone()),
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
