//! The measured phase of `echo`, `send` and `broadcast`, on one mio poll loop.
//!
//! The benchmark pins the client to one core. With a tokio task and a fastwebsockets reader
//! per socket, the client spent about a quarter of that core in user space and made two
//! `recv`s per frame (the second only to see `EAGAIN`); it was at 0.9-0.97 of its core, so the
//! figures were partly its own. Here a readable socket is read into one shared buffer, whole
//! frames are handled in place, and a read that leaves room in the buffer ends the socket's
//! turn: mio's epoll is edge-triggered, and data that arrives after that read raises a new
//! event. Every server gets the same client.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use switchboard_bench::frames::{self, opcode, Next};

use crate::measure::{Clock, Tally};
use crate::sockets::Ws;

/// What the loop reports about a socket.
pub(crate) enum Inbound<'a> {
    /// A text frame's payload.
    Text(&'a [u8]),
    /// The socket is gone: the server closed it, or it failed; the text says which.
    Ended(String),
}

/// A scenario the loop drives until the clock ends and nothing is left in flight.
pub(crate) trait Scenario {
    /// Handles what a turn found on socket `i`.
    fn on(&mut self, tx: &mut Sender, i: usize, inbound: Inbound<'_>);
    /// After every turn: sends what the turn made room for.
    fn after_turn(&mut self, _tx: &mut Sender) {}
    /// Nothing is in flight any more (asked once the clock has ended).
    fn settled(&self) -> bool;
    /// Done before the clock's end (asked before every turn).
    fn finished(&self) -> bool {
        false
    }
    /// When the next turn must return even if nothing happens (besides the clock's end).
    fn wake_at(&self) -> Option<Instant> {
        None
    }
    /// What is still in flight at the hard deadline, as an error.
    fn overdue(&self) -> String;
    /// Where errors are counted.
    fn tally(&mut self) -> &mut Tally;
}

/// One socket of the loop.
struct Conn {
    stream: TcpStream,
    /// The start of a frame not all read yet.
    partial: Vec<u8>,
    /// Bytes the socket would not take yet (written when it is writable again).
    unsent: Vec<u8>,
    ended: bool,
}

/// Writes frames to the loop's sockets.
pub(crate) struct Sender {
    conns: Vec<Conn>,
    frame: Vec<u8>,
    mask: u32,
}

impl Sender {
    /// Sends a masked text frame to socket `i`; fails if it has ended.
    pub(crate) fn text(&mut self, i: usize, payload: &[u8]) -> Result<(), String> {
        self.send(i, opcode::TEXT, payload)
    }

    fn send(&mut self, i: usize, op: u8, payload: &[u8]) -> Result<(), String> {
        if self.conns[i].ended {
            return Err(format!("socket {i} has ended"));
        }
        // A cheap xorshift: masks need not be secret here, only present (RFC 6455 §5.3).
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        self.frame.clear();
        frames::push_masked(&mut self.frame, op, payload, self.mask.to_ne_bytes());
        let conn = &mut self.conns[i];
        if !conn.unsent.is_empty() {
            conn.unsent.extend_from_slice(&self.frame);
            return Ok(());
        }
        let written = match conn.stream.write(&self.frame) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                conn.ended = true;
                return Err(format!("socket {i}: write: {e}"));
            }
        };
        conn.unsent.extend_from_slice(&self.frame[written..]);
        Ok(())
    }

    fn flush(&mut self, i: usize) -> io::Result<()> {
        let conn = &mut self.conns[i];
        while !conn.unsent.is_empty() {
            match conn.stream.write(&conn.unsent) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(conn.unsent.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The sockets of a run on one poll loop.
pub(crate) struct Loop {
    poll: Poll,
    events: Events,
    /// One read buffer for every socket: a read lands after the socket's partial frame.
    buf: Vec<u8>,
    cuts: Vec<frames::Cut>,
    max_frame: usize,
    /// Poll without sleeping (`--spin`).
    spin: bool,
    pub(crate) tx: Sender,
}

impl Loop {
    /// Takes over sockets opened (and upgraded) on tokio; socket `i` is token `i`. Frames
    /// longer than `max_frame` bytes end their socket. With `spin`, a turn polls without
    /// waiting, and [`Loop::run`] counts the turns that found nothing as idle time.
    pub(crate) fn new(sockets: Vec<Ws>, max_frame: usize, spin: bool) -> Result<Loop, String> {
        let streams = sockets
            .into_iter()
            .enumerate()
            // Freshly upgraded: nothing was read past the 101's head, so fastwebsockets holds
            // no bytes of the stream.
            .map(|(i, ws)| {
                ws.into_inner()
                    .into_std()
                    .map_err(|e| format!("socket {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Loop::from_std(streams, max_frame, spin)
    }

    /// As [`Loop::new`], from upgraded non-blocking std streams.
    pub(crate) fn from_std(
        streams: Vec<std::net::TcpStream>,
        max_frame: usize,
        spin: bool,
    ) -> Result<Loop, String> {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let mut conns = Vec::with_capacity(streams.len());
        for (i, std) in streams.into_iter().enumerate() {
            let mut stream = TcpStream::from_std(std);
            poll.registry()
                .register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("socket {i}: register: {e}"))?;
            conns.push(Conn {
                stream,
                partial: Vec::new(),
                unsent: Vec::new(),
                ended: false,
            });
        }
        Ok(Loop {
            poll,
            events: Events::with_capacity(1024),
            buf: vec![0; 2 * max_frame + 64 * 1024],
            cuts: Vec::new(),
            max_frame,
            spin,
            tx: Sender {
                conns,
                frame: Vec::new(),
                mask: 0x9E37_79B9,
            },
        })
    }

    /// Waits until an event or `until` (not at all when spinning), then hands every whole
    /// text frame (and every socket that ended) to `on`, with the sender to answer on. Pings
    /// are answered here. Says whether the poll found anything.
    pub(crate) fn turn(
        &mut self,
        until: Instant,
        on: &mut impl FnMut(&mut Sender, usize, Inbound<'_>),
    ) -> Result<bool, String> {
        let wait = if self.spin {
            Duration::ZERO
        } else {
            until.saturating_duration_since(Instant::now())
        };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in self.events.iter() {
            let i = ev.token().0;
            if self.tx.conns[i].ended {
                continue;
            }
            if ev.is_writable() {
                if let Err(e) = self.tx.flush(i) {
                    self.tx.conns[i].ended = true;
                    on(&mut self.tx, i, Inbound::Ended(format!("write: {e}")));
                    continue;
                }
            }
            let to_the_end = ev.is_read_closed() || ev.is_error();
            if ev.is_readable() || to_the_end {
                read_ready(
                    &mut self.tx,
                    i,
                    &mut self.buf,
                    &mut self.cuts,
                    self.max_frame,
                    to_the_end,
                    on,
                );
            }
        }
        Ok(!self.events.is_empty())
    }

    /// Turns until the clock has ended and `scenario` is settled, or until the hard deadline;
    /// until the end, a turn waits at most until the end. When spinning, the turns of the
    /// measured window that found nothing add their time to the tally's `idle`.
    pub(crate) fn run(&mut self, clock: &Clock, scenario: &mut impl Scenario) {
        loop {
            let now = Instant::now();
            if scenario.finished() || (now >= clock.end && scenario.settled()) {
                return;
            }
            if now >= clock.hard {
                let overdue = scenario.overdue();
                scenario.tally().error(overdue);
                return;
            }
            let until = if now < clock.end {
                clock.end
            } else {
                clock.hard
            };
            let until = scenario.wake_at().map_or(until, |at| at.min(until));
            match self.turn(until, &mut |tx, i, inbound| scenario.on(tx, i, inbound)) {
                Ok(false) if self.spin && clock.measured(now) => {
                    scenario.tally().idle += now.elapsed();
                }
                Ok(_) => {}
                Err(e) => {
                    scenario.tally().error(e);
                    return;
                }
            }
            scenario.after_turn(&mut self.tx);
        }
    }

    /// Sends a close frame (1000) on every socket still open, without waiting for answers.
    pub(crate) fn close_all(&mut self) {
        for i in 0..self.tx.conns.len() {
            let _ = self.tx.send(i, opcode::CLOSE, &1000u16.to_be_bytes());
            let _ = self.tx.flush(i);
        }
    }
}

/// Reads socket `i` until a read leaves room in the buffer, and hands on its whole frames.
/// With `to_the_end` (the event said the peer closed, or the socket failed), it reads on
/// until the end or the error shows: data that came with a FIN raises no second event.
fn read_ready(
    tx: &mut Sender,
    i: usize,
    buf: &mut [u8],
    cuts: &mut Vec<frames::Cut>,
    max_frame: usize,
    to_the_end: bool,
    on: &mut impl FnMut(&mut Sender, usize, Inbound<'_>),
) {
    loop {
        let conn = &mut tx.conns[i];
        let kept = conn.partial.len();
        buf[..kept].copy_from_slice(&conn.partial);
        let (read, ended) = match conn.stream.read(&mut buf[kept..]) {
            Ok(0) => (0, Some("the server closed the connection".to_string())),
            Ok(n) => (n, None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, None),
            // `partial` is still whole: copied again on the next try.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => (0, Some(format!("read: {e}"))),
        };
        conn.partial.clear();
        let filled = kept + read == buf.len();
        let end = kept + read;
        let mut at = 0;
        let mut failed = None;
        cuts.clear();
        while at < end {
            match frames::cut(&buf[at..end], max_frame) {
                Ok(Next::Frame(mut c)) => {
                    c.payload = at + c.payload.start..at + c.payload.end;
                    at += c.len;
                    cuts.push(c);
                }
                Ok(Next::Partial { .. }) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() {
            tx.conns[i].partial.extend_from_slice(&buf[at..end]);
        }
        for c in cuts.iter() {
            let payload = &buf[c.payload.clone()];
            match c.opcode {
                opcode::TEXT => on(tx, i, Inbound::Text(payload)),
                opcode::PING => {
                    if let Err(e) = tx.send(i, opcode::PONG, payload) {
                        on(tx, i, Inbound::Ended(e));
                        return;
                    }
                }
                opcode::CLOSE => {
                    let _ = tx.send(i, opcode::CLOSE, payload.get(..2).unwrap_or_default());
                    let _ = tx.flush(i);
                    tx.conns[i].ended = true;
                    on(tx, i, Inbound::Ended("the server closed the socket".into()));
                    return;
                }
                _ => {}
            }
        }
        if let Some(why) = failed.or(ended) {
            tx.conns[i].ended = true;
            on(tx, i, Inbound::Ended(why));
            return;
        }
        if read == 0 || !(filled || to_the_end) {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// A non-blocking client socket and the server's end of it, on 127.0.0.1.
    pub(crate) fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// A frame as a server sends it (unmasked, payload under 126 bytes).
    pub(crate) fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | op, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    /// Reads one masked client frame: (opcode, unmasked payload).
    pub(crate) fn client_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 6];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        s.read_exact(&mut payload).unwrap();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= head[2 + i % 4];
        }
        (head[0] & 0x0f, payload)
    }

    /// One turn of the loop: text frames are recorded and answered with `answer`.
    fn step(lp: &mut Loop, seen: &mut Vec<String>) {
        let soon = Instant::now() + Duration::from_millis(200);
        lp.turn(soon, &mut |tx, i, inbound| match inbound {
            Inbound::Text(p) => {
                seen.push(String::from_utf8(p.to_vec()).unwrap());
                tx.text(i, b"answer").unwrap();
            }
            Inbound::Ended(why) => seen.push(format!("ended: {why}")),
        })
        .unwrap();
    }

    /// Turns until `want` things were seen (at most 5 s).
    fn until(lp: &mut Loop, seen: &mut Vec<String>, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < want && Instant::now() < deadline {
            step(lp, seen);
        }
    }

    #[test]
    fn frames_in_pieces_pings_and_a_close_over_a_real_socket() {
        let (client, mut server) = connected();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut lp = Loop::from_std(vec![client], 1024, false).unwrap();

        // A text frame split mid-header and mid-payload, a ping, another text, in one go.
        let first = server_frame(opcode::TEXT, b"first frame");
        server.write_all(&first[..1]).unwrap();
        let mut seen = Vec::new();
        step(&mut lp, &mut seen);
        server.write_all(&first[1..5]).unwrap();
        step(&mut lp, &mut seen);
        assert!(seen.is_empty(), "no frame before it is whole: {seen:?}");
        let mut rest = first[5..].to_vec();
        rest.extend(server_frame(opcode::PING, b"are you there"));
        rest.extend(server_frame(opcode::TEXT, b"second"));
        server.write_all(&rest).unwrap();
        until(&mut lp, &mut seen, 2);
        assert_eq!(seen, ["first frame", "second"]);
        assert_eq!(
            client_frame(&mut server),
            (opcode::TEXT, b"answer".to_vec())
        );
        assert_eq!(
            client_frame(&mut server),
            (opcode::PONG, b"are you there".to_vec()),
            "the ping is answered in order"
        );
        assert_eq!(
            client_frame(&mut server),
            (opcode::TEXT, b"answer".to_vec())
        );

        // A close is answered with the same code, and ends the socket.
        server
            .write_all(&server_frame(opcode::CLOSE, &1001u16.to_be_bytes()))
            .unwrap();
        until(&mut lp, &mut seen, 3);
        assert_eq!(seen[2], "ended: the server closed the socket");
        assert_eq!(
            client_frame(&mut server),
            (opcode::CLOSE, 1001u16.to_be_bytes().to_vec())
        );
    }

    #[test]
    fn a_last_frame_that_comes_with_the_fin_is_read_and_the_end_seen() {
        let (client, mut server) = connected();
        server
            .write_all(&server_frame(opcode::TEXT, b"last words"))
            .unwrap();
        drop(server);
        // Both reach the client before it reads: one event, readable and read-closed.
        std::thread::sleep(Duration::from_millis(50));
        let mut lp = Loop::from_std(vec![client], 1024, false).unwrap();
        let mut seen = Vec::new();
        // Read only, as a broadcast subscriber does: an answer would draw a reset, and with
        // it an event of its own.
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 2 && Instant::now() < deadline {
            lp.turn(deadline, &mut |_, _, inbound| match inbound {
                Inbound::Text(p) => seen.push(String::from_utf8(p.to_vec()).unwrap()),
                Inbound::Ended(why) => seen.push(format!("ended: {why}")),
            })
            .unwrap();
        }
        assert_eq!(
            seen,
            ["last words", "ended: the server closed the connection"]
        );
    }

    #[test]
    fn an_oversized_frame_or_a_dropped_connection_ends_the_socket() {
        let mut ended = Vec::new();
        for oversized in [true, false] {
            let (client, mut server) = connected();
            let mut lp = Loop::from_std(vec![client], 100, false).unwrap();
            if oversized {
                let mut f = vec![0x81, 126];
                f.extend_from_slice(&200u16.to_be_bytes());
                server.write_all(&f).unwrap();
            } else {
                drop(server);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut why = None;
            while why.is_none() && Instant::now() < deadline {
                lp.turn(deadline, &mut |_, _, inbound| {
                    if let Inbound::Ended(w) = inbound {
                        why = Some(w);
                    }
                })
                .unwrap();
            }
            ended.push(why.expect("the socket ended"));
        }
        assert!(ended[0].contains("over the client's 100"), "{}", ended[0]);
        assert_eq!(ended[1], "the server closed the connection");
    }

    /// Records the text frames a run sees.
    #[derive(Default)]
    struct Record {
        seen: Vec<String>,
        tally: Tally,
    }

    impl Scenario for Record {
        fn on(&mut self, _: &mut Sender, _: usize, inbound: Inbound<'_>) {
            if let Inbound::Text(p) = inbound {
                self.seen.push(String::from_utf8_lossy(p).into_owned());
            }
        }
        fn settled(&self) -> bool {
            true
        }
        fn overdue(&self) -> String {
            String::new()
        }
        fn tally(&mut self) -> &mut Tally {
            &mut self.tally
        }
    }

    #[test]
    fn a_spinning_loop_still_reads_and_counts_its_empty_polls_as_idle() {
        for spin in [false, true] {
            let (client, mut server) = connected();
            let mut lp = Loop::from_std(vec![client], 1024, spin).unwrap();
            server
                .write_all(&server_frame(opcode::TEXT, b"hello"))
                .unwrap();
            let clock = Clock::start(0.0, 0.2);
            let mut record = Record::default();
            lp.run(&clock, &mut record);
            assert_eq!(record.seen, ["hello"], "spin {spin}");
            let idle = record.tally.idle;
            if spin {
                // One frame in 0.2 s: nearly every poll found nothing.
                assert!(
                    !idle.is_zero(),
                    "a spinning loop's empty polls are idle time"
                );
                assert!(
                    idle <= clock.end - clock.warm,
                    "only the window counts: {idle:?}"
                );
            } else {
                assert!(
                    idle.is_zero(),
                    "a sleeping loop is never idle by this count"
                );
            }
        }
    }
}
