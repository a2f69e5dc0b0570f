//! The built-in `send`, `broadcast` and `disconnect` subscribers: deliver bus messages to
//! sockets, or close them.

use std::future::{ready, Ready};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use switchboard_bus::Message;
use switchboard_core::SocketRef;
use switchboard_registry::{ConnId, Registry, Target};

use crate::gateway::encode_frame;

type Sockets = Arc<Registry<SocketRef>>;

/// `send` data: `{username, namespace?, type, payload}`. Reaches every socket of `username`
/// in `namespace`, or every socket of `username` when `namespace` is absent. `out` counts the
/// frames queued.
pub(crate) fn send_handler(
    registry: Sockets,
    out: Counter,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let fields = Fields::of(msg.data());
        match fields.user_target("send needs a string `username`") {
            Ok(target) => deliver(&registry, &msg, &fields, target, &out),
            Err(e) => refuse(&msg, e),
        }
    }
}

/// `broadcast` data: `{type, payload, namespace?}`. Reaches every socket, or every socket of
/// `namespace` when given (our extension).
pub(crate) fn broadcast_handler(
    registry: Sockets,
    out: Counter,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let fields = Fields::of(msg.data());
        let target = match optional(fields.namespace, NAMESPACE_NOT_A_STRING) {
            Ok(Some(ns)) => Target::Namespace(ns),
            Ok(None) => Target::All,
            Err(e) => return refuse(&msg, e),
        };
        deliver(&registry, &msg, &fields, target, &out)
    }
}

/// The fields a delivery reads, found in one pass over the object's few entries (looking
/// each up by key cost more: a string comparison per step of each search).
#[derive(Default)]
struct Fields<'v> {
    username: Option<&'v Value>,
    namespace: Option<&'v Value>,
    kind: Option<&'v Value>,
    payload: Option<&'v Value>,
}

impl<'v> Fields<'v> {
    fn of(data: &'v Value) -> Self {
        let mut fields = Fields::default();
        if let Value::Object(map) = data {
            for (key, value) in map {
                match key.as_str() {
                    "username" => fields.username = Some(value),
                    "namespace" => fields.namespace = Some(value),
                    "type" => fields.kind = Some(value),
                    "payload" => fields.payload = Some(value),
                    _ => {}
                }
            }
        }
        fields
    }

    /// `{username, namespace?}`: that user's sockets, in that namespace if given.
    fn user_target(&self, no_user: &'static str) -> Result<Target<'v>, &'static str> {
        let username = self.username.and_then(Value::as_str).ok_or(no_user)?;
        Ok(match optional(self.namespace, NAMESPACE_NOT_A_STRING)? {
            Some(ns) => Target::UserInNamespace(username, ns),
            None => Target::User(username),
        })
    }
}

/// Close code of a `disconnect` that names none.
pub const DISCONNECT_CODE: u16 = 4002;

/// `disconnect` data: `{username, namespace?, code?, reason?}`. Closes every socket of
/// `username` (in `namespace`) with `code` ([`DISCONNECT_CODE`] when absent) and `reason`;
/// each socket then ends as any closed socket does, publishing `onclose` once. `closed` counts
/// the sockets closed.
pub(crate) fn disconnect_handler(
    registry: Sockets,
    closed: Counter,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let data = msg.data();
        let target = match Fields::of(data).user_target("disconnect needs a string `username`") {
            Ok(target) => target,
            Err(e) => return refuse(&msg, e),
        };
        let code = match data.get("code") {
            None | Some(Value::Null) => DISCONNECT_CODE,
            Some(code) => match code.as_u64().and_then(|c| u16::try_from(c).ok()) {
                Some(code) if server_may_send(code) => code,
                _ => {
                    return refuse(
                        &msg,
                        "disconnect `code` must be 1000, 1001, 1008, 1011 or 3000-4999",
                    )
                }
            },
        };
        let reason = match optional(data.get("reason"), "`reason` must be a string") {
            Ok(reason) => reason.unwrap_or("disconnected by the server"),
            Err(e) => return refuse(&msg, e),
        };
        // Sockets closing already (a second disconnect, say) are neither closed nor counted
        // again.
        let mut sockets = Vec::with_capacity(registry.count(target));
        registry.for_each(target, |_, socket| {
            if !socket.is_closing() {
                sockets.push(socket.clone());
            }
        });
        for socket in &sockets {
            socket.close(code, reason);
        }
        closed.inc_by(sockets.len() as u64);
        ready(())
    }
}

/// Close codes a server may choose for a disconnect (RFC 6455 7.4: not the ones that report
/// the client's errors or that may not be sent).
pub(crate) fn server_may_send(code: u16) -> bool {
    matches!(code, 1000 | 1001 | 1008 | 1011 | 3000..=4999)
}

fn deliver(
    registry: &Sockets,
    msg: &Message,
    fields: &Fields<'_>,
    target: Target<'_>,
    out: &Counter,
) -> Ready<()> {
    let Some(kind) = fields.kind.and_then(Value::as_str) else {
        return refuse(msg, "delivery needs a string `type`");
    };
    let frame = encode_frame(kind, fields.payload.unwrap_or(&Value::Null));
    // The handles are gathered first and written to afterwards: each write is a system call,
    // and the registry's shard locks, which connects and disconnects wait on, must not be
    // held across thousands of them. In the order the sockets connected, which the kernel's
    // caches favour (see `collect_in_order`).
    let sockets = registry.collect_in_order(target);
    // A full queue closes that socket only; the others still get the frame.
    let queued = fan_out(&sockets, &frame, fan_out_threads(sockets.len()));
    if queued > 0 {
        out.inc_by(queued);
    }
    ready(())
}

/// Recipients per thread below which a delivery is not worth splitting.
const RECIPIENTS_PER_THREAD: usize = 2048;

/// How many threads a delivery to `recipients` sockets is written from: at most as many as
/// the runtime has workers (a gateway given one worker fans out on one thread), and as the
/// process may use cores.
fn fan_out_threads(recipients: usize) -> usize {
    if recipients < 2 * RECIPIENTS_PER_THREAD {
        return 1; // a `send` to one user's sockets: no need to ask the runtime
    }
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers = tokio::runtime::Handle::try_current()
        .map_or(cores, |runtime| runtime.metrics().num_workers());
    (recipients / RECIPIENTS_PER_THREAD).clamp(1, cores.min(workers).max(1))
}

/// Writes `frame` to every socket, split over `threads` threads (this one among them), and
/// returns once all are done; returns how many took it.
///
/// Each write is a system call, so a broadcast to thousands of sockets written from one
/// thread is bound by one core (measured: 2 threads deliver a third more per second to 10k
/// sockets on a 2-core machine). It returns only when every socket has the frame (or a queued
/// copy), so a caller's later sends still reach each socket after it.
fn fan_out(sockets: &[(ConnId, SocketRef)], frame: &Bytes, threads: usize) -> u64 {
    split_over_threads(sockets, threads, |(_, socket)| {
        socket.send_text(frame.clone()).is_ok()
    })
}

/// Calls `f` once for every item, from `threads` threads (the caller's among them); counts
/// the `true`s. A panic in `f` on a helper thread is raised again here.
fn split_over_threads<T: Sync>(items: &[T], threads: usize, f: impl Fn(&T) -> bool + Sync) -> u64 {
    let run = |chunk: &[T]| chunk.iter().map(|item| u64::from(f(item))).sum::<u64>();
    if threads <= 1 {
        return run(items);
    }
    let mut chunks = items.chunks(items.len().div_ceil(threads.max(1)).max(1));
    let first = chunks.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = chunks
            .map(|chunk| {
                // The OS may refuse a thread (a thread limit): then this thread does it.
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || run(chunk))
                    .map_err(|_| chunk)
            })
            .collect();
        let mut total = run(first);
        for helper in helpers {
            total += match helper {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(chunk) => run(chunk),
            };
        }
        total
    })
}

/// An optional string field: absent or `null` is `None`; anything else but a string is
/// refused with `not_a_string`.
fn optional<'v>(
    value: Option<&'v Value>,
    not_a_string: &'static str,
) -> Result<Option<&'v str>, &'static str> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(not_a_string),
    }
}

const NAMESPACE_NOT_A_STRING: &str = "`namespace` must be a string";

fn refuse(msg: &Message, why: &str) -> Ready<()> {
    // Anyone who may publish to these topics chooses how often this happens: one warning a
    // second at most, with how many were dropped meanwhile, so a flood cannot fill a disk.
    if let Some(dropped) = REFUSALS.note() {
        tracing::warn!(topic = msg.topic(), dropped, "{why}; message dropped");
    }
    msg.fail(json!({"message": why, "topic": msg.topic()}));
    ready(())
}

static REFUSALS: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Mutex;
    use switchboard_bus::{Reply, ReplyTo};

    /// The errors a publisher hears back for `data` from send, broadcast and disconnect.
    fn refusals(data: Value) -> Vec<String> {
        #[derive(Default)]
        struct Heard(Mutex<Vec<String>>);
        impl ReplyTo for Heard {
            fn deliver(&self, _topic: &str, reply: Reply) {
                if let Reply::Fail(e) = reply {
                    let text = e["message"].as_str().unwrap_or_default().to_string();
                    self.0.lock().unwrap().push(text);
                }
            }
        }
        let registry: Sockets = Arc::default();
        let heard = Arc::new(Heard::default());
        let msg = Message::new("t", data).with_reply_to(heard.clone());
        // The handlers do their work when called; their futures are already ready.
        drop(send_handler(registry.clone(), Counter::default())(
            msg.clone(),
        ));
        drop(broadcast_handler(registry.clone(), Counter::default())(
            msg.clone(),
        ));
        drop(disconnect_handler(registry, Counter::default())(msg));
        let heard = heard.0.lock().unwrap().clone();
        heard
    }

    #[test]
    fn each_bad_field_is_named_in_the_refusal() {
        let namespace = "`namespace` must be a string";
        assert_eq!(
            refusals(json!({"username": "a", "type": "t", "namespace": 1})),
            [namespace, namespace, namespace]
        );
        assert_eq!(
            refusals(json!({"namespace": "n", "reason": 1})),
            [
                "send needs a string `username`",
                "delivery needs a string `type`",
                "disconnect needs a string `username`",
            ]
        );
        assert_eq!(
            refusals(json!({"username": "a", "type": "t", "reason": 1})),
            ["`reason` must be a string"]
        );
    }

    #[test]
    fn every_item_is_visited_once_whatever_the_split() {
        for (len, threads) in [(0, 2), (1, 2), (5, 2), (4096, 2), (4097, 3), (10, 16)] {
            let visits: Vec<AtomicU8> = (0..len).map(|_| AtomicU8::new(0)).collect();
            let counted = split_over_threads(&visits, threads, |v| {
                v.fetch_add(1, Ordering::Relaxed) == 0 // true on the first visit
            });
            assert!(
                visits.iter().all(|v| v.load(Ordering::Relaxed) == 1),
                "{len}/{threads}"
            );
            assert_eq!(counted, len as u64, "{len}/{threads}");
        }
    }

    #[test]
    fn a_panic_on_a_helper_thread_reaches_the_caller() {
        let items: Vec<u32> = (0..100).collect();
        // The last chunk runs on a helper thread.
        let outcome = std::panic::catch_unwind(|| {
            split_over_threads(&items, 2, |i| {
                assert!(*i != 99, "a send panicked");
                true
            })
        });
        assert!(outcome.is_err(), "not swallowed as a short count");
    }

    #[test]
    fn large_deliveries_use_every_core_small_ones_one_thread() {
        assert_eq!(fan_out_threads(0), 1);
        assert_eq!(fan_out_threads(RECIPIENTS_PER_THREAD * 2 - 1), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(fan_out_threads(RECIPIENTS_PER_THREAD * 64), cores.min(64));
    }
}
