//! The publisher: one task writes messages to NATS in publish order, from a queue bounded in
//! messages and in bytes, so a slow or absent broker turns into failed publishes, not memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::ENVELOPE_HEADER;

/// One message to write.
pub(crate) struct Outgoing {
    pub(crate) subject: String,
    pub(crate) reply: Option<String>,
    pub(crate) payload: Bytes,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Messages,
    Bytes,
    Closed,
}

impl Refused {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refused::Messages => "too many messages waiting for NATS",
            Refused::Bytes => "too many bytes waiting for NATS",
            Refused::Closed => "the publisher has stopped",
        }
    }
}

/// The sending side of the queue.
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Outbox {
    /// A queue of at most `max_messages` and `max_bytes`, drained by a task on `client`.
    pub(crate) fn start(
        client: async_nats::Client,
        max_messages: usize,
        max_bytes: usize,
    ) -> Outbox {
        let (tx, rx) = mpsc::channel(max_messages.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(publish_in_order(client, rx, bytes.clone()));
        Outbox {
            tx,
            bytes,
            max_bytes,
        }
    }

    /// Queues `out` or refuses it at once (publishing must not block).
    pub(crate) fn try_send(&self, out: Outgoing) -> Result<(), Refused> {
        let len = out.payload.len();
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_bytes && before > 0 {
            // Over the bound; one message larger than the whole bound still goes alone.
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(Refused::Bytes);
        }
        self.tx.try_send(out).map_err(|e| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Messages,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }

    /// Queues `out` behind everything queued so far, waiting for room.
    pub(crate) async fn send(&self, out: Outgoing) -> Result<(), Refused> {
        let len = out.payload.len();
        self.bytes.fetch_add(len, Ordering::AcqRel);
        self.tx.send(out).await.map_err(|_| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            Refused::Closed
        })
    }

    /// Messages and bytes queued now.
    pub(crate) fn queued(&self) -> (usize, usize) {
        (
            self.tx.max_capacity() - self.tx.capacity(),
            self.bytes.load(Ordering::Acquire),
        )
    }
}

/// Writes messages to NATS in the order they were queued.
async fn publish_in_order(
    client: async_nats::Client,
    mut outgoing: mpsc::Receiver<Outgoing>,
    bytes: Arc<AtomicUsize>,
) {
    while let Some(out) = outgoing.recv().await {
        let len = out.payload.len();
        let mut headers = HeaderMap::new();
        headers.insert(ENVELOPE_HEADER, "1");
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
        bytes.fetch_sub(len, Ordering::AcqRel);
        if let Err(e) = sent {
            tracing::warn!(subject = %out.subject, error = %e, "nats publish failed");
        }
    }
}
