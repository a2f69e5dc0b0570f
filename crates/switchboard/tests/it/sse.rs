//! The Server-Sent Events fallback: the same gateway over an event stream and posts, on the
//! WebSocket port, with the same admission, hooks and delivery.

use std::time::Duration;

use serde_json::json;
use switchboard::Message;
use switchboard_test_support::sse::{self as sse_client, SseClient, SseEvent};
use switchboard_test_support::{
    container, next_published, recorder, spec_config, start, token, wait_until, websocket, Gateway,
    Kind, Seen,
};

fn sse_config() -> switchboard::Config {
    spec_config("    sse: {}")
}

fn cookie(user: &str) -> String {
    format!("Cookie: ID_TOKEN={}\r\n", token(user))
}

async fn open_sse(gw: &Gateway, user: &str, namespace: Option<&str>) -> SseClient {
    let query = namespace
        .map(|n| format!("?namespace={n}"))
        .unwrap_or_default();
    sse_client::open(
        gw.local_addr().unwrap(),
        &format!("/connect/sse{query}"),
        &cookie(user),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn send_and_broadcast_reach_sse_and_websocket_sockets_alike() {
    let c = container(sse_config());
    let gw = start(Kind::Sse, c).await;
    let mut sse = open_sse(&gw, "alex", Some("acme")).await;
    let mut ws = websocket::connect(gw.local_addr().unwrap(), "blair", Some("acme")).await;
    gw.wait_for_sockets(2).await;
    let producer = gw.producer();
    producer
        .send(
            "socket:broadcast",
            json!({"type": "news", "payload": 1, "namespace": "acme"}),
        )
        .unwrap();
    assert_eq!(sse.recv().await, json!({"type": "news", "payload": 1}));
    assert_eq!(
        websocket::recv(&mut ws).await,
        json!({"type": "news", "payload": 1})
    );
    producer
        .send(
            "socket:send",
            json!({"username": "alex", "type": "whisper", "payload": "psst"}),
        )
        .unwrap();
    assert_eq!(
        sse.recv().await,
        json!({"type": "whisper", "payload": "psst"})
    );
    websocket::assert_silent(&mut ws, 200).await;
    assert_eq!(gw.sockets().count_of_user("alex", Some("acme")), 1);
}

#[tokio::test]
async fn a_failed_connect_sends_the_error_then_close_1008_and_publishes_onclose_once() {
    let mut c = container(sse_config());
    let mut closes = recorder(&mut c, &["socket:close"]);
    c.add_handler("socket:connection", |m: Message| async move {
        m.fail(json!({"message": "not today"}));
    })
    .unwrap();
    let gw = start(Kind::Sse, c).await;
    let mut sse = open_sse(&gw, "alex", None).await;
    assert_eq!(
        sse.recv().await,
        json!({"type": "error", "payload": {"message": "not today"}})
    );
    assert_eq!(sse.close_code().await, 1008);
    assert_eq!(
        sse.next_sse_event().await,
        None,
        "the stream ends after the close event"
    );
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["reason"]["code"], 1008);
    gw.wait_for_sockets(0).await;
    assert_eq!(
        sse.post(b"{\"type\":\"x\"}").await,
        404,
        "the session is gone"
    );
    assert!(closes.try_recv().is_err(), "exactly once");
}

#[tokio::test]
async fn a_client_that_goes_away_publishes_onclose_once_and_its_session_is_gone() {
    let mut c = container(sse_config());
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(Kind::Sse, c).await;
    let sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    let addr = gw.local_addr().unwrap();
    let post = sse.post.clone();
    drop(sse);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["reason"]["kind"], "dropped");
    gw.wait_for_sockets(0).await;
    assert_eq!(
        sse_client::post(addr, &post, &cookie("alex"), b"{}").await,
        404
    );
    assert!(closes.try_recv().is_err(), "exactly once");
    assert_eq!(gw.stats().transport.sockets_open, 0);
}

#[tokio::test]
async fn a_client_close_is_published_with_its_code_once() {
    let mut c = container(sse_config());
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(Kind::Sse, c).await;
    let mut sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    assert_eq!(sse.close(4000, "bye").await, 204);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(
        data["reason"],
        json!({"by": "client", "code": 4000, "reason": "bye"})
    );
    let echo = SseEvent::Close {
        code: 4000,
        reason: "bye".into(),
    };
    assert_eq!(
        sse.next_sse_event().await,
        Some(echo),
        "echoed, as a close frame is"
    );
    assert_eq!(sse.next_sse_event().await, None, "then the stream ends");
    gw.wait_for_sockets(0).await;
    assert!(closes.try_recv().is_err(), "exactly once");
}

#[tokio::test]
async fn streams_and_posts_are_refused_as_upgrades_are() {
    let c = container(sse_config());
    let gw = start(Kind::Sse, c).await;
    let addr = gw.local_addr().unwrap();
    let refused = sse_client::open(addr, "/connect/sse", "")
        .await
        .err()
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("content-type: text/plain; charset=utf-8"),
        "{refused}"
    );
    let other_site = format!("{}Origin: https://evil.example\r\n", cookie("alex"));
    let refused = sse_client::open(addr, "/connect/sse", &other_site)
        .await
        .err()
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    let mut sse = open_sse(&gw, "alex", None).await;
    let unknown = "/connect/sse?session=0123456789abcdef0123456789abcdef";
    assert_eq!(sse_client::post(addr, unknown, "", b"{}").await, 404);
    assert_eq!(
        sse_client::post(addr, &sse.post, &other_site, b"{}").await,
        403
    );
    let too_big = vec![b' '; 64 * 1024 + 1];
    assert_eq!(sse.post(&too_big).await, 413);
    // Invalid UTF-8 ends the session as it would a WebSocket (1007).
    assert_eq!(sse.post(b"{\"type\":\"\xff\"}").await, 400);
    assert_eq!(sse.close_code().await, 1007);
    assert_eq!(sse.next_sse_event().await, None);
    gw.wait_for_sockets(0).await;
    assert!(gw.stats().refused_unauthorized >= 1);
    assert_eq!(gw.stats().transport.refused_origin, 1 + 1);
}

/// The status of a raw request `head` (whole, with its blank line).
async fn raw_status(addr: std::net::SocketAddr, head: &str) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut status = String::new();
    let mut reader = BufReader::new(stream);
    let read = reader.read_line(&mut status);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer")
        .unwrap();
    status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn what_the_upgrade_refuses_as_malformed_or_foreign_opens_no_stream() {
    let c = container(sse_config());
    let gw = start(Kind::Sse, c).await;
    let addr = gw.local_addr().unwrap();
    let rest = format!("Accept: text/event-stream\r\n{}\r\n", cookie("alex"));
    for (what, head) in [
        ("no Host", format!("GET /connect/sse HTTP/1.1\r\n{rest}")),
        (
            "two Hosts",
            format!("GET /connect/sse HTTP/1.1\r\nHost: {addr}\r\nHost: {addr}\r\n{rest}"),
        ),
        (
            "HTTP/1.0",
            format!("GET /connect/sse HTTP/1.0\r\nHost: {addr}\r\n{rest}"),
        ),
    ] {
        assert_eq!(raw_status(addr, &head).await, 400, "{what}");
    }
    // What a browser sends for a `no-cors` fetch from a sibling subdomain's page: the cookie,
    // no `Origin`. It would open a session in the visitor's name (and use up their sockets).
    for site in ["same-site", "cross-site"] {
        let headers = format!(
            "{}Sec-Fetch-Site: {site}\r\nSec-Fetch-Mode: no-cors\r\n",
            cookie("alex")
        );
        let refused = sse_client::open(addr, "/connect/sse", &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{site}: opened"));
        assert!(refused.starts_with("HTTP/1.1 403"), "{site}: {refused}");
    }
    // The page's own event source, and a client that is no browser, open one.
    let own = format!(
        "{}Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n",
        cookie("alex")
    );
    let _own = sse_client::open(addr, "/connect/sse", &own).await.unwrap();
    let _other = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(2).await;
    // A method it does not take: 405 saying which it does.
    let (status, head) = sse_client::exchange(addr, "PUT", "/connect/sse", "", b"").await;
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase()
            .contains("allow: get, post, delete, options"),
        "{head}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer_and_holds_nothing() {
    let c = container(spec_config(
        "    sse: {}\n    heartbeat: 100ms\n    send_queue: 4",
    ));
    let gw = start(Kind::Sse, c).await;
    let sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    // The client reads nothing more: the broadcasts fill its queue, and it is closed as a slow
    // consumer rather than holding them.
    // 25 MB: more than the kernel's and hyper's buffers take.
    broadcast_bulk(&gw, 400, 64 << 10);
    gw.wait_for_sockets(0).await;
    assert!(gw.stats().transport.slow_consumers >= 1);
    // The close event stays counted until the stream takes it (see the next test).
    wait_until("nothing held", Duration::from_secs(15), || {
        gw.stats().transport.buffered_bytes == 0
    })
    .await;
    drop(sse);
}

#[tokio::test]
async fn a_client_that_takes_nothing_between_two_heartbeats_is_cut_off() {
    // Queues large enough never to fill: only the heartbeat sweep can find the stall.
    let c = container(spec_config(
        "    sse: {}\n    heartbeat: 100ms\n    send_queue: 100000\n    send_queue_bytes: 64MiB",
    ));
    let gw = start(Kind::Sse, c).await;
    let sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    broadcast_bulk(&gw, 100, 256 << 10);
    gw.wait_for_sockets(0).await;
    assert_eq!(gw.stats().transport.slow_consumers, 1);
    // Its queue was dropped at once; the close event (a few dozen bytes) stays counted until
    // the stream takes it or the close timeout cuts the connection, which happens after the
    // session has left the registry.
    wait_until("nothing held", Duration::from_secs(15), || {
        gw.stats().transport.buffered_bytes == 0
    })
    .await;
    drop(sse);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_before_the_kernel_takes_megabytes_for_it() {
    // Queues that never fill, and 1 MiB pushed: less than the kernel's send buffer grows to
    // for a connection by itself (4 MiB), so only a bounded one lets the heartbeat see that
    // the client takes nothing. (Was: the session and its megabytes stayed, heartbeat after
    // heartbeat, since each comment still fitted in the kernel.)
    let c = container(spec_config(
        "    sse: {}\n    heartbeat: 100ms\n    send_queue: 100000\n    send_queue_bytes: 64MiB",
    ));
    let gw = start(Kind::Sse, c).await;
    let sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    broadcast_bulk(&gw, 16, 64 << 10);
    gw.wait_for_sockets(0).await;
    assert_eq!(gw.stats().transport.slow_consumers, 1);
    drop(sse);
}

#[tokio::test]
async fn a_server_close_that_the_client_does_not_read_ends_within_the_close_timeout() {
    // Heartbeats an hour apart: only the close timeout (2 s) can end the session. 25 MB the
    // client never reads: more than the kernel's and hyper's buffers take.
    let (gw, sse, mut closes) = backlogged(WITH_DISCONNECT, 100).await;
    // The server closes it: the close event is queued after the backlog, which the client
    // never takes. Was: the session (its queue, its place in the registry) lasted until the
    // next heartbeat sweeps, and onclose with it.
    gw.producer()
        .send(
            "socket:disconnect",
            json!({"username": "alex", "code": 4003}),
        )
        .unwrap();
    gw.wait_for_sockets(0).await;
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["reason"]["code"], 4003, "{data}");
    wait_until("nothing held", Duration::from_secs(5), || {
        gw.stats().transport.buffered_bytes == 0
    })
    .await;
    drop(sse);
}

/// The socket section's line that subscribes the `disconnect` topic.
const WITH_DISCONNECT: &str = "    disconnect: {subscribe: \"socket:disconnect\"}";

/// Broadcasts `n` messages of `bytes` each (and a sequence number), to be queued.
fn broadcast_bulk(gw: &Gateway, n: usize, bytes: usize) {
    let producer = gw.producer();
    for i in 0..n {
        let _ = producer.send(
            "socket:broadcast",
            json!({"type": "bulk", "payload": "x".repeat(bytes) + &i.to_string()}),
        );
    }
}

/// A session with `n` 256 KiB broadcasts queued that its client has not read yet.
async fn backlogged(extra: &str, n: usize) -> (Gateway, SseClient, Seen) {
    let mut c = container(spec_config(&format!(
        "    sse: {{}}\n    heartbeat: 1h\n    send_queue: 100000\n    send_queue_bytes: 64MiB\n{extra}"
    )));
    let closes = recorder(&mut c, &["socket:close"]);
    let gw = start(Kind::Sse, c).await;
    let sse = open_sse(&gw, "alex", None).await;
    gw.wait_for_sockets(1).await;
    broadcast_bulk(&gw, n, 256 << 10);
    wait_until("the queue filled", Duration::from_secs(5), || {
        gw.stats().transport.buffered_bytes > 1 << 20
    })
    .await;
    (gw, sse, closes)
}

#[tokio::test]
async fn a_client_that_reads_its_backlog_slowly_after_a_server_close_gets_all_of_it_and_the_close()
{
    let (gw, mut sse, mut closes) = backlogged(WITH_DISCONNECT, 80).await;
    gw.producer()
        .send(
            "socket:disconnect",
            json!({"username": "alex", "code": 4003}),
        )
        .unwrap();
    // 50 ms per message: four seconds for the backlog, twice the close timeout, yet never
    // two seconds without taking anything.
    let mut got = 0;
    let code = loop {
        match sse.next_sse_event().await {
            Some(SseEvent::Message(_)) => got += 1,
            Some(SseEvent::Close { code, .. }) => break code,
            other => panic!("{other:?} after {got} messages"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((got, code), (80, 4003));
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["reason"]["code"], 4003, "{data}");
}

#[tokio::test]
async fn shutdown_drops_an_sse_backlog_and_sends_1001_at_once() {
    let (gw, sse, _closes) = backlogged("", 100).await;
    assert_eq!(shut_down_while_backlogged(gw, sse, 100).await, 1001);
}

#[tokio::test]
async fn shutdown_drops_the_backlog_of_a_session_already_closing() {
    // A server close queued its close event behind the backlog; shutdown does not wait for
    // the backlog either, and the close event the session had is its last.
    let (gw, sse, _closes) = backlogged(WITH_DISCONNECT, 100).await;
    gw.producer()
        .send(
            "socket:disconnect",
            json!({"username": "alex", "code": 4003}),
        )
        .unwrap();
    assert_eq!(shut_down_while_backlogged(gw, sse, 100).await, 4003);
}

/// Shuts `gw` down while `sse` has most of `queued` messages still queued, then reads it: at
/// most what the kernel had taken arrives before the close event, whose code it returns.
async fn shut_down_while_backlogged(gw: Gateway, mut sse: SseClient, queued: usize) -> u16 {
    let shutdown = tokio::spawn(gw.shutdown(Duration::from_secs(10)));
    let mut got = 0;
    let code = loop {
        match sse.next_sse_event().await {
            Some(SseEvent::Message(_)) => got += 1,
            Some(SseEvent::Close { code, .. }) => break code,
            other => panic!("{other:?} after {got} messages"),
        }
    };
    assert!(got < queued, "the backlog was sent: {got}");
    assert!(shutdown.await.unwrap().drained);
    code
}

#[tokio::test]
async fn sse_queues_stay_within_the_buffer_budget_and_a_reading_session_sees_everything() {
    // Per-session queues too large to matter: only the budget bounds what is held.
    let yaml = "    sse: {}\n    send_queue: 100000\n    send_queue_bytes: 64MiB";
    let mut config = spec_config(yaml);
    config.gateway.limits.buffer_budget = 1 << 20;
    let c = container(config);
    let gw = start(Kind::Sse, c).await;
    let mut hoarders = Vec::new();
    for user in ["h1", "h2", "h3"] {
        hoarders.push(open_sse(&gw, user, None).await);
    }
    let mut reader = open_sse(&gw, "reader", None).await;
    gw.wait_for_sockets(4).await;
    let producer = gw.producer();
    // The reader tells how far it got: the broadcasts keep within its pace (it is a reader,
    // not a slow consumer), while the hoarders read nothing.
    let (progress, mut read) = tokio::sync::watch::channel(0u64);
    let reading = tokio::spawn(async move {
        for i in 0..800 {
            let frame = reader.recv().await;
            assert_eq!(frame["payload"]["n"], i, "in order, none missing");
            let _ = progress.send(i + 1);
        }
        reader
    });
    // 13 MB each: more than the kernel's and hyper's buffers take for a client that does not
    // read, in frames small beside a fair share (1 MiB / 4).
    for i in 0..800u64 {
        read.wait_for(|n| i < n + 8).await.unwrap();
        let _ = producer.send(
            "socket:broadcast",
            json!({"type": "bulk", "payload": {"n": i, "fill": "x".repeat(16 * 1024)}}),
        );
    }
    let reader = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the reader got every message")
        .unwrap();
    gw.wait_for_sockets(1).await;
    let t = gw.stats().transport;
    assert_eq!(t.over_budget, 3, "the three hoarders were shed");
    // Every session's first event counts too, unrefused (a hundred bytes each).
    assert!(t.buffered_bytes_peak <= (1 << 20) + 4 * 200, "{t:?}");
    drop(hoarders);
    drop(reader);
    gw.wait_for_sockets(0).await;
    // A shed session's bytes are given back as its connection is torn down, which may come
    // a moment after it leaves the registry.
    wait_until("nothing held", Duration::from_secs(15), || {
        gw.stats().transport.buffered_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn only_an_event_source_request_opens_a_session_and_never_a_cross_site_one_without_origin() {
    let gw = start(Kind::Sse, container(sse_config())).await;
    let addr = gw.local_addr().unwrap();
    let alex = cookie("alex");
    // What an `<img>` or a `<script>` of another site would send: the cookie, no `Origin`.
    let img = format!("{alex}Accept: image/*\r\nSec-Fetch-Site: cross-site\r\n");
    assert_eq!(
        sse_client::request(addr, "GET", "/connect/sse", &img, b"").await,
        403
    );
    let no_accept = alex.clone();
    assert_eq!(
        sse_client::request(addr, "GET", "/connect/sse", &no_accept, b"").await,
        406
    );
    let cross_site_stream = format!("{alex}Sec-Fetch-Site: cross-site\r\n");
    let refused = sse_client::open(addr, "/connect/sse", &cross_site_stream)
        .await
        .err()
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert_eq!(gw.sockets().count(), 0);
    assert_eq!(gw.stats().transport.sockets_opened, 0, "nothing was opened");
}

#[tokio::test]
async fn a_page_of_an_allowed_origin_may_read_the_stream_and_post_with_credentials() {
    let config = spec_config("    sse: {}\n    allowed_origins: [\"https://app.example\"]");
    let gw = start(Kind::Sse, container(config)).await;
    let addr = gw.local_addr().unwrap();
    let from_app = format!("{}Origin: https://app.example\r\n", cookie("alex"));
    let sse = sse_client::open(addr, "/connect/sse", &from_app)
        .await
        .unwrap();
    let (status, head) = sse_client::exchange(
        addr,
        "OPTIONS",
        &sse.post,
        "Origin: https://app.example\r\nAccess-Control-Request-Method: DELETE\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 204);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods: get, post, delete"),
        "{head}"
    );
    let (status, head) = sse_client::exchange(addr, "POST", &sse.post, &from_app, b"{}").await;
    assert_eq!(status, 202);
    assert!(head
        .to_ascii_lowercase()
        .contains("access-control-allow-origin: https://app.example"));
    // A post too large is refused before the endpoint sees it, and the page can still read
    // why (its client then closes with 1009, not an unreadable 1006).
    let too_big = vec![b' '; 64 * 1024 + 1];
    let (status, head) = sse_client::exchange(addr, "POST", &sse.post, &from_app, &too_big).await;
    assert_eq!(status, 413);
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    // Another site gets no CORS headers, and its preflight is refused.
    let (status, head) = sse_client::exchange(
        addr,
        "OPTIONS",
        &sse.post,
        "Origin: https://evil.example\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 403);
    assert!(!head
        .to_ascii_lowercase()
        .contains("access-control-allow-origin"));
}
