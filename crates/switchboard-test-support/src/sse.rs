//! A Server-Sent Events client over a raw TCP connection, as a browser's `EventSource` plus
//! `fetch` would use the SSE transport: a `GET` whose chunked body is parsed into events, one
//! `POST` per message, a `DELETE` to close.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::client::{close_code, next_json, Event, Events};
use crate::WAIT;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// The first event: where the session's messages are posted.
    Session {
        /// The post path (and query).
        post: String,
    },
    /// A message (`data:` lines).
    Message(String),
    /// `event: close`.
    Close {
        /// The close code.
        code: u16,
        /// The reason.
        reason: String,
    },
}

/// One SSE session, from the client's side.
pub struct SseClient {
    addr: SocketAddr,
    body: BufReader<TcpStream>,
    /// Undecoded bytes left of the current chunk.
    chunk_left: usize,
    /// Decoded bytes not yet split into lines.
    pending: Vec<u8>,
    ended: bool,
    /// Where this session's messages are posted (path and query).
    pub post: String,
    headers: String,
}

/// Opens a stream at `target` (path and query) with extra request header lines; `Err` is the
/// status line and body of a refusal.
pub async fn open(addr: SocketAddr, target: &str, headers: &str) -> Result<SseClient, String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut body = BufReader::new(stream);
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{headers}\r\n"
    );
    body.get_mut().write_all(request.as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut body).await;
    if !status.contains(" 200 ") {
        let mut rest = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), body.read_to_string(&mut rest)).await;
        return Err(format!("{status}\n{head}\n{rest}"));
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut client = SseClient {
        addr,
        body,
        chunk_left: 0,
        pending: Vec::new(),
        ended: false,
        post: String::new(),
        headers: headers.to_string(),
    };
    match client.next_sse_event().await {
        Some(SseEvent::Session { post }) => client.post = post,
        other => panic!("expected the open event first, got {other:?}"),
    }
    Ok(client)
}

async fn read_head(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let mut status = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut status))
        .await
        .expect("a status line within 5 s")
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            return (status.trim_end().to_string(), head);
        }
        head.push_str(&line);
    }
}

impl SseClient {
    /// The next line of the decoded body, or None at its end.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(String::from_utf8(line[..line.len() - 1].to_vec()).unwrap());
            }
            if self.ended {
                return None;
            }
            if self.chunk_left == 0 {
                let mut size = String::new();
                if self.body.read_line(&mut size).await.unwrap_or(0) == 0 {
                    self.ended = true;
                    continue;
                }
                let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if size == 0 {
                    self.ended = true;
                    continue;
                }
                self.chunk_left = size + 2; // and its CRLF
            }
            let mut buf = vec![0; self.chunk_left];
            let n = self.body.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                self.ended = true;
                continue;
            }
            self.chunk_left -= n;
            // The chunk's closing CRLF is not part of the body.
            let keep = if self.chunk_left < 2 {
                n - (2 - self.chunk_left)
            } else {
                n
            };
            self.pending.extend_from_slice(&buf[..keep]);
        }
    }

    /// The next event (comments skipped), or None once the stream has ended.
    pub async fn next_sse_event(&mut self) -> Option<SseEvent> {
        let mut kind = String::from("message");
        let mut data: Vec<String> = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.line())
                .await
                .expect("a line within 10 s")?;
            if line.is_empty() {
                if data.is_empty() {
                    continue; // a comment's blank line
                }
                let data = data.join("\n");
                return Some(match kind.as_str() {
                    "session" => {
                        let v: Value = serde_json::from_str(&data).unwrap();
                        SseEvent::Session {
                            post: v["post"].as_str().unwrap().to_string(),
                        }
                    }
                    "close" => {
                        let v: Value = serde_json::from_str(&data).unwrap();
                        SseEvent::Close {
                            code: v["code"].as_u64().unwrap() as u16,
                            reason: v["reason"].as_str().unwrap_or_default().to_string(),
                        }
                    }
                    _ => SseEvent::Message(data),
                });
            }
            if line.starts_with(':') {
                continue;
            }
            if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.to_string());
            }
        }
    }

    /// The next message as JSON, within 5 s (panics on a close or the end).
    pub async fn recv(&mut self) -> Value {
        next_json(self, WAIT).await
    }

    /// Reads until the close event (within 10 s); its code.
    pub async fn close_code(&mut self) -> u16 {
        close_code(self).await
    }

    /// Closes the session as the client (`DELETE`); the status code.
    pub async fn close(&self, code: u16, reason: &str) -> u16 {
        let target = format!("{}&code={code}&reason={reason}", self.post);
        request(self.addr, "DELETE", &target, &self.headers, b"").await
    }

    /// Posts one message; the status code.
    pub async fn post(&self, body: &[u8]) -> u16 {
        post(self.addr, &self.post, &self.headers, body).await
    }
}

/// One `POST` of `body` to `target`; the status code.
pub async fn post(addr: SocketAddr, target: &str, headers: &str, body: &[u8]) -> u16 {
    request(addr, "POST", target, headers, body).await
}

/// One request; the status code.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
    body: &[u8],
) -> u16 {
    exchange(addr, method, target, headers, body).await.0
}

/// One request; the status code and the response's header lines (the body is not read).
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    let mut reader = BufReader::new(stream);
    let (status, head) = read_head(&mut reader).await;
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head)
}

impl Events for SseClient {
    async fn next_event(&mut self) -> Event {
        match self.next_sse_event().await {
            Some(SseEvent::Message(text)) => Event::Json(serde_json::from_str(&text).unwrap()),
            Some(SseEvent::Close { code, .. }) => Event::Close(code),
            Some(SseEvent::Session { .. }) => panic!("a second session event"),
            None => Event::Ended,
        }
    }
}

/// Opens a session for `request` (the WebSocket request a test would make: its `/connect`
/// path becomes the default SSE path `/connect/sse`, its query and headers are kept); a
/// refusal's HTTP status as the error.
pub async fn connect_request(
    addr: SocketAddr,
    request: http::Request<()>,
) -> Result<SseClient, u16> {
    let path = format!("{}/sse", request.uri().path().trim_end_matches('/'));
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut headers = String::new();
    for (name, value) in request.headers() {
        headers.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    open(addr, &target, &headers).await.map_err(|refusal| {
        refusal
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    })
}
