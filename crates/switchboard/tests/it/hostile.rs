//! Hostile input, limits and faults, end to end: each case checks what the client sees,
//! what is published (nothing, unless said), what is counted, and that other sockets are
//! untouched. See docs/HOSTILE-INPUT.md for the table these tests pin down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard::{Config, Message};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use switchboard_test_support::{each_transport, start as start_on, Kind};

use crate::harness::*;

/// The spec config plus `extra` lines under `gateway:` (already indented by two spaces).
fn config_with(socket_extra: &str, gateway_extra: &str) -> Config {
    let base = spec_config(socket_extra);
    if gateway_extra.is_empty() {
        return base;
    }
    let yaml = format!(
        "gateway:\n{gateway_extra}\n  socket:\n    path: /connect\n{socket_extra}\n    onconnect: {{publish: \"socket:connection\"}}\n    onmessage:\n      publish: \"socket:generalMessage\"\n    onclose: {{publish: \"socket:close\"}}\n    send: {{subscribe: \"socket:send\"}}\n    broadcast: {{subscribe: \"socket:broadcast\"}}\n  auth:\n    secret_env: {SECRET_ENV}\n"
    );
    Config::from_yaml_str(&yaml).unwrap()
}

/// Reads frames until a close; returns its code.
async fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close within 5 s")
        {
            Some(Ok(WsMessage::Close(Some(f)))) => return f.code,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn raw_frame(ws: &mut Ws, opcode: Data, payload: &[u8], fin: bool) {
    let op = if matches!(opcode, Data::Continue) {
        OpCode::Data(Data::Continue)
    } else {
        OpCode::Data(opcode)
    };
    ws.send(WsMessage::Frame(Frame::message(payload.to_vec(), op, fin)))
        .await
        .unwrap();
}

#[tokio::test]
async fn oversized_message_closes_1009_and_publishes_nothing() {
    let mut c = container(spec_config("    max_message_size: 100"));
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    let gw = start(c).await;
    let mut bystander = connect(&gw, "sam", Some("a")).await;
    let mut ws = connect(&gw, "alex", Some("a")).await;
    let big = json!({"type": "x", "payload": "y".repeat(200)});
    send(&mut ws, big).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);
    // fragments count as a whole: three 60-byte pieces of one message
    let mut ws = connect(&gw, "alex", Some("a")).await;
    let piece = [b' '; 60];
    raw_frame(&mut ws, Data::Text, b"{\"type\":\"x\"", false).await;
    raw_frame(&mut ws, Data::Continue, &piece, false).await;
    raw_frame(&mut ws, Data::Continue, &piece, false).await;
    raw_frame(&mut ws, Data::Continue, b"}", true).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(seen.try_recv().is_err(), "nothing published");
    assert_eq!(gw.stats().transport.protocol_errors, 2);
    // the other socket is untouched
    send(&mut bystander, json!({"type": "ok"})).await;
    assert_eq!(next_published(&mut seen).await.1, json!({"type": "ok"}));
}

#[tokio::test]
async fn fragmented_message_is_published_whole() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    raw_frame(&mut ws, Data::Text, b"{\"type\":\"fr", false).await;
    raw_frame(
        &mut ws,
        Data::Continue,
        "ag\",\"payload\":\"h\u{e9}".as_bytes(),
        false,
    )
    .await;
    raw_frame(&mut ws, Data::Continue, b"llo\"}", true).await;
    let (_, data, _) = next_published(&mut seen).await;
    assert_eq!(data, json!({"type": "frag", "payload": "h\u{e9}llo"}));
}

#[tokio::test]
async fn invalid_utf8_closes_1007_and_binary_gets_an_error_frame() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    ws.send(WsMessage::binary(b"{\"type\":\"x\"}".to_vec()))
        .await
        .unwrap();
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    raw_frame(&mut ws, Data::Text, b"{\"type\":\"\xff\"}", true).await;
    assert_eq!(close_code(&mut ws).await, CloseCode::Invalid);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(seen.try_recv().is_err(), "nothing published");
    let stats = gw.stats();
    assert_eq!(stats.bad_messages, 1);
    assert_eq!(stats.transport.protocol_errors, 1);
}

#[tokio::test]
async fn foreign_origin_gets_403_same_origin_passes() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:connection"]);
    let gw = start(c).await;
    let attempt = |origin: String| {
        let url = format!("ws://{}/connect", gw.local_addr().unwrap());
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "cookie",
            format!("ID_TOKEN={}", token("alex")).parse().unwrap(),
        );
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match attempt("https://evil.example".into()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.try_recv().is_err(),
        "nothing published for a refused origin"
    );
    attempt(format!("http://{}", gw.local_addr().unwrap()))
        .await
        .unwrap();
    next_published(&mut seen).await;
    assert_eq!(gw.stats().transport.refused_origin, 1);
}

#[tokio::test]
async fn socket_limits_refuse_before_the_upgrade() {
    let config = config_with(
        "",
        "  limits:\n    max_sockets: 3\n    max_sockets_per_user: 2",
    );
    let gw = start(container(config)).await;
    let status = |user: &'static str| {
        let url = format!("ws://{}/connect", gw.local_addr().unwrap());
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert(
                "cookie",
                format!("ID_TOKEN={}", token(user)).parse().unwrap(),
            );
            match tokio_tungstenite::connect_async(req).await {
                Ok((ws, _)) => (101, Some(ws)),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => (r.status().as_u16(), None),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let (s1, _a1) = status("alex").await;
    let (s2, _a2) = status("alex").await;
    let (s3, _) = status("alex").await;
    assert_eq!((s1, s2, s3), (101, 101, 429));
    let (s4, _b1) = status("sam").await;
    let (s5, _) = status("kim").await;
    assert_eq!((s4, s5), (101, 503));
    let stats = gw.stats();
    assert_eq!(stats.refused_user_limit, 1);
    assert_eq!(stats.transport.refused_capacity, 1);
}

/// Twenty upgrades of one user at once, two places: two sockets open; and the places come
/// back when they close. Admission reserves a user's place until the socket is registered
/// (the reservation's own test, `places_in_flight_count_until_given_back`, shows the race
/// it closes); a place never given back would refuse the last two upgrades here.
#[tokio::test]
async fn upgrades_in_flight_count_against_the_per_user_limit() {
    let config = config_with("", "  limits:\n    max_sockets_per_user: 2");
    let gw = start(container(config)).await;
    let url = format!("ws://{}/connect", gw.local_addr().unwrap());
    let upgrade = || {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert(
            "cookie",
            format!("ID_TOKEN={}", token("alex")).parse().unwrap(),
        );
        async move { tokio_tungstenite::connect_async(req).await.ok() }
    };
    let open: Vec<_> = futures_util::future::join_all((0..20).map(|_| upgrade()))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(open.len(), 2);
    assert_eq!(gw.stats().refused_user_limit, 18);
    drop(open);
    let mut again = Vec::new();
    for _ in 0..2 {
        // The server sees the closes a moment later: bounded retries.
        let mut opened = None;
        for _ in 0..100 {
            opened = upgrade().await;
            if opened.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        again.push(opened.expect("a place once the first two have closed"));
    }
}

#[tokio::test]
async fn namespace_claim_limits_which_namespaces_a_token_may_join() {
    let _ = spec_config("");
    let yaml = format!(
        "gateway:\n  socket: {{}}\n  auth:\n    secret_env: {SECRET_ENV}\n    namespace_claim: tenants\n"
    );
    let gw = start(container(Config::from_yaml_str(&yaml).unwrap())).await;
    let try_ns = |ns: &str, tenants: serde_json::Value| {
        let url = format!("ws://{}/connect?namespace={ns}", gw.local_addr().unwrap());
        let t = token_with(
            json!({"preferred_username": "alex", "exp": now() + 60, "tenants": tenants}),
            SECRET,
        );
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("cookie", format!("ID_TOKEN={t}").parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(try_ns("acme", json!(["acme", "globex"])).await, 101);
    assert_eq!(try_ns("acme", json!("acme")).await, 101);
    assert_eq!(try_ns("initech", json!(["acme"])).await, 403);
    assert_eq!(try_ns("acme", json!(null)).await, 403);
    // A second `namespace` (which handlers would read in `params`) is refused, in either
    // order: only one tenant can have been checked.
    assert_eq!(try_ns("acme&namespace=initech", json!(["acme"])).await, 400);
    assert_eq!(try_ns("initech&namespace=acme", json!(["acme"])).await, 400);
    assert_eq!(try_ns("acme&namespace=acme", json!(["acme"])).await, 400);
    assert_eq!(try_ns("acme&other=1", json!(["acme"])).await, 101);
    // Percent-encoded, the name and the value count as themselves...
    assert_eq!(
        try_ns("acme&%6Eamespace=initech", json!(["acme"])).await,
        400
    );
    assert_eq!(try_ns("%61cme", json!(["acme"])).await, 101);
    // ...and a value that is not UTF-8 once decoded is refused, not read as U+FFFD (which
    // a token could list).
    assert_eq!(try_ns("%ff", json!(["\u{fffd}"])).await, 400);
    assert_eq!(try_ns("a%ffb", json!(["a\u{fffd}b"])).await, 400);
    // A namespace is at most 256 bytes once decoded; longer is refused before the token's
    // list is consulted (a token holder could otherwise make kilobyte-long tenants).
    let (fits, over) = ("n".repeat(256), "n".repeat(257));
    assert_eq!(try_ns(&fits, json!([fits])).await, 101);
    assert_eq!(try_ns(&"%6E".repeat(256), json!([fits])).await, 101);
    assert_eq!(try_ns(&over, json!([over])).await, 400);
    assert_eq!(try_ns(&"%C3%A9".repeat(129), json!(["x"])).await, 400);
    assert_eq!(gw.stats().refused_namespace, 2);
    assert_eq!(gw.stats().refused_namespace_repeated, 4);
    assert_eq!(gw.stats().refused_namespace_not_utf8, 2);
    assert_eq!(gw.stats().refused_namespace_too_long, 2);
    let metrics = gw.metrics_text();
    assert!(
        metrics.contains(
            r#"switchboard_handshakes_refused_total{reason="namespace_not_utf8",status="400"} 2"#
        ) && metrics.contains(
            r#"switchboard_handshakes_refused_total{reason="namespace_too_long",status="400"} 2"#
        ),
        "{metrics}"
    );
}

async fn rate_limit_refuses_with_an_error_frame_then_closes(kind: Kind) {
    // The slowest refill the config takes: the six messages below must come within a second
    // of each other for the sixth to find the burst spent.
    let config = config_with(
        "",
        "  limits:\n    messages_per_second: 1\n    message_burst: 5",
    );
    let mut c = container(config);
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    let gw = start_on(kind, c).await;
    let mut calm = gw.connect("sam", None).await;
    let mut noisy = gw.connect("alex", None).await;
    for i in 0..6 {
        noisy.send(json!({"type": "m", "payload": i})).await;
    }
    for i in 0..5 {
        assert_eq!(next_published(&mut seen).await.1["payload"], i);
    }
    // the sixth is refused with one error frame
    let frame = noisy.recv().await;
    assert_eq!(frame["type"], "error");
    assert!(frame["payload"]["message"]
        .as_str()
        .unwrap()
        .contains("rate limit"));
    // going on for a whole burst gets the socket closed
    for i in 0..10 {
        let message = json!({"type": "m", "payload": i}).to_string();
        if !noisy.try_send_text(&message).await {
            break;
        }
    }
    assert_eq!(noisy.close_code().await, 1008);
    // the calm socket is unaffected
    calm.send(json!({"type": "calm"})).await;
    loop {
        if next_published(&mut seen).await.1 == json!({"type": "calm"}) {
            break;
        }
    }
    let stats = gw.stats();
    assert!(stats.rate_limited >= 5, "{stats:?}");
    assert_eq!(stats.rate_limit_closes, 1);
}

each_transport!(rate_limit_refuses_with_an_error_frame_then_closes);

#[tokio::test]
async fn connect_handler_error_closes_1011() {
    let mut c = container(spec_config(""));
    c.add_handler("socket:connection", |_m: Message| async {
        Err::<(), _>(std::io::Error::other("membership service down"))
    })
    .unwrap();
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("a")).await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert!(
        !frame.to_string().contains("membership"),
        "no internals leak: {frame}"
    );
    assert_eq!(close_code(&mut ws).await, CloseCode::Error);
    assert_eq!(gw.stats().connect_failures, 1);
}

#[tokio::test]
async fn a_handler_that_never_replies_costs_nothing_but_its_own_wait() {
    let mut c = container(spec_config(""));
    let waiting = Arc::new(AtomicUsize::new(0));
    let w = waiting.clone();
    c.add_handler("socket:type_one", move |_m: Message| {
        w.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>()
    })
    .unwrap();
    c.add_handler(
        "socket:type_two",
        |m: Message| async move { m.reply("two") },
    )
    .unwrap();
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    for _ in 0..50 {
        send(&mut ws, json!({"type": "message_type_one"})).await;
    }
    send(&mut ws, json!({"type": "message_type_two"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:type_two", "payload": "two"})
    );
    assert_eq!(waiting.load(Ordering::SeqCst), 50);
    ws.close(None).await.unwrap();
    assert_eq!(next_published(&mut closes).await.1["username"], "alex");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_among_a_thousand_is_closed_and_the_rest_get_everything() {
    const FAST: usize = 1000;
    const WINDOW: usize = 8;
    // Loopback buffers absorb up to about 4.2 MB for a client that stops reading (the send
    // buffer grows to tcp_wmem's 4 MiB; the receive buffer stays near its 128 KiB), so the
    // stream must be well over that plus the 16-frame queue to overflow it: 360 x 16 KiB
    // (5.9 MB; 320, with a 64-frame queue, sometimes fitted).
    const BROADCASTS: usize = 360;
    const PAD: usize = 16 * 1024;
    // The readers answer no pings: no heartbeat may close them, however long a busy machine
    // takes over the gigabytes.
    let mut c = container(spec_config("    send_queue: 16\n    heartbeat: 1h"));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    let received = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..FAST {
        // Plain frame readers: 5 GB through the loopback must stay cheap in a debug build.
        let mut stream =
            crate::raw::connect(gw.local_addr().unwrap(), &token(&format!("u{i}"))).await;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            for expect in 0..BROADCASTS {
                let text = crate::raw::read_text(&mut stream).await;
                // {"type":"tick","payload":"000042|xxxx..."}: the sequence number is at a
                // fixed place, so no JSON parsing is needed to check order and gaps.
                let seq = &text[26..32];
                assert_eq!(
                    seq,
                    format!("{expect:06}").as_bytes(),
                    "in order, none missing"
                );
                received.fetch_add(1, Ordering::Relaxed);
            }
            stream
        }));
    }
    // One client that never reads.
    let _slow = crate::raw::connect(gw.local_addr().unwrap(), &token("slowpoke")).await;
    while gw.sockets().count() < FAST + 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pad = "x".repeat(PAD);
    let producer = gw.producer();
    for seq in 0..BROADCASTS {
        // Keep the fast readers within a small window so only the slow one falls behind.
        while received.load(Ordering::Relaxed) + WINDOW * FAST < seq * FAST {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        producer
            .send(
                "socket:broadcast",
                json!({"type": "tick", "payload": format!("{seq:06}|{pad}")}),
            )
            .unwrap();
    }
    let mut fast = Vec::new();
    for r in readers {
        fast.push(
            tokio::time::timeout(Duration::from_secs(120), r)
                .await
                .expect("fast readers finish")
                .unwrap(),
        );
    }
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "slowpoke");
    assert_eq!(data["reason"]["kind"], "slow_consumer");
    assert_eq!(gw.stats().transport.slow_consumers, 1);
    assert_eq!(gw.sockets().count(), FAST);
    // What the gateway holds follows from its bounds, not from the length of the stream: the
    // slow socket's queue is capped at `send_queue` frames and `send_queue_bytes` (1 MiB),
    // and once it is closed and the others have read everything, nothing stays buffered.
    let t = gw.stats().transport;
    assert!(t.buffered_bytes_peak <= t.buffer_budget, "{t:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.stats().transport.buffered_bytes > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            gw.stats().transport
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(fast);
}
