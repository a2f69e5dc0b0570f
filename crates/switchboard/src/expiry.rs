//! Sockets do not outlive their token: every socket is filed under its token's `exp`, and one
//! task per gateway closes each socket whose time has come (4001, `token expired`), unless
//! the client has refreshed its token in-band and the socket was filed again under the new
//! `exp`.
//!
//! One ordered map and one task for the whole gateway, instead of a timer per socket: an idle
//! socket costs one map entry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_core::SocketRef;
use switchboard_registry::ConnId;
use tokio::sync::Notify;

use crate::gateway::TOKEN_EXPIRED_CODE;

/// The sockets by the second they expire.
pub(crate) struct Expiries {
    /// `(exp + leeway, id)`: the close comes as the clock reaches that second.
    queue: Mutex<BTreeMap<(u64, ConnId), SocketRef>>,
    leeway: u64,
    /// A socket was filed ahead of the one the task waits for, or the gateway stops.
    changed: Notify,
    stopped: AtomicBool,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Expiries {
    pub(crate) fn new(leeway: Duration) -> Self {
        Expiries {
            queue: Mutex::new(BTreeMap::new()),
            leeway: leeway.as_secs(),
            changed: Notify::new(),
            stopped: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u64, ConnId), SocketRef>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a socket whose token expires at `exp` (seconds since the epoch).
    pub(crate) fn file(&self, exp: u64, id: ConnId, handle: &SocketRef) {
        let key = (exp.saturating_add(self.leeway), id);
        let mut queue = self.lock();
        let first = queue.first_key_value().is_none_or(|(k, _)| key < *k);
        queue.insert(key, handle.clone());
        drop(queue);
        if first {
            self.changed.notify_one();
        }
    }

    /// Takes a socket out (it has ended).
    pub(crate) fn unfile(&self, exp: u64, id: ConnId) {
        self.lock().remove(&(exp.saturating_add(self.leeway), id));
    }

    /// Moves a socket from `old` to `new` (its client refreshed the token).
    pub(crate) fn refile(&self, old: u64, new: u64, id: ConnId, handle: &SocketRef) {
        self.unfile(old, id);
        self.file(new, id, handle);
    }

    /// Stops [`Expiries::run`].
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Closes every socket whose token has expired, as the clock reaches each, until stopped.
    pub(crate) async fn run(self: Arc<Self>) {
        while !self.stopped.load(Ordering::Acquire) {
            let due = self.close_expired(now_secs());
            let wait = match due {
                // Wake as the clock reaches the second `at`.
                Some(at) => {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    Duration::from_secs(at).saturating_sub(now)
                }
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
            }
        }
    }

    /// Closes the sockets filed under `now` or a second before (a token is expired *at* its
    /// `exp`, RFC 7519 4.1.4); returns the next one's second.
    fn close_expired(&self, now: u64) -> Option<u64> {
        let mut expired = Vec::new();
        let next = {
            let mut queue = self.lock();
            while let Some(entry) = queue.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                expired.push(entry.remove());
            }
            queue.first_key_value().map(|(k, _)| k.0)
        };
        for handle in expired {
            handle.close(TOKEN_EXPIRED_CODE, "token expired");
        }
        next
    }
}
