//! A raw TCP WebSocket client that completes the handshake and then never answers pings.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) async fn connect(addr: SocketAddr, token: &str) -> TcpStream {
    let (stream, head) = open(addr, &upgrade_request(addr, "", token, ""), &[]).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Reads frames until a text frame (opcode 1) and returns its payload. Server frames are
/// unmasked; pings are ignored. No deadline: callers bound the whole stream.
pub(crate) async fn read_text(stream: &mut TcpStream) -> Vec<u8> {
    loop {
        let (opcode, payload) = read_any(stream).await;
        if opcode == TEXT {
            return payload;
        }
    }
}

/// The next frame of any kind: (opcode, payload).
async fn read_any(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7f {
        126 => stream.read_u16().await.unwrap() as usize,
        127 => stream.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

/// A masked client frame (the transport codec's encoder).
pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    switchboard_transport::codec::encode_client_frame(
        fin,
        opcode,
        payload,
        [0x37, 0xfa, 0x21, 0x3d],
    )
}

pub(crate) use switchboard_transport::codec::{CLOSE, TEXT};

/// An upgrade request with `extra` header lines (each ending in `\r\n`) and the token cookie.
pub(crate) fn upgrade_request(addr: SocketAddr, query: &str, token: &str, extra: &str) -> String {
    format!(
        "GET /connect{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Cookie: ID_TOKEN={token}\r\n{extra}\r\n"
    )
}

/// Sends `request` (and `early` bytes in the same write); returns the stream and the response
/// head, read byte by byte so that no frame is swallowed.
pub(crate) async fn open(addr: SocketAddr, request: &str, early: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut bytes = request.as_bytes().to_vec();
    bytes.extend_from_slice(early);
    stream.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if stream.read_exact(&mut b).await.is_err() {
            break;
        }
        head.push(b[0]);
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// The next frame of any kind, within 10 s: (opcode, payload).
pub(crate) async fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(std::time::Duration::from_secs(10), read_any(stream))
        .await
        .expect("a frame within 10 s")
}

/// Reads until a close frame; returns its code.
pub(crate) async fn read_close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (op, payload) = read_frame(stream).await;
        if op == CLOSE {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}
