//! `wss://` upgrades in process: the hand-written upgrade serves TLS as it serves plain TCP
//! (the socket registered before its `101`, frames sent right behind the request kept), and
//! hyper still serves a head too large for the first read.

use std::time::Duration;

use serde_json::json;
use switchboard::{Config, Running};
use switchboard_test_support::tls::{tls_stream, TestCa};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::harness::{container, next_published, recorder, start, token, SECRET_ENV};

/// A gateway serving TLS with a certificate of `ca`, recording connects and messages.
async fn tls_gateway(
    ca: &TestCa,
    dir: &std::path::Path,
) -> (Running, switchboard_test_support::Seen) {
    let files = ca.write_server_files(dir, "server");
    let text = format!(
        "gateway:\n  socket:\n    onconnect: {{publish: \"socket:connection\"}}\n    \
         onmessage: {{publish: \"socket:generalMessage\"}}\n  auth:\n    secret_env: {SECRET_ENV}\n  \
         tls:\n    cert_file: {:?}\n    key_file: {:?}\n",
        files.cert, files.key
    );
    let mut c = container(Config::from_yaml_str(&text).unwrap());
    let seen = recorder(&mut c, &["socket:generalMessage"]);
    (start(c).await, seen)
}

/// A [`tls_gateway`] (its files in the directory returned) and one connection to it, its TLS
/// handshake done.
async fn gateway_and_connection() -> (
    tempfile::TempDir,
    Running,
    switchboard_test_support::Seen,
    switchboard_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (gw, seen) = tls_gateway(&ca, dir.path()).await;
    let (stream, _) = tls_stream(gw.local_addr().unwrap(), ca.client_config())
        .await
        .unwrap();
    (dir, gw, seen, stream)
}

/// The upgrade request of `user`, with `padding` bytes of an extra header.
fn upgrade_request(user: &str, padding: usize) -> String {
    let pad = if padding > 0 {
        format!("X-Padding: {}\r\n", "p".repeat(padding))
    } else {
        String::new()
    };
    format!(
        "GET /connect HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         {pad}Cookie: ID_TOKEN={}\r\n\r\n",
        token(user)
    )
}

/// A masked text frame of `text` (under 64 KiB), as a client sends it.
fn client_text_frame(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81];
    match u16::try_from(text.len()).expect("under 64 KiB") {
        short @ 0..=125 => frame.push(0x80 | short as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&len.to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads as a quick client reads, in one go (the `101` comes in one record), up to the end
/// of the response head; returns the head and what came after it.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = read.split_off(end + 4);
            return (String::from_utf8(read).unwrap(), rest);
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => read.extend_from_slice(&chunk[..n]),
            other => panic!(
                "no whole head: {other:?} after {}",
                String::from_utf8_lossy(&read)
            ),
        }
    }
}

/// Over TLS, as on plain TCP, the socket is registered before its `101` goes out: a client
/// that has read its `101` finds itself registered at once (hyper's path registered it a
/// few microseconds after). The client is a blocking one on a thread of its own, which reads
/// the `101` the moment it arrives. The frame sent right behind the request, in the same TLS
/// write, is the socket's first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_socket_is_registered_before_its_client_reads_the_101() {
    use std::io::Write;
    use switchboard_tls::rustls::{pki_types::ServerName, ClientConnection, StreamOwned};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (gw, mut seen) = tls_gateway(&ca, dir.path()).await;
    let addr = gw.local_addr().unwrap();
    let sockets = gw.sockets().clone();
    let client = ca.client_config();
    const CLIENTS: usize = 200;
    let clients = tokio::task::spawn_blocking(move || {
        let mut late = Vec::new();
        let mut open = Vec::new();
        for i in 0..CLIENTS {
            let user = format!("fresh{i}");
            let name = ServerName::try_from("localhost").unwrap();
            let session = ClientConnection::new(client.clone(), name).unwrap();
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut tls = StreamOwned::new(session, tcp);
            let mut request = upgrade_request(&user, 0).into_bytes();
            request.extend(client_text_frame(&format!(
                r#"{{"type":"hi","payload":{i}}}"#
            )));
            tls.write_all(&request).unwrap();
            let head = switchboard_test_support::read_head_blocking(&mut tls);
            assert!(
                head.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            if sockets.count_of_user(&user, None) != 1 {
                late.push(i);
            }
            open.push(tls);
        }
        (late, open)
    });
    let mut heard = Vec::new();
    for _ in 0..CLIENTS {
        let (_, data, context) = next_published(&mut seen).await;
        assert_eq!(data["type"], "hi", "{data}");
        assert_eq!(
            context["username"],
            json!(format!("fresh{}", data["payload"])),
            "{context}"
        );
        heard.push(data["payload"].as_u64().unwrap());
    }
    heard.sort_unstable();
    assert_eq!(heard, (0..CLIENTS as u64).collect::<Vec<_>>());
    let (late, open) = clients.await.unwrap();
    assert!(
        late.is_empty(),
        "sockets not yet registered when their client had the 101: {late:?}"
    );
    drop(open);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A head over the first read's 4 KiB (big cookies), or one written in pieces, is read whole
/// by the hand-written upgrade too: the socket is registered before its `101` (hyper's, with
/// its `date`, registered it after), and the frame sent behind the request arrives.
#[tokio::test]
async fn a_wss_upgrade_too_large_for_the_first_read_is_registered_before_its_101_too() {
    for (padding, in_pieces) in [(6000, false), (0, true), (20_000, true)] {
        let what = format!("{padding} bytes of padding, in pieces: {in_pieces}");
        let (_dir, gw, mut seen, mut stream) = gateway_and_connection().await;
        let mut request = upgrade_request("alex", padding).into_bytes();
        request.extend(client_text_frame(r#"{"type":"hi","payload":"big"}"#));
        if in_pieces {
            for piece in request.chunks(700) {
                stream.write_all(piece).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            stream.write_all(&request).await.unwrap();
        }
        let (head, _) = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
        assert_eq!(gw.sockets().count_of_user("alex", None), 1, "{what}");
        assert!(
            !head.to_ascii_lowercase().contains("\r\ndate: "),
            "{what}: {head}"
        );
        let (_, data, _) = next_published(&mut seen).await;
        assert_eq!(data, json!({"type": "hi", "payload": "big"}), "{what}");
        drop(stream);
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

/// A refusal over TLS is a whole HTTP answer, then a clean end (`close_notify`), on either
/// path: the hand-written one (a bad token, the request in one write or in pieces) and
/// hyper's (refused by the cheap checks, which hyper answers and then drops without a
/// shutdown).
#[tokio::test]
async fn a_wss_upgrade_refused_gets_its_whole_answer_and_a_clean_close() {
    let forged = upgrade_request("alex", 0).replace("ID_TOKEN=", "ID_TOKEN=forged");
    let foreign = upgrade_request("alex", 0).replace(
        "Host: localhost\r\n",
        "Host: localhost\r\nOrigin: https://evil.example\r\n",
    );
    let elsewhere = upgrade_request("alex", 0).replace("GET /connect ", "GET /elsewhere ");
    let cases = [
        ("forged token, one write", forged.clone(), false, "401"),
        ("forged token, in pieces", forged, true, "401"),
        ("foreign origin", foreign, false, "403"),
        ("another path", elsewhere, false, "404"),
    ];
    for (what, request, in_pieces, status) in cases {
        let (_dir, gw, _seen, mut stream) = gateway_and_connection().await;
        if in_pieces {
            let (first, rest) = request.split_at(40);
            stream.write_all(first.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(rest.as_bytes()).await.unwrap();
        } else {
            stream.write_all(request.as_bytes()).await.unwrap();
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the connection ends");
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            read.is_ok(),
            "{what}: cut, not closed: {read:?} after {answer}"
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-length: {}", body.len())),
            "{what}: {answer}"
        );
        assert_eq!(gw.sockets().count(), 0);
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

/// A message larger than the first read, written with the request: what the first read left
/// (decrypted or not, in the TLS session) is the socket's, and the message arrives whole.
#[tokio::test]
async fn a_message_sent_with_the_wss_request_past_the_first_read_arrives_whole() {
    let (_dir, gw, mut seen, mut stream) = gateway_and_connection().await;
    let fill = "f".repeat(20_000);
    let mut request = upgrade_request("alex", 0).into_bytes();
    request.extend(client_text_frame(&format!(
        r#"{{"type":"big","payload":"{fill}"}}"#
    )));
    request.extend(client_text_frame(r#"{"type":"after","payload":1}"#));
    stream.write_all(&request).await.unwrap();
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, data, _) = next_published(&mut seen).await;
    assert_eq!(data, json!({"type": "big", "payload": fill}));
    let (_, data, _) = next_published(&mut seen).await;
    assert_eq!(data, json!({"type": "after", "payload": 1}));
    drop(stream);
    gw.shutdown(Duration::from_secs(2)).await;
}
