//! Clients of a gateway that serves TLS: `wss://` sockets and HTTPS calls to its API, with a
//! CA the test made ([`TestCa`]) or any rustls client config.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::Value;
use switchboard_tls::rustls::pki_types::ServerName;
use switchboard_tls::rustls::ClientConfig;
use switchboard_tls::tokio_rustls::client::TlsStream;
use switchboard_tls::tokio_rustls::TlsConnector;
pub use switchboard_tls::TestCa;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use crate::{json_exchange, json_request, request, token};

/// A `wss://` client connection; [`crate::websocket`]'s `recv`, `send` and the rest take it.
pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A TLS connection to `addr` as `localhost`, trusting what `client` trusts; the error says
/// why the handshake failed. Also returns the certificate the server showed (DER).
pub async fn tls_stream(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("a valid name");
    let stream = tokio::time::timeout(crate::WAIT, TlsConnector::from(client).connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok((stream, leaf))
}

/// Connects over `wss://` as `user` (the token as the `ID_TOKEN` cookie) at `path`, in
/// `namespace`: the socket and the server's certificate, or why it failed.
pub async fn connect_wss(
    addr: SocketAddr,
    path: &str,
    user: &str,
    namespace: Option<&str>,
    client: Arc<ClientConfig>,
) -> Result<(Wss, Vec<u8>), String> {
    let (stream, leaf) = tls_stream(addr, client).await?;
    let template = request(&token(user), namespace);
    let query = template
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut req = format!("wss://localhost:{}{path}{query}", addr.port())
        .into_client_request()
        .map_err(|e| e.to_string())?;
    for (name, value) in template.headers() {
        req.headers_mut().append(name, value.clone());
    }
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok((ws, leaf))
}

/// [`crate::http_json`] over HTTPS.
pub async fn https_json(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
    method: &str,
    target: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let (stream, _) = tls_stream(addr, client).await?;
    let request = json_request(
        &format!("localhost:{}", addr.port()),
        method,
        target,
        key,
        body,
    );
    Ok(json_exchange(stream, &request).await)
}
