//! The server API: `send`, `broadcast`, `disconnect` and presence over HTTP, for backends that
//! do not join the bus, on a listener of its own (`gateway.api`), behind an API key.
//! docs/API.md and docs/openapi.json describe it; a test checks them against [`API_ROUTES`].

// The `Err` of these functions is the HTTP answer itself, moved once to the caller.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, TRANSFER_ENCODING,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use switchboard_bus::{Bus, Message};
use switchboard_core::{HttpResponse, SocketRef};
use switchboard_registry::{Registry, Target};

use crate::delivery::server_may_send;
use crate::listener::Respond;
use crate::presence::Presence;

/// Every route the API serves: (method, path).
pub const API_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/send"),
    ("POST", "/api/broadcast"),
    ("POST", "/api/disconnect"),
    ("GET", "/api/presence"),
    ("GET", "/api/connections"),
];

/// The shortest API key accepted.
pub(crate) const MIN_KEY_LEN: usize = 16;

/// How long a request's body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why `key` cannot be an API key (a header carries it: visible ASCII, at least
/// [`MIN_KEY_LEN`] bytes), if it cannot.
pub(crate) fn key_problem(key: &[u8]) -> Option<String> {
    if key.len() < MIN_KEY_LEN {
        return Some(format!("the API key must be at least {MIN_KEY_LEN} bytes"));
    }
    if !key.iter().all(u8::is_ascii_graphic) {
        return Some("the API key must be visible ASCII, without spaces or line ends".into());
    }
    None
}

/// What the API needs of the gateway.
pub(crate) struct ApiState {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) registry: Arc<Registry<SocketRef>>,
    pub(crate) presence: Presence,
    pub(crate) send: Option<Arc<str>>,
    pub(crate) broadcast: Option<Arc<str>>,
    pub(crate) disconnect: Option<Arc<str>>,
    pub(crate) key: Vec<u8>,
    pub(crate) max_body: usize,
}

/// The listener's answer to every request.
pub(crate) fn respond(state: ApiState) -> Respond {
    let state = Arc::new(state);
    Arc::new(move |req| {
        let state = state.clone();
        Box::pin(async move { answer(&state, req).await.unwrap_or_else(|e| e) })
    })
}

type Answer = Result<HttpResponse, HttpResponse>;

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    let mut res = Response::new(Bytes::from(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": message }))
}

/// A `400` naming the field that is wrong.
fn bad_field(field: &str, message: &str) -> HttpResponse {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "error": message, "field": field }),
    )
}

/// `Authorization: Bearer <key>`, in exactly one header, the key compared in constant time
/// (its length is not secret).
fn authorized(key: &[u8], req: &Request<Incoming>) -> bool {
    let Ok(Some(value)) = crate::auth::single_authorization(req.headers()) else {
        return false;
    };
    let Some(given) = crate::auth::bearer_token(value.to_str().ok()).map(str::as_bytes) else {
        return false;
    };
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

async fn answer(state: &ApiState, req: Request<Incoming>) -> Answer {
    if !authorized(&state.key, &req) {
        let mut res = error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
        res.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Ok(res);
    }
    let path = req.uri().path().to_string();
    let Some(&(method, _)) = API_ROUTES.iter().find(|(_, p)| *p == path) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "no such route: see docs/API.md",
        ));
    };
    if req.method().as_str() != method {
        let mut res = error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {method}"));
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(method));
        return Ok(res);
    }
    if req.method() == Method::GET {
        let query = query(req.uri().query().unwrap_or_default())?;
        return match path.as_str() {
            "/api/presence" => presence(state, &query).await,
            _ => connections(state, &query).await,
        };
    }
    let body = read_json(req, state.max_body).await?;
    match path.as_str() {
        "/api/send" => send(state, &body),
        "/api/broadcast" => broadcast(state, &body),
        _ => disconnect(state, &body),
    }
}

/// The query's parameters, each name once: a name given twice (`?namespace=a&namespace=b`)
/// or a name or value that is not UTF-8 once percent-decoded (`%ff`) is a `400` naming it,
/// never a guess (the last one, or U+FFFD in place of the bytes), as at the upgrade.
fn query(query: &str) -> Result<BTreeMap<String, String>, HttpResponse> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Ok(name) = form_decode(name) else {
            // Named as it was sent (percent-encoded: ASCII).
            return Err(bad_field(
                name,
                &format!("the query parameter name `{name}` is not UTF-8 once percent-decoded"),
            ));
        };
        let Ok(value) = form_decode(value) else {
            return Err(bad_field(
                &name,
                &format!("`?{name}=` is not UTF-8 once percent-decoded"),
            ));
        };
        if params.contains_key(&name) {
            return Err(bad_field(
                &name,
                &format!("`?{name}=` given more than once"),
            ));
        }
        params.insert(name, value);
    }
    Ok(params)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte; a `%` not
/// followed by two hex digits stands for itself), strict: bytes that are not UTF-8 are an
/// error.
pub(crate) fn form_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = match bytes[i] {
            b'+' => b' ',
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(high), Some(low)) => {
                    i += 2;
                    high * 16 + low
                }
                _ => b'%',
            },
            b => b,
        };
        out.push(byte);
        i += 1;
    }
    String::from_utf8(out)
}

/// The body as a JSON object, at most `max` bytes (`413` beyond, unread).
async fn read_json(req: Request<Incoming>, max: usize) -> Result<Map<String, Value>, HttpResponse> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body over {max} bytes"),
        )
    };
    // The body is read as it comes: a coding it would have to undo (`Content-Encoding:
    // gzip`, `Transfer-Encoding: gzip, chunked`) is refused, never read as if it were plain.
    // (hyper itself answers `400` to a `Transfer-Encoding` that does not end in `chunked`.)
    let headers = req.headers();
    let codings = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|coding| !coding.is_empty())
    };
    if codings(CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"identity")) {
        let mut res = error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must not be content-encoded",
        );
        // What it takes (RFC 9110 15.5.16).
        res.headers_mut()
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        return Err(res);
    }
    if codings(TRANSFER_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"chunked")) {
        return Err(error(
            StatusCode::NOT_IMPLEMENTED,
            "no transfer coding but chunked is taken",
        ));
    }
    // hyper undoes one `chunked`: a body chunked twice would be read with the inner framing
    // left in it (RFC 9112 6.1: never applied more than once).
    if codings(TRANSFER_ENCODING).count() > 1 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "chunked is given more than once",
        ));
    }
    let body = req.into_body();
    if body.size_hint().lower() > max as u64 {
        return Err(too_large());
    }
    // A body sent slowly does not hold the connection for ever.
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect())
        .await
        .map_err(|_| error(StatusCode::REQUEST_TIMEOUT, "the body took too long"))?;
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, &format!("bad body: {e}"))),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Fields {
            map,
            repeated: None,
        }) => Ok(map),
        // As for a query parameter: the first value or the last would be a guess.
        Ok(Fields {
            repeated: Some(field),
            ..
        }) => Err(bad_field(
            &field,
            &format!("`{field}` given more than once"),
        )),
        // Only the top level can have the wrong type: below it, any JSON is a `Value`.
        Err(e) if e.is_data() => Err(error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not JSON: {e}"),
        )),
    }
}

/// A JSON object's fields, and the first name it gives twice (`serde_json::Map` would keep
/// the last value silently).
struct Fields {
    map: Map<String, Value>,
    repeated: Option<String>,
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Fields, A::Error> {
                let mut fields = Fields {
                    map: Map::new(),
                    repeated: None,
                };
                while let Some((name, value)) = a.next_entry::<String, Value>()? {
                    if fields.repeated.is_none() && fields.map.contains_key(&name) {
                        fields.repeated = Some(name);
                    } else {
                        fields.map.insert(name, value);
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Object)
    }
}

/// A string field: `Ok(None)` when absent (or null) and not `required`.
fn string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
    required: bool,
) -> Result<Option<&'a str>, HttpResponse> {
    match body.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        Some(Value::String(s)) if required && s.is_empty() => {
            Err(bad_field(field, &format!("`{field}` must not be empty")))
        }
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Err(bad_field(field, &format!("`{field}` is required"))),
        Some(_) => Err(bad_field(field, &format!("`{field}` must be a string"))),
    }
}

/// The topic a route publishes to, if the config has it.
fn topic<'a>(topic: &'a Option<Arc<str>>, key: &str) -> Result<&'a str, HttpResponse> {
    topic.as_deref().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            &format!("the config has no `gateway.socket.{key}` topic"),
        )
    })
}

/// Publishes `data` on `topic`; the answer says how many of this node's sockets `target`
/// matched, and whether every node got it (a shared bus).
fn publish(state: &ApiState, topic: &str, data: Value, target: Target<'_>) -> Answer {
    let here = crate::presence::live(&state.registry, target);
    if let Err(e) = state.bus.publish(Message::new(topic, data)) {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "sockets_on_this_node": here,
            "published_to_every_node": state.bus.node_name().is_some(),
        }),
    ))
}

/// `{username, namespace?}` as a target, and those fields for the topic's data.
fn user_target<'a>(
    body: &'a Map<String, Value>,
) -> Result<(Target<'a>, Map<String, Value>), HttpResponse> {
    let username = string(body, "username", true)?.unwrap_or_default();
    let namespace = string(body, "namespace", false)?;
    let mut data = Map::new();
    data.insert("username".into(), json!(username));
    if let Some(ns) = namespace {
        data.insert("namespace".into(), json!(ns));
    }
    let target = match namespace {
        Some(ns) => Target::UserInNamespace(username, ns),
        None => Target::User(username),
    };
    Ok((target, data))
}

/// `type` and `payload`, into `data`.
fn frame_fields(
    body: &Map<String, Value>,
    data: &mut Map<String, Value>,
) -> Result<(), HttpResponse> {
    let kind = string(body, "type", true)?.unwrap_or_default();
    data.insert("type".into(), json!(kind));
    data.insert(
        "payload".into(),
        body.get("payload").cloned().unwrap_or(Value::Null),
    );
    Ok(())
}

/// Refuses a field the route does not know: a misspelt `namespace` (`Namespace`,
/// `namespce`) would otherwise be ignored, and the send or disconnect reach the user in every
/// namespace.
fn only_fields(body: &Map<String, Value>, known: &[&str]) -> Result<(), HttpResponse> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(unknown) => Err(bad_field(
            unknown,
            &format!(
                "unknown field `{unknown}`; this route takes {}",
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn send(state: &ApiState, body: &Map<String, Value>) -> Answer {
    only_fields(body, &["username", "namespace", "type", "payload"])?;
    let topic = topic(&state.send, "send")?;
    let (target, mut data) = user_target(body)?;
    frame_fields(body, &mut data)?;
    publish(state, topic, Value::Object(data), target)
}

fn broadcast(state: &ApiState, body: &Map<String, Value>) -> Answer {
    only_fields(body, &["namespace", "type", "payload"])?;
    let topic = topic(&state.broadcast, "broadcast")?;
    let namespace = string(body, "namespace", false)?;
    let mut data = Map::new();
    if let Some(ns) = namespace {
        data.insert("namespace".into(), json!(ns));
    }
    frame_fields(body, &mut data)?;
    let target = namespace.map_or(Target::All, Target::Namespace);
    publish(state, topic, Value::Object(data), target)
}

fn disconnect(state: &ApiState, body: &Map<String, Value>) -> Answer {
    only_fields(body, &["username", "namespace", "code", "reason"])?;
    let topic = topic(&state.disconnect, "disconnect")?;
    let (target, mut data) = user_target(body)?;
    match body.get("code") {
        None | Some(Value::Null) => {}
        Some(code) => match code.as_u64().and_then(|c| u16::try_from(c).ok()) {
            Some(code) if server_may_send(code) => {
                data.insert("code".into(), json!(code));
            }
            _ => {
                return Err(bad_field(
                    "code",
                    "`code` must be 1000, 1001, 1008, 1011 or 3000-4999",
                ))
            }
        },
    }
    if let Some(reason) = string(body, "reason", false)? {
        if reason.len() > 123 {
            return Err(bad_field("reason", "`reason` must be at most 123 bytes"));
        }
        data.insert("reason".into(), json!(reason));
    }
    publish(state, topic, Value::Object(data), target)
}

fn required_param<'a>(
    query: &'a BTreeMap<String, String>,
    name: &str,
) -> Result<&'a str, HttpResponse> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad_field(name, &format!("`?{name}=` is required")))
}

async fn presence(state: &ApiState, query: &BTreeMap<String, String>) -> Answer {
    let namespace = required_param(query, "namespace")?;
    let p = state
        .presence
        .namespace(namespace)
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "namespace": namespace,
            "users": p.users,
            "sockets": p.sockets,
            "nodes": p.nodes,
            "truncated": p.truncated,
        }),
    ))
}

async fn connections(state: &ApiState, query: &BTreeMap<String, String>) -> Answer {
    let username = required_param(query, "username")?;
    let c = state
        .presence
        .connections(username)
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))?;
    let list: Vec<Value> = c
        .connections
        .iter()
        .map(|c| json!({"node": c.node, "namespace": c.namespace, "since_ms": c.since_ms}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"username": username, "connections": list, "nodes": c.nodes}),
    ))
}
