//! A transport as its user starts and stops it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{Service, TransportCounters};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A way for clients to reach a [`Service`]: configured first, then started with the
/// service it will call. `switchboard::Container` is given transports this way and starts
/// them all with one service, so that a socket of any of them can be sent to.
pub trait Transport: Send + 'static {
    /// Starts serving `service` (binding a listener, if the transport has one).
    fn start<S: Service>(
        self,
        service: Arc<S>,
    ) -> impl Future<Output = std::io::Result<Box<dyn RunningTransport>>> + Send;
}

/// A started transport.
pub trait RunningTransport: Send + Sync + 'static {
    /// The transport's name: `"websocket"`, `"sse"`, `"memory"`.
    fn name(&self) -> &'static str;

    /// The address it listens on, if it listens.
    fn local_addr(&self) -> Option<SocketAddr>;

    /// Its counters now.
    fn counters(&self) -> TransportCounters;

    /// Stops taking new sockets, closes every socket with 1001 (going away), and waits until
    /// each has ended and [`Service::on_close`] has run for it, or until `drain` has passed.
    /// Its counters can still be read meanwhile and after; a second call reports at once.
    fn shutdown(&self, drain: Duration) -> BoxFuture<'static, ShutdownReport>;
}

/// What happened during [`RunningTransport::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// True when every socket finished its close before the deadline.
    pub drained: bool,
}

impl ShutdownReport {
    /// A report saying whether every socket finished in time.
    pub fn new(drained: bool) -> Self {
        ShutdownReport { drained }
    }

    /// Both reports together: drained only if both drained.
    pub fn and(self, other: ShutdownReport) -> ShutdownReport {
        ShutdownReport::new(self.drained && other.drained)
    }
}
