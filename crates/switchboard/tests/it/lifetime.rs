//! Sockets do not outlive their token: they close when `exp` passes, unless the client sends a
//! fresh token for the same user in-band.

use std::time::Duration;

use serde_json::json;
use switchboard::{Config, Message, TOKEN_EXPIRED_CODE};

use crate::harness::*;

fn token_for(user: &str, secs: u64, extra: serde_json::Value) -> String {
    let mut claims = json!({"preferred_username": user, "exp": now() + secs});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    token_with(claims, SECRET)
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires_and_onclose_is_published_once() {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    // Four seconds (three at least, `exp` being whole seconds): room for the upgrade to be
    // verified on a busy machine.
    let mut short = connect_with_token(&gw, &token_for("alex", 4, json!({}))).await;
    let _long = connect(&gw, "sam", None).await;
    assert_eq!(close_code_of(&mut short).await, TOKEN_EXPIRED_CODE);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["reason"]["kind"], "token_expired");
    assert_eq!(data["reason"]["code"], TOKEN_EXPIRED_CODE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(closes.try_recv().is_err(), "onclose once");
    assert_eq!(gw.sockets().count(), 1, "the other socket stays");
    assert_eq!(gw.stats().token_expiry_closes, 1);
    let metrics = gw.metrics_text();
    assert!(
        metrics.contains("switchboard_token_expiry_closes_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refreshed_socket_outlives_its_first_token_and_handlers_see_the_new_claims() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    c.add_handler("socket:generalMessage", |m: Message| async move {
        m.reply(m.context().headers["jwt"]["level"].clone());
    })
    .unwrap();
    let gw = start(c).await;
    // Four seconds (three at least): room for the exchanges and the refresh below, however
    // busy the machine.
    let mut ws = connect_with_token(&gw, &token_for("alex", 4, json!({"level": 1}))).await;
    // Each message of a socket shares its context: reading it twice, and a refresh after
    // that, must still show each message the claims of its time.
    for _ in 0..2 {
        send(&mut ws, json!({"type": "hello"})).await;
        assert_eq!(
            recv(&mut ws).await,
            json!({"type": "socket:generalMessage", "payload": 1})
        );
        next_published(&mut seen).await;
    }
    let fresh = token_for("alex", 600, json!({"level": 2}));
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": fresh}}),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(answer["type"], "$refreshed");
    assert!(answer["payload"]["exp"].as_u64().unwrap() >= now() + 590);
    // Past the first token's expiry, the socket is still open...
    tokio::time::sleep(Duration::from_millis(4500)).await;
    send(&mut ws, json!({"type": "hello"})).await;
    // ...and handlers see the new token's claims.
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": 2})
    );
    let (_, data, _) = next_published(&mut seen).await;
    assert_eq!(data["type"], "hello", "the refresh itself is not published");
    assert_eq!(gw.stats().refreshes, 1);
}

#[tokio::test]
async fn a_refresh_answers_its_tokens_exp_exactly() {
    let gw = start(container(spec_config(""))).await;
    let mut ws = connect_with_token(&gw, &token_for("alex", 600, json!({}))).await;
    // The largest `exp` a signed 64-bit clock has: through f64 it came back one more.
    let far = token_for("alex", 0, json!({"exp": i64::MAX}));
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": far}}),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(answer["type"], "$refreshed", "{answer}");
    assert_eq!(answer["payload"]["exp"], json!(i64::MAX), "{answer}");
}

#[tokio::test]
async fn an_invalid_refresh_changes_nothing_and_another_users_token_closes_the_socket() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:generalMessage", "socket:close"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    let forged = token_with(
        json!({"preferred_username": "alex", "exp": now() + 600}),
        "not-the-secret-0123456789",
    );
    for bad in [json!({"token": forged}), json!({}), json!("nope")] {
        send(&mut ws, json!({"type": "$refresh", "payload": bad})).await;
        let frame = recv(&mut ws).await;
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["payload"]["type"], "$refresh");
        assert!(
            frame["payload"]["message"]
                .as_str()
                .unwrap()
                .starts_with("refresh refused"),
            "{frame}"
        );
    }
    // Over the bound, the error says which bound.
    let long = "x".repeat(20 << 10);
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": long}}),
    )
    .await;
    let frame = recv(&mut ws).await;
    assert!(
        frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than 16384 bytes"),
        "{frame}"
    );
    send(&mut ws, json!({"type": "still-here"})).await;
    assert_eq!(next_published(&mut seen).await.1["type"], "still-here");
    // A valid token, for someone else (a second verification: after the one-per-second limit).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let sams = token_for("sam", 600, json!({}));
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": sams}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "error");
    assert_eq!(close_code_of(&mut ws).await, 1008);
    let (topic, data, _) = next_published(&mut seen).await;
    assert_eq!(
        (topic.as_str(), &data["username"]),
        ("socket:close", &json!("alex"))
    );
    let stats = gw.stats();
    assert_eq!((stats.refreshes_refused, stats.refresh_mismatches), (4, 1));
    // Every refusal's error frame is counted with the others.
    let metrics = gw.metrics_text();
    assert!(
        metrics.contains("\nswitchboard_error_frames_total{kind=\"refresh\"} 5\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refresh_whose_token_leaves_out_the_sockets_namespace_says_so_then_closes() {
    let _ = spec_config("");
    let yaml = format!(
        "gateway:\n  socket: {{}}\n  auth:\n    secret_env: {SECRET_ENV}\n    namespace_claim: tenants\n"
    );
    let gw = start(container(Config::from_yaml_str(&yaml).unwrap())).await;
    let tenants = |list: serde_json::Value| token_for("alex", 600, json!({"tenants": list}));
    let first = tenants(json!(["acme"]));
    let mut ws = switchboard_test_support::websocket::connect_request(
        gw.local_addr().unwrap(),
        switchboard_test_support::request(&first, Some("acme")),
    )
    .await
    .unwrap();
    // The same user, but a token for another tenant only.
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": tenants(json!(["globex"]))}}),
    )
    .await;
    let frame = recv(&mut ws).await;
    assert_eq!(
        (frame["type"].as_str(), frame["payload"]["type"].as_str()),
        (Some("error"), Some("$refresh")),
        "{frame}"
    );
    assert!(
        frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("does not allow this namespace"),
        "{frame}"
    );
    assert_eq!(close_code_of(&mut ws).await, 1008);
    assert_eq!(gw.stats().refresh_mismatches, 1);
}

#[tokio::test]
async fn with_close_on_expiry_off_sockets_outlive_their_token() {
    let _ = spec_config("");
    let yaml = format!(
        "gateway:\n  socket:\n    onmessage: {{publish: m}}\n  auth:\n    secret_env: {SECRET_ENV}\n    close_on_expiry: false\n"
    );
    let mut c = container(Config::from_yaml_str(&yaml).unwrap());
    let mut seen = recorder(&mut c, &["m"]);
    let gw = start(c).await;
    // Four seconds: a token of one could expire (at its `exp`) before the upgrade is verified
    // on a busy machine.
    let mut ws = connect_with_token(&gw, &token_for("alex", 4, json!({}))).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    send(&mut ws, json!({"type": "late"})).await;
    assert_eq!(next_published(&mut seen).await.1["type"], "late");
}

#[tokio::test]
async fn refreshes_are_verified_at_most_once_per_second_per_socket() {
    let gw = start(container(spec_config(""))).await;
    let mut ws = connect(&gw, "alex", None).await;
    let fresh = token_for("alex", 600, json!({}));
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": fresh}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "$refreshed");
    send(
        &mut ws,
        json!({"type": "$refresh", "payload": {"token": fresh}}),
    )
    .await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert!(
        frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("too frequent"),
        "{frame}"
    );
    assert_eq!((gw.stats().refreshes, gw.stats().refreshes_refused), (1, 1));
}

/// A socket's messages share one context, but the socket must not keep the maps a handler
/// made by reading its headers or params (they can be many times the text's size) while it
/// sits idle: after the connect event and after a message whose handlers read the context,
/// the context they read is gone once they are done.
#[tokio::test]
async fn an_idle_socket_does_not_keep_a_context_its_handlers_read() {
    use std::sync::{mpsc, Arc, Weak};
    use switchboard::Context;
    let mut c = container(spec_config(""));
    let (tx, read) = mpsc::channel::<Weak<Context>>();
    for topic in ["socket:connection", "socket:generalMessage"] {
        let tx = tx.clone();
        c.add_handler(topic, move |m: Message| {
            let tx = tx.clone();
            async move {
                assert_eq!(m.context().headers["jwt"]["preferred_username"], "alex");
                assert!(m.context().params.is_parsed() || m.context().params.is_empty());
                tx.send(Arc::downgrade(m.shared_context())).unwrap();
                m.reply(1);
            }
        })
        .unwrap();
    }
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    assert_eq!(recv(&mut ws).await["type"], "onconnect");
    let at_connect = read.recv_timeout(Duration::from_secs(5)).unwrap();
    send(&mut ws, json!({"type": "hello"})).await;
    assert_eq!(recv(&mut ws).await["type"], "socket:generalMessage");
    let at_message = read.recv_timeout(Duration::from_secs(5)).unwrap();
    // The socket now sits idle: nothing holds either context any more.
    switchboard_test_support::wait_until("contexts freed", Duration::from_secs(5), || {
        at_connect.upgrade().is_none() && at_message.upgrade().is_none()
    })
    .await;
    // And the next message still sees the claims.
    send(&mut ws, json!({"type": "hello"})).await;
    assert_eq!(recv(&mut ws).await["payload"], 1);
}
