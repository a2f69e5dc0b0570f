//! Every open socket of a server, and the one task that heartbeats them all and closes them
//! at shutdown.
//!
//! One sweep per heartbeat interval for the whole server, instead of a timer in every
//! socket's task: an idle socket then costs no timer and no wake-up of its own between
//! pings, which is what lets a server hold many of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use crate::socket::SocketState;

/// The open sockets, by a number of their own.
#[derive(Default)]
pub(crate) struct SocketList {
    inner: Mutex<(u64, HashMap<u64, Arc<SocketState>>)>,
}

impl SocketList {
    /// Adds a socket; the number removes it again.
    pub(crate) fn insert(&self, socket: Arc<SocketState>) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (next, sockets) = &mut *inner;
        *next += 1;
        sockets.insert(*next, socket);
        *next
    }

    pub(crate) fn remove(&self, number: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.remove(&number);
        if inner.1.is_empty() {
            inner.1.shrink_to_fit();
        }
    }

    /// The sockets open now; the lock is not held while the caller works through them.
    fn snapshot(&self) -> Vec<Arc<SocketState>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.values().cloned().collect()
    }
}

/// Pings every socket each `every` (closing those that did not answer the last ping or are
/// stalled, see [`SocketState::heartbeat`]) until the server shuts down, then closes them
/// all with 1001. A dropped server counts as a shutdown.
pub(crate) async fn heartbeat_until_shutdown(
    sockets: Arc<SocketList>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow_and_update() {
                    for socket in sockets.snapshot() {
                        socket.shut_down();
                    }
                    return;
                }
            }
            _ = tick.tick() => {
                for (i, socket) in sockets.snapshot().into_iter().enumerate() {
                    socket.heartbeat();
                    // A ping is a system call: let other tasks on this thread run now and
                    // then during a sweep of many thousand sockets.
                    if i % 1024 == 1023 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}
