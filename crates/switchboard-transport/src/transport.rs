//! The WebSocket transport as a [`Transport`]: what `switchboard::Container` starts by default.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::{
    BoxFuture, RunningTransport, Service, ShutdownReport, Transport, TransportCounters,
};
use tokio::net::TcpListener;

use crate::{Server, TransportOptions};

/// WebSocket upgrades (and the [`TransportOptions::endpoints`]) on one TCP address.
#[derive(Debug)]
pub struct WebSocketTransport {
    listen: Listen,
    options: TransportOptions,
}

#[derive(Debug)]
enum Listen {
    Addr(SocketAddr),
    Listener(TcpListener),
}

impl WebSocketTransport {
    /// Will bind `addr` (port 0 for any) when started.
    pub fn bind(addr: SocketAddr, options: TransportOptions) -> Self {
        WebSocketTransport {
            listen: Listen::Addr(addr),
            options,
        }
    }

    /// Will serve on a listener bound already.
    pub fn from_listener(listener: TcpListener, options: TransportOptions) -> Self {
        WebSocketTransport {
            listen: Listen::Listener(listener),
            options,
        }
    }
}

impl Transport for WebSocketTransport {
    async fn start<S: Service>(
        self,
        service: Arc<S>,
    ) -> std::io::Result<Box<dyn RunningTransport>> {
        let server = match self.listen {
            // `Server::bind` names the address in its error.
            Listen::Addr(addr) => Server::bind(addr, self.options, service).await?,
            Listen::Listener(listener) => Server::from_listener(listener, self.options, service)?,
        };
        Ok(Box::new(server))
    }
}

impl RunningTransport for Server {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(Server::local_addr(self))
    }

    fn counters(&self) -> TransportCounters {
        self.stats().snapshot()
    }

    fn shutdown(&self, drain: Duration) -> BoxFuture<'static, ShutdownReport> {
        Box::pin(self.stop(drain))
    }
}
