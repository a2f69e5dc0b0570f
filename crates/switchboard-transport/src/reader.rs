//! The read side of a socket: bytes from the kernel to whole messages.
//!
//! Reads go into one scratch buffer per thread, not one per socket; a socket keeps bytes of
//! its own only while a frame is incomplete (and frees them as soon as it completes). An
//! idle socket therefore holds no read buffer at all, which is most of what an idle
//! connection costs in libraries that keep a fixed 8 KiB buffer per socket.

use std::cell::RefCell;
use std::io::{self, Read};

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::frame::{self, Head, Utf8Progress, Violation};

/// Size of each thread's scratch buffer, and of one read.
const SCRATCH_LEN: usize = 16 * 1024;
/// Reads per wake-up before the socket lets other tasks run (it is woken again at once).
const READS_PER_WAKE: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// What the reader hands on while the connection is open.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// A whole message; a text message's bytes are valid UTF-8.
    Message { text: bool, data: Bytes },
    /// A ping with its payload, to be answered with a pong.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
}

/// Why reading stopped for good.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The peer closed the TCP connection without a close frame.
    Eof,
    /// Reading failed.
    Io(io::Error),
    /// The peer sent a valid close frame.
    Close {
        payload: Bytes,
        code: u16,
        reason: String,
    },
    /// The peer broke the protocol; the connection must close with `code`.
    Violation { code: u16, detail: String },
    /// Buffering what the peer sent would take the server past its buffer budget.
    OverBudget,
}

impl From<Violation> for ReadEnd {
    fn from((code, detail): Violation) -> Self {
        ReadEnd::Violation {
            code,
            detail: detail.to_string(),
        }
    }
}

/// Whether the socket has more to read right now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The kernel has nothing more: wait for readiness.
    Yes,
    /// Stopped after [`READS_PER_WAKE`] reads to be fair; call again.
    No,
}

/// One socket's read state.
#[derive(Debug)]
pub(crate) struct FrameReader {
    /// Bytes of an incomplete frame; unallocated while there is none.
    pending: BytesMut,
    messages: Assembler,
}

/// Frames to messages: reassembly of fragments and the size and UTF-8 checks.
#[derive(Debug)]
struct Assembler {
    max_message_size: usize,
    /// A fragmented message in progress: text?, bytes so far, UTF-8 checked so far. Boxed:
    /// most sockets never have one, and the reader lives in every socket's task.
    partial: Option<Box<(bool, BytesMut, Utf8Progress)>>,
}

impl FrameReader {
    /// `early`: bytes the client sent right after its upgrade request, read with it.
    pub(crate) fn new(max_message_size: usize, early: Bytes) -> FrameReader {
        FrameReader {
            pending: BytesMut::from(&early[..]),
            messages: Assembler {
                max_message_size,
                partial: None,
            },
        }
    }

    /// The reader for a closing socket, which only looks for the client's close frame: the
    /// message in progress is dropped, and what was read but not parsed yet goes through it.
    pub(crate) fn for_closing(self) -> CloseReader {
        let mut closing = CloseReader::default();
        if closing.consume(&self.pending) {
            closing.done = true;
        }
        closing
    }

    /// Bytes this reader holds: an incomplete frame and a fragmented message so far.
    pub(crate) fn held(&self) -> usize {
        let partial = self
            .messages
            .partial
            .as_deref()
            .map_or(0, |(_, data, _)| data.capacity());
        self.pending.capacity() + partial
    }

    /// Handles whatever the socket has: complete frames become events, an incomplete frame
    /// is kept for next time. After each read, `settle` is told how many bytes the reader
    /// holds; when it answers false (over the buffer budget), reading ends the socket.
    pub(crate) fn read(
        &mut self,
        stream: &TcpStream,
        on: &mut dyn FnMut(Event<'_>),
        settle: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Drained, ReadEnd> {
        if !self.pending.is_empty() {
            self.parse_pending(on)?;
        }
        for _ in 0..READS_PER_WAKE {
            // A nested call (a service that reads another socket from `on`, which nothing
            // here does) would find the scratch borrowed; it gets a buffer of its own.
            let done = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => self.read_once(stream, &mut scratch, on),
                Err(_) => self.read_once(stream, &mut vec![0; SCRATCH_LEN], on),
            })?;
            if !settle(self.held()) {
                return Err(ReadEnd::OverBudget);
            }
            if done {
                return Ok(Drained::Yes);
            }
        }
        Ok(Drained::No)
    }

    /// One `read` into `scratch`; true when the kernel had nothing.
    fn read_once(
        &mut self,
        stream: &TcpStream,
        scratch: &mut [u8],
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<bool, ReadEnd> {
        let (n, drained) = match read_ready(stream, scratch) {
            Ok((0, _)) => return Err(ReadEnd::Eof),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(ReadEnd::Io(e)),
        };
        if self.pending.is_empty() {
            // The common case: frames straight out of the scratch buffer.
            let used = parse(&mut self.messages, &mut scratch[..n], on)?;
            if used < n {
                let rest = &scratch[used..n];
                self.pending.reserve(frame_size_hint(rest).max(rest.len()));
                self.pending.extend_from_slice(rest);
            }
        } else {
            self.pending.extend_from_slice(&scratch[..n]);
            self.parse_pending(on)?;
        }
        Ok(drained)
    }

    fn parse_pending(&mut self, on: &mut dyn FnMut(Event<'_>)) -> Result<(), ReadEnd> {
        let used = parse(&mut self.messages, &mut self.pending[..], on)?;
        if used == self.pending.len() {
            self.pending = BytesMut::new(); // give the memory back while idle
        } else if used > 0 {
            // The rest moves to a buffer of its own size: after `advance` the old allocation
            // would stay whole while `capacity` (what the budget counts) no longer shows it.
            let rest = &self.pending[used..];
            let mut fresh = BytesMut::with_capacity(frame_size_hint(rest).max(rest.len()));
            fresh.extend_from_slice(rest);
            self.pending = fresh;
        }
        Ok(())
    }
}

/// Reads a closing socket until the client's close frame, the end of the connection or a
/// protocol error. Data frames that cross the close are skipped as their bytes arrive,
/// without being kept, so the reader holds at most one control frame and a header (about 140
/// bytes) while it waits.
#[derive(Debug, Default)]
pub(crate) struct CloseReader {
    /// An incomplete header or control frame.
    pending: Vec<u8>,
    /// Payload bytes of a data frame still to skip.
    skip: u64,
    /// The wait is over.
    done: bool,
}

impl CloseReader {
    /// Reads what the socket has; `Ok(true)` once the wait is over.
    pub(crate) fn read(&mut self, stream: &TcpStream) -> io::Result<Option<Drained>> {
        if self.done {
            return Ok(None);
        }
        for _ in 0..READS_PER_WAKE {
            let mut buf = [0u8; 4096];
            let (n, drained) = match read_ready(stream, &mut buf) {
                Ok((0, _)) => return Ok(None),
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Drained::Yes)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if self.consume(&buf[..n]) {
                self.done = true;
                return Ok(None);
            }
            if drained {
                return Ok(Some(Drained::Yes));
            }
        }
        Ok(Some(Drained::No))
    }

    /// Takes `bytes` in; true when a close frame or a protocol error ends the wait.
    fn consume(&mut self, bytes: &[u8]) -> bool {
        // A header or control frame may straddle reads: what is left of one waits in
        // `pending` and goes first.
        let joined;
        let mut buf: &[u8] = if self.pending.is_empty() {
            bytes
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(bytes);
            joined = pending;
            &joined
        };
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len() as u64) as usize;
                self.skip -= n as u64;
                buf = &buf[n..];
            }
            if buf.is_empty() {
                return false;
            }
            match frame::parse_head(buf) {
                Err(_) => return true,
                Ok(None) => {
                    self.pending = buf.to_vec();
                    return false;
                }
                Ok(Some(head)) if !head.is_control() => {
                    self.skip = head.len;
                    buf = &buf[head.size..];
                }
                Ok(Some(head)) => {
                    let end = head.size + head.len as usize;
                    if buf.len() < end {
                        self.pending = buf.to_vec();
                        return false;
                    }
                    if head.opcode == frame::CLOSE {
                        return true;
                    }
                    buf = &buf[end..];
                }
            }
        }
    }
}

/// Reads once; returns the bytes read and whether that emptied the kernel's buffer.
///
/// A read shorter than `buf` got everything the kernel had, so the socket's readiness is
/// cleared there and then (tokio's own `poll_read` does the same), instead of learning it
/// from one more `read` that fails with `WouldBlock`: that saves a system call per wake-up,
/// which for small request/response traffic is a third of them. The readiness cleared is the
/// one seen before the read, so data arriving after it still wakes the socket.
fn read_ready(stream: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut short = 0;
    let read = stream.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into()); // makes try_io clear the readiness
        }
        Ok(n)
    });
    match read {
        Ok(n) => Ok((n, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        Err(e) => Err(e),
    }
}

/// How many bytes to make room for, for the frame starting `buf`: its whole size when its
/// header is complete, so the pending buffer grows once rather than read by read, but no more
/// than one scratch buffer's worth: the size is what the client *says*, and a header alone
/// must not make the server reserve a whole maximum-size message (beyond that the buffer
/// grows as the bytes actually arrive).
fn frame_size_hint(buf: &[u8]) -> usize {
    match frame::parse_head(buf) {
        Ok(Some(head)) => head.size.saturating_add(head.len as usize).min(SCRATCH_LEN),
        _ => 0,
    }
}

/// Handles every complete frame at the start of `buf` (unmasking in place); returns how many
/// bytes they took. A data frame's declared size is checked against the message limit
/// before its payload has arrived, so an oversized message is refused without buffering it.
fn parse(
    messages: &mut Assembler,
    buf: &mut [u8],
    on: &mut dyn FnMut(Event<'_>),
) -> Result<usize, ReadEnd> {
    let mut at = 0;
    while let Some(head) = frame::parse_head(&buf[at..])? {
        if !head.is_control() {
            messages.check_size(&head)?;
        }
        let end = at + head.size + head.len as usize;
        if end > buf.len() {
            break;
        }
        let payload = &mut buf[at + head.size..end];
        fastwebsockets::unmask(payload, head.mask);
        messages.on_frame(&head, payload, on)?;
        at = end;
    }
    Ok(at)
}

impl Assembler {
    fn check_size(&self, head: &Head) -> Result<(), ReadEnd> {
        let so_far = self.partial.as_deref().map_or(0, |(_, data, _)| data.len());
        if (so_far as u64).saturating_add(head.len) > self.max_message_size as u64 {
            return Err(ReadEnd::Violation {
                code: 1009,
                detail: format!("message too big (limit {} bytes)", self.max_message_size),
            });
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        head: &Head,
        payload: &[u8],
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), ReadEnd> {
        match head.opcode {
            frame::TEXT | frame::BINARY if self.partial.is_some() => {
                Err((1002, "new message before the previous one finished").into())
            }
            frame::TEXT | frame::BINARY => {
                let text = head.opcode == frame::TEXT;
                let mut utf8 = Utf8Progress::default();
                if text {
                    utf8.check(payload, head.fin)?;
                }
                if head.fin {
                    let data = Bytes::copy_from_slice(payload);
                    on(Event::Message { text, data });
                } else {
                    self.partial = Some(Box::new((text, BytesMut::from(payload), utf8)));
                }
                Ok(())
            }
            frame::CONTINUATION => {
                let Some((text, data, utf8)) = self.partial.as_deref_mut() else {
                    return Err((1002, "continuation frame without a message").into());
                };
                data.extend_from_slice(payload);
                if *text {
                    utf8.check(data, head.fin)?;
                }
                if head.fin {
                    let (text, data, _) = *self.partial.take().expect("checked above");
                    on(Event::Message {
                        text,
                        data: data.freeze(),
                    });
                }
                Ok(())
            }
            frame::PING => {
                on(Event::Ping(payload));
                Ok(())
            }
            frame::PONG => {
                on(Event::Pong);
                Ok(())
            }
            frame::CLOSE => {
                let (code, reason) = frame::parse_close(payload)?;
                Err(ReadEnd::Close {
                    payload: Bytes::copy_from_slice(payload),
                    code,
                    reason,
                })
            }
            _ => unreachable!("parse_head rejects reserved opcodes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `bytes` through `parse` in chunks of `chunk`, the way reads would split them.
    fn feed(bytes: &[u8], chunk: usize, max: usize) -> (Vec<String>, Option<ReadEnd>) {
        feed_cuts(bytes, &[chunk], max)
    }

    /// Feeds `bytes` in pieces of the given sizes (cycled), like reads of varying length.
    fn feed_cuts(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<String>, Option<ReadEnd>) {
        let mut reader = FrameReader::new(max, Bytes::new());
        let mut seen = Vec::new();
        let mut on = |e: Event<'_>| match e {
            Event::Message { text, data } => {
                seen.push(format!("{}:{}", text, String::from_utf8_lossy(&data)))
            }
            Event::Ping(p) => seen.push(format!("ping:{}", String::from_utf8_lossy(p))),
            Event::Pong => seen.push("pong".into()),
        };
        let mut rest = bytes;
        for &cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at(cut.clamp(1, rest.len()));
            rest = after;
            reader.pending.extend_from_slice(piece);
            if let Err(end) = reader.parse_pending(&mut on) {
                return (seen, Some(end));
            }
        }
        if reader.pending.is_empty() {
            assert_eq!(
                reader.pending.capacity(),
                0,
                "no memory kept between frames"
            );
        }
        (seen, None)
    }

    fn outcome(end: &Option<ReadEnd>) -> String {
        match end {
            None => "open".into(),
            Some(ReadEnd::Violation { code, .. }) => format!("violation {code}"),
            Some(ReadEnd::Close { code, .. }) => format!("close {code}"),
            Some(other) => format!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// Any bytes, cut anywhere: no panic, and the same messages and the same ending as
        /// when they arrive in one piece. The frames are built from random headers (any
        /// opcode, RSV bits, mask bit and length form) and random payloads, so they cover
        /// valid and invalid streams alike.
        #[test]
        fn any_stream_cut_anywhere_parses_as_a_whole(
            frames in proptest::collection::vec(
                (0u8..=255, proptest::bool::ANY, proptest::collection::vec(0u8..=255, 0..300)),
                0..12,
            ),
            garbage in proptest::collection::vec(0u8..=255, 0..16),
            cuts in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let mut stream = Vec::new();
            for (first, text, payload) in &frames {
                // Mostly well-formed data/control frames, sometimes any first byte.
                let first = if first % 4 == 0 { *first } else { (first & 0x80) | if *text { 1 } else { first & 0x0F } };
                stream.extend(masked(first, payload));
            }
            stream.extend(&garbage);
            let (whole, whole_end) = feed_cuts(&stream, &[stream.len().max(1)], 256);
            let (split, split_end) = feed_cuts(&stream, &cuts, 256);
            proptest::prop_assert_eq!(whole, split);
            proptest::prop_assert_eq!(outcome(&whole_end), outcome(&split_end));
        }
    }

    #[test]
    fn a_closing_reader_skips_data_keeps_nothing_and_stops_at_the_close_frame() {
        let mut stream = masked(0x81, &[b'x'; 300]); // a message crossing our close
        stream.extend(masked(0x89, b"ping"));
        stream.extend(masked(0x01, &[b'y'; 60_000])); // a big fragment, skipped as it comes
        stream.extend(masked(0x88, &[0x03, 0xe8]));
        for chunk in [1, 7, 100, 4096, stream.len()] {
            let mut r = CloseReader::default();
            let mut done = false;
            for piece in stream.chunks(chunk) {
                assert!(!done, "chunk {chunk}: nothing after the close frame");
                done = r.consume(piece);
                assert!(
                    r.pending.len() <= 14 + 125,
                    "chunk {chunk}: holds {}",
                    r.pending.len()
                );
            }
            assert!(done, "chunk {chunk}");
        }
        // A protocol error ends the wait too.
        assert!(
            CloseReader::default().consume(&[0x81, 0x05, b'x']),
            "unmasked"
        );
    }

    #[test]
    fn messages_survive_any_split_of_the_byte_stream() {
        let mut stream = masked(0x81, b"hello");
        stream.extend(masked(0x89, b"p"));
        stream.extend(masked(0x02, b"bi")); // binary, not final
        stream.extend(masked(0x8A, b"")); // pong between fragments
        stream.extend(masked(0x80, b"n")); // final continuation
        stream.extend(masked(0x81, &[b'x'; 300]));
        for chunk in [1, 2, 3, 7, 64, 1024] {
            let (seen, end) = feed(&stream, chunk, 1000);
            assert!(end.is_none(), "chunk {chunk}: {end:?}");
            assert_eq!(
                seen,
                [
                    "true:hello".to_string(),
                    "ping:p".into(),
                    "pong".into(),
                    "false:bin".into(),
                    format!("true:{}", "x".repeat(300)),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn an_oversized_message_fails_on_its_header() {
        let stream = masked(0x81, &[b'x'; 300]);
        // Only the header has arrived, and the limit is already known to be exceeded.
        let (_, end) = feed(&stream[..8], 8, 299);
        assert!(
            matches!(end, Some(ReadEnd::Violation { code: 1009, .. })),
            "{end:?}"
        );
        // Across fragments.
        let mut stream = masked(0x01, &[b'x'; 200]);
        stream.extend(masked(0x80, &[b'x'; 100]));
        let (_, end) = feed(&stream, 1024, 299);
        assert!(
            matches!(end, Some(ReadEnd::Violation { code: 1009, .. })),
            "{end:?}"
        );
        let (seen, end) = feed(&stream, 1024, 300);
        assert!(
            end.is_none() && seen.len() == 1,
            "exactly the limit is allowed"
        );
    }

    #[test]
    fn sequencing_errors_and_close() {
        let (_, end) = feed(&masked(0x80, b"x"), 64, 100);
        assert!(matches!(end, Some(ReadEnd::Violation { code: 1002, .. })));
        let mut stream = masked(0x01, b"a");
        stream.extend(masked(0x81, b"b"));
        let (_, end) = feed(&stream, 64, 100);
        assert!(matches!(end, Some(ReadEnd::Violation { code: 1002, .. })));
        let (_, end) = feed(&masked(0x81, &[0xC3]), 64, 100);
        assert!(matches!(end, Some(ReadEnd::Violation { code: 1007, .. })));
        let (_, end) = feed(&masked(0x88, &[0x03, 0xE8, b'b', b'y', b'e']), 2, 100);
        match end {
            Some(ReadEnd::Close { code, reason, .. }) => {
                assert_eq!((code, &*reason), (1000, "bye"))
            }
            other => panic!("{other:?}"),
        }
    }
}
