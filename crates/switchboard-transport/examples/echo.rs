//! A plain WebSocket echo server on the transport: every text or binary message comes back
//! as it was sent. Used for protocol conformance runs (Autobahn) and as the smallest example
//! of a [`Service`].
//!
//! ```text
//! cargo run -p switchboard-transport --example echo -- 127.0.0.1:9001 /
//! ```

use std::sync::Arc;
use std::time::Duration;

use switchboard_transport::{
    CloseReason, HttpResponse, Inbound, RequestParts, Server, Service, SocketRef, TransportOptions,
};

struct Echo;

impl Service for Echo {
    type Admission = ();
    type Session = SocketRef;

    fn admit(&self, _request: &RequestParts) -> Result<(), HttpResponse> {
        Ok(())
    }

    fn open(&self, _admission: (), socket: SocketRef) -> SocketRef {
        socket
    }

    fn on_message(&self, socket: &SocketRef, message: Inbound) {
        let _ = match message {
            Inbound::Text(text) => socket.send_text(text),
            Inbound::Binary(data) => socket.send_binary(data),
        };
    }

    fn on_close(&self, _socket: SocketRef, _reason: CloseReason) {}
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let path = args.next().unwrap_or_else(|| "/".into());
    let mut options = TransportOptions::default();
    options.path = path;
    // Autobahn sends messages up to 16 MiB.
    options.max_message_size = 32 << 20;
    options.send_queue = 1024;
    // Conformance clients send any Origin.
    options.origins = switchboard_transport::OriginPolicy::Any;
    // A conformance case watches every frame it gets, and a heartbeat ping inside one (case
    // 5.19 waits two seconds) is an event it does not expect. The heartbeat sweep pings each
    // socket at its list's tick, anywhere within the interval, so in a run of 300 cases some
    // case would meet one. The heartbeat has tests of its own.
    options.heartbeat_interval = Duration::from_secs(3600);
    let server = Server::bind(addr.parse().expect("address"), options, Arc::new(Echo)).await?;
    println!("echo server on ws://{}", server.local_addr());
    tokio::signal::ctrl_c().await?;
    server.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
