//! The transport over real TCP sockets on 127.0.0.1: upgrades, refusals, frames, close
//! codes, heartbeats, slow consumers and shutdown.

mod raw;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use switchboard_transport::{
    plain_response, CloseReason, HttpResponse, Inbound, OriginPolicy, RequestParts, Server,
    Service, SocketRef, TransportOptions,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Echoes messages, obeys a few commands, and reports every close.
struct TestService {
    closes: mpsc::UnboundedSender<CloseReason>,
}

impl Service for TestService {
    /// Whether `open` should panic (`?panic-open`).
    type Admission = bool;
    type Session = SocketRef;

    fn admit(&self, request: &RequestParts) -> Result<bool, HttpResponse> {
        if request.uri.query() == Some("deny") {
            return Err(plain_response(StatusCode::UNAUTHORIZED, "no\n"));
        }
        Ok(request.uri.query() == Some("panic-open"))
    }

    fn open(&self, panic_on_open: bool, socket: SocketRef) -> SocketRef {
        assert!(!panic_on_open, "open panics, as asked");
        socket
    }

    fn on_message(&self, socket: &SocketRef, message: Inbound) {
        match message {
            Inbound::Text(t) if &t[..] == b"close" => socket.close(4000, "bye"),
            Inbound::Text(t) if t.starts_with(b"flood ") => {
                let n: usize = std::str::from_utf8(&t[6..]).unwrap().parse().unwrap();
                let frame = Bytes::from(vec![b'x'; 1024]);
                for _ in 0..n {
                    if socket.send_text(frame.clone()).is_err() {
                        break;
                    }
                }
            }
            Inbound::Text(t) => drop(socket.send_text(t)),
            Inbound::Binary(b) => drop(socket.send_binary(b)),
        }
    }

    fn on_close(&self, _: SocketRef, reason: CloseReason) {
        let _ = self.closes.send(reason);
    }

    fn http(&self, request: &RequestParts) -> HttpResponse {
        if request.uri.path() == "/hello" {
            return plain_response(StatusCode::OK, "hello\n");
        }
        plain_response(StatusCode::NOT_FOUND, "not found\n")
    }
}

struct Harness {
    server: Server,
    closes: mpsc::UnboundedReceiver<CloseReason>,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut TransportOptions)) -> Harness {
        let mut options = TransportOptions::default();
        options.path = "/ws".into();
        options.max_message_size = 1024;
        tweak(&mut options);
        let (tx, closes) = mpsc::unbounded_channel();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            options,
            Arc::new(TestService { closes: tx }),
        )
        .await
        .unwrap();
        Harness { server, closes }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.server.local_addr())
    }

    async fn next_close(&mut self) -> CloseReason {
        tokio::time::timeout(Duration::from_secs(10), self.closes.recv())
            .await
            .expect("on_close within 10 s")
            .unwrap()
    }
}

async fn http_status(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn echoes_text_and_binary_and_reports_client_close() {
    let mut h = Harness::start(|_| {}).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(WsMessage::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, WsMessage::text("hi"));
    ws.send(WsMessage::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        WsMessage::binary(vec![0u8, 159, 146, 150])
    );
    ws.close(None).await.unwrap();
    // the server answers the close handshake
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
    assert_eq!(
        h.next_close().await,
        CloseReason::Client {
            code: 1005,
            reason: String::new()
        }
    );
}

#[tokio::test]
async fn other_paths_go_to_http_and_plain_get_gets_426() {
    let h = Harness::start(|_| {}).await;
    let addr = h.server.local_addr();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(http_status(addr, &get("/nope")).await.contains("404"));
    assert!(http_status(addr, &get("/hello")).await.contains("200"));
    assert!(http_status(addr, &get("/ws")).await.contains("426"));
    // an upgrade at another path is not an upgrade
    let up = "GET /other HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert!(http_status(addr, up).await.contains("404"));
}

#[tokio::test]
async fn refused_admission_sends_the_response_and_opens_nothing() {
    let mut h = Harness::start(|_| {}).await;
    let err = tokio_tungstenite::connect_async(format!("{}?deny", h.url()))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h.closes.try_recv().is_err(), "no socket, so no close");
}

#[tokio::test]
async fn server_close_sends_code_and_reason() {
    let mut h = Harness::start(|_| {}).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    ws.send(WsMessage::text("hi")).await.unwrap();
    ws.send(WsMessage::text("close")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, WsMessage::text("hi"));
    match next_data(&mut ws).await {
        WsMessage::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::from(4000));
            assert_eq!(f.reason, "bye");
        }
        other => panic!("expected close, got {other:?}"),
    }
    assert_eq!(
        h.next_close().await,
        CloseReason::Server {
            code: 4000,
            reason: "bye".into()
        }
    );
}

#[tokio::test]
async fn fragments_reassemble_and_count_as_a_whole() {
    let mut h = Harness::start(|o| o.max_message_size = 10).await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(false, raw::TEXT, b"hel").await;
    c.send_frame(false, raw::CONTINUATION, b"lo ").await;
    c.send_frame(true, raw::CONTINUATION, "wörld".as_bytes()[..4].as_ref())
        .await;
    // "hello wör" is exactly 10 bytes: within the limit, and valid UTF-8 once whole
    let (op, payload) = c.read_frame().await;
    assert_eq!(
        (op, payload.as_slice()),
        (raw::TEXT, "hello wör".as_bytes())
    );
    // 4 + 4 + 4 = 12 bytes > 10, though each fragment is small
    c.send_frame(false, raw::TEXT, b"aaaa").await;
    c.send_frame(false, raw::CONTINUATION, b"bbbb").await;
    c.send_frame(true, raw::CONTINUATION, b"cccc").await;
    assert_eq!(c.read_close_code().await, 1009);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1009, .. }
    ));
}

#[tokio::test]
async fn oversized_frame_closes_1009() {
    let mut h = Harness::start(|o| o.max_message_size = 10).await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::TEXT, b"exactly 10").await;
    assert_eq!(c.read_frame().await.1, b"exactly 10");
    c.send_frame(true, raw::TEXT, b"eleven byte").await;
    assert_eq!(c.read_close_code().await, 1009);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1009, .. }
    ));
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::TEXT, &[0xff, 0xfe]).await;
    assert_eq!(c.read_close_code().await, 1007);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1007, .. }
    ));
    // also when the bad byte is split across fragments
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(false, raw::TEXT, &[b'a', 0xce]).await;
    c.send_frame(true, raw::CONTINUATION, &[0x41]).await;
    assert_eq!(c.read_close_code().await, 1007);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1007, .. }
    ));
}

#[tokio::test]
async fn protocol_errors_close_1002() {
    let mut h = Harness::start(|_| {}).await;
    // continuation without a message
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::CONTINUATION, b"x").await;
    assert_eq!(c.read_close_code().await, 1002);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1002, .. }
    ));
    // a new message inside a fragmented one
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(false, raw::TEXT, b"x").await;
    c.send_frame(true, raw::TEXT, b"y").await;
    assert_eq!(c.read_close_code().await, 1002);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1002, .. }
    ));
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let h = Harness::start(|_| {}).await;
    let mut early = raw::frame(true, raw::TEXT, b"first");
    early.extend(raw::frame(true, raw::TEXT, b"second"));
    let mut c = raw::Client::connect_sending(h.server.local_addr(), "/ws", &early).await;
    assert_eq!(c.read_frame().await, (raw::TEXT, b"first".to_vec()));
    assert_eq!(c.read_frame().await, (raw::TEXT, b"second".to_vec()));
}

#[tokio::test]
async fn upgrade_requests_in_pieces_or_past_the_first_read_are_served_whole() {
    // The first read holds part of the head, or the head is longer than the first read
    // (4 KiB): the head is read whole and upgraded by hand (its 101 has no date). One with a
    // body header goes to hyper (whose 101 has a date). All keep their early frames.
    let h = Harness::start(|o| o.max_request_head = 16 * 1024).await;
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(6000));
    for (extra, first, by_hyper) in [
        ("", 20, false),
        ("", 100, false),
        (cookie.as_str(), usize::MAX, false),
        (cookie.as_str(), 3000, false),
        ("Content-Length: 0\r\n", usize::MAX, true),
        ("Content-Length: 0\r\n", 30, true),
    ] {
        let early = raw::frame(true, raw::TEXT, b"early");
        let mut c =
            raw::Client::connect_in_pieces(h.server.local_addr(), "/ws", extra, first, &early)
                .await;
        assert_eq!(c.read_frame().await, (raw::TEXT, b"early".to_vec()));
        c.send_frame(true, raw::TEXT, b"later").await;
        assert_eq!(c.read_frame().await, (raw::TEXT, b"later".to_vec()));
        assert_eq!(
            c.head.contains("\r\ndate: "),
            by_hyper,
            "{extra:.20} in pieces from {first}: {}",
            c.head
        );
    }
    // A request whole in one write is upgraded by hand.
    let c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    assert!(!c.head.contains("date:"), "{}", c.head);
}

/// The head read by hand in pieces: bare line feeds and empty lines before the request line
/// are taken as hyper takes them, and a head that passes `max_request_head` without ending
/// gets `431` at once, not when the handshake times out.
#[tokio::test]
async fn a_head_in_pieces_is_answered_once_whole_or_once_too_long() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(|o| {
        o.max_request_head = 8 * 1024;
        o.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = h.server.local_addr();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let bare_lf = request.replace("\r\n", "\n");
    let padded = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {}\r\n",
        // Past the limit and the 1 KiB a head as sent may take beyond it.
        "p".repeat(9 * 1024 + 100)
    );
    let cases = [
        (vec![&bare_lf[..30], &bare_lf[30..]], "HTTP/1.1 101"),
        (
            vec!["\r\n", "\r\n", &request[..50], &request[50..]],
            "HTTP/1.1 101",
        ),
        // Ends exactly across two writes.
        (
            vec![&request[..request.len() - 3], &request[request.len() - 3..]],
            "HTTP/1.1 101",
        ),
        (vec![&padded[..4000], &padded[4000..]], "HTTP/1.1 431"),
    ];
    for (pieces, status) in cases {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        for piece in &pieces {
            s.write_all(piece.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = vec![0u8; 1024];
        // A liveness bound well under the handshake timeout: the answer comes as soon as the
        // head is whole or too long.
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
            .await
            .expect("an answer before the handshake timeout")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
        assert!(
            answer.starts_with(&status.to_ascii_lowercase()),
            "{pieces:.40?}: {answer}"
        );
        // Upgraded by hand (hyper's 101 carries a date).
        assert!(
            status.contains("431") || !answer.contains("\r\ndate: "),
            "{answer}"
        );
    }
    assert_eq!(h.server.stats().snapshot().refused_head_size, 1);
}

#[tokio::test]
async fn a_backlog_reaches_a_slow_reader_whole_and_in_order() {
    // Far more than the socket buffers hold: most frames are queued, some are split by
    // partial writes, and all must arrive intact.
    let h = Harness::start(|o| {
        o.send_queue = 100_000;
        o.send_queue_bytes = usize::MAX;
    })
    .await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::TEXT, b"flood 3000").await;
    c.send_frame(true, raw::TEXT, b"after the flood").await;
    for i in 0..3000 {
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // let the backlog build
        }
        assert_eq!(
            c.read_frame().await,
            (raw::TEXT, vec![b'x'; 1024]),
            "frame {i}"
        );
    }
    assert_eq!(
        c.read_frame().await,
        (raw::TEXT, b"after the flood".to_vec())
    );
}

/// A raw client whose socket (queues unbounded, heartbeats every `heartbeat`) was sent
/// `frames` frames of 1 KiB and then closed by the server (4000, "bye"), the close queued behind
/// them; nothing read yet.
async fn closed_behind_a_flood(heartbeat: Duration, frames: usize) -> (Harness, raw::Client) {
    let h = Harness::start(|o| {
        o.send_queue = 100_000;
        o.send_queue_bytes = usize::MAX;
        o.heartbeat_interval = heartbeat;
    })
    .await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::TEXT, format!("flood {frames}").as_bytes())
        .await;
    c.send_frame(true, raw::TEXT, b"close").await;
    (h, c)
}

#[tokio::test]
async fn a_server_close_behind_a_backlog_reaches_a_slow_reader_across_heartbeats() {
    // Heartbeats every 600 ms (longer than the stalls a busy machine gives the test's one
    // thread); the client reads 20 MB in pauses of 40 ms, for more than two intervals. A
    // close queued behind the backlog owes no pong (no ping can go out once the close is
    // queued): only a client that takes nothing for a whole interval is cut.
    let (mut h, mut c) = closed_behind_a_flood(Duration::from_millis(600), 20_000).await;
    let started = std::time::Instant::now();
    for i in 0..20_000 {
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(c.read_frame().await.0, raw::TEXT, "frame {i}");
    }
    assert_eq!(c.read_close_code().await, 4000);
    assert!(
        started.elapsed() > Duration::from_millis(1200),
        "read across two sweeps"
    );
    assert_eq!(
        h.next_close().await,
        CloseReason::Server {
            code: 4000,
            reason: "bye".into()
        }
    );
}

#[tokio::test]
async fn a_trickling_reader_cannot_hold_a_closed_socket_past_ten_heartbeats() {
    // After a server close, a client that takes 64 KiB every 20 ms makes the server write at
    // every 1 s sweep, but would need about 16 s for the 50 MB backlog: ten sweeps after the
    // close the socket is closed as a slow consumer, the rest dropped.
    let (mut h, mut c) = closed_behind_a_flood(Duration::from_secs(1), 50_000).await;
    let trickle = tokio::spawn(async move {
        let mut got = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for _ in 0..64 {
                match tokio::time::timeout(Duration::from_secs(30), c.read_any_or_end()).await {
                    Ok(Some(_)) => got += 1,
                    _ => return got,
                }
            }
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(30), h.closes.recv())
        .await
        .expect("closed within 30 s");
    assert_eq!(closed, Some(CloseReason::SlowConsumer));
    let got = trickle.await.unwrap();
    assert!((1..50_000).contains(&got), "{got} frames before the end");
}

#[tokio::test]
async fn a_panic_in_open_closes_the_connection() {
    let h = Harness::start(|_| {}).await;
    let url = format!("{}?panic-open", h.url());
    // `open` runs before the `101` is written: the panic ends the connection before the
    // client is upgraded, not leave it open with no task behind it.
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("the connection ends within 5 s");
    assert!(connected.is_err(), "upgraded although `open` panicked");
}

#[tokio::test]
async fn client_that_ignores_pings_is_dropped() {
    // An interval longer than the stalls a busy machine gives the test's one thread.
    let mut h = Harness::start(|o| o.heartbeat_interval = Duration::from_millis(500)).await;
    // A raw client that never answers pings.
    let _silent = raw::Client::connect(h.server.local_addr(), "/ws").await;
    // A tungstenite client answers pings by itself and must stay.
    let alive = keep_reading(&h, Duration::from_millis(2500)).await;
    assert_eq!(h.next_close().await, CloseReason::HeartbeatTimeout);
    still_echoes(alive.await.unwrap()).await;
}

type Tungstenite =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A tungstenite client (it answers pings by itself) that reads for `how_long`, failing if it
/// is closed meanwhile; the task gives it back.
async fn keep_reading(h: &Harness, how_long: Duration) -> tokio::task::JoinHandle<Tungstenite> {
    let (mut alive, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    tokio::spawn(async move {
        // reading drives tungstenite's automatic pongs
        let deadline = tokio::time::sleep(how_long);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                m = alive.next() => if m.is_none() { panic!("live client was closed") },
            }
        }
        alive
    })
}

/// The echo server still answers `alive`.
async fn still_echoes(mut alive: Tungstenite) {
    alive.send(WsMessage::text("still here")).await.unwrap();
    loop {
        if let WsMessage::Text(t) = alive.next().await.unwrap().unwrap() {
            assert_eq!(t.as_str(), "still here");
            break;
        }
    }
}

#[tokio::test]
async fn pinged_a_share_at_a_time_every_silent_client_is_still_dropped() {
    // A 1 s interval is swept in four shares of the sockets, 250 ms apart: six silent
    // clients fall into different shares, and each must still be pinged and dropped.
    let mut h = Harness::start(|o| o.heartbeat_interval = Duration::from_secs(1)).await;
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(raw::Client::connect(h.server.local_addr(), "/ws").await);
    }
    let alive = keep_reading(&h, Duration::from_millis(3500)).await;
    for _ in 0..6 {
        assert_eq!(h.next_close().await, CloseReason::HeartbeatTimeout);
    }
    still_echoes(alive.await.unwrap()).await;
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_are_not() {
    let mut h = Harness::start(|o| o.send_queue = 16).await;
    let mut slow = raw::Client::connect(h.server.local_addr(), "/ws").await;
    let (mut fast, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    // The slow client asks for far more than its socket buffers and queue hold, and never reads.
    slow.send_frame(true, raw::TEXT, b"flood 100000").await;
    assert_eq!(h.next_close().await, CloseReason::SlowConsumer);
    fast.send(WsMessage::text("ok?")).await.unwrap();
    assert_eq!(next_data(&mut fast).await, WsMessage::text("ok?"));
}

/// The next message that is not a ping or pong: the heartbeat pings each socket at its
/// list's tick, which may come at any time within the interval.
pub(crate) async fn next_data<S>(ws: &mut S) -> WsMessage
where
    S: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    loop {
        match ws.next().await.unwrap().unwrap() {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_cannot_pin_its_socket() {
    // A queue too big to fill: only the write deadline can notice the stall.
    let mut h = Harness::start(|o| {
        o.send_queue = 1_000_000;
        o.send_queue_bytes = usize::MAX;
        o.heartbeat_interval = Duration::from_millis(300);
    })
    .await;
    let mut stuck = raw::Client::connect(h.server.local_addr(), "/ws").await;
    stuck.send_frame(true, raw::TEXT, b"flood 40000").await;
    assert_eq!(h.next_close().await, CloseReason::SlowConsumer);
    // and shutdown is not held up by it
    assert!(h.server.shutdown(Duration::from_secs(3)).await.drained);
}

#[tokio::test]
async fn shutdown_drains_even_a_socket_whose_client_stopped_reading() {
    let h = Harness::start(|o| {
        o.send_queue = 1_000_000;
        o.send_queue_bytes = usize::MAX;
    })
    .await;
    let mut stuck = raw::Client::connect(h.server.local_addr(), "/ws").await;
    stuck.send_frame(true, raw::TEXT, b"flood 40000").await;
    let stats = h.server.stats();
    wait_until("a backlog", || stats.snapshot().buffered_bytes > 0).await;
    let Harness { server, mut closes } = h;
    let report = server.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    assert_eq!(closes.try_recv(), Ok(CloseReason::Shutdown));
}

#[tokio::test]
async fn oversized_control_frames_close_1002() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = raw::Client::connect(h.server.local_addr(), "/ws").await;
    c.send_frame(true, raw::PONG, &[0u8; 126]).await;
    assert_eq!(c.read_close_code().await, 1002);
    assert!(matches!(
        h.next_close().await,
        CloseReason::Protocol { code: 1002, .. }
    ));
}

/// Upgrade status for a request with these extra headers.
async fn upgrade_status(addr: std::net::SocketAddr, extra: &str) -> String {
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    http_status(addr, &req).await
}

#[tokio::test]
async fn an_upgrade_that_breaks_rfc_6455_gets_400() {
    let h = Harness::start(|_| {}).await;
    let addr = h.server.local_addr();
    let up = |version: &str, key: &str| {
        format!(
            "GET /ws {version}\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
    };
    let good = "dGhlIHNhbXBsZSBub25jZQ==";
    assert!(http_status(addr, &up("HTTP/1.1", good))
        .await
        .contains("101"));
    // The spec's curl example: 13 bytes, not the RFC's 16, and taken.
    let spec = "SGVsbG8sIHdvcmxkIQ==";
    assert!(http_status(addr, &up("HTTP/1.1", spec))
        .await
        .contains("101"));
    let long = "A".repeat(200);
    for (version, key) in [
        ("HTTP/1.0", good),
        ("HTTP/1.1", ""),
        ("HTTP/1.1", "hello"),
        ("HTTP/1.1", "!!!!"),
        ("HTTP/1.1", long.as_str()),
        ("HTTP/1.1", "QUFBQUFBQUFBQUFBQUFBQUE="), // 17 bytes
    ] {
        let status = http_status(addr, &up(version, key)).await;
        assert!(status.contains(" 400"), "{version} key {key:?}: {status}");
    }
    // RFC 9112 3.2: exactly one Host, or 400 (the origin check would read the first of two).
    // RFC 6455 4.1: one key and one version; which of two the answer is for would be a guess.
    for head in [
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\n"),
        "GET /ws HTTP/1.1\r\n".to_string(),
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nSec-WebSocket-Key: SGVsbG8sIHdvcmxkIQ==\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nSec-WebSocket-Version: 13\r\n"),
    ] {
        let req = format!(
            "{head}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {good}\r\n\r\n"
        );
        let status = http_status(addr, &req).await;
        assert!(status.contains(" 400"), "{head:?}: {status}");
    }
    // Refused before taking a socket: only the two good ones opened.
    assert_eq!(h.server.stats().snapshot().sockets_opened, 2);

    // Checked before capacity and admission: with every slot taken, a bad upgrade still
    // gets 400, not 503.
    let full = Harness::start(|o| o.max_connections = Some(1)).await;
    let addr = full.server.local_addr();
    let (_held, _) = tokio_tungstenite::connect_async(full.url()).await.unwrap();
    let up = |key: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
    };
    assert!(http_status(addr, &up(good)).await.contains(" 503"));
    assert!(http_status(addr, &up("hello")).await.contains(" 400"));
    assert_eq!(full.server.stats().snapshot().refused_capacity, 1);
}

#[tokio::test]
async fn foreign_origins_get_403_by_default() {
    let h = Harness::start(|_| {}).await;
    let addr = h.server.local_addr();
    assert!(
        upgrade_status(addr, "").await.contains("101"),
        "no Origin: not a browser"
    );
    let same = format!("Origin: http://{addr}\r\n");
    assert!(upgrade_status(addr, &same).await.contains("101"));
    let same_tls = format!("Origin: https://{addr}\r\n");
    assert!(upgrade_status(addr, &same_tls).await.contains("101"));
    for foreign in [
        "Origin: https://evil.example\r\n",
        "Origin: null\r\n",
        "Origin: http://127.0.0.1.evil.example\r\n",
    ] {
        assert!(
            upgrade_status(addr, foreign).await.contains("403"),
            "{foreign}"
        );
    }
    assert_eq!(h.server.stats().snapshot().refused_origin, 3);
}

#[tokio::test]
async fn an_origin_list_admits_exactly_its_entries() {
    let h = Harness::start(|o| {
        o.origins = OriginPolicy::List(vec!["https://app.example.com".into()]);
    })
    .await;
    let addr = h.server.local_addr();
    assert!(upgrade_status(addr, "Origin: https://APP.example.com\r\n")
        .await
        .contains("101"));
    assert!(upgrade_status(addr, "Origin: http://app.example.com\r\n")
        .await
        .contains("403"));
    let same = format!("Origin: http://{addr}\r\n");
    assert!(
        upgrade_status(addr, &same).await.contains("403"),
        "the list replaces same-host"
    );
}

#[tokio::test]
async fn max_connections_refuses_with_503_and_frees_slots_on_close() {
    let mut h = Harness::start(|o| o.max_connections = Some(2)).await;
    let (a, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    let (_b, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    match tokio_tungstenite::connect_async(h.url()).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(a);
    h.next_close().await;
    tokio_tungstenite::connect_async(h.url()).await.unwrap();
    let stats = h.server.stats().snapshot();
    assert_eq!((stats.refused_capacity, stats.sockets_opened), (1, 3));
}

#[tokio::test]
async fn idle_connections_are_dropped_and_do_not_block_real_clients() {
    use tokio::io::AsyncReadExt;
    let h = Harness::start(|o| {
        // Long enough for the 200 connects and the real client's handshake below, however
        // busy the machine; the idle ones are then closed within the 10 s waited for.
        o.handshake_timeout = Duration::from_secs(5);
        o.max_handshakes_per_address = 1000; // the per-address cap has a test of its own
    })
    .await;
    let addr = h.server.local_addr();
    // 200 clients open TCP and never send a byte.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A real client still gets through, while every idle one is still waiting.
    let (mut ws, _) = tokio_tungstenite::connect_async(h.url()).await.unwrap();
    ws.send(WsMessage::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, WsMessage::text("hi"));
    let still_open = idle
        .iter()
        .filter(|s| matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    assert_eq!(
        still_open, 200,
        "the real client did not wait for the idle ones"
    );
    // And every idle one is closed by the server after the handshake timeout.
    for mut s in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("idle connection closed within 10 s");
        // hyper may answer 408 before closing; either way the connection ends.
        if let Ok(n) = n {
            if n > 0 {
                assert!(String::from_utf8_lossy(&buf[..n]).contains("408"));
            }
        }
    }
}

/// Polls `done` every 10 ms until it holds, for at most 10 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True once the peer has closed the connection (EOF or reset), within 5 s.
async fn closed_by_server(mut s: tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn handshakes_in_progress_are_capped_per_address_and_in_total() {
    let h = Harness::start(|o| {
        o.max_handshakes_per_address = 5;
        o.max_handshakes = 8;
        o.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = h.server.local_addr();
    let stats = h.server.stats();
    // Five silent connections from one address take all of that address's places...
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(raw::tcp_from("127.0.0.1", addr).await);
    }
    wait_until("5 in progress", || {
        stats.snapshot().handshakes_in_progress == 5
    })
    .await;
    // ...so a sixth from there is closed at once, long before the handshake timeout.
    assert!(closed_by_server(raw::tcp_from("127.0.0.1", addr).await).await);
    // Another address still gets in and upgrades.
    let mut other = raw::Client::connect_from("127.0.0.2", addr, "/ws").await;
    other.send_frame(true, raw::TEXT, b"hello").await;
    assert_eq!(other.read_frame().await, (raw::TEXT, b"hello".to_vec()));
    // Three more silent ones from a third address reach the total of 8...
    for _ in 0..3 {
        silent.push(raw::tcp_from("127.0.0.3", addr).await);
    }
    wait_until("8 in progress", || {
        stats.snapshot().handshakes_in_progress == 8
    })
    .await;
    // ...and then any address is refused.
    assert!(closed_by_server(raw::tcp_from("127.0.0.4", addr).await).await);
    let s = stats.snapshot();
    assert_eq!(
        (s.refused_handshakes_per_address, s.refused_handshakes),
        (1, 1)
    );
    // Their places come back when they go.
    drop(silent);
    wait_until("none in progress", || {
        stats.snapshot().handshakes_in_progress == 0
    })
    .await;
    let mut again = raw::Client::connect_from("127.0.0.1", addr, "/ws").await;
    again.send_frame(true, raw::TEXT, b"back").await;
    assert_eq!(again.read_frame().await, (raw::TEXT, b"back".to_vec()));
}

fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    )
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_opens_nothing() {
    let mut h = Harness::start(|o| o.max_request_head = 4096).await;
    let addr = h.server.local_addr();
    let padding = |n: usize| format!("X-Padding: {}\r\n", "a".repeat(n));
    // Over our limit but within the parser's buffer: refused by the transport.
    let status = http_status(addr, &upgrade_request("/ws", &padding(5000))).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    // Far over it: refused by the HTTP parser itself, counted all the same.
    let status = http_status(addr, &upgrade_request("/ws", &padding(100_000))).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    // More than 100 header lines, however short (docs/HOSTILE-INPUT.md gives the limit).
    let many = |n: usize| (0..n).map(|i| format!("X-{i}: a\r\n")).collect::<String>();
    // (The request has 5 headers of its own: 96 more make 101.)
    let status = http_status(addr, &upgrade_request("/ws", &many(96))).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    assert_eq!(h.server.stats().snapshot().refused_head_size, 3);
    assert_eq!(h.server.stats().snapshot().sockets_opened, 0);
    assert!(h.closes.try_recv().is_err(), "no socket, so no close");
    // Within the limits: upgraded.
    let status = http_status(addr, &upgrade_request("/ws", &padding(3000))).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let status = http_status(addr, &upgrade_request("/ws", &many(95))).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

#[tokio::test]
async fn a_refused_connection_is_closed_and_serves_no_second_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(|_| {}).await;
    let mut s = tokio::net::TcpStream::connect(h.server.local_addr())
        .await
        .unwrap();
    // A refused upgrade and, behind it on the same connection, a second request.
    let mut requests = upgrade_request("/ws?deny", "");
    requests.push_str("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 401"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        !answer.contains("hello"),
        "a second request was served: {answer}"
    );
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001() {
    let mut h = Harness::start(|_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(tokio_tungstenite::connect_async(h.url()).await.unwrap().0);
    }
    let addr = h.server.local_addr();
    let report = h.server.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    for _ in 0..5 {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), h.closes.recv())
                .await
                .unwrap()
                .unwrap(),
            CloseReason::Shutdown
        );
    }
    for mut c in clients {
        match c.next().await {
            Some(Ok(WsMessage::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    // no longer accepting
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Says which of its methods heard each text message, by echoing it with a prefix.
struct Lender;

impl Service for Lender {
    type Admission = ();
    type Session = SocketRef;

    fn admit(&self, _: &RequestParts) -> Result<(), HttpResponse> {
        Ok(())
    }

    fn open(&self, _: (), socket: SocketRef) -> SocketRef {
        socket
    }

    fn on_message(&self, socket: &SocketRef, message: Inbound) {
        if let Inbound::Text(t) = message {
            let _ = socket.send_text(Bytes::from([&b"on_message:"[..], &t].concat()));
        }
    }

    fn on_text(&self, socket: &SocketRef, text: &str) {
        let _ = socket.send_text(Bytes::from(format!("on_text:{text}")));
    }

    fn on_close(&self, _: SocketRef, _: CloseReason) {}

    fn http(&self, _: &RequestParts) -> HttpResponse {
        plain_response(StatusCode::NOT_FOUND, "not found\n")
    }
}

#[tokio::test]
async fn a_text_in_one_frame_is_lent_to_on_text_and_a_fragmented_one_goes_to_on_message() {
    let mut options = TransportOptions::default();
    options.path = "/ws".into();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), options, Arc::new(Lender))
        .await
        .unwrap();
    let mut c = raw::Client::connect(server.local_addr(), "/ws").await;
    c.send_frame(true, raw::TEXT, "héllo".as_bytes()).await;
    assert_eq!(
        c.read_frame().await,
        (raw::TEXT, b"on_text:h\xc3\xa9llo".to_vec())
    );
    c.send_frame(false, raw::TEXT, b"he").await;
    c.send_frame(true, raw::CONTINUATION, b"llo").await;
    assert_eq!(
        c.read_frame().await,
        (raw::TEXT, b"on_message:hello".to_vec())
    );
    // Not UTF-8 in one frame: closed 1007, nothing lent.
    c.send_frame(true, raw::TEXT, b"\xff").await;
    assert_eq!(c.read_close_code().await, 1007);
}
