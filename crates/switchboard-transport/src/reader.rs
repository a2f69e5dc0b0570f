//! The read side of a socket: bytes from the kernel to whole messages, through the
//! sans-IO [`Decoder`](crate::codec::Decoder).
//!
//! Reads go into one scratch buffer per thread, not one per socket; a socket keeps bytes of
//! its own only while a frame is incomplete (and frees them as soon as it completes). An
//! idle socket therefore holds no read buffer at all, which is most of what an idle
//! connection costs in libraries that keep a fixed 8 KiB buffer per socket.

use std::cell::RefCell;
use std::io;

use crate::wire::Wire;
use bytes::Bytes;

use crate::codec::{self, Decoder, End, Event};
use crate::frame;

/// Size of each thread's scratch buffer, and of one read.
const SCRATCH_LEN: usize = 16 * 1024;
/// Reads per wake-up before the socket lets other tasks run (it is woken again at once).
const READS_PER_WAKE: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
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

impl From<End> for ReadEnd {
    fn from(end: End) -> Self {
        match end {
            End::Close {
                payload,
                code,
                reason,
            } => ReadEnd::Close {
                payload,
                code,
                reason,
            },
            End::Violation { code, detail } => ReadEnd::Violation { code, detail },
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

/// One socket's read state: a [`Decoder`] fed from the socket.
#[derive(Debug)]
pub(crate) struct FrameReader {
    decoder: Decoder,
}

impl FrameReader {
    /// `early`: bytes the client sent right after its upgrade request, read with it.
    pub(crate) fn new(max_message_size: usize, early: Bytes) -> FrameReader {
        FrameReader {
            decoder: Decoder::with_early(max_message_size, &early),
        }
    }

    /// The reader for a closing socket, which only looks for the client's close frame: the
    /// message in progress is dropped, and what was read but not decoded yet goes through it.
    pub(crate) fn for_closing(self) -> CloseReader {
        let mut closing = CloseReader::default();
        if closing.consume(&self.decoder.into_undecoded()) {
            closing.done = true;
        }
        closing
    }

    /// Bytes this reader holds: an incomplete frame and a fragmented message so far.
    pub(crate) fn held(&self) -> usize {
        self.decoder.buffered()
    }

    /// Handles whatever the socket has: complete frames become events, an incomplete frame
    /// is kept for next time. After each read, `settle` is told how many bytes the reader
    /// holds; when it answers false (over the buffer budget), reading ends the socket.
    pub(crate) fn read(
        &mut self,
        stream: &Wire,
        on: &mut dyn FnMut(Event<'_>),
        settle: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Drained, ReadEnd> {
        if self.decoder.has_undecoded() {
            self.decoder.feed(&mut [], on)?;
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
        stream: &Wire,
        scratch: &mut [u8],
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<bool, ReadEnd> {
        let (n, drained) = match stream.read(scratch) {
            Ok((0, _)) => return Err(ReadEnd::Eof),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(ReadEnd::Io(e)),
        };
        self.decoder.feed(&mut scratch[..n], on)?;
        Ok(drained)
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
    pub(crate) fn read(&mut self, stream: &Wire) -> io::Result<Option<Drained>> {
        if self.done {
            return Ok(None);
        }
        for _ in 0..READS_PER_WAKE {
            let mut buf = [0u8; 4096];
            let (n, drained) = match stream.read(&mut buf) {
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
            match codec::parse_head(buf) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_client_frame;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        encode_client_frame(first & 0x80 != 0, first & 0x0F, payload, [9, 8, 7, 6])
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
}
