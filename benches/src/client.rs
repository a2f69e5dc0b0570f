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
pub async fn handshake(ep: &Endpoint, from: Option<IpAddr>, token: &str) -> io::Result<TcpStream> {
    let mut stream = tcp(ep.addr, from).await?;
    stream.write_all(&upgrade_request(ep, token)).await?;
    let mut buf = [0u8; RESPONSE_HEAD_MAX];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the handshake",
            ));
        }
        len += n;
        if response_head(&buf[..len]).map_err(io::Error::other)? {
            return Ok(stream);
        }
    }
}

/// The longest response head the client reads.
pub const RESPONSE_HEAD_MAX: usize = 1024;

/// Whether `read` (everything read so far) is a whole `101` response head: `Ok(false)` while it
/// is not all here. Fails on another status, on bytes after the head (the bench servers send
/// nothing before the client speaks), or on a head over [`RESPONSE_HEAD_MAX`].
pub fn response_head(read: &[u8]) -> Result<bool, String> {
    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match read.len() >= RESPONSE_HEAD_MAX {
            true => Err(format!(
                "response head larger than {RESPONSE_HEAD_MAX} bytes"
            )),
            false => Ok(false),
        };
    };
    let status = read.split(|&b| b == b'\r').next().unwrap_or_default();
    if !status.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(status)
        ));
    }
    if end + 4 != read.len() {
        let after = &read[end + 4..];
        return Err(format!(
            "data after the 101 response: {} bytes, {:02x?}",
            after.len(),
            &after[..after.len().min(16)]
        ));
    }
    Ok(true)
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
        assert_eq!(response_head(&ok[..20]), Ok(false));
        assert_eq!(response_head(ok), Ok(true));
        let mut more = ok.to_vec();
        more.push(0x81);
        assert!(response_head(&more).unwrap_err().contains("after"));
        let refused = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert!(response_head(refused).unwrap_err().contains("401"));
        assert!(response_head(&[b'x'; RESPONSE_HEAD_MAX]).is_err());
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
