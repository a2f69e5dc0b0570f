//! The events this node published that wait for an answer, by id.
//!
//! An entry keeps only the way back (the message's topic and its `ReplyTo`), never the
//! event's data or context, and leaves the map the moment its answer (or NATS's "no
//! responders") arrives; the sweeper fails the ones still there at their deadline. Ids grow
//! with publish time and every entry has the same timeout, so the map's first entries are
//! the first to expire.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use switchboard_bus::Message;
use tokio::time::Instant;

/// How many published events wait for an answer, and their size on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingAnswers {
    /// Events waiting.
    pub events: usize,
    /// Their envelopes' bytes, as published. The map itself keeps none of their data.
    pub bytes: usize,
}

struct Pending {
    way_back: Message,
    deadline: Instant,
    bytes: usize,
}

#[derive(Default)]
struct Waiting {
    next_id: u64,
    by_id: BTreeMap<u64, Pending>,
    bytes: usize,
}

/// The map of pending answers, bounded in entries.
pub(crate) struct Answers {
    waiting: Mutex<Waiting>,
    timeout: Duration,
    max: usize,
}

impl Answers {
    pub(crate) fn new(timeout: Duration, max: usize) -> Self {
        Answers {
            waiting: Mutex::new(Waiting {
                next_id: 1,
                ..Waiting::default()
            }),
            timeout,
            max,
        }
    }

    /// Registers `msg` (of `bytes` on the wire) and returns its id; `None` when full.
    pub(crate) fn register(&self, msg: &Message, bytes: usize) -> Option<u64> {
        let way_back = msg.way_back();
        let mut w = lock(&self.waiting);
        if w.by_id.len() >= self.max {
            return None;
        }
        let id = w.next_id;
        w.next_id += 1;
        w.bytes += bytes;
        let deadline = Instant::now() + self.timeout;
        w.by_id.insert(
            id,
            Pending {
                way_back,
                deadline,
                bytes,
            },
        );
        Some(id)
    }

    /// Removes `id` and returns its way back; `None` if it is unknown or already answered.
    pub(crate) fn take(&self, id: u64) -> Option<Message> {
        let mut w = lock(&self.waiting);
        let pending = w.by_id.remove(&id)?;
        w.bytes -= pending.bytes;
        Some(pending.way_back)
    }

    /// Removes and returns every entry whose deadline is at or before `now`.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Message> {
        let mut w = lock(&self.waiting);
        let mut expired = Vec::new();
        while let Some(entry) = w.by_id.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            let pending = entry.remove();
            w.bytes -= pending.bytes;
            expired.push(pending.way_back);
        }
        expired
    }

    pub(crate) fn counts(&self) -> PendingAnswers {
        let w = lock(&self.waiting);
        PendingAnswers {
            events: w.by_id.len(),
            bytes: w.bytes,
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Weak};

    use serde_json::{json, Value};
    use switchboard_bus::{Reply, ReplyTo};

    use super::*;

    struct Socket;
    impl ReplyTo for Socket {
        fn deliver(&self, _topic: &str, _reply: Reply) {}
    }

    fn event(data: Value) -> (Message, Weak<dyn ReplyTo>, Weak<Value>) {
        let to: Arc<dyn ReplyTo> = Arc::new(Socket);
        let data = Arc::new(data);
        let msg = Message::new("t", Value::Null)
            .with_shared_data(data.clone())
            .with_reply_to(to.clone());
        (msg, Arc::downgrade(&to), Arc::downgrade(&data))
    }

    #[test]
    fn an_entry_keeps_no_data_and_leaves_when_answered() {
        let answers = Answers::new(Duration::from_secs(60), 10);
        let (msg, socket, data) = event(json!({"big": "x".repeat(1000)}));
        let id = answers.register(&msg, 1000).unwrap();
        drop(msg);
        assert!(data.upgrade().is_none(), "the map keeps no data");
        assert_eq!(
            answers.counts(),
            PendingAnswers {
                events: 1,
                bytes: 1000
            }
        );
        assert_eq!(answers.take(id).unwrap().topic(), "t");
        assert!(answers.take(id).is_none(), "a second answer finds nothing");
        assert_eq!(answers.counts(), PendingAnswers::default());
        assert!(socket.upgrade().is_none(), "nothing keeps the socket");
    }

    #[test]
    fn the_map_is_bounded_and_expires_in_order() {
        let answers = Answers::new(Duration::ZERO, 2);
        let (msg, _, _) = event(Value::Null);
        let first = answers.register(&msg, 1).unwrap();
        let second = answers.register(&msg, 1).unwrap();
        assert!(answers.register(&msg, 1).is_none(), "full");
        assert!(first < second);
        assert_eq!(answers.expire(Instant::now()).len(), 2);
        assert_eq!(answers.counts(), PendingAnswers::default());
        assert!(answers.register(&msg, 1).is_some(), "room again");
    }
}
