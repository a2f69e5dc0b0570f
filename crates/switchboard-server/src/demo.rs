//! The demo chat: handlers written against the public `switchboard` API exactly as a user
//! would write them, a page at `/` (using the client helper at `/switchboard-client.js`), and
//! `/demo/login` to get a token.
//!
//! - connect: needs `?namespace=`; replies `{username, namespace, online, users}` and tells
//!   the namespace who is online (`chat.presence`), on every node (`Container::presence`);
//! - `chat.say {text}` → `chat.said {from, text}` to the sender's namespace (broadcast topic);
//! - `chat.whisper {to, text}` → `chat.whispered {from, text}` to user `to` in the sender's
//!   namespace (send topic), with a copy to the sender; without `to` or `text`: `fail`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use switchboard::http::{header, HeaderValue, Response, StatusCode};
use switchboard::{
    plain_response, Bytes, Config, Container, HttpResponse, Message, Presence, Producer,
    RequestParts, Sockets,
};

/// The repo's `conf/socket.yaml`, for `serve --demo` outside the repo.
pub(crate) const BUNDLED_CONFIG: &str = include_str!("../../../conf/socket.yaml");
const PAGE: &str = include_str!("../assets/index.html");
/// The client helper the page imports; usable on its own (`assets/switchboard-client.js`).
const CLIENT_JS: &str = include_str!("../assets/switchboard-client.js");
/// Used only by `serve --demo` when the secret variable is unset.
const DEMO_SECRET: &str = "switchboard-demo-secret-not-for-production";
/// Used only by `serve --demo` when an HTTP handler's secret variable is unset (the Python
/// backend, `examples/http-handlers/backend.py --demo`, falls back to the same).
const DEMO_HANDLER_SECRET: &str = "switchboard-demo-handler-secret-not-for-production";
/// Used only by `serve --demo` when the server API's key variable is unset (likewise).
const DEMO_API_KEY: &str = "switchboard-demo-api-key-not-for-production";
const MAX_TEXT: usize = 2000;

/// Sets the config's secret variables (the JWT secret; with handlers over HTTP, their signing
/// secrets and the server API's key) to the demo's when they are unset. Call before any
/// thread starts.
pub(crate) fn use_demo_secret_if_unset(config: &Config) {
    let mut vars = vec![(config.gateway.auth.secret_env.as_str(), DEMO_SECRET)];
    for h in config.gateway.http_handlers.iter() {
        vars.push((h.secret_env.as_str(), DEMO_HANDLER_SECRET));
    }
    if let Some(api) = &config.gateway.api {
        vars.push((api.key_env.as_str(), DEMO_API_KEY));
    }
    for (var, value) in vars {
        if std::env::var(var).map_or(true, |v| v.is_empty()) {
            say_err!(
                "switchboard: demo mode: {var} is unset, using the demo's (never in production)"
            );
            std::env::set_var(var, value);
        }
    }
}

/// Topics the demo needs from the config.
struct Topics {
    connect: String,
    close: Option<String>,
    say: String,
    whisper: String,
    send: String,
    broadcast: String,
}

impl Topics {
    fn from_config(config: &Config) -> Result<Self, String> {
        let s = &config.gateway.socket;
        let typed = |t: &str| {
            s.onmessage
                .iter()
                .flat_map(|m| m.types.iter())
                .find(|r| r.message_type == t)
                .map(|r| r.publish.to_string())
                .ok_or_else(|| format!("the demo needs an onmessage.types entry for `{t}`"))
        };
        Ok(Topics {
            connect: s
                .onconnect
                .as_ref()
                .map(|h| h.publish.to_string())
                .ok_or("the demo needs onconnect.publish")?,
            close: s.onclose.as_ref().map(|h| h.publish.to_string()),
            say: typed("chat.say")?,
            whisper: typed("chat.whisper")?,
            send: s
                .send
                .as_ref()
                .map(|h| h.subscribe.to_string())
                .ok_or("the demo needs send.subscribe")?,
            broadcast: s
                .broadcast
                .as_ref()
                .map(|h| h.subscribe.to_string())
                .ok_or("the demo needs broadcast.subscribe")?,
        })
    }
}

/// Adds the demo's handlers and routes to `container`.
pub(crate) fn install(container: &mut Container) -> Result<(), Box<dyn std::error::Error>> {
    let topics = Topics::from_config(container.config())?;
    // Topics the config binds to an HTTP endpoint (the Python backend of
    // examples/http-handlers) are handled there: no Rust handler for them.
    let bindings = container.config().gateway.http_handlers.clone();
    let here = |topic: &str| bindings.for_topic(topic).is_none();
    let secret = std::env::var(&container.config().gateway.auth.secret_env)?;
    let auth = &container.config().gateway.auth;
    if !auth.algorithm.is_hmac() || auth.jwks.is_some() {
        return Err("the demo signs its own tokens and needs an HS* auth.algorithm".into());
    }
    let cookie = container.config().gateway.auth.cookie.clone();
    let claim = container.config().gateway.auth.username_claim.clone();
    let producer = container.producer();
    // Who is online on every node, not only this one (the demo runs on NATS too).
    let presence = container.presence();
    let sockets = container.sockets();

    let (p, online, s, broadcast) = (
        producer.clone(),
        presence.clone(),
        sockets.clone(),
        topics.broadcast.clone(),
    );
    if here(&topics.connect) {
        container.add_handler(&topics.connect, move |msg: Message| {
            let (p, online, s, broadcast) =
                (p.clone(), online.clone(), s.clone(), broadcast.clone());
            async move { on_connect(msg, &p, &online, &s, &broadcast).await }
        })?;
    }
    if let Some(close) = topics.close.as_ref().filter(|t| here(t)) {
        let (p, online, s, broadcast) = (
            producer.clone(),
            presence.clone(),
            sockets.clone(),
            topics.broadcast.clone(),
        );
        container.add_handler(close, move |msg: Message| {
            let (p, online, s, broadcast) =
                (p.clone(), online.clone(), s.clone(), broadcast.clone());
            async move {
                if let Some(ns) = &msg.context().namespace {
                    let (count, users) = who_is_online(&online, &s, ns).await;
                    let _ = p.send(&broadcast, presence_frame(ns, count, &users));
                }
            }
        })?;
    }
    let (p, broadcast) = (producer.clone(), topics.broadcast.clone());
    if here(&topics.say) {
        container.add_handler(&topics.say, move |msg: Message| {
            on_say(msg, &p, &broadcast);
            async {}
        })?;
    }
    let (p, send) = (producer, topics.send.clone());
    if here(&topics.whisper) {
        container.add_handler(&topics.whisper, move |msg: Message| {
            on_whisper(msg, &p, &send);
            async {}
        })?;
    }

    container.route("/", |_req: &RequestParts| {
        let mut res = Response::new(Bytes::from(PAGE));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        res
    });
    container.route("/switchboard-client.js", |_req: &RequestParts| {
        let mut res = Response::new(Bytes::from(CLIENT_JS));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        res
    });
    let (login_secret, login_cookie, login_claim) = (secret.clone(), cookie.clone(), claim.clone());
    container.route("/demo/login", move |req: &RequestParts| {
        login(req, &login_secret, &login_cookie, &login_claim)
    });
    container.route("/demo/token", move |req: &RequestParts| {
        fresh_token(req, &secret, &cookie, &claim)
    });
    Ok(())
}

/// Sockets and users online in `namespace` on every node; this node's own view if the bus
/// cannot ask the others.
async fn who_is_online(
    presence: &Presence,
    sockets: &Sockets,
    namespace: &str,
) -> (usize, Vec<String>) {
    match presence.namespace(namespace).await {
        Ok(p) => (p.sockets, p.users.into_keys().collect()),
        Err(_) => (
            sockets.count_in_namespace(namespace),
            sockets.users_in_namespace(namespace),
        ),
    }
}

fn presence_frame(namespace: &str, online: usize, users: &[String]) -> Value {
    json!({
        "namespace": namespace,
        "type": "chat.presence",
        "payload": {"online": online, "users": users},
    })
}

async fn on_connect(
    msg: Message,
    producer: &Producer,
    presence: &Presence,
    sockets: &Sockets,
    broadcast: &str,
) {
    let ctx = msg.context();
    let Some(namespace) = &ctx.namespace else {
        msg.fail(json!({"message": "pick a namespace: connect with ?namespace=NAME"}));
        return;
    };
    let (online, users) = who_is_online(presence, sockets, namespace).await;
    msg.reply(json!({
        "username": ctx.username,
        "namespace": namespace,
        "online": online,
        "users": users,
    }));
    let _ = producer.send(broadcast, presence_frame(namespace, online, &users));
}

/// The sender's name and namespace, and the payload's `text`, if all are there.
fn speaker(msg: &Message) -> Option<(&str, &str, &str)> {
    let ctx = msg.context();
    let text = msg.data()["payload"]["text"].as_str()?;
    if text.trim().is_empty() || text.len() > MAX_TEXT {
        return None;
    }
    Some((ctx.username.as_deref()?, ctx.namespace.as_deref()?, text))
}

fn on_say(msg: Message, producer: &Producer, broadcast: &str) {
    let Some((from, namespace, text)) = speaker(&msg) else {
        msg.fail(
            json!({"message": format!("chat.say needs payload.text (1 to {MAX_TEXT} bytes)")}),
        );
        return;
    };
    let _ = producer.send(
        broadcast,
        json!({"namespace": namespace, "type": "chat.said", "payload": {"from": from, "text": text}}),
    );
}

fn on_whisper(msg: Message, producer: &Producer, send: &str) {
    let to = msg.data()["payload"]["to"]
        .as_str()
        .filter(|t| !t.is_empty());
    let (Some(to), Some((from, namespace, text))) = (to, speaker(&msg)) else {
        msg.fail(json!({"message": "chat.whisper needs payload.to and payload.text"}));
        return;
    };
    let payload = json!({"from": from, "text": text, "to": to});
    let mut recipients = vec![to];
    if from != to {
        recipients.push(from);
    }
    for user in recipients {
        let _ = producer.send(
            send,
            json!({"username": user, "namespace": namespace, "type": "chat.whispered", "payload": payload}),
        );
    }
}

/// A one-hour demo token for `username`.
fn mint(secret: &str, claim: &str, username: &str) -> Option<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = serde_json::Map::new();
    claims.insert(claim.to_string(), json!(username));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + 3600));
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .ok()
}

/// `GET /demo/token`: `{"token": ...}`, a fresh token for whoever holds a valid demo token
/// cookie; the page hands it to the client helper, which refreshes its socket in-band. (A real
/// application gets fresh tokens from its identity provider; the demo signs its own.)
fn fresh_token(req: &RequestParts, secret: &str, cookie: &str, claim: &str) -> HttpResponse {
    let current = cookie_value(req, cookie).and_then(|token| {
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .ok()
    });
    let Some(username) = current
        .as_ref()
        .and_then(|data| data.claims.get(claim))
        .and_then(|v| v.as_str())
    else {
        return plain_response(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    let Some(token) = mint(secret, claim, username) else {
        return plain_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign\n");
    };
    let mut res = Response::new(Bytes::from(json!({ "token": token }).to_string()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The value of cookie `name` in the request.
fn cookie_value<'r>(req: &'r RequestParts, name: &str) -> Option<&'r str> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// `GET /demo/login?username=NAME`: a one-hour demo token in the auth cookie.
fn login(req: &RequestParts, secret: &str, cookie: &str, claim: &str) -> HttpResponse {
    let username = req
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("username=")))
        .unwrap_or("");
    let valid = (1..=32).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid {
        return plain_response(
            StatusCode::BAD_REQUEST,
            "username: 1 to 32 letters, digits, '_', '.' or '-'\n",
        );
    }
    let Some(token) = mint(secret, claim, username) else {
        return plain_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign\n");
    };
    let mut res = Response::new(Bytes::from(json!({"username": username}).to_string()));
    let set_cookie = format!("{cookie}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600");
    if let Ok(v) = HeaderValue::from_str(&set_cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
