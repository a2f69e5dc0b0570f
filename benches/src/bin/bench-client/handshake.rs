//! Scenario `handshake`: connect, upgrade with a JWT and reset, as fast as possible.
//!
//! On one mio poll loop, like echo and broadcast (see `poller.rs`): `concurrency` connections
//! are in flight at once, each a small state machine (connecting, request sent, 101 read),
//! with no task, timer or buffer of its own beyond the response head's.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use switchboard_bench::client;

use crate::measure::{latency_result, sample_cpu, Clock, Tally};
use crate::sockets::Run;

/// Scenario 5: handshakes per second. Each of `concurrency` slots connects, upgrades with a
/// JWT and resets the connection (linger 0: no TIME_WAIT to exhaust ports), again and again.
pub(crate) async fn handshakes(
    run: Arc<Run>,
    concurrency: usize,
    tokens: usize,
    warmup: f64,
    secs: f64,
) -> Result<String, String> {
    let requests: Vec<Vec<u8>> = (0..tokens.max(1))
        .map(|i| {
            let token = switchboard_bench::mint_token(&run.secret, &format!("user-{i}"), 3600);
            client::upgrade_request(&run.ep, &token)
        })
        .collect();
    let clock = Clock::start(warmup, secs);
    let cpu = sample_cpu(clock, run.server_pid);
    let looped = run.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let mut tally = Tally::default();
        if let Err(e) = handshake_loop(&looped, &requests, concurrency.max(1), clock, &mut tally) {
            tally.error(e);
        }
        tally
    });
    Ok(latency_result(
        vec![
            ("scenario", "handshake".into()),
            ("concurrency", concurrency.to_string()),
        ],
        vec![worker],
        cpu,
        &clock,
        run.samples_file.as_deref(),
    )
    .await)
}

/// One connection being upgraded.
struct Attempt {
    stream: TcpStream,
    started: Instant,
    request: usize,
    sent: bool,
    head: [u8; client::RESPONSE_HEAD_MAX],
    len: usize,
}

/// What an event did to an attempt.
enum Step {
    Waiting,
    Upgraded,
    Failed(String),
}

fn handshake_loop(
    run: &Run,
    requests: &[Vec<u8>],
    concurrency: usize,
    clock: Clock,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut events = Events::with_capacity(256);
    let mut slots: Vec<Option<Attempt>> = (0..concurrency).map(|_| None).collect();
    let mut next = 0usize;
    let mut start = |slot: usize, poll: &Poll, slots: &mut [Option<Attempt>], tally: &mut Tally| {
        // A refused or failed connect is counted and the slot tries again at once: errors fail
        // the benchmark, so a loop of them ends up in the report rather than in a hang.
        for _ in 0..3 {
            let i = next;
            next += 1;
            match begin(run, i, Token(slot), poll) {
                Ok(stream) => {
                    slots[slot] = Some(Attempt {
                        stream,
                        started: Instant::now(),
                        request: i % requests.len(),
                        sent: false,
                        head: [0; client::RESPONSE_HEAD_MAX],
                        len: 0,
                    });
                    return;
                }
                Err(e) => tally.error(format!("connect: {e}")),
            }
        }
    };
    for slot in 0..concurrency {
        start(slot, &poll, &mut slots, tally);
    }
    loop {
        let now = Instant::now();
        let in_flight = slots.iter().filter(|s| s.is_some()).count();
        if in_flight == 0 && now >= clock.end {
            return Ok(());
        }
        if now >= clock.hard {
            tally.error(format!("{in_flight} handshakes timed out"));
            return Ok(());
        }
        let wait = clock
            .hard
            .saturating_duration_since(now)
            .min(Duration::from_millis(100));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            let slot = ev.token().0;
            let Some(attempt) = slots[slot].as_mut() else {
                continue;
            };
            match advance(attempt, &requests[attempt.request]) {
                Step::Waiting => continue,
                Step::Upgraded => {
                    let at = Instant::now();
                    if clock.measured(at) {
                        tally.samples.push((at - attempt.started).as_nanos() as u64);
                    }
                    let _ = SockRef::from(&attempt.stream).set_linger(Some(Duration::ZERO));
                }
                Step::Failed(e) => tally.error(e),
            }
            // Dropping the stream closes it (and takes it out of the poll).
            slots[slot] = None;
            if Instant::now() < clock.end {
                start(slot, &poll, &mut slots, tally);
            }
        }
    }
}

/// A non-blocking connect to the server from source address number `i`.
fn begin(run: &Run, i: usize, token: Token, poll: &Poll) -> io::Result<TcpStream> {
    let to = run.ep.addr;
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if let Some(ip) = run.source(i) {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(socket.into());
    stream.set_nodelay(true)?;
    poll.registry()
        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
}

/// Moves an attempt on after an event: sends the request once connected, then reads the
/// response head. Fails unless the server answers `101`; a frame right behind the head (a
/// heartbeat ping) is let go with the reset.
fn advance(a: &mut Attempt, request: &[u8]) -> Step {
    if !a.sent {
        // Writing is the test for "connected": while the connect is under way the write
        // would block, and a failed connect fails it with the connect's error. A few hundred
        // bytes into an empty socket buffer are taken whole.
        return match a.stream.write(request) {
            Ok(n) if n == request.len() => {
                a.sent = true;
                Step::Waiting // the answer raises a readable event of its own
            }
            Ok(n) => Step::Failed(format!("the request was written in part ({n} bytes)")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Waiting,
            Err(e) => Step::Failed(format!("connect or write: {e}")),
        };
    }
    loop {
        match a.stream.read(&mut a.head[a.len..]) {
            Ok(0) => return Step::Failed("closed during the handshake".into()),
            Ok(n) => a.len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Step::Failed(format!("read: {e}")),
        }
        // A frame right behind the 101 (a heartbeat ping) goes with the reset.
        match client::response_head(&a.head[..a.len]) {
            Ok(Some(_)) => return Step::Upgraded,
            Ok(None) => {}
            Err(e) => return Step::Failed(e),
        }
    }
}
