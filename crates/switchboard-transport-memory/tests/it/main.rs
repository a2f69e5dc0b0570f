//! The in-memory transport against a small recording service: order, every way a socket
//! ends (each reported once), bounds, pausing, admission and shutdown. Nothing here sleeps to
//! wait: each test waits for what it expects.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::{
    http, plain_response, CloseReason, HttpResponse, Inbound, RequestParts, RunningTransport,
    SendError, Service, SocketRef, Transport,
};
use switchboard_transport_memory::{ClientEvent, MemoryClient, MemoryOptions, MemoryTransport};
use tokio::sync::mpsc;

/// What the service saw, by socket number (in order of opening).
#[derive(Debug, PartialEq)]
enum Seen {
    Message(usize, Inbound),
    Closed(usize, CloseReason),
}

/// Records every call; echoes text (`close CODE` closes the socket from inside the call);
/// refuses requests without an `x-user` header with 401.
struct Recording {
    seen: mpsc::UnboundedSender<Seen>,
    sockets: Mutex<Vec<SocketRef>>,
    opened: AtomicUsize,
    pause_on_open: bool,
    answer_pings: bool,
    /// Set while a call for a socket runs: a second call inside it would find it set.
    in_call: AtomicBool,
    /// on_close waits for this to be dropped, when set.
    hold_close: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

struct Session {
    n: usize,
    socket: SocketRef,
}

impl Recording {
    fn enter(&self) {
        assert!(!self.in_call.swap(true, Ordering::SeqCst), "re-entered");
    }

    fn leave(&self) {
        self.in_call.store(false, Ordering::SeqCst);
    }
}

impl Service for Recording {
    type Admission = ();
    type Session = Session;

    fn admit(&self, request: &RequestParts) -> Result<(), HttpResponse> {
        match request.headers.get("x-user") {
            Some(_) => Ok(()),
            None => Err(plain_response(http::StatusCode::UNAUTHORIZED, "who?\n")),
        }
    }

    fn open(&self, _: (), socket: SocketRef) -> Session {
        if self.pause_on_open {
            socket.pause_reading();
        }
        self.sockets.lock().unwrap().push(socket.clone());
        let n = self.opened.fetch_add(1, Ordering::SeqCst);
        Session { n, socket }
    }

    fn on_message(&self, s: &Session, message: Inbound) {
        self.enter();
        if let Inbound::Text(text) = &message {
            match std::str::from_utf8(text).unwrap().strip_prefix("close ") {
                Some(code) => s.socket.close(code.parse().unwrap(), "asked to"),
                None => {
                    let _ = s.socket.send_text(text.clone());
                }
            }
        }
        let _ = self.seen.send(Seen::Message(s.n, message));
        self.leave();
    }

    fn on_ping(&self, _: &Session) -> bool {
        self.answer_pings
    }

    fn on_close(&self, s: Session, reason: CloseReason) {
        self.enter();
        if let Some(hold) = self.hold_close.lock().unwrap().take() {
            let _ = hold.recv();
        }
        let _ = self.seen.send(Seen::Closed(s.n, reason));
        self.leave();
    }
}

struct Setup {
    transport: MemoryTransport,
    serving: Box<dyn RunningTransport>,
    service: Arc<Recording>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

async fn serve(options: MemoryOptions, configure: impl FnOnce(&mut Recording)) -> Setup {
    let (tx, seen) = mpsc::unbounded_channel();
    let mut service = Recording {
        seen: tx,
        sockets: Mutex::default(),
        opened: AtomicUsize::new(0),
        pause_on_open: false,
        answer_pings: true,
        in_call: AtomicBool::new(false),
        hold_close: Mutex::new(None),
    };
    configure(&mut service);
    let service = Arc::new(service);
    let transport = MemoryTransport::new(options);
    let serving = transport.clone().start(service.clone()).await.unwrap();
    Setup {
        transport,
        serving,
        service,
        seen,
    }
}

/// A transport with options as `configure` sets them, one client, and its socket.
async fn one_socket(
    configure: impl FnOnce(&mut MemoryOptions),
) -> (Setup, MemoryClient, SocketRef) {
    let mut options = MemoryOptions::default();
    configure(&mut options);
    let s = serve(options, |_| {}).await;
    let client = s.connect().await;
    let socket = s.socket(0);
    (s, client, socket)
}

fn request(user: &str) -> http::Request<()> {
    http::Request::get("/connect")
        .header("x-user", user)
        .body(())
        .unwrap()
}

impl Setup {
    async fn connect(&self) -> MemoryClient {
        self.transport.connect(request("alex")).await.unwrap()
    }

    /// The socket the service got for the n-th connection.
    fn socket(&self, n: usize) -> SocketRef {
        self.service.sockets.lock().unwrap()[n].clone()
    }

    /// The next call is the first socket's on_close, for `reason`.
    async fn assert_closed(&mut self, reason: CloseReason) {
        assert_eq!(self.next_seen().await, Seen::Closed(0, reason));
    }

    /// The client's last event is the close that `reason` sends; the service reads
    /// `messages` more of the first socket's messages, then its on_close for `reason`, and
    /// nothing after.
    async fn assert_ends(
        &mut self,
        client: &mut MemoryClient,
        messages: usize,
        reason: CloseReason,
    ) {
        let farewell = match &reason {
            CloseReason::Server { code, reason } | CloseReason::Client { code, reason } => {
                close(*code, reason)
            }
            CloseReason::SlowConsumer => close(1008, "send queue full"),
            other => panic!("no close event for {other:?}"),
        };
        assert_eq!(next_event(client).await, farewell);
        assert_eq!(next_event(client).await, None);
        for _ in 0..messages {
            assert!(matches!(self.next_seen().await, Seen::Message(0, _)));
        }
        self.assert_closed(reason).await;
        self.assert_all_ended_once().await;
    }

    async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("a call within 5 s")
            .unwrap()
    }

    /// Waits until every socket has ended, then checks that nothing more was reported.
    async fn assert_all_ended_once(&mut self) {
        let transport = &self.transport;
        let ended = async {
            while transport.counters().sockets_open > 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("every socket ends within 5 s");
        assert!(self.seen.try_recv().is_err(), "nothing after the close");
    }
}

async fn next_event(client: &mut MemoryClient) -> Option<ClientEvent> {
    tokio::time::timeout(Duration::from_secs(5), client.recv())
        .await
        .expect("an event within 5 s")
}

fn text(s: &str) -> Option<ClientEvent> {
    Some(ClientEvent::Text(s.into()))
}

fn by_server(code: u16, reason: &str) -> CloseReason {
    CloseReason::Server {
        code,
        reason: reason.into(),
    }
}

fn close(code: u16, reason: &str) -> Option<ClientEvent> {
    Some(ClientEvent::Close {
        code,
        reason: reason.into(),
    })
}

/// Lets every task that is ready run (the tests use the current-thread runtime, where this is
/// exact): what could happen now has happened.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn messages_arrive_whole_and_in_order_and_echoes_come_back_in_order() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let mut client = s.connect().await;
    for i in 0..100 {
        client.send_text(format!("m{i}")).unwrap();
    }
    client.send_binary(Bytes::from_static(b"\x00\x01")).unwrap();
    for i in 0..100 {
        assert_eq!(next_event(&mut client).await, text(&format!("m{i}")));
        assert_eq!(
            s.next_seen().await,
            Seen::Message(0, Inbound::Text(format!("m{i}").into()))
        );
    }
    assert_eq!(
        s.next_seen().await,
        Seen::Message(0, Inbound::Binary(Bytes::from_static(b"\x00\x01")))
    );
    let socket = s.socket(0);
    assert_eq!(socket.transport(), "memory");
    assert_eq!(socket.peer_addr(), None);
    socket.send_binary(Bytes::from_static(b"b")).unwrap();
    assert_eq!(
        next_event(&mut client).await,
        Some(ClientEvent::Binary(Bytes::from_static(b"b")))
    );
}

#[tokio::test]
async fn a_server_close_comes_after_what_was_queued_and_is_reported_once() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let mut client = s.connect().await;
    let socket = s.socket(0);
    socket.send_text("before".into()).unwrap();
    socket.close(4000, "done");
    assert!(socket.is_closing());
    assert_eq!(socket.send_text("after".into()), Err(SendError::Closed));
    socket.close(4001, "again"); // the first close wins
    assert_eq!(next_event(&mut client).await, text("before"));
    s.assert_ends(&mut client, 0, by_server(4000, "done")).await;
    assert_eq!(s.transport.counters().closed_by_server, 1);
    assert_eq!(client.send_text("late"), Err(SendError::Closed));
}

#[tokio::test]
async fn a_close_from_inside_a_call_is_reported_after_the_call_with_a_sendable_code() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let mut client = s.connect().await;
    // 1005 may not be sent in a close frame: it becomes 1011. `Recording` asserts that
    // on_close does not run inside on_message.
    client.send_text("close 1005").unwrap();
    client.send_text("never read").unwrap();
    s.assert_ends(&mut client, 1, by_server(1011, "asked to"))
        .await;
}

#[tokio::test]
async fn a_client_close_is_echoed_and_reported_once() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let mut client = s.connect().await;
    client.send_text("last words").unwrap();
    client.close(1000, "bye").unwrap();
    assert_eq!(next_event(&mut client).await, text("last words"));
    let reason = CloseReason::Client {
        code: 1000,
        reason: "bye".into(),
    };
    s.assert_ends(&mut client, 1, reason).await;
    assert_eq!(s.transport.counters().closed_by_client, 1);
}

#[tokio::test]
async fn a_dropped_client_is_reported_once_after_what_it_sent() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let client = s.connect().await;
    client.send_text("one").unwrap();
    drop(client);
    assert!(matches!(s.next_seen().await, Seen::Message(0, _)));
    s.assert_closed(CloseReason::Dropped).await;
    s.assert_all_ended_once().await;
    let counters = s.transport.counters();
    assert_eq!((counters.dropped, counters.sockets_opened), (1, 1));
    assert_eq!(
        s.socket(0).send_text("to no one".into()),
        Err(SendError::Closed)
    );
}

#[tokio::test]
async fn a_full_send_queue_closes_the_socket_as_a_slow_consumer() {
    let (mut s, mut client, socket) = one_socket(|o| o.send_queue = 4).await;
    for i in 0..4 {
        socket.send_text(format!("f{i}").into()).unwrap();
    }
    assert_eq!(s.transport.counters().buffered_bytes, 8);
    assert_eq!(socket.send_text("f4".into()), Err(SendError::Full));
    assert!(socket.is_closing());
    for i in 0..4 {
        assert_eq!(next_event(&mut client).await, text(&format!("f{i}")));
    }
    s.assert_ends(&mut client, 0, CloseReason::SlowConsumer)
        .await;
    let counters = s.transport.counters();
    assert_eq!(counters.slow_consumers, 1);
    assert_eq!(
        (counters.buffered_bytes, counters.buffered_bytes_peak),
        (0, 8)
    );
}

#[tokio::test]
async fn the_send_queue_is_bounded_in_bytes_and_a_client_that_reads_keeps_its_socket() {
    let (mut s, mut client, socket) = one_socket(|o| o.send_queue_bytes = 100).await;
    // Into an empty queue a frame always goes, whatever its size.
    let big = "x".repeat(500);
    socket.send_text(big.clone().into()).unwrap();
    assert_eq!(next_event(&mut client).await, text(&big));
    // Read as it is sent, much more than the bound goes through.
    for _ in 0..20 {
        socket.send_text("y".repeat(60).into()).unwrap();
        assert_eq!(next_event(&mut client).await, text(&"y".repeat(60)));
    }
    socket.send_text("y".repeat(60).into()).unwrap();
    assert_eq!(
        socket.send_text("z".repeat(60).into()),
        Err(SendError::Full)
    );
    assert_eq!(next_event(&mut client).await, text(&"y".repeat(60)));
    s.assert_ends(&mut client, 0, CloseReason::SlowConsumer)
        .await;
}

#[tokio::test]
async fn a_message_over_the_limit_closes_1009_and_is_not_delivered() {
    let mut options = MemoryOptions::default();
    options.max_message_size = 8;
    let mut s = serve(options, |_| {}).await;
    let mut client = s.connect().await;
    client.send_text("12345678").unwrap();
    client.send_text("123456789").unwrap();
    client.send_text("after").unwrap();
    assert_eq!(next_event(&mut client).await, text("12345678"));
    assert_eq!(
        next_event(&mut client).await,
        close(1009, "message too big")
    );
    assert_eq!(next_event(&mut client).await, None);
    assert!(matches!(s.next_seen().await, Seen::Message(0, _)));
    match s.next_seen().await {
        Seen::Closed(0, CloseReason::Protocol { code: 1009, .. }) => {}
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    s.assert_all_ended_once().await;
    assert_eq!(s.transport.counters().protocol_errors, 1);
}

#[tokio::test]
async fn a_paused_socket_reads_nothing_until_resumed_and_can_still_send() {
    let mut s = serve(MemoryOptions::default(), |r| r.pause_on_open = true).await;
    let mut client = s.connect().await;
    client.send_text("one").unwrap();
    client.send_text("two").unwrap();
    client.ping().unwrap();
    settle().await;
    assert!(s.seen.try_recv().is_err(), "nothing read while paused");
    assert_eq!(client.try_recv(), None, "no echo, no pong");
    let socket = s.socket(0);
    socket.send_text("while paused".into()).unwrap();
    assert_eq!(next_event(&mut client).await, text("while paused"));
    socket.resume_reading();
    assert_eq!(next_event(&mut client).await, text("one"));
    assert_eq!(next_event(&mut client).await, text("two"));
    assert_eq!(next_event(&mut client).await, Some(ClientEvent::Pong));
    assert!(matches!(s.next_seen().await, Seen::Message(0, _)));
    assert!(matches!(s.next_seen().await, Seen::Message(0, _)));
    // Paused again, a server close still ends it.
    socket.pause_reading();
    client.send_text("unread").unwrap();
    socket.close(1000, "bye");
    assert_eq!(next_event(&mut client).await, close(1000, "bye"));
    assert!(matches!(s.next_seen().await, Seen::Closed(0, _)));
    s.assert_all_ended_once().await;
}

#[tokio::test]
async fn pings_are_answered_only_when_the_service_says_so() {
    let s = serve(MemoryOptions::default(), |r| r.answer_pings = false).await;
    let mut client = s.connect().await;
    client.ping().unwrap();
    client.send_text("after the ping").unwrap();
    assert_eq!(next_event(&mut client).await, text("after the ping"));
    let s = serve(MemoryOptions::default(), |_| {}).await;
    let mut client = s.connect().await;
    client.ping().unwrap();
    assert_eq!(next_event(&mut client).await, Some(ClientEvent::Pong));
}

#[tokio::test]
async fn a_refused_request_gets_the_service_answer_and_opens_nothing() {
    let mut s = serve(MemoryOptions::default(), |_| {}).await;
    let refused = s
        .transport
        .connect(http::Request::get("/connect").body(()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(refused.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(refused.body().as_ref(), b"who?\n");
    let counters = s.serving.counters();
    assert_eq!(
        (counters.refused_by_service, counters.sockets_opened),
        (1, 0)
    );
    assert_eq!(s.service.opened.load(Ordering::SeqCst), 0);
    assert!(s.seen.try_recv().is_err());
}

#[tokio::test]
async fn connecting_before_start_or_after_shutdown_gets_503_and_start_is_once() {
    let transport = MemoryTransport::new(MemoryOptions::default());
    let before = transport.connect(request("alex")).await.unwrap_err();
    assert_eq!(before.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let s = serve(MemoryOptions::default(), |_| {}).await;
    let again = s.transport.clone().start(s.service.clone()).await;
    assert!(again.is_err(), "a transport serves one service");
    assert!(s.serving.shutdown(Duration::from_secs(1)).await.drained);
    let after = s.transport.connect(request("alex")).await.unwrap_err();
    assert_eq!(after.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.serving.name(), "memory");
    assert_eq!(s.serving.local_addr(), None);
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001_and_waits_for_each_close() {
    let mut s = serve(MemoryOptions::default(), |r| r.pause_on_open = true).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(s.connect().await);
    }
    s.socket(1).send_text("queued".into()).unwrap();
    assert_eq!(s.serving.counters().sockets_open, 3);
    let report = s.serving.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    // Every on_close ran before the shutdown returned.
    let mut closed = Vec::new();
    while let Ok(seen) = s.seen.try_recv() {
        match seen {
            Seen::Closed(n, CloseReason::Shutdown) => closed.push(n),
            other => panic!("{other:?}"),
        }
    }
    closed.sort();
    assert_eq!(closed, [0, 1, 2]);
    assert_eq!(next_event(&mut clients[1]).await, text("queued"));
    for client in &mut clients {
        assert_eq!(
            next_event(client).await,
            close(1001, "server shutting down")
        );
        assert_eq!(next_event(client).await, None);
    }
    let counters = s.serving.counters();
    assert_eq!((counters.closed_by_shutdown, counters.sockets_open), (3, 0));
    // A second call reports at once.
    assert!(s.serving.shutdown(Duration::ZERO).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_a_close_that_did_not_finish_within_the_drain() {
    let (release, hold) = std::sync::mpsc::channel();
    let mut s = serve(MemoryOptions::default(), |r| {
        r.hold_close = Mutex::new(Some(hold));
    })
    .await;
    let _client = s.connect().await;
    let report = s.serving.shutdown(Duration::from_millis(50)).await;
    assert!(!report.drained, "on_close is still running");
    drop(release);
    s.assert_closed(CloseReason::Shutdown).await;
    s.assert_all_ended_once().await;
}
