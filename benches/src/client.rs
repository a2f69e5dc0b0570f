//! The load client's connections: TCP from a chosen loopback source address, a minimal
//! HTTP/1.1 upgrade with the JWT in the `ID_TOKEN` cookie, then fastwebsockets frames.
//!
//! The handshake is written by hand (a dozen lines) rather than with a client library so that
//! the client spends as little CPU per connection as possible, and so that every server gets
//! byte-for-byte the same request.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use fastwebsockets::{Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The server's address (loopback).
    pub addr: SocketAddr,
    /// The upgrade path.
    pub path: String,
    /// The namespace query parameter.
    pub namespace: String,
}

/// `count` source addresses `prefix.1` ..= `prefix.count` (e.g. `127.1.0.1`...), so that many
/// sockets do not exhaust the ephemeral ports of one address. An empty prefix means "let the
/// kernel choose" (no bind).
pub fn source_addresses(prefix: &str, count: u8) -> Result<Vec<IpAddr>, String> {
    if prefix.is_empty() {
        return Ok(Vec::new());
    }
    (1..=count.max(1))
        .map(|i| {
            let text = format!("{prefix}.{i}");
            let ip: Ipv4Addr = text
                .parse()
                .map_err(|_| format!("`{text}` is not an IPv4 address"))?;
            if !ip.is_loopback() {
                return Err(format!("source address {ip} is not loopback (127.0.0.0/8)"));
            }
            Ok(IpAddr::V4(ip))
        })
        .collect()
}

/// Opens TCP to `to`, bound to `from` first when given.
pub async fn tcp(to: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The upgrade request for `token`.
pub fn upgrade_request(ep: &Endpoint, token: &str) -> Vec<u8> {
    format!(
        "GET {path}?namespace={ns} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Cookie: ID_TOKEN={token}\r\n\r\n",
        path = ep.path,
        ns = ep.namespace,
        host = ep.addr,
    )
    .into_bytes()
}

/// Connects and completes the upgrade; returns the stream, ready for frames.
///
/// Only the response head is taken from the stream: a server may send a frame right behind
/// its `101` (a heartbeat ping whose time has come, say), and that frame is the reader's.
pub async fn handshake(ep: &Endpoint, from: Option<IpAddr>, token: &str) -> io::Result<TcpStream> {
    let mut stream = tcp(ep.addr, from).await?;
    stream.write_all(&upgrade_request(ep, token)).await?;
    let mut buf = [0u8; RESPONSE_HEAD_MAX];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the handshake",
            ));
        }
        if let Some(head) = response_head(&buf[..n]).map_err(io::Error::other)? {
            stream.read_exact(&mut buf[..head]).await?;
            return Ok(stream);
        }
        // Not all here yet; peeking again at once would see the same bytes.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// The longest response head the client reads.
pub const RESPONSE_HEAD_MAX: usize = 1024;

/// The length of the `101` response head at the start of `read` (what has arrived so far),
/// `None` while it is not all here. Fails on another status, or on a head over
/// [`RESPONSE_HEAD_MAX`]. What follows the head is not looked at.
pub fn response_head(read: &[u8]) -> Result<Option<usize>, String> {
    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match read.len() >= RESPONSE_HEAD_MAX {
            true => Err(format!(
                "response head larger than {RESPONSE_HEAD_MAX} bytes"
            )),
            false => Ok(None),
        };
    };
    let status = read.split(|&b| b == b'\r').next().unwrap_or_default();
    if !status.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(status)
        ));
    }
    Ok(Some(end + 4))
}

/// Connects, upgrades, and wraps the stream as a client WebSocket that answers pings.
pub async fn connect(
    ep: &Endpoint,
    from: Option<IpAddr>,
    token: &str,
) -> io::Result<WebSocket<TcpStream>> {
    let stream = handshake(ep, from, token).await?;
    let mut ws = WebSocket::after_handshake(stream, Role::Client);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    ws.set_writev(false);
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_loopback_only() {
        let s = source_addresses("127.1.0", 3).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], "127.1.0.3".parse::<IpAddr>().unwrap());
        assert!(source_addresses("10.0.0", 2).is_err());
        assert!(source_addresses("127.1", 2).is_err());
        assert!(source_addresses("", 2).unwrap().is_empty());
    }

    #[test]
    fn a_response_head_is_read_whole_and_only_a_101_passes() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(response_head(&ok[..20]), Ok(None));
        assert_eq!(response_head(ok), Ok(Some(ok.len())));
        let mut ping_behind = ok.to_vec();
        ping_behind.extend_from_slice(&[0x89, 0x00]);
        assert_eq!(response_head(&ping_behind), Ok(Some(ok.len())));
        let refused = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert!(response_head(refused).unwrap_err().contains("401"));
        assert!(response_head(&[b'x'; RESPONSE_HEAD_MAX]).is_err());
    }

    #[tokio::test]
    async fn a_frame_right_behind_the_101_is_left_for_the_reader() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = Endpoint {
            addr: listener.local_addr().unwrap(),
            path: "/connect".into(),
            namespace: "bench".into(),
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
            // The head and a ping in one write, as a heartbeat sweep may send them.
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x89\x00")
                .unwrap();
            s
        });
        let mut stream = handshake(&ep, None, "a.b.c").await.unwrap();
        let mut ping = [0u8; 2];
        stream.read_exact(&mut ping).await.unwrap();
        assert_eq!(ping, [0x89, 0x00]);
        drop(server.join().unwrap());
    }

    #[test]
    fn the_request_carries_the_token_and_namespace() {
        let ep = Endpoint {
            addr: "127.0.0.1:4000".parse().unwrap(),
            path: "/connect".into(),
            namespace: "bench".into(),
        };
        let req = String::from_utf8(upgrade_request(&ep, "a.b.c")).unwrap();
        assert!(req.starts_with("GET /connect?namespace=bench HTTP/1.1\r\n"));
        assert!(req.contains("Cookie: ID_TOKEN=a.b.c\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
