//! The server API (`gateway.api`): a real HTTP client against a started gateway, and the
//! OpenAPI document checked against the routes the server serves.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::{json, Value};
use switchboard::API_ROUTES;
use switchboard_test_support::{
    container, http_json, next_published, recorder, spec_config, start, Gateway, Kind,
};

const KEY: &str = "test-api-key-0123456789";

fn api_config() -> switchboard::Config {
    let mut yaml = String::from("    disconnect:\n      subscribe: \"socket:disconnect\"");
    yaml.push_str("\n    sse: {}");
    let mut config = spec_config(&yaml);
    let api: switchboard::config::Api = serde_json::from_value(json!({
        "listen": "127.0.0.1:0",
        "max_body": 1024,
    }))
    .unwrap();
    config.gateway.api = Some(api);
    config
}

async fn api_gateway(kind: Kind) -> (Gateway, SocketAddr) {
    let gw = start(kind, container_with_key()).await;
    let addr = gw.api_addr().expect("an API listener");
    (gw, addr)
}

/// A container with the API section, its key given directly (no environment variable).
fn container_with_key() -> switchboard::Container {
    let mut c = container(api_config());
    c.api_key(KEY).unwrap();
    c
}

async fn call(addr: SocketAddr, method: &str, target: &str, body: Option<Value>) -> (u16, Value) {
    http_json(addr, method, target, Some(KEY), body.as_ref()).await
}

#[tokio::test]
async fn every_call_needs_the_key_and_bad_input_names_the_field() {
    let (_gw, addr) = api_gateway(Kind::WebSocket).await;
    let send = json!({"username": "alex", "type": "t"});
    for key in [None, Some("wrong-key-0123456789abc"), Some("")] {
        let (status, body) = http_json(addr, "POST", "/api/send", key, Some(&send)).await;
        assert_eq!(status, 401, "{key:?} {body}");
    }
    // The right key twice, in two headers: which one counts is not guessed.
    let twice = format!("{KEY}\r\nAuthorization: Bearer {KEY}");
    let (status, body) = http_json(addr, "POST", "/api/send", Some(&twice), Some(&send)).await;
    assert_eq!(status, 401, "two Authorization headers: {body}");
    let (status, _) = http_json(addr, "GET", "/api/nope", None, None).await;
    assert_eq!(status, 401, "no route is shown without the key");
    assert_eq!(call(addr, "GET", "/api/nope", None).await.0, 404);
    assert_eq!(call(addr, "GET", "/api/send", None).await.0, 405);
    let bad = [
        ("POST", "/api/send", Some(json!({"type": "t"})), "username"),
        (
            "POST",
            "/api/send",
            Some(json!({"username": 7, "type": "t"})),
            "username",
        ),
        (
            "POST",
            "/api/send",
            Some(json!({"username": "", "type": "t"})),
            "username",
        ),
        (
            "POST",
            "/api/broadcast",
            Some(json!({"payload": 1})),
            "type",
        ),
        (
            "POST",
            "/api/disconnect",
            Some(json!({"username": "alex", "code": 1005})),
            "code",
        ),
        ("GET", "/api/presence", None, "namespace"),
    ];
    for (method, path, body, field) in bad {
        let (status, answer) = call(addr, method, path, body.clone()).await;
        assert_eq!(
            (status, answer["field"].clone()),
            (400, json!(field)),
            "{method} {path} {body:?}: {answer}"
        );
    }
    let (status, _) = call(addr, "POST", "/api/send", Some(json!([1, 2]))).await;
    assert_eq!(status, 400);
    let big = json!({"username": "alex", "type": "t", "payload": "x".repeat(2000)});
    assert_eq!(call(addr, "POST", "/api/send", Some(big)).await.0, 413);
}

async fn send_broadcast_disconnect_and_presence_over_http(kind: Kind) {
    let mut c = container_with_key();
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(kind, c).await;
    let addr = gw.api_addr().unwrap();
    let mut alex = gw.connect("alex", Some("acme")).await;
    let mut sam = gw.connect("sam", Some("acme")).await;
    gw.wait_for_sockets(2).await;

    let send = json!({"username": "alex", "namespace": "acme", "type": "note", "payload": 1});
    let (status, body) = call(addr, "POST", "/api/send", Some(send)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"sockets_on_this_node": 1, "published_to_every_node": false})
    );
    assert_eq!(alex.recv().await, json!({"type": "note", "payload": 1}));

    let news = json!({"namespace": "acme", "type": "news", "payload": "hi"});
    let (status, body) = call(addr, "POST", "/api/broadcast", Some(news)).await;
    assert_eq!(
        (status, body["sockets_on_this_node"].clone()),
        (200, json!(2))
    );
    assert_eq!(alex.recv().await["type"], "news");
    assert_eq!(sam.recv().await["type"], "news");

    let (status, body) = call(addr, "GET", "/api/presence?namespace=acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["users"], json!({"alex": 1, "sam": 1}));
    assert_eq!(
        (body["sockets"].clone(), body["nodes"].clone()),
        (json!(2), json!(1))
    );

    let (status, body) = call(addr, "GET", "/api/connections?username=alex", None).await;
    assert_eq!(status, 200);
    let connections = body["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{body}");
    assert_eq!(connections[0]["namespace"], "acme");
    assert_eq!(connections[0]["node"], "local");
    assert!(connections[0]["since_ms"].as_u64().unwrap() > 1_700_000_000_000);

    let out = json!({"username": "alex", "code": 4003, "reason": "banned"});
    let (status, body) = call(addr, "POST", "/api/disconnect", Some(out)).await;
    assert_eq!(
        (status, body["sockets_on_this_node"].clone()),
        (200, json!(1))
    );
    assert_eq!(alex.close_code().await, 4003);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["reason"]["reason"], "banned");
    gw.wait_for_sockets(1).await;
}

switchboard_test_support::each_transport!(send_broadcast_disconnect_and_presence_over_http);

/// `body` as it is, bytes that are not JSON (or not UTF-8) included, with the key.
async fn call_raw(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> (u16, Value) {
    let length = format!("Content-Length: {}\r\n", body.len());
    let (status, _, answer) = call_with_head(addr, method, target, &length, body).await;
    (status, answer)
}

/// `body` after a head of the key and `head_lines` (each ending in CRLF), which say how the
/// body is framed: the status, the answer's head (lower-cased) and its JSON body.
async fn call_with_head(
    addr: SocketAddr,
    method: &str,
    target: &str,
    head_lines: &str,
    body: &[u8],
) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{head_lines}\r\n"
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap(),
    )
}

/// A body in a coding the API does not undo is refused, never read as plain JSON: a body that
/// says it is gzip and parses as JSON is not what its sender meant. Plain `chunked` and
/// `identity` are read.
#[tokio::test]
async fn a_coded_body_is_refused_and_reaches_nobody() {
    let (gw, addr) = api_gateway(Kind::WebSocket).await;
    let mut alex = gw.connect("alex", None).await;
    gw.wait_for_sockets(1).await;
    let cases = [
        ("Content-Encoding: gzip", false, 415),
        ("Content-Encoding: identity, br", false, 415),
        ("Transfer-Encoding: gzip, chunked", true, 501),
        ("Transfer-Encoding: chunked, chunked", true, 400),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            true,
            501,
        ),
        // Read: each reaches alex with its own payload, so a refused one that was sent would
        // show up first.
        ("Transfer-Encoding: chunked", true, 200),
        ("Content-Encoding: identity", false, 200),
        // An empty value, or `identity` listed twice, asks for no coding either.
        ("Content-Encoding: ", false, 200),
        ("Content-Encoding: Identity, identity", false, 200),
    ];
    for (i, (framing, chunked, status)) in cases.into_iter().enumerate() {
        let body = format!(r#"{{"username":"alex","type":"t","payload":{i}}}"#);
        let (head, body) = if chunked {
            let chunk = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
            (format!("{framing}\r\n"), chunk)
        } else {
            let length = format!("Content-Length: {}\r\n", body.len());
            (format!("{framing}\r\n{length}"), body)
        };
        let (got, answer_head, answer) =
            call_with_head(addr, "POST", "/api/send", &head, body.as_bytes()).await;
        assert_eq!(got, status, "{head}: {answer}");
        if status == 200 {
            assert_eq!(answer["sockets_on_this_node"], json!(1), "{head}");
            assert_eq!(alex.recv().await, json!({"type": "t", "payload": i}));
        } else {
            let error = answer["error"].as_str().unwrap();
            assert!(
                error.contains("encoded") || error.contains("coding") || error.contains("chunked"),
                "{answer}"
            );
            if status == 415 {
                // What it takes instead (RFC 9110 15.5.16).
                assert!(
                    answer_head.contains("\r\naccept-encoding: identity"),
                    "{answer_head}"
                );
            }
        }
    }
    alex.assert_silent(100).await;
}

/// A field a route does not take is refused, not ignored: a misspelt `namespace` would
/// otherwise widen a send or a disconnect to the user's sockets in every namespace.
#[tokio::test]
async fn a_misspelt_field_is_400_naming_it_and_reaches_nobody() {
    let (gw, addr) = api_gateway(Kind::WebSocket).await;
    let mut in_acme = gw.connect("alex", Some("acme")).await;
    let mut in_globex = gw.connect("alex", Some("globex")).await;
    gw.wait_for_sockets(2).await;
    let refused = [
        (
            "/api/send",
            json!({"username": "alex", "Namespace": "acme", "type": "t"}),
            "Namespace",
        ),
        (
            "/api/broadcast",
            json!({"namespace": "acme", "type": "t", "to": "alex"}),
            "to",
        ),
        (
            "/api/disconnect",
            json!({"username": "alex", "namespce": "acme"}),
            "namespce",
        ),
    ];
    for (route, body, field) in refused {
        let (status, answer) = call(addr, "POST", route, Some(body)).await;
        assert_eq!(
            (status, answer["field"].clone()),
            (400, json!(field)),
            "{route}: {answer}"
        );
        assert!(
            answer["error"].as_str().unwrap().contains("`namespace`"),
            "names what the route takes: {answer}"
        );
    }
    // Nothing was sent to either socket, and neither was closed.
    in_acme.assert_silent(200).await;
    in_globex.assert_silent(100).await;
    // Every field a route documents is taken.
    let (status, answer) = call(
        addr,
        "POST",
        "/api/send",
        Some(json!({"username": "alex", "namespace": "acme", "type": "t", "payload": 1})),
    )
    .await;
    assert_eq!(
        (status, answer["sockets_on_this_node"].clone()),
        (200, json!(1))
    );
    assert_eq!(in_acme.recv().await, json!({"type": "t", "payload": 1}));
    in_globex.assert_silent(100).await;
}

/// A parameter or a body field given twice gets `400` naming it, as `namespace` does at the
/// upgrade: one value would be used, and which one is a guess (the last, before). A parameter
/// that is not UTF-8 once percent-decoded gets `400` too, never U+FFFD in place of its bytes
/// (which would name another namespace or user than the one asked about).
#[tokio::test]
async fn a_repeated_or_undecodable_parameter_or_field_is_400_naming_it() {
    let (gw, addr) = api_gateway(Kind::WebSocket).await;
    let _alex = gw.connect("alex", Some("acme")).await;
    gw.wait_for_sockets(1).await;
    let refused = [
        ("/api/presence?namespace=acme&namespace=globex", "namespace"),
        ("/api/presence?namespace=globex&namespace=acme", "namespace"),
        ("/api/presence?namespace=acme&namespace=acme", "namespace"),
        ("/api/presence?namespace=%ff", "namespace"),
        ("/api/presence?namespace=ac%ffme", "namespace"),
        ("/api/presence?namespace=acme&other=%c3", "other"),
        ("/api/connections?username=alex&username=sam", "username"),
        ("/api/connections?username=%ff%fe", "username"),
    ];
    for (target, field) in refused {
        let (status, answer) = call(addr, "GET", target, None).await;
        assert_eq!(
            (status, answer["field"].clone()),
            (400, json!(field)),
            "{target}: {answer}"
        );
    }
    let (status, answer) = call(addr, "GET", "/api/presence?%ff=1&namespace=acme", None).await;
    assert_eq!(
        (status, answer["field"].clone()),
        (400, json!("%ff")),
        "{answer}"
    );
    // Percent-encoded UTF-8, `+` and a `%` that encodes nothing still decode as before.
    for (target, namespace) in [
        ("/api/presence?namespace=ac%6De", "acme"),
        ("/api/presence?namespace=%C3%A9t%C3%A9", "été"),
        ("/api/presence?namespace=a+b%", "a b%"),
    ] {
        let (status, answer) = call(addr, "GET", target, None).await;
        assert_eq!(
            (status, answer["namespace"].clone()),
            (200, json!(namespace))
        );
    }
    let (status, answer) = call(addr, "GET", "/api/presence?namespace=ac%6De", None).await;
    assert_eq!((status, answer["users"].clone()), (200, json!({"alex": 1})));
    let (status, answer) = call(addr, "GET", "/api/connections?username=%61lex", None).await;
    assert_eq!((status, answer["username"].clone()), (200, json!("alex")));

    // The same for the POSTs' bodies: a field given twice.
    let refused: [(&str, &str, &str); 5] = [
        (
            "/api/send",
            r#"{"username":"sam","username":"alex","type":"t"}"#,
            "username",
        ),
        (
            "/api/send",
            r#"{"username":"alex","type":"t","namespace":"a","namespace":"acme"}"#,
            "namespace",
        ),
        (
            "/api/broadcast",
            r#"{"type":"a","payload":1,"type":"b"}"#,
            "type",
        ),
        (
            "/api/disconnect",
            r#"{"username":"alex","code":4003,"code":4004}"#,
            "code",
        ),
        (
            "/api/disconnect",
            r#"{"username":"alex","reason":"a","reason":"b"}"#,
            "reason",
        ),
    ];
    for (path, body, field) in refused {
        let (status, answer) = call_raw(addr, "POST", path, body.as_bytes()).await;
        assert_eq!(
            (status, answer["field"].clone()),
            (400, json!(field)),
            "{path} {body}: {answer}"
        );
    }
    // Not UTF-8, raw or escaped (a lone surrogate): not JSON.
    for body in [
        &b"{\"username\":\"\xff\",\"type\":\"t\"}"[..],
        br#"{"username":"\udcff","type":"t"}"#,
    ] {
        let (status, answer) = call_raw(addr, "POST", "/api/send", body).await;
        assert_eq!(status, 400, "{answer}");
    }
    // A repeated key deeper down is the payload's own business, sent as JSON reads it.
    let body = br#"{"username":"alex","type":"t","payload":{"n":1,"n":2}}"#;
    let (status, answer) = call_raw(addr, "POST", "/api/send", body).await;
    assert_eq!(
        (status, answer["sockets_on_this_node"].clone()),
        (200, json!(1))
    );
    let (status, answer) = call_raw(addr, "POST", "/api/send", b"[1]").await;
    assert_eq!(
        (status, answer["error"].clone()),
        (400, json!("the body must be a JSON object"))
    );
}

/// docs/openapi.json lists exactly the routes the server serves, and each answers (with the
/// key, and bad input: never 404 or 405).
#[tokio::test]
async fn the_openapi_document_matches_the_routes_served() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let served: BTreeSet<(String, String)> = API_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
    let (_gw, addr) = api_gateway(Kind::WebSocket).await;
    for (method, path) in &served {
        let body = (method == "POST").then(|| json!({}));
        let (status, _) = call(addr, method, path, body).await;
        assert_eq!(status, 400, "{method} {path} answers (bad input: 400)");
    }
}

#[tokio::test]
async fn without_a_key_the_gateway_does_not_start_and_says_which_variable() {
    let c = container(api_config());
    let err = c
        .start_on("127.0.0.1:0".parse().unwrap())
        .await
        .expect_err("no API key");
    assert!(
        err.to_string()
            .contains("the environment variable `SWITCHBOARD_API_KEY` is not set"),
        "{err}"
    );
    let mut c = container(api_config());
    assert!(c.api_key("too-short").is_err());
}

#[tokio::test]
async fn the_api_listener_holds_at_most_128_connections() {
    use tokio::io::AsyncReadExt;
    let (_gw, addr) = api_gateway(Kind::WebSocket).await;
    let mut held = Vec::new();
    for _ in 0..128 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The 129th is closed as it is accepted (nothing is read from it).
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // A freed place serves again.
    drop(held.pop());
    let answered = async {
        loop {
            let (status, _) = call(addr, "GET", "/api/presence?namespace=x", None).await;
            if status == 200 {
                return;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), answered)
        .await
        .expect("served once a place is free");
}

/// A client that pipelines requests and never reads the answers: the server's writes stall,
/// and the connection is dropped (after 10 s without progress) instead of holding one of the
/// 128 places for ever. Before, 128 such clients, without the key, shut the API out for good.
#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let (_gw, addr) = api_gateway(Kind::WebSocket).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // Unauthenticated: each gets a small 401, none is ever read. The writes go on until the
    // server has stopped taking requests (its answers stalled), then fail once it drops us.
    let requests = "GET /api/presence?namespace=x HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    let dropped = async { while stream.write_all(requests.as_bytes()).await.is_ok() {} };
    tokio::time::timeout(std::time::Duration::from_secs(60), dropped)
        .await
        .expect("the connection is dropped once its answers stall");
    // The listener serves others as before.
    let (status, _) = call(addr, "GET", "/api/presence?namespace=x", None).await;
    assert_eq!(status, 200);
}

/// A client that pipelines requests and takes what has come of its answers every 2 s never
/// makes a write wait the 10 s that drop a stalled client, but makes the server wait most of
/// the time: it is dropped once the waits outrun the time between them by 30 s (before, it
/// held its place for ever). Its small receive buffer fills within a moment of each read,
/// however slowly the server answers.
#[tokio::test]
async fn a_client_that_takes_its_answers_every_few_seconds_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let (_gw, addr) = api_gateway(Kind::WebSocket).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let (answers, mut requests) = socket.connect(addr).await.unwrap().into_split();
    let pipelined = "GET /api/presence?namespace=x HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    let writing =
        tokio::spawn(
            async move { while requests.write_all(pipelined.as_bytes()).await.is_ok() {} },
        );
    let every_few_seconds = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            // What has come, up to 4 MiB: the server's writes go through, then wait again.
            let mut taken = 0;
            while taken < 4 << 20 {
                match answers.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => taken += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), every_few_seconds)
        .await
        .expect("the connection is dropped once its waits add up");
    writing.abort();
    let (status, _) = call(addr, "GET", "/api/presence?namespace=x", None).await;
    assert_eq!(status, 200);
}
