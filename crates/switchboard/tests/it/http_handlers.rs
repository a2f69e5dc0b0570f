//! `gateway.http_handlers`: events POSTed, signed, to a real HTTP server on loopback, through
//! real WebSocket clients of a running container; the answers and every failure reach the
//! socket as the bus paths' do.

use std::time::Duration;

use serde_json::json;
use switchboard::Config;
use switchboard_test_support::http_backend::{
    Answer, HttpBackend, Request, HANDLER_SECRET, HANDLER_SECRET_ENV,
};
use switchboard_test_support::{
    container, request, start, token, wait_until, Event, Gateway, Kind,
};

/// A gateway whose `onconnect`, `onmessage` and `onclose` topics are bound to `backend`, with
/// `extra` lines (indented by six spaces) in the binding.
async fn gateway(backend: &HttpBackend, extra: &str) -> Gateway {
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
        url = backend.url(),
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
        Some("sleepy") => Answer::json(json!({"reply": "zzz"})).after(Duration::from_millis(600)),
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
    let gw = gateway(&backend, "      timeout: 300ms\n      max_response: 1KiB\n").await;
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
        json!({"type": "error", "payload": {"message": "no handler answered within 300ms", "topic": "socket:generalMessage"}})
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
            Answer::json(json!({"reply": "late"})).after(Duration::from_secs(2))
        } else {
            by_type(r)
        }
    })
    .await;
    let gw = gateway(&backend, "      timeout: 300ms\n").await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "no handler answered within 300ms", "topic": "socket:connection"}})
    );
    alex.send(json!({"type": "say", "payload": 1})).await;
    assert_eq!(alex.recv().await["payload"], json!({"echo": 1}));
    assert_eq!(gw.stats().connect_failures, 0);
}

#[tokio::test]
async fn a_full_queue_answers_at_once_and_one_socket_cannot_fill_it_for_others() {
    let backend = HttpBackend::start(by_type).await;
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
    let backend = HttpBackend::start(|r: &Request| {
        if r.topic() == "socket:close" {
            Answer::raw(200, "{}").after(Duration::from_millis(400))
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
    wait_until("three onclose attempts", Duration::from_secs(5), || {
        backend.on_topic("socket:close").len() >= 3
    })
    .await;
    // No fourth: the retries are bounded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closes = backend.on_topic("socket:close");
    assert_eq!(closes.len(), 3, "one attempt and two retries");
    assert!(closes.iter().all(|r| r.signed));
    assert!(closes.iter().all(|r| r.event_id == closes[0].event_id));
    assert_eq!(closes[0].envelope["data"]["reason"]["code"], 1000);
    let metrics = gw.metrics_text();
    assert!(metrics.contains("switchboard_http_handler_retries_total{endpoint=\"test-backend\"} 2"));
    assert!(metrics.contains(
        "switchboard_http_handler_errors_total{endpoint=\"test-backend\",kind=\"gave_up\"} 1"
    ));
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
