//! `wss://`: the TLS handshake before the upgrade, frames through rustls (large ones that
//! the kernel takes in parts included), refusals of clients that do not trust the server,
//! the minimum protocol version, and a certificate reload under open sockets.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchboard_tls::rustls::pki_types::ServerName;
use switchboard_tls::rustls::ClientConfig;
use switchboard_tls::tokio_rustls::{client::TlsStream, TlsConnector};
use switchboard_tls::{MinVersion, ServerTls, TestCa};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::Harness;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// Connects over TLS with `config` and upgrades at `/ws`.
async fn connect(h: &Harness, config: Arc<ClientConfig>) -> Result<(Wss, Vec<u8>), String> {
    let addr = h.server.local_addr();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // The certificate the server showed, to tell a reload apart.
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok((ws, leaf))
}

async fn echo(ws: &mut Wss, text: &str) {
    ws.send(WsMessage::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), crate::next_data(ws))
        .await
        .expect("an echo within 10 s");
    assert_eq!(got, WsMessage::text(text));
}

async fn tls_harness(tls: &ServerTls) -> Harness {
    let tls = tls.clone();
    Harness::start(move |o| {
        o.tls = Some(tls);
        o.max_message_size = 4 << 20;
        o.send_queue_bytes = 64 << 20;
    })
    .await
}

/// A TLS server with a certificate from a new CA: the files' folder (kept while the test
/// runs), the CA, the server.
async fn trusted_server() -> (tempfile::TempDir, TestCa, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let tls = ServerTls::load(ca.write_server_files(dir.path(), "server")).unwrap();
    let h = tls_harness(&tls).await;
    (dir, ca, h)
}

#[tokio::test]
async fn wss_echoes_and_refuses_clients_that_do_not_trust_the_certificate() {
    let (_dir, ca, h) = trusted_server().await;

    let (mut ws, _) = connect(&h, ca.client_config()).await.unwrap();
    echo(&mut ws, "hello over TLS").await;

    // A client that trusts another CA stops at the TLS handshake.
    let stranger = TestCa::new();
    let refused = connect(&h, stranger.client_config()).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    // So does a plain ws:// client on the TLS port.
    let plain = tokio_tungstenite::connect_async(h.url()).await;
    assert!(plain.is_err(), "plain WebSocket on a TLS port must fail");
    let stats = h.server.stats();
    crate::wait_until("both refusals counted", || {
        stats.snapshot().refused_tls >= 2
    })
    .await;

    // The socket that was open is untouched by the refusals.
    echo(&mut ws, "still here").await;
}

#[tokio::test]
async fn large_messages_cross_tls_whole_and_in_order_both_ways() {
    let (_dir, ca, h) = trusted_server().await;
    let (ws, _) = connect(&h, ca.client_config()).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    // 40 messages of up to 1 MiB each, sent without waiting: the server's echoes go through
    // rustls in chunks while the kernel's buffers fill, and must arrive whole and in order.
    let messages: Vec<String> = (0..40)
        .map(|i| {
            let len = 1000 + (i * 26_893) % (1 << 20);
            let fill = char::from(b'a' + (i % 26) as u8);
            format!("{i:04}{}", fill.to_string().repeat(len))
        })
        .collect();
    let sent = messages.clone();
    let writer = tokio::spawn(async move {
        for m in sent {
            tx.send(WsMessage::text(m)).await.unwrap();
        }
        tx
    });
    // Nothing is read until the server's echoes back up behind the kernel's buffers.
    let stats = h.server.stats();
    crate::wait_until("a backlog", || stats.snapshot().buffered_bytes > 0).await;
    for expected in &messages {
        let got = tokio::time::timeout(Duration::from_secs(20), crate::next_data(&mut rx))
            .await
            .expect("an echo within 20 s");
        let got = got.into_text().unwrap();
        assert_eq!(got.len(), expected.len(), "message {}", &expected[..4]);
        assert!(*got == **expected, "message {} differs", &expected[..4]);
    }
    let tx = writer.await.unwrap();
    let mut ws = tx.reunite(rx).unwrap();
    echo(&mut ws, "after the large ones").await;
    let buffered = h.server.stats().snapshot().buffered_bytes;
    assert_eq!(buffered, 0, "nothing stays counted once everything is out");
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new();
    let files = old_ca.write_server_files(dir.path(), "server");
    let tls = ServerTls::load(files.clone()).unwrap();
    let h = tls_harness(&tls).await;
    let (mut old_socket, old_leaf) = connect(&h, old_ca.client_config()).await.unwrap();

    // The operator replaces the files with a certificate from a new CA, then reloads.
    let new_ca = TestCa::new();
    new_ca.write_server_files(dir.path(), "server");
    tls.reload().unwrap();

    let (mut new_socket, new_leaf) = connect(&h, new_ca.client_config()).await.unwrap();
    assert_ne!(
        old_leaf, new_leaf,
        "new connections get the new certificate"
    );
    let refused = connect(&h, old_ca.client_config()).await;
    assert!(refused.is_err(), "the old certificate is no longer served");
    echo(&mut old_socket, "opened before the reload").await;
    echo(&mut new_socket, "opened after it").await;

    // A bad file is refused and the certificate in use stays.
    std::fs::write(&files.key, "garbage").unwrap();
    assert!(tls.reload().is_err());
    let (mut again, leaf) = connect(&h, new_ca.client_config()).await.unwrap();
    assert_eq!(leaf, new_leaf);
    echo(&mut again, "after a failed reload").await;
}

#[tokio::test]
async fn a_tls13_minimum_refuses_tls12_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let mut files = ca.write_server_files(dir.path(), "server");
    files.min_version = MinVersion::Tls13;
    let tls = ServerTls::load(files).unwrap();
    let h = tls_harness(&tls).await;

    let tls12_only = {
        let provider = switchboard_tls::rustls::crypto::ring::default_provider();
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&switchboard_tls::rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
        Arc::new(config)
    };
    let refused = connect(&h, tls12_only).await.unwrap_err();
    assert!(refused.to_lowercase().contains("version"), "{refused}");
    let (mut ws, _) = connect(&h, ca.client_config()).await.unwrap();
    echo(&mut ws, "TLS 1.3").await;
}
