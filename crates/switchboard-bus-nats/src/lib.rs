//! Switchboard's event bus on NATS: several gateway nodes share one broker, and the handlers
//! of their topics may run in any process, in any language.
//!
//! Depend on this crate to run the gateway as one of several nodes, or to use the
//! [`switchboard_bus::Bus`] seam over NATS yourself. The core crates never link a broker
//! client; the `switchboard` binary picks this bus when the config has a `gateway.bus.nats`
//! section.
//!
//! How the spec's bus maps onto NATS (the wire format is in `docs/PROTOCOL.md`):
//! - a topic is a NATS subject of the same name; a message is a JSON envelope
//!   `{"topic", "data", "context"}` marked with the header `Switchboard-Envelope: 1`;
//! - [`Bus::subscribe`] joins a queue group (default `switchboard-handlers`), so each event
//!   is handled once per group however many handler processes run;
//! - [`Bus::subscribe_every_node`] subscribes plainly: every node gets every `send` and
//!   `broadcast` message and delivers to its own sockets only;
//! - a message that can be answered carries a NATS reply subject on the node that holds the
//!   socket; a handler answers `{"reply": ...}`, `{"fail": ...}` or `{}` (handled, nothing to
//!   say). No answer within the reply timeout: the socket gets an error frame;
//! - while NATS is unreachable, publishing fails at once (the sender gets an error frame),
//!   [`Bus::is_ready`] is false, and the client reconnects by itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use switchboard_bus::Bus;
//! use switchboard_bus_nats::{NatsBus, NatsOptions};
//!
//! let bus = Arc::new(NatsBus::connect(NatsOptions::new("nats://127.0.0.1:4222")).await?);
//! // hand it to `switchboard::Container::with_bus(config, bus.clone())`, add handlers, then:
//! bus.subscriptions_ready().await?;
//! assert!(bus.is_ready());
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_bus::{
    Bus, Context, Handler, Message, PublishError, PublishFailure, Reply, ReplyTo, SubscribeError,
};
use tokio::sync::{mpsc, oneshot};

/// Header that marks a Switchboard envelope. A body without it is taken as bare `data`
/// (what a plain NATS client publishing to the `send` topic would send).
pub const ENVELOPE_HEADER: &str = "Switchboard-Envelope";
/// Prefix of the reply subjects: `_SB_REPLY.<node>.<id>`.
pub const REPLY_PREFIX: &str = "_SB_REPLY";
/// Default queue group of handlers.
pub const DEFAULT_GROUP: &str = "switchboard-handlers";
/// Messages waiting to be written to NATS before publishing fails as backpressure.
const OUTBOX: usize = 65_536;

/// How to reach NATS and how to behave there.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NatsOptions {
    /// Server URL(s), e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// This node's name (NATS connection name and reply subjects). Default: a fresh id.
    pub node_name: Option<String>,
    /// How long a message that can be answered waits for an answer. Default 10 s.
    pub reply_timeout: Duration,
    /// Queue group of [`Bus::subscribe`]rs. Default [`DEFAULT_GROUP`].
    pub group: String,
}

impl NatsOptions {
    /// Options with defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            node_name: None,
            reply_timeout: Duration::from_secs(10),
            group: DEFAULT_GROUP.into(),
        }
    }
}

/// Why the NATS bus could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The first connection failed.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A subscription failed.
    #[error("cannot subscribe to `{topic}`: {reason}")]
    Subscribe {
        /// The topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
}

/// The envelope of a message on NATS.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    topic: String,
    data: Value,
    #[serde(default)]
    context: Context,
}

/// A handler's answer on a reply subject.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fail: Option<Value>,
}

struct Outgoing {
    subject: String,
    reply: Option<String>,
    payload: Bytes,
    envelope: bool,
}

/// A message published here that waits for its answer.
struct Pending {
    message: Message,
    answered: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    by_id: HashMap<u64, Arc<Pending>>,
    /// Ids in publish order; all share one timeout, so deadlines are in order too.
    deadlines: VecDeque<(tokio::time::Instant, u64)>,
}

/// The NATS bus. See the crate docs.
pub struct NatsBus {
    client: async_nats::Client,
    node: String,
    options: NatsOptions,
    outbox: mpsc::Sender<Outgoing>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
    subscribing: Mutex<Vec<oneshot::Receiver<Result<(), NatsError>>>>,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("node", &self.node)
            .field("url", &self.options.url)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl NatsBus {
    /// Connects (retrying until the first connection succeeds is *not* done: a gateway
    /// should fail fast at start) and starts the reply listener and the publisher.
    pub async fn connect(options: NatsOptions) -> Result<Self, NatsError> {
        let node = options.node_name.clone().unwrap_or_else(|| {
            format!(
                "sb-{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                    ^ u64::from(std::process::id())
            )
        });
        let client = async_nats::ConnectOptions::new()
            .name(&node)
            .max_reconnects(None)
            .event_callback(|event| async move {
                tracing::info!(%event, "nats");
            })
            .connect(options.url.as_str())
            .await
            .map_err(|e| NatsError::Connect {
                url: options.url.clone(),
                reason: e.to_string(),
            })?;
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let replies = client
            .subscribe(format!("{REPLY_PREFIX}.{node}.*"))
            .await
            .map_err(|e| NatsError::Subscribe {
                topic: format!("{REPLY_PREFIX}.{node}.*"),
                reason: e.to_string(),
            })?;
        tokio::spawn(listen_for_answers(replies, waiting.clone()));
        tokio::spawn(expire_unanswered(waiting.clone(), options.reply_timeout));
        let (outbox, outgoing) = mpsc::channel(OUTBOX);
        tokio::spawn(publish_in_order(client.clone(), outgoing));
        Ok(NatsBus {
            client,
            node,
            options,
            outbox,
            waiting,
            next_id: AtomicU64::new(1),
            subscribing: Mutex::new(Vec::new()),
        })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Waits until every subscription made so far is active on the server. Call it after
    /// adding handlers and before serving, so no early event is missed.
    pub async fn subscriptions_ready(&self) -> Result<(), NatsError> {
        let pending: Vec<_> = std::mem::take(&mut *lock(&self.subscribing));
        for rx in pending {
            if let Ok(result) = rx.await {
                result?;
            }
        }
        self.client.flush().await.map_err(|e| NatsError::Subscribe {
            topic: "(flush)".into(),
            reason: e.to_string(),
        })
    }

    fn start_subscription(&self, topic: &str, group: Option<String>, handler: Arc<dyn Handler>) {
        let (done, rx) = oneshot::channel();
        lock(&self.subscribing).push(rx);
        let client = self.client.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            let subscribed = match &group {
                Some(g) => client.queue_subscribe(topic.clone(), g.clone()).await,
                None => client.subscribe(topic.clone()).await,
            };
            let mut subscriber = match subscribed {
                Ok(s) => {
                    let _ = done.send(Ok(()));
                    s
                }
                Err(e) => {
                    tracing::error!(%topic, error = %e, "nats subscribe failed");
                    let _ = done.send(Err(NatsError::Subscribe {
                        topic,
                        reason: e.to_string(),
                    }));
                    return;
                }
            };
            while let Some(incoming) = subscriber.next().await {
                handle_incoming(&client, &topic, handler.as_ref(), incoming);
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A NATS subject must be non-empty, without whitespace, and without empty tokens; topics
/// with wildcards cannot be published to.
fn check_subject(topic: &str) -> Result<(), String> {
    if topic.is_empty()
        || topic.contains(char::is_whitespace)
        || topic
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(format!("`{topic}` is not a valid NATS subject"));
    }
    Ok(())
}

impl Bus for NatsBus {
    fn publish(&self, msg: Message) -> Result<(), PublishError> {
        let fail = |msg: Message, reason: PublishFailure| {
            Err(PublishError {
                message: msg,
                reason,
            })
        };
        if let Err(e) = check_subject(msg.topic()) {
            return fail(msg, PublishFailure::Unavailable(e));
        }
        if self.client.connection_state() != State::Connected {
            return fail(
                msg,
                PublishFailure::Unavailable("not connected to NATS".into()),
            );
        }
        let envelope = Envelope {
            topic: msg.topic().to_string(),
            data: msg.data().clone(),
            context: msg.context().clone(),
        };
        let payload = match serde_json::to_vec(&envelope) {
            Ok(p) => Bytes::from(p),
            Err(e) => return fail(msg, PublishFailure::Serialize(e.to_string())),
        };
        let reply = msg.can_reply().then(|| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut waiting = lock(&self.waiting);
            let deadline = tokio::time::Instant::now() + self.options.reply_timeout;
            waiting.by_id.insert(
                id,
                Arc::new(Pending {
                    message: msg.clone(),
                    answered: AtomicBool::new(false),
                }),
            );
            waiting.deadlines.push_back((deadline, id));
            (id, format!("{REPLY_PREFIX}.{}.{id}", self.node))
        });
        let outgoing = Outgoing {
            subject: msg.topic().to_string(),
            reply: reply.as_ref().map(|(_, s)| s.clone()),
            payload,
            envelope: true,
        };
        if self.outbox.try_send(outgoing).is_err() {
            if let Some((id, _)) = reply {
                lock(&self.waiting).by_id.remove(&id);
            }
            return fail(
                msg,
                PublishFailure::Unavailable("too many messages waiting for NATS".into()),
            );
        }
        Ok(())
    }

    fn subscribe(&self, topic: &str, handler: Arc<dyn Handler>) -> Result<(), SubscribeError> {
        check_subject(topic).map_err(|reason| SubscribeError::Broker {
            topic: topic.into(),
            reason,
        })?;
        self.start_subscription(topic, Some(self.options.group.clone()), handler);
        Ok(())
    }

    fn subscribe_every_node(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<(), SubscribeError> {
        check_subject(topic).map_err(|reason| SubscribeError::Broker {
            topic: topic.into(),
            reason,
        })?;
        self.start_subscription(topic, None, handler);
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// Writes messages to NATS in the order they were published.
async fn publish_in_order(client: async_nats::Client, mut outgoing: mpsc::Receiver<Outgoing>) {
    while let Some(out) = outgoing.recv().await {
        let mut headers = HeaderMap::new();
        if out.envelope {
            headers.insert(ENVELOPE_HEADER, "1");
        }
        let sent = match out.reply {
            Some(reply) => {
                client
                    .publish_with_reply_and_headers(
                        out.subject.clone(),
                        reply,
                        headers,
                        out.payload,
                    )
                    .await
            }
            None => {
                client
                    .publish_with_headers(out.subject.clone(), headers, out.payload)
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(subject = %out.subject, error = %e, "nats publish failed");
        }
    }
}

/// Answers arriving for messages this node published.
async fn listen_for_answers(mut replies: async_nats::Subscriber, waiting: Arc<Mutex<Waiting>>) {
    while let Some(answer) = replies.next().await {
        let Some(id) = answer
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        if answer.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // Nobody subscribes to the topic: as on the in-process bus, nothing happens.
            lock(&waiting).by_id.remove(&id);
            continue;
        }
        let Some(pending) = lock(&waiting).by_id.get(&id).cloned() else {
            continue; // too late: the timeout already answered
        };
        let parsed: Answer = match serde_json::from_slice(&answer.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "malformed answer on {}", answer.subject);
                Answer {
                    fail: Some(json!({"message": "malformed answer from a handler"})),
                    ..Answer::default()
                }
            }
        };
        pending.answered.store(true, Ordering::Release);
        if let Some(fail) = parsed.fail {
            pending.message.deliver(Reply::Fail(fail));
        } else if let Some(reply) = parsed.reply {
            pending.message.deliver(Reply::Ok(reply));
        }
    }
}

/// Drops answered messages after the timeout, and fails the unanswered ones.
async fn expire_unanswered(waiting: Arc<Mutex<Waiting>>, timeout: Duration) {
    let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        let now = tokio::time::Instant::now();
        let expired: Vec<Arc<Pending>> = {
            let mut w = lock(&waiting);
            let mut out = Vec::new();
            while w.deadlines.front().is_some_and(|(d, _)| *d <= now) {
                if let Some((_, id)) = w.deadlines.pop_front() {
                    if let Some(p) = w.by_id.remove(&id) {
                        out.push(p);
                    }
                }
            }
            out
        };
        for p in expired {
            if !p.answered.load(Ordering::Acquire) {
                let topic = p.message.topic().to_string();
                p.message.deliver(Reply::Fail(json!({
                    "message": format!("no handler answered within {timeout:?}"),
                    "topic": topic,
                })));
            }
        }
    }
}

/// Answers one NATS message for a local handler on its reply subject.
struct NatsAnswer {
    client: async_nats::Client,
    subject: String,
    answered: AtomicBool,
}

impl NatsAnswer {
    fn send(&self, answer: &Answer) {
        self.answered.store(true, Ordering::Release);
        let client = self.client.clone();
        let subject = self.subject.clone();
        let body = Bytes::from(serde_json::to_vec(answer).unwrap_or_default());
        tokio::spawn(async move {
            if let Err(e) = client.publish(subject, body).await {
                tracing::warn!(error = %e, "cannot send an answer");
            }
        });
    }
}

impl ReplyTo for NatsAnswer {
    fn deliver(&self, _topic: &str, reply: Reply) {
        let answer = match reply {
            Reply::Ok(v) => Answer {
                reply: Some(v),
                fail: None,
            },
            Reply::Fail(v) => Answer {
                reply: None,
                fail: Some(v),
            },
            _ => Answer {
                reply: None,
                fail: Some(json!({"message": "internal error in a handler"})),
            },
        };
        self.send(&answer);
    }
}

/// Turns a NATS message into a bus [`Message`] and runs the local handler on it. If the
/// handler finishes without answering, an empty answer tells the sender it was handled.
fn handle_incoming(
    client: &async_nats::Client,
    topic: &str,
    handler: &dyn Handler,
    incoming: async_nats::Message,
) {
    let is_envelope = incoming
        .headers
        .as_ref()
        .and_then(|h| h.get(ENVELOPE_HEADER))
        .is_some();
    let (data, context) = if is_envelope {
        match serde_json::from_slice::<Envelope>(&incoming.payload) {
            Ok(e) => (e.data, e.context),
            Err(e) => {
                tracing::warn!(%topic, error = %e, "malformed envelope dropped");
                return;
            }
        }
    } else {
        match serde_json::from_slice::<Value>(&incoming.payload) {
            Ok(v) => (v, Context::default()),
            Err(e) => {
                tracing::warn!(%topic, error = %e, "message is not JSON; dropped");
                return;
            }
        }
    };
    let mut message = Message::new(topic, data).with_context(Arc::new(context));
    let answer = incoming.reply.map(|subject| {
        Arc::new(NatsAnswer {
            client: client.clone(),
            subject: subject.to_string(),
            answered: AtomicBool::new(false),
        })
    });
    if let Some(a) = &answer {
        message = message.with_reply_to(a.clone());
    }
    let fut = handler.call(message);
    tokio::spawn(async move {
        let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
        let failed = !matches!(outcome, Ok(Ok(())));
        if failed {
            tracing::error!("handler failed");
        }
        if let Some(a) = answer {
            if failed {
                a.deliver("", Reply::HandlerFailed);
            } else if !a.answered.load(Ordering::Acquire) {
                a.send(&Answer::default());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_checked() {
        assert!(check_subject("socket:send").is_ok());
        assert!(check_subject("a.b.c").is_ok());
        for bad in ["", "a b", "a..b", "a.*", ">", ".a"] {
            assert!(check_subject(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_serialize_compactly() {
        assert_eq!(serde_json::to_string(&Answer::default()).unwrap(), "{}");
        let a: Answer = serde_json::from_str(r#"{"reply": {"x": 1}}"#).unwrap();
        assert_eq!(a.reply, Some(json!({"x": 1})));
    }
}
