//! A real WebSocket client (tokio-tungstenite) on a gateway's TCP address, for the tests
//! that are about WebSocket itself; the others use [`crate::Client`].

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::{next_json, Event, Events};
use crate::{request, token, WAIT};

/// A WebSocket client connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a WebSocket client runs on: plain TCP ([`Ws`]) or TLS ([`crate::tls::Wss`]).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// Connects to `addr` as `user` (the token as the `ID_TOKEN` cookie), in `namespace`.
pub async fn connect(addr: SocketAddr, user: &str, namespace: Option<&str>) -> Ws {
    connect_request(addr, request(&token(user), namespace))
        .await
        .unwrap_or_else(|status| panic!("refused with {status}"))
}

/// Upgrades `request` (its path, query and headers) at `addr`; a refusal's HTTP status as
/// the error.
pub async fn connect_request(addr: SocketAddr, request: http::Request<()>) -> Result<Ws, u16> {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut req = format!("ws://{addr}{target}")
        .into_client_request()
        .unwrap();
    for (name, value) in request.headers() {
        req.headers_mut().append(name, value.clone());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connecting to {addr}: {e}"),
    }
}

/// The next text frame as JSON, within 5 s (pings and pongs skipped); panics on a close.
pub async fn recv<S: Stream>(ws: &mut WebSocketStream<S>) -> Value {
    next_json(ws, WAIT).await
}

/// [`recv`] with another deadline.
pub async fn recv_within<S: Stream>(ws: &mut WebSocketStream<S>, within: Duration) -> Value {
    next_json(ws, within).await
}

/// Sends `v` as a text frame.
pub async fn send<S: Stream>(ws: &mut WebSocketStream<S>, v: Value) {
    ws.send(WsMessage::text(v.to_string())).await.unwrap();
}

/// Asserts that no text frame arrives within `ms` and that the socket stays open.
pub async fn assert_silent<S: Stream>(ws: &mut WebSocketStream<S>, ms: u64) {
    crate::client::assert_silent(ws, ms).await
}

/// Reads until a close frame (within 10 s); returns its code.
pub async fn close_code<S: Stream>(ws: &mut WebSocketStream<S>) -> u16 {
    crate::client::close_code(ws).await
}

/// Starts the close handshake with `code`.
pub(crate) async fn close<S: Stream>(ws: &mut WebSocketStream<S>, code: u16) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    };
    ws.close(Some(frame)).await.unwrap();
}

impl<S: Stream> Events for WebSocketStream<S> {
    async fn next_event(&mut self) -> Event {
        loop {
            return match self.next().await {
                Some(Ok(WsMessage::Text(text))) => {
                    Event::Json(serde_json::from_str(&text).unwrap())
                }
                Some(Ok(WsMessage::Pong(_))) => Event::Pong,
                Some(Ok(WsMessage::Close(frame))) => {
                    Event::Close(frame.map_or(1005, |f| f.code.into()))
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => Event::Ended,
            };
        }
    }
}
