//! A deliberately minimal WebSocket client over raw TCP, for sending what a well-behaved
//! client library would refuse to send (bad UTF-8, stray continuations) and for not
//! answering pings.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) use switchboard_transport::codec::{CLOSE, CONTINUATION, PING, PONG, TEXT};

/// A masked client frame (the codec's encoder).
pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    switchboard_transport::codec::encode_client_frame(
        fin,
        opcode,
        payload,
        [0x11, 0x22, 0x33, 0x44],
    )
}

pub(crate) struct Client {
    stream: TcpStream,
    /// The `101`'s head, lower-cased.
    pub(crate) head: String,
}

/// An upgrade request to `path` with RFC 6455's example key, and `extra` header lines.
fn request(addr: SocketAddr, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr, path: &str) -> Client {
        Self::connect_sending(addr, path, &[]).await
    }

    /// Connects, sending `early` (frames, say) in the same write as the upgrade request.
    pub(crate) async fn connect_sending(addr: SocketAddr, path: &str, early: &[u8]) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::upgrade(stream, addr, path, early).await
    }

    /// Connects, sending the upgrade request in two writes a moment apart (split after
    /// `first` bytes, with `extra` header lines in it), then `early` right behind it.
    pub(crate) async fn connect_in_pieces(
        addr: SocketAddr,
        path: &str,
        extra: &str,
        first: usize,
        early: &[u8],
    ) -> Client {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = request(addr, path, extra);
        req.extend_from_slice(early);
        let (a, b) = req.split_at(first.min(req.len()));
        stream.write_all(a).await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stream.write_all(b).await.unwrap();
        Self::read_upgrade(stream).await
    }

    /// Connects from the loopback address `local` (127.0.0.x), as another client machine would.
    pub(crate) async fn connect_from(local: &str, addr: SocketAddr, path: &str) -> Client {
        Self::upgrade(tcp_from(local, addr).await, addr, path, &[]).await
    }

    async fn upgrade(mut stream: TcpStream, addr: SocketAddr, path: &str, early: &[u8]) -> Client {
        let mut req = request(addr, path, "");
        req.extend_from_slice(early);
        stream.write_all(&req).await.unwrap();
        Self::read_upgrade(stream).await
    }

    async fn read_upgrade(mut stream: TcpStream) -> Client {
        // read the response head byte by byte so no frame bytes are swallowed
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        // RFC 6455 section 1.3's example key and its accept value.
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{head}"
        );
        Client { stream, head }
    }

    pub(crate) async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.stream
            .write_all(&frame(fin, opcode, payload))
            .await
            .unwrap();
    }

    /// The next frame that is not a ping: (opcode, payload).
    pub(crate) async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.read_any())
                .await
                .expect("a frame within 10 s");
            if frame.0 != PING {
                return frame;
            }
        }
    }

    /// Reads until a close frame and returns its code.
    pub(crate) async fn read_close_code(&mut self) -> u16 {
        loop {
            let (op, payload) = self.read_frame().await;
            if op == CLOSE {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    /// The next frame, or `None` once the connection has ended (or broke).
    pub(crate) async fn read_any_or_end(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h).await.ok()?;
        let len = match h[1] & 0x7f {
            126 => self.stream.read_u16().await.ok()? as usize,
            127 => self.stream.read_u64().await.ok()? as usize,
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0f, payload))
    }

    async fn read_any(&mut self) -> (u8, Vec<u8>) {
        self.read_any_or_end().await.expect("a frame, not the end")
    }
}

/// A TCP connection to `addr` from the loopback address `local` (127.0.0.x).
pub(crate) async fn tcp_from(local: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}
