//! What a transport asks of the code that gives its sockets meaning.

use crate::{
    plain_response, BoxFuture, CloseReason, HttpResponse, Inbound, RequestParts, SocketRef,
};

/// What a transport calls as sockets open, speak and end. One value serves every socket of
/// every transport it is given to.
pub trait Service: Send + Sync + 'static {
    /// What [`Service::admit`] learns about a request (an identity, say), handed to
    /// [`Service::open`].
    type Admission: Send + 'static;
    /// Per-socket state the service keeps, handed back on every message and at close.
    type Session: Send + Sync + 'static;

    /// Work the service needs done before [`Service::admit`] can decide on a request with
    /// these headers (fetching the signing keys its token names, say). A transport awaits
    /// the future, within its handshake deadline, then calls `admit`. Default: none, which
    /// is also the answer for almost every request, so the common path costs no allocation.
    fn prepare_admit(&self, headers: &http::HeaderMap) -> Option<BoxFuture<'static, ()>> {
        let _ = headers;
        None
    }

    /// Decides, before a socket exists, whether this request may open one. An `Err` is sent
    /// as the answer (e.g. `401`) and no socket is opened.
    // A refusal is the cold path and is moved once; boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    fn admit(&self, request: &RequestParts) -> Result<Self::Admission, HttpResponse>;

    /// A socket was opened for an admitted request.
    fn open(&self, admission: Self::Admission, socket: SocketRef) -> Self::Session;

    /// A whole message arrived. Called in arrival order, never concurrently for one socket.
    fn on_message(&self, session: &Self::Session, message: Inbound);

    /// A whole text message arrived, already checked to be UTF-8 and lent from the
    /// transport's read buffer (the WebSocket transport lends a message that came in one
    /// frame; others call [`Service::on_message`]). Same order and rules as `on_message`.
    /// Default: `on_message` with a copy. A service that only reads the text, to parse it,
    /// overrides this and saves an allocation, a copy and a second UTF-8 check per message.
    fn on_text(&self, session: &Self::Session, text: &str) {
        self.on_message(
            session,
            Inbound::Text(bytes::Bytes::copy_from_slice(text.as_bytes())),
        );
    }

    /// The client sent a ping: answer it? Default yes. A service that rate-limits its clients
    /// counts pings here too (each answer costs a write); false drops the ping.
    fn on_ping(&self, session: &Self::Session) -> bool {
        let _ = session;
        true
    }

    /// The socket has ended. Called exactly once per opened socket.
    fn on_close(&self, session: Self::Session, reason: CloseReason);

    /// Answers a plain HTTP request that no transport claims (another path on the same
    /// server). Default: `404`.
    fn http(&self, request: &RequestParts) -> HttpResponse {
        let _ = request;
        plain_response(http::StatusCode::NOT_FOUND, "not found\n")
    }
}
