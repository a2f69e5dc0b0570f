//! The built-in `send` and `broadcast` subscribers: deliver bus messages to sockets.

use std::future::{ready, Ready};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use switchboard_bus::Message;
use switchboard_registry::{Registry, Target};
use switchboard_transport::SocketHandle;

use crate::gateway::encode_frame;

type Sockets = Arc<Registry<SocketHandle>>;

/// `send` data: `{username, namespace?, type, payload}`. Reaches every socket of `username`
/// in `namespace`, or every socket of `username` when `namespace` is absent. `out` counts the
/// frames queued.
pub(crate) fn send_handler(
    registry: Sockets,
    out: Counter,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let data = msg.data();
        let Some(username) = data.get("username").and_then(Value::as_str) else {
            return refuse(&msg, "send needs a string `username`");
        };
        let target = match optional_str(data, "namespace") {
            Ok(Some(ns)) => Target::UserInNamespace(username, ns),
            Ok(None) => Target::User(username),
            Err(e) => return refuse(&msg, e),
        };
        deliver(&registry, &msg, target, &out)
    }
}

/// `broadcast` data: `{type, payload, namespace?}`. Reaches every socket, or every socket of
/// `namespace` when given (our extension).
pub(crate) fn broadcast_handler(
    registry: Sockets,
    out: Counter,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let target = match optional_str(msg.data(), "namespace") {
            Ok(Some(ns)) => Target::Namespace(ns),
            Ok(None) => Target::All,
            Err(e) => return refuse(&msg, e),
        };
        deliver(&registry, &msg, target, &out)
    }
}

fn deliver(registry: &Sockets, msg: &Message, target: Target<'_>, out: &Counter) -> Ready<()> {
    let data = msg.data();
    let Some(kind) = data.get("type").and_then(Value::as_str) else {
        return refuse(msg, "delivery needs a string `type`");
    };
    let frame = encode_frame(kind, data.get("payload").unwrap_or(&Value::Null));
    let mut queued = 0;
    registry.for_each(target, |_, socket| {
        // A full queue closes that socket only; the others still get the frame.
        queued += u64::from(socket.send_text(frame.clone()).is_ok());
    });
    if queued > 0 {
        out.inc_by(queued);
    }
    ready(())
}

fn optional_str<'v>(data: &'v Value, key: &str) -> Result<Option<&'v str>, &'static str> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err("`namespace` must be a string"),
    }
}

fn refuse(msg: &Message, why: &str) -> Ready<()> {
    tracing::warn!(topic = msg.topic(), "{why}; message dropped");
    msg.fail(json!({"message": why, "topic": msg.topic()}));
    ready(())
}
