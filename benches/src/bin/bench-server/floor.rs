//! `bench-server --floor`: the benchmark's physical floor, the same wire protocol as the gateway
//! for echo, broadcast and handshakes on `switchboard_transport` alone, so that the report
//! shows what the gateway's layers (JSON, the bus, the registry, the facade) cost on top of the
//! transport and the kernel.
//!
//! - handshakes: the same HS256 verification as the gateway (`jsonwebtoken`, `exp` required,
//!   `nbf` checked, a non-empty username claim) from the `ID_TOKEN` cookie or a bearer header,
//!   `401` otherwise; nothing is kept of the claims;
//! - `{"type":"echo",REST` → `{"type":"bench:echo",REST`: the reply is the client's frame with
//!   its type rewritten, one copy and no JSON parse (the client reads the type and the stamp);
//! - `{"type":"broadcast",REST` → `{"type":"bench.broadcast",REST` built once as one `Bytes`
//!   and sent to every open socket of a plain list, in a loop on the receiving task;
//! - `{"type":"send","to":"NAME",REST` → `{"type":"bench.send",REST` to every socket of user
//!   NAME (the username claim of its token), found in a map kept as sockets open and close:
//!   the gateway's `send` without the bus, the JSON or the registry's namespaces (the name is
//!   read up to the next `"`: the client's names have no escapes);
//! - anything else gets an error frame.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use switchboard_bench::{SECRET_ENV, USERNAME_CLAIM};
use switchboard_transport::http::{header, HeaderMap, StatusCode};
use switchboard_transport::{
    plain_response, CloseReason, HttpResponse, Inbound, RequestParts, Server, Service, SocketRef,
    TransportOptions,
};

const ECHO_IN: &[u8] = br#"{"type":"echo","#;
const ECHO_OUT: &[u8] = br#"{"type":"bench:echo","#;
const BROADCAST_IN: &[u8] = br#"{"type":"broadcast","#;
const BROADCAST_OUT: &[u8] = br#"{"type":"bench.broadcast","#;
const SEND_IN: &[u8] = br#"{"type":"send","to":""#;
const SEND_OUT: &[u8] = br#"{"type":"bench.send""#;
const UNKNOWN: &str =
    r#"{"type":"error","payload":{"message":"the floor answers echo, send and broadcast only"}}"#;

/// Serves the floor on 127.0.0.1:`port` until SIGTERM or Ctrl-C.
pub(crate) async fn serve(port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var(SECRET_ENV).map_err(|_| format!("{SECRET_ENV} is not set"))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let floor = Arc::new(Floor {
        key: DecodingKey::from_secret(secret.as_bytes()),
        validation,
        sockets: Mutex::default(),
    });
    // The bench config's socket settings (`switchboard_bench::server_yaml`); the rest are the
    // transport's defaults, as the gateway's are.
    let mut options = TransportOptions::default();
    options.path = switchboard_bench::PATH.into();
    options.max_message_size = 64 * 1024;
    options.send_queue = 256;
    options.heartbeat_interval = Duration::from_secs(30);
    let stop = switchboard::shutdown_signal();
    let server = Server::bind(SocketAddr::from(([127, 0, 0, 1], port)), options, floor).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", server.local_addr().port())?;
        out.flush()?;
    }
    stop.await;
    server.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

struct Floor {
    key: DecodingKey,
    validation: Validation,
    sockets: Mutex<Slots>,
}

/// Every open socket, in a list whose holes are reused, and each user's places in it.
#[derive(Default)]
struct Slots {
    list: Vec<Option<SocketRef>>,
    free: Vec<usize>,
    users: HashMap<Arc<str>, Vec<usize>>,
}

/// A socket, its user and its place in [`Slots`].
struct Session {
    socket: SocketRef,
    user: Arc<str>,
    slot: usize,
}

impl Floor {
    fn sockets(&self) -> MutexGuard<'_, Slots> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unauthorized() -> HttpResponse {
    plain_response(StatusCode::UNAUTHORIZED, "invalid token\n")
}

/// The token in the `ID_TOKEN` cookie, else in `Authorization: Bearer`.
fn token(headers: &HeaderMap) -> Option<&str> {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == "ID_TOKEN")
        .map(|(_, value)| value.trim());
    cookie.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        value.strip_prefix("Bearer ").map(str::trim)
    })
}

/// `with` followed by what comes after `prefix` in `frame`, as one buffer.
fn retyped(frame: &[u8], prefix: usize, with: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(with.len() + frame.len() - prefix);
    out.extend_from_slice(with);
    out.extend_from_slice(&frame[prefix..]);
    out.freeze()
}

impl Service for Floor {
    type Admission = Arc<str>;
    type Session = Session;

    fn admit(&self, request: &RequestParts) -> Result<Arc<str>, HttpResponse> {
        let token = token(&request.headers).ok_or_else(unauthorized)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|_| unauthorized())?;
        match data.claims.get(USERNAME_CLAIM) {
            Some(Value::String(name)) if !name.is_empty() => Ok(Arc::from(name.as_str())),
            _ => Err(unauthorized()),
        }
    }

    fn open(&self, user: Arc<str>, socket: SocketRef) -> Session {
        let mut slots = self.sockets();
        let slot = match slots.free.pop() {
            Some(i) => {
                slots.list[i] = Some(socket.clone());
                i
            }
            None => {
                slots.list.push(Some(socket.clone()));
                slots.list.len() - 1
            }
        };
        slots.users.entry(user.clone()).or_default().push(slot);
        Session { socket, user, slot }
    }

    fn on_message(&self, session: &Session, message: Inbound) {
        let Inbound::Text(frame) = message else {
            return;
        };
        if frame.starts_with(ECHO_IN) {
            let _ = session
                .socket
                .send_text(retyped(&frame, ECHO_IN.len(), ECHO_OUT));
        } else if let Some((user, rest)) = addressed(&frame) {
            let out = retyped(&frame, rest, SEND_OUT);
            let slots = self.sockets();
            for &slot in slots.users.get(user).into_iter().flatten() {
                if let Some(socket) = &slots.list[slot] {
                    let _ = socket.send_text(out.clone());
                }
            }
        } else if frame.starts_with(BROADCAST_IN) {
            let out = retyped(&frame, BROADCAST_IN.len(), BROADCAST_OUT);
            // Sending never waits, and `on_close` never runs inside a send, so the list can
            // stay locked for the loop.
            for socket in self.sockets().list.iter().flatten() {
                let _ = socket.send_text(out.clone());
            }
        } else {
            let _ = session
                .socket
                .send_text(Bytes::from_static(UNKNOWN.as_bytes()));
        }
    }

    fn on_close(&self, session: Session, _reason: CloseReason) {
        let mut slots = self.sockets();
        slots.list[session.slot] = None;
        slots.free.push(session.slot);
        if let Some(places) = slots.users.get_mut(&session.user) {
            places.retain(|&s| s != session.slot);
            if places.is_empty() {
                slots.users.remove(&session.user);
            }
        }
    }
}

/// A `send` frame's user and where the rest of the frame (`,"payload":...`) starts.
fn addressed(frame: &[u8]) -> Option<(&str, usize)> {
    let after = frame.strip_prefix(SEND_IN)?;
    let end = after.iter().position(|&b| b == b'"')?;
    let user = std::str::from_utf8(&after[..end]).ok()?;
    Some((user, SEND_IN.len() + end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_the_client_frame_after_its_type() {
        let frame = br#"{"type":"echo","payload":"00ab"}"#;
        let reply = retyped(frame, ECHO_IN.len(), ECHO_OUT);
        assert_eq!(&reply[..], br#"{"type":"bench:echo","payload":"00ab"}"#);
        let frame = br#"{"type":"broadcast","payload":"x"}"#;
        let reply = retyped(frame, BROADCAST_IN.len(), BROADCAST_OUT);
        assert_eq!(&reply[..], br#"{"type":"bench.broadcast","payload":"x"}"#);
        // `send`: the gateway's frame, `to` left out.
        let frame = br#"{"type":"send","to":"user-7","payload":"00ab"}"#;
        let (user, rest) = addressed(frame).unwrap();
        assert_eq!(user, "user-7");
        let reply = retyped(frame, rest, SEND_OUT);
        assert_eq!(&reply[..], br#"{"type":"bench.send","payload":"00ab"}"#);
        assert_eq!(addressed(br#"{"type":"send","to":"unterminated"#), None);
        assert_eq!(addressed(br#"{"type":"echo","payload":"x"}"#), None);
    }

    #[test]
    fn the_token_comes_from_the_cookie_then_the_bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer b.c.d".parse().unwrap());
        assert_eq!(token(&h), Some("b.c.d"));
        h.insert(header::COOKIE, "a=1; ID_TOKEN=x.y.z".parse().unwrap());
        assert_eq!(token(&h), Some("x.y.z"));
    }
}
