//! `gateway.http_handlers`: events POSTed, signed, to a real HTTP server on loopback, through
//! real WebSocket clients of a running container; the answers and every failure reach the
//! socket as the bus paths' do.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use switchboard::Config;
use switchboard_test_support::http_backend::{
    Answer, Gate, HttpBackend, Request, HANDLER_SECRET, HANDLER_SECRET_ENV,
};
use switchboard_test_support::{
    container, request, start, token, wait_until, Event, Gateway, Kind,
};

/// A gateway whose `onconnect`, `onmessage` and `onclose` topics are bound to `backend`, with
/// `extra` lines (indented by six spaces) in the binding.
async fn gateway(backend: &HttpBackend, extra: &str) -> Gateway {
    gateway_at(&backend.url(), extra).await
}

/// The same with the endpoint at `url`.
async fn gateway_at(url: &str, extra: &str) -> Gateway {
    let yaml = format!(
        r#"
gateway:
  socket:
    context_headers: [user-agent]
    onconnect: {{publish: "socket:connection"}}
    onmessage: {{publish: "socket:generalMessage"}}
    onclose: {{publish: "socket:close"}}
    send: {{subscribe: "socket:send"}}
  auth:
    secret_env: {secret}
  http_handlers:
    - url: "{url}"
      name: test-backend
      topics: ["socket:connection", "socket:generalMessage", "socket:close"]
      secret_env: {HANDLER_SECRET_ENV}
{extra}"#,
        secret = switchboard_test_support::SECRET_ENV,
    );
    let mut c = container(Config::from_yaml_str(&yaml).unwrap());
    c.http_handler_secret(HANDLER_SECRET_ENV, HANDLER_SECRET);
    start(Kind::WebSocket, c).await
}

/// Answers by the message's `type` (the connect event gets a greeting, `onclose` `{}`).
fn by_type(r: &Request) -> Answer {
    let data = &r.envelope["data"];
    match data["type"].as_str() {
        None if r.topic() == "socket:connection" => {
            Answer::json(json!({"reply": {"hello": r.envelope["context"]["username"]}}))
        }
        Some("say") => Answer::json(json!({"reply": {"echo": data["payload"]}})),
        Some("nope") => Answer::json(json!({"fail": {"message": "no"}})),
        Some("quiet") => Answer::raw(200, "{}"),
        Some("empty") => Answer::raw(204, ""),
        Some("garbage") => Answer::raw(200, "this is not JSON"),
        // JSON, but not an answer: an array (read as a reply before), another key.
        Some("array") => Answer::raw(200, r#"["hi"]"#),
        Some("other") => Answer::raw(200, r#"{"other":1}"#),
        Some("null") => Answer::raw(200, r#"{"reply":null}"#),
        Some("boom") => Answer::raw(500, "database on fire"),
        Some("huge") => Answer::json(json!({"reply": "x".repeat(100_000)})),
        Some("slow") => Answer::json(json!({"reply": "late"})).after(Duration::from_secs(3)),
        _ => Answer::raw(200, "{}"),
    }
}

#[tokio::test]
async fn reply_fail_and_empty_answers_reach_the_socket_as_on_the_bus() {
    let backend = HttpBackend::start(by_type).await;
    let gw = gateway(&backend, "").await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "onconnect", "payload": {"hello": "alex"}})
    );
    alex.send(json!({"type": "say", "payload": {"n": 1}})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "socket:generalMessage", "payload": {"echo": {"n": 1}}})
    );
    alex.send(json!({"type": "nope"})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "no"}})
    );
    // `{}` and an empty 204: handled, nothing to say.
    alex.send(json!({"type": "quiet"})).await;
    alex.send(json!({"type": "empty"})).await;
    alex.assert_silent(300).await;
    // Both answered (the silence above proves nothing about a machine that stalled).
    let answered =
        "switchboard_http_handler_request_duration_seconds_count{endpoint=\"test-backend\"} 5";
    wait_until("five requests answered", Duration::from_secs(10), || {
        backend.requests().len() == 5 && gw.metrics_text().contains(answered)
    })
    .await;
    // The envelope is the one NATS handlers get, signed.
    let requests = backend.requests();
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert!(requests.iter().all(|r| r.signed), "every request verifies");
    let say = &requests[1];
    assert_eq!(say.topic(), "socket:generalMessage");
    assert_eq!(
        say.envelope["data"],
        json!({"type": "say", "payload": {"n": 1}})
    );
    let context = &say.envelope["context"];
    assert_eq!(context["username"], "alex");
    assert_eq!(context["namespace"], "acme");
    assert_eq!(context["headers"]["jwt"]["preferred_username"], "alex");
    assert_eq!(say.headers["content-type"], "application/json");
    // Event ids differ per event.
    let mut ids: Vec<&str> = requests.iter().map(|r| r.event_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5);
    // One connection, kept alive, carried all five (one request at a time here).
    assert_eq!(backend.connections(), 1);
    // The metrics count per endpoint.
    let metrics = gw.metrics_text();
    assert!(
        metrics.contains("switchboard_http_handler_requests_total{endpoint=\"test-backend\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "switchboard_http_handler_request_duration_seconds_count{endpoint=\"test-backend\"} 5"
    ));
}

#[tokio::test]
async fn malformed_failed_oversized_and_late_answers_get_the_bus_error_frames() {
    let backend = HttpBackend::start(by_type).await;
    // Long enough for every answer but the slow one (3 s), however busy the machine.
    let gw = gateway(&backend, "      timeout: 2s\n      max_response: 1KiB\n").await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["type"], "onconnect");
    alex.send(json!({"type": "garbage"})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "malformed answer from a handler"}})
    );
    alex.send(json!({"type": "huge"})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "malformed answer from a handler"}})
    );
    for not_an_answer in ["array", "other"] {
        alex.send(json!({"type": not_an_answer})).await;
        assert_eq!(
            alex.recv().await,
            json!({"type": "error", "payload": {"message": "malformed answer from a handler"}}),
            "{not_an_answer}"
        );
    }
    // `{"reply": null}`: a field that is null is absent, so nothing to say (the next frame
    // is the answer to the next message).
    alex.send(json!({"type": "null"})).await;
    alex.send(json!({"type": "boom"})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "internal error in a handler", "topic": "socket:generalMessage"}})
    );
    alex.send(json!({"type": "slow"})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "no handler answered within 2s", "topic": "socket:generalMessage"}})
    );
    // The socket is still open and served.
    alex.send(json!({"type": "say", "payload": 2})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": 2}));
    let metrics = gw.metrics_text();
    for (kind, n) in [("malformed", 4), ("status", 1), ("timeout", 1)] {
        let line = format!(
            "switchboard_http_handler_errors_total{{endpoint=\"test-backend\",kind=\"{kind}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn a_connect_handler_that_does_not_answer_in_time_leaves_the_socket_open() {
    // The connect event's answer comes after the timeout: the socket hears so, and (the
    // connect gate being off) stays open; silence is no refusal (it closed with 1008 before).
    let backend = HttpBackend::start(|r: &Request| {
        if r.topic() == "socket:connection" {
            Answer::json(json!({"reply": "late"})).after(Duration::from_secs(3))
        } else {
            by_type(r)
        }
    })
    .await;
    let gw = gateway(&backend, "      timeout: 1s\n").await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "no handler answered within 1s", "topic": "socket:connection"}})
    );
    alex.send(json!({"type": "say", "payload": 1})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": 1}));
    assert_eq!(gw.stats().connect_failures, 0);
}

#[tokio::test]
async fn a_full_queue_answers_at_once_and_one_socket_cannot_fill_it_for_others() {
    // Held until every step below is taken.
    let gate = Gate::new();
    let holding = gate.clone();
    let backend =
        HttpBackend::start(
            move |r: &Request| match r.envelope["data"]["type"].as_str() {
                Some("sleepy") => Answer::json(json!({"reply": "zzz"})).held_by(&holding),
                _ => by_type(r),
            },
        )
        .await;
    // Room for 3 events (1 in flight, 2 waiting), at most 2 of one socket (and of one user:
    // by default half the room, 1 here).
    let gw = gateway(
        &backend,
        "      concurrency: 1\n      queue: 2\n      per_socket: 2\n      per_user: 2\n      \
         timeout: 10s\n",
    )
    .await;
    let mut alex = gw.connect("alex", None).await;
    let mut sam = gw.connect("sam", None).await;
    let mut carl = gw.connect("carl", None).await;
    for c in [&mut alex, &mut sam, &mut carl] {
        assert_eq!(c.recv().await["type"], "onconnect");
    }
    let refused = json!({"type": "error", "payload": {"message": "handler queue full", "topic": "socket:generalMessage"}});
    // alex may hold 2 events of the endpoint: the other 3 are refused at once.
    for _ in 0..5 {
        alex.send(json!({"type": "sleepy"})).await;
    }
    for _ in 0..3 {
        assert_eq!(alex.recv().await, refused);
    }
    // So sam still finds room...
    sam.send(json!({"type": "sleepy"})).await;
    let held = "switchboard_http_handler_held_events{endpoint=\"test-backend\"} 3";
    wait_until("3 events held", Duration::from_secs(5), || {
        gw.metrics_text().contains(held)
    })
    .await;
    // ...and now the endpoint is full for everyone.
    carl.send(json!({"type": "sleepy"})).await;
    assert_eq!(carl.recv().await, refused);
    // A socket's close is never refused: not with the endpoint full, not with the socket at
    // its per-socket bound (a client cannot flood, then leave, to keep its close from the
    // backend).
    alex.close(1000).await;
    gate.open();
    assert_eq!(sam.recv().await["payload"], "zzz");
    wait_until(
        "alex's onclose at the backend",
        Duration::from_secs(10),
        || {
            backend
                .on_topic("socket:close")
                .iter()
                .any(|r| r.envelope["data"]["username"] == "alex")
        },
    )
    .await;
    // Refused events never reached the backend.
    assert_eq!(backend.on_topic("socket:generalMessage").len(), 3);
    let metrics = gw.metrics_text();
    assert!(metrics.contains(
        "switchboard_http_handler_errors_total{endpoint=\"test-backend\",kind=\"queue_full\"} 4"
    ));
}

/// One username's sockets together hold at most `per_user` events of an endpoint, however
/// many sockets it opens: another user still finds room.
#[tokio::test]
async fn one_users_many_sockets_cannot_fill_an_endpoint_for_others() {
    // Long enough that nothing is answered before every step below is taken, even on a busy
    // machine.
    let backend = HttpBackend::start(|r: &Request| match r.envelope["data"]["type"].as_str() {
        Some("held") => Answer::json(json!({"reply": "done"})).after(Duration::from_secs(2)),
        _ => by_type(r),
    })
    .await;
    // Room for 4 events (1 in flight, 3 waiting), at most 2 of one socket, 3 of one user.
    let gw = gateway(
        &backend,
        "      concurrency: 1\n      queue: 3\n      per_socket: 2\n      per_user: 3\n      \
         timeout: 30s\n",
    )
    .await;
    let mut alex_1 = gw.connect("alex", None).await;
    let mut alex_2 = gw.connect("alex", None).await;
    let mut sam = gw.connect("sam", None).await;
    for c in [&mut alex_1, &mut alex_2, &mut sam] {
        assert_eq!(c.recv().await["type"], "onconnect");
    }
    let refused = json!({"type": "error", "payload": {"message": "handler queue full", "topic": "socket:generalMessage"}});
    for _ in 0..2 {
        alex_1.send(json!({"type": "held"})).await;
    }
    let held =
        |n: usize| format!("switchboard_http_handler_held_events{{endpoint=\"test-backend\"}} {n}");
    wait_until(
        "alex's first socket holds 2",
        Duration::from_secs(5),
        || gw.metrics_text().contains(&held(2)),
    )
    .await;
    // Each of alex's sockets is within `per_socket`, but alex is at `per_user` after one more:
    // without the per-user bound both would be taken and the endpoint would be full.
    alex_2.send(json!({"type": "held"})).await;
    alex_2.send(json!({"type": "held"})).await;
    assert_eq!(alex_2.recv().await, refused);
    wait_until("3 events held", Duration::from_secs(5), || {
        gw.metrics_text().contains(&held(3))
    })
    .await;
    // So sam is taken, and answered (fourth in line: about 8 s).
    sam.send(json!({"type": "held"})).await;
    let answer = |c: Option<Event>| match c {
        Some(Event::Json(v)) => v["payload"].clone(),
        other => panic!("no answer: {other:?}"),
    };
    let within = Duration::from_secs(20);
    assert_eq!(answer(sam.next(within).await), "done");
    for _ in 0..2 {
        assert_eq!(answer(alex_1.next(within).await), "done");
    }
    assert_eq!(answer(alex_2.next(within).await), "done");
    // Answered, alex's events are given back: alex is taken again.
    alex_2.send(json!({"type": "say", "payload": 1})).await;
    assert_eq!(alex_2.recv().await["payload"], json!({"echo": 1}));
    assert_eq!(backend.on_topic("socket:generalMessage").len(), 5);
}

/// A backlog of closes waiting for a slow endpoint does not refuse the messages of the
/// sockets still open: only answerable events count against `concurrency + queue`.
#[tokio::test]
async fn a_backlog_of_closes_does_not_refuse_the_next_message() {
    // The closes are held until the message is sent.
    let gate = Gate::new();
    let holding = gate.clone();
    let backend = HttpBackend::start(move |r: &Request| {
        if r.topic() == "socket:close" {
            Answer::raw(200, "{}").held_by(&holding)
        } else {
            by_type(r)
        }
    })
    .await;
    // Room for 3 answerable events (1 in flight, 2 waiting).
    let gw = gateway(&backend, "      concurrency: 1\n      queue: 2\n").await;
    let mut leaving = Vec::new();
    for user in ["a", "b", "c", "d"] {
        let mut c = gw.connect(user, None).await;
        assert_eq!(c.recv().await["type"], "onconnect");
        leaving.push(c);
    }
    let mut sam = gw.connect("sam", None).await;
    assert_eq!(sam.recv().await["type"], "onconnect");
    for c in &mut leaving {
        c.close(1000).await;
    }
    let held = "switchboard_http_handler_held_events{endpoint=\"test-backend\"} 4";
    wait_until("4 closes held", Duration::from_secs(5), || {
        gw.metrics_text().contains(held)
    })
    .await;
    // More events than `concurrency + queue` are held, yet the message is taken: it waits
    // behind the closes and is answered.
    sam.send(json!({"type": "say", "payload": 7})).await;
    // Taken (not refused) while the four closes are held: five held.
    let five = "switchboard_http_handler_held_events{endpoint=\"test-backend\"} 5";
    wait_until(
        "the message held with the closes",
        Duration::from_secs(5),
        || gw.metrics_text().contains(five),
    )
    .await;
    gate.open();
    assert_eq!(sam.recv().await["payload"], json!({"echo": 7}));
    wait_until("every close sent", Duration::from_secs(10), || {
        backend.on_topic("socket:close").len() == 4
    })
    .await;
}

#[tokio::test]
async fn the_listed_headers_of_the_upgrade_request_are_passed_along_and_no_others() {
    let backend = HttpBackend::start(by_type).await;
    let gw = gateway(
        &backend,
        "      pass_headers: [x-request-id, accept-language]\n",
    )
    .await;
    let mut req = request(&token("alex"), None);
    for (name, value) in [
        ("x-request-id", "req-42"),
        ("accept-language", "fr"),
        ("x-secret-internal", "nope"),
        ("user-agent", "tester/1.0"),
    ] {
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    let mut alex = gw.connect_request(req).await.unwrap();
    assert_eq!(alex.recv().await["type"], "onconnect");
    alex.send(json!({"type": "say", "payload": 1})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": 1}));
    for r in backend.requests() {
        assert_eq!(r.headers["x-request-id"], "req-42");
        assert_eq!(r.headers["accept-language"], "fr");
        assert!(r.headers.get("x-secret-internal").is_none());
        assert!(r.headers.get("cookie").is_none(), "the token never leaves");
        // The gateway's own user agent, not the client's (which is in the context).
        assert!(r.headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("switchboard/"));
        assert_eq!(r.envelope["context"]["headers"]["user-agent"], "tester/1.0");
        assert_eq!(r.envelope["context"]["headers"]["x-request-id"], "req-42");
    }
}

#[tokio::test]
async fn onclose_is_retried_a_bounded_number_of_times_with_the_same_event_id() {
    let backend = HttpBackend::start(|r: &Request| {
        if r.topic() == "socket:close" {
            Answer::raw(503, "try later")
        } else {
            Answer::raw(200, "{}")
        }
    })
    .await;
    let gw = gateway(
        &backend,
        "      onclose_retries: 2\n      retry_backoff: 20ms\n",
    )
    .await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    gw.wait_for_sockets(1).await;
    alex.close(1000).await;
    // Given up after the third attempt: no fourth comes, the retries are bounded.
    let gave_up =
        "switchboard_http_handler_errors_total{endpoint=\"test-backend\",kind=\"gave_up\"} 1";
    wait_until("the onclose given up", Duration::from_secs(10), || {
        gw.metrics_text().contains(gave_up)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closes = backend.on_topic("socket:close");
    assert_eq!(closes.len(), 3, "one attempt and two retries");
    assert!(closes.iter().all(|r| r.signed));
    assert!(closes.iter().all(|r| r.event_id == closes[0].event_id));
    assert_eq!(closes[0].envelope["data"]["reason"]["code"], 1000);
    let metrics = gw.metrics_text();
    assert!(metrics.contains("switchboard_http_handler_retries_total{endpoint=\"test-backend\"} 2"));
    // Answered events are never retried: a 500 to a message is one request.
    let backend = HttpBackend::start(|r: &Request| match r.topic() {
        "socket:generalMessage" => Answer::raw(500, ""),
        _ => Answer::raw(200, ""),
    })
    .await;
    let gw = gateway(
        &backend,
        "      onclose_retries: 2\n      retry_backoff: 20ms\n",
    )
    .await;
    let mut sam = gw.connect("sam", None).await;
    gw.wait_for_sockets(1).await;
    sam.send(json!({"type": "say"})).await;
    assert_eq!(
        sam.recv().await["payload"]["message"],
        "internal error in a handler"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.on_topic("socket:generalMessage").len(), 1);
}

#[tokio::test]
async fn a_connect_fail_from_the_endpoint_closes_the_socket_as_a_handler_fail_does() {
    let backend = HttpBackend::start(|r: &Request| {
        if r.topic() == "socket:connection" {
            Answer::json(json!({"fail": {"message": "go away"}}))
        } else {
            Answer::raw(200, "")
        }
    })
    .await;
    let gw = gateway(&backend, "").await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "go away"}})
    );
    assert_eq!(alex.close_code().await, 1008);
    // Its onclose still goes to the endpoint, once.
    wait_until("the onclose event", Duration::from_secs(5), || {
        backend.on_topic("socket:close").len() == 1
    })
    .await;
}

#[tokio::test]
async fn shutdown_waits_for_the_onclose_events_of_every_socket() {
    let backend = HttpBackend::start(|r: &Request| {
        let _ = r;
        Answer::raw(200, "{}").after(Duration::from_millis(100))
    })
    .await;
    let gw = gateway(&backend, "").await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(gw.connect(user, None).await);
    }
    gw.wait_for_sockets(3).await;
    gw.shutdown(Duration::from_secs(5)).await;
    assert_eq!(backend.on_topic("socket:close").len(), 3);
}

#[tokio::test]
async fn an_https_endpoint_with_a_private_ca_is_reached_over_http2_when_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let backend = HttpBackend::start_tls(&ca, by_type).await;
    let gw = gateway(&backend, &format!("      ca_file: {:?}\n", ca)).await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["payload"], json!({"hello": "alex"}));
    alex.send(json!({"type": "say", "payload": 7})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": 7}));
    let requests = backend.requests();
    assert!(requests
        .iter()
        .all(|r| r.version == switchboard::http::Version::HTTP_2));
    assert!(requests.iter().all(|r| r.signed));
    assert_eq!(backend.connections(), 1, "one HTTP/2 connection");
    // Without the CA the endpoint is not trusted: the handler failed, nothing was sent.
    let other = tempfile::tempdir().unwrap();
    let backend = HttpBackend::start_tls(&other.path().join("ca.pem"), by_type).await;
    let gw = gateway(&backend, "").await;
    let mut sam = gw.connect("sam", None).await;
    assert_eq!(
        sam.recv().await["payload"],
        json!({"message": "internal error in a handler", "topic": "socket:connection"})
    );
    assert!(backend.requests().is_empty());
}

#[tokio::test]
async fn an_event_over_queue_bytes_is_refused_and_a_bound_topic_never_reaches_the_bus() {
    let backend = HttpBackend::start(by_type).await;
    let yaml = format!(
        r#"
gateway:
  socket:
    onmessage: {{publish: "socket:generalMessage"}}
  auth:
    secret_env: {secret}
  http_handlers:
    - url: "{url}"
      topics: ["socket:generalMessage"]
      secret_env: {HANDLER_SECRET_ENV}
      queue_bytes: 2KiB
"#,
        secret = switchboard_test_support::SECRET_ENV,
        url = backend.url(),
    );
    let mut c = container(Config::from_yaml_str(&yaml).unwrap());
    c.http_handler_secret(HANDLER_SECRET_ENV, HANDLER_SECRET);
    // A Rust handler on the bound topic is never called: the event goes to the endpoint only.
    let mut on_bus = switchboard_test_support::recorder(&mut c, &["socket:generalMessage"]);
    let gw = start(Kind::WebSocket, c).await;
    let mut alex = gw.connect("alex", None).await;
    gw.wait_for_sockets(1).await;
    alex.send(json!({"type": "say", "payload": "x".repeat(4000)}))
        .await;
    assert_eq!(
        alex.recv().await["payload"]["message"],
        "handler queue full"
    );
    alex.send(json!({"type": "say", "payload": "small"})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": "small"}));
    assert_eq!(backend.requests().len(), 1);
    assert!(
        on_bus.try_recv().is_err(),
        "nothing was published on the bus"
    );
}

/// Reads one HTTP/1.1 request (head and `content-length` body) from `stream` into `buf`,
/// keeping what follows it; its body, or `None` when the connection ends first.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let body = buf[end + 4..end + 4 + length].to_vec();
                buf.drain(..end + 4 + length);
                return Some(body);
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An `https://` endpoint (HTTP/1.1 only) that serves its first connection and leaves every
/// later one hanging in the TLS handshake (TCP accepted, the ClientHello never answered).
/// When a request starts a connection and an idle one frees up first, hyper's pool finishes
/// the new connection in a task of its own, for the pool; nothing bounded the TLS handshake
/// there, so every such race held a socket and a task for as long as the endpoint kept the
/// TCP connection open. The whole connect (TCP and TLS) is now bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_left_hanging_in_the_tls_handshake_are_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = switchboard_tls::TestCa::new();
    let ca_file = ca.write_pem(dir.path(), "ca.pem");
    let tls = switchboard_tls::ServerTls::load(ca.write_server_files(dir.path(), "leaf")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Connections left hanging, and those of them the gateway closed.
    let (hanging, let_go) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h, l) = (hanging.clone(), let_go.clone());
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut tcp, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // Kept alive; each request answered after 300 ms.
                    let mut buf = Vec::new();
                    while read_request(&mut stream, &mut buf).await.is_some() {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let body = r#"{"reply":"ok"}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            } else {
                h.fetch_add(1, SeqCst);
                let l = l.clone();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 4096];
                    while matches!(tcp.read(&mut chunk).await, Ok(n) if n > 0) {}
                    l.fetch_add(1, SeqCst);
                });
            }
        }
    });
    let url = format!("https://127.0.0.1:{}/events", addr.port());
    let extra = format!(
        "      concurrency: 2\n      per_user: 2\n      timeout: 3s\n      ca_file: {ca_file:?}\n"
    );
    let gw = gateway_at(&url, &extra).await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["payload"], "ok");
    // Two events at once: one takes the idle connection, the other starts a new one, which
    // hangs until the first is answered and frees its connection.
    for round in 0..3 {
        alex.send(json!({"type": "say", "payload": round})).await;
        alex.send(json!({"type": "say", "payload": round})).await;
        for _ in 0..2 {
            assert_eq!(alex.recv().await["payload"], "ok", "round {round}");
        }
    }
    assert!(hanging.load(SeqCst) >= 1, "no connection was left hanging");
    // Every connection left hanging is closed soon after the endpoint's timeout (they were
    // held until the endpoint gave up on them, here never).
    wait_until(
        "the hanging connections closed by the gateway",
        Duration::from_secs(10),
        || let_go.load(SeqCst) == hanging.load(SeqCst),
    )
    .await;
}

/// A TCP proxy to `backend` whose connections can be wedged: kept open, nothing forwarded
/// either way any more (a stuck middlebox, a peer gone without a reset).
struct Wedgeable {
    addr: std::net::SocketAddr,
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Wedgeable {
    async fn start(backend: std::net::SocketAddr) -> Wedgeable {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            wedged: Arc<AtomicBool>,
        ) {
            let mut chunk = [0u8; 16384];
            loop {
                let n = match from.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if wedged.load(SeqCst) {
                    // Hold both ends open, forward nothing, until the test ends.
                    let _ends = (from, to);
                    std::future::pending::<()>().await;
                    return;
                }
                if to.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Wedgeable {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
        };
        let connections = proxy.connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(backend).await else {
                    continue;
                };
                let wedged = Arc::new(AtomicBool::new(false));
                connections.lock().unwrap().push(wedged.clone());
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                tokio::spawn(pump(client_read, upstream_write, wedged.clone()));
                tokio::spawn(pump(upstream_read, client_write, wedged));
            }
        });
        proxy
    }

    /// Wedges every connection open now; later ones are forwarded.
    fn wedge(&self) {
        for c in self.connections.lock().unwrap().iter() {
            c.store(true, SeqCst);
        }
    }

    fn connections(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

/// An HTTP/2 endpoint whose one connection wedges: each request on it timed out, but the
/// pool kept handing out that connection (a stream that times out is reset, the connection
/// stays), so every event of every socket failed for as long as the connection stayed open,
/// although a new connection would have been answered. A connection that does not answer a
/// PING in time is now dropped, and the events after it get a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_http2_connection_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let backend = HttpBackend::start_tls(&ca, by_type).await;
    let backend_addr: std::net::SocketAddr = backend
        .url()
        .trim_start_matches("https://")
        .trim_end_matches("/events")
        .parse()
        .unwrap();
    let proxy = Wedgeable::start(backend_addr).await;
    let url = format!("https://127.0.0.1:{}/events", proxy.addr.port());
    let gw = gateway_at(
        &url,
        // Long enough for the first event's TCP, TLS and HTTP/2 set-up through the proxy,
        // however busy the machine.
        &format!("      timeout: 2s\n      ca_file: {ca:?}\n"),
    )
    .await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["payload"], json!({"hello": "alex"}));
    assert!(backend
        .requests()
        .iter()
        .all(|r| r.version == switchboard::http::Version::HTTP_2));
    assert_eq!(proxy.connections(), 1);
    proxy.wedge();
    // Events time out on the wedged connection until it is dropped (within about two
    // keep-alive intervals, 1 s each here); then one is answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event answered after the connection wedged ({n} sent, {} connections)",
            proxy.connections()
        );
        n += 1;
        alex.send(json!({"type": "say", "payload": n})).await;
        let answer = alex.recv().await;
        if answer["payload"] == json!({"echo": n}) {
            break;
        }
        // Timed out, or failed with the connection when it was dropped.
        let why = answer["payload"]["message"].as_str().unwrap_or_default();
        assert!(
            [
                "no handler answered within 2s",
                "internal error in a handler"
            ]
            .contains(&why),
            "{answer}"
        );
    }
    assert!(proxy.connections() >= 2, "answered on a new connection");
}

/// An HTTP/1.1 endpoint that answers one event after its socket stopped waiting, on the
/// kept-alive connection, and another with a second, unasked-for answer behind the first:
/// neither reaches the socket of the event sent next (the late answer's connection is closed
/// when its request is dropped; bytes before a request are an error, not the next answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_or_unasked_for_answer_never_reaches_the_next_events_socket() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = |reply: &str| {
        let body = json!({"reply": reply}).to_string();
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(body) = read_request(&mut tcp, &mut buf).await {
                    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let user = event["context"]["username"].as_str().unwrap_or("?");
                    let text = match event["data"]["type"].as_str() {
                        Some("slow") => {
                            tokio::time::sleep(Duration::from_millis(2500)).await;
                            answer("late, for alex")
                        }
                        Some("twice") => answer("for alex") + &answer("unasked, for alex"),
                        _ => answer(user),
                    };
                    if tcp.write_all(text.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let url = format!("http://{addr}/events");
    // One request at a time, one connection kept alive for all of them.
    let gw = gateway_at(&url, "      concurrency: 1\n      timeout: 1s\n").await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["payload"], "alex");
    let mut sam = gw.connect("sam", None).await;
    assert_eq!(sam.recv().await["payload"], "sam");
    alex.send(json!({"type": "slow"})).await;
    assert_eq!(
        alex.recv().await["payload"]["message"],
        "no handler answered within 1s"
    );
    // The late answer is written about now; sam's event must not read it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sam.send(json!({"type": "say"})).await;
    assert_eq!(sam.recv().await["payload"], "sam");
    alex.send(json!({"type": "twice"})).await;
    assert_eq!(alex.recv().await["payload"], "for alex");
    for _ in 0..3 {
        sam.send(json!({"type": "say"})).await;
        assert_eq!(sam.recv().await["payload"], "sam");
    }
    alex.assert_silent(300).await;
    sam.assert_silent(300).await;
}
