//! The RFC 6455 codec, without I/O: bytes in, frames and whole messages out, and frames
//! encoded for the wire.
//!
//! [`Decoder`] is what every socket of the transport reads through: give it bytes as they
//! arrive, cut anywhere, and it hands back whole messages (fragments reassembled, text checked
//! as UTF-8 fragment by fragment, the size limit checked on each frame's header before its
//! payload is buffered), pings and pongs, and ends with the client's close frame or the first
//! protocol violation. It keeps bytes only while a frame is incomplete. Public so that it can
//! be fuzzed (`fuzz/fuzz_targets/frame_reader.rs`), benchmarked (`cargo bench -p
//! switchboard-bench -- codec`) and used by anyone who reads WebSocket frames from somewhere
//! else; [`encode_client_frame`] is the one masked-frame encoder the tests use.
//!
//! ```
//! use switchboard_transport::codec::{encode_client_frame, Decoder, Event, TEXT};
//!
//! let mut wire = encode_client_frame(true, TEXT, b"hello", [1, 2, 3, 4]);
//! let mut decoder = Decoder::new(1024);
//! let mut got = Vec::new();
//! let (first, rest) = wire.split_at_mut(3); // any cut
//! for piece in [first, rest] {
//!     decoder
//!         .feed(piece, &mut |event| {
//!             if let Event::Text(text) = event {
//!                 got.push(text.to_string());
//!             }
//!         })
//!         .unwrap();
//! }
//! assert_eq!(got, ["hello"]);
//! ```

use bytes::{Bytes, BytesMut};

pub use crate::frame::{
    encode_client_frame, encode_frame, parse_head, Head, Violation, BINARY, CLOSE, CONTINUATION,
    PING, PONG, TEXT,
};
use crate::frame::{Utf8Progress, INVALID_UTF8};

/// XORs `payload` with the 4-byte `mask` in place (RFC 6455 5.3): masks a client frame's
/// payload, or unmasks it. Word at a time (fastwebsockets' routine, behind our own name so
/// that no 0.x crate shows in this API).
#[inline]
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    fastwebsockets::unmask(payload, mask);
}

/// The most bytes a [`Decoder`] reserves ahead for one frame on the strength of its header
/// alone (a header may claim anything; beyond this the buffer grows as bytes arrive).
pub const MAX_RESERVE: usize = 16 * 1024;

/// What a [`Decoder`] hands on while the connection is open.
#[derive(Debug)]
pub enum Event<'a> {
    /// A whole text message that came in one frame, checked to be UTF-8, borrowed from the
    /// decoder's buffer: whoever only reads it (parses it) needs no copy.
    Text(&'a str),
    /// A whole message; a text message's bytes are valid UTF-8. Binary messages, and text
    /// messages that came in fragments.
    Message {
        /// A text message (else binary).
        text: bool,
        /// The message's bytes, unmasked.
        data: Bytes,
    },
    /// A ping with its payload, to be answered with a pong.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
}

/// Why decoding ended: the stream is over after either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer sent a valid close frame.
    Close {
        /// The frame's payload, to echo back.
        payload: Bytes,
        /// Its code (1005 when it had none).
        code: u16,
        /// Its reason.
        reason: String,
    },
    /// The peer broke the protocol; the connection must close with `code` (1002, 1007,
    /// 1009).
    Violation {
        /// The close code to send.
        code: u16,
        /// What was wrong.
        detail: String,
    },
}

impl From<Violation> for End {
    fn from((code, detail): Violation) -> Self {
        End::Violation {
            code,
            detail: detail.to_string(),
        }
    }
}

/// Client frames to messages, for one connection. See the module docs.
#[derive(Debug)]
pub struct Decoder {
    /// Bytes of an incomplete frame; unallocated while there is none.
    pending: BytesMut,
    messages: Assembler,
}

/// Frames to messages: reassembly of fragments and the size and UTF-8 checks.
#[derive(Debug)]
struct Assembler {
    max_message_size: usize,
    /// A fragmented message in progress: text?, bytes so far, UTF-8 checked so far. Boxed:
    /// most sockets never have one, and the decoder lives in every socket's task.
    partial: Option<Box<(bool, BytesMut, Utf8Progress)>>,
}

impl Decoder {
    /// A decoder that refuses messages over `max_message_size` bytes (1009).
    pub fn new(max_message_size: usize) -> Decoder {
        Decoder {
            pending: BytesMut::new(),
            messages: Assembler {
                max_message_size,
                partial: None,
            },
        }
    }

    /// A decoder that starts with `early` (bytes that came with the upgrade request) not
    /// decoded yet: the next [`Decoder::feed`] decodes them first.
    pub(crate) fn with_early(max_message_size: usize, early: &[u8]) -> Decoder {
        let mut decoder = Decoder::new(max_message_size);
        decoder.pending = BytesMut::from(early);
        decoder
    }

    /// Decodes `bytes` (the next ones of the stream; unmasked in place), calling `on` for
    /// every event they complete. An incomplete frame at the end is kept for the next call.
    /// After an `Err`, the stream is over and the decoder must not be fed again.
    pub fn feed(&mut self, bytes: &mut [u8], on: &mut dyn FnMut(Event<'_>)) -> Result<(), End> {
        if self.pending.is_empty() {
            // The common case: frames straight out of the caller's buffer.
            let used = parse(&mut self.messages, bytes, on)?;
            if used < bytes.len() {
                let rest = &bytes[used..];
                self.pending.reserve(frame_size_hint(rest).max(rest.len()));
                self.pending.extend_from_slice(rest);
            }
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        let used = parse(&mut self.messages, &mut self.pending[..], on)?;
        if used == self.pending.len() {
            self.pending = BytesMut::new(); // give the memory back while idle
        } else if used > 0 {
            // The rest moves to a buffer of its own size: after `advance` the old allocation
            // would stay whole while `capacity` (what a budget counts) no longer shows it.
            let rest = &self.pending[used..];
            let mut fresh = BytesMut::with_capacity(frame_size_hint(rest).max(rest.len()));
            fresh.extend_from_slice(rest);
            self.pending = fresh;
        }
        Ok(())
    }

    /// Bytes this decoder holds (allocated): an incomplete frame and a fragmented message so
    /// far.
    pub fn buffered(&self) -> usize {
        let partial = self
            .messages
            .partial
            .as_deref()
            .map_or(0, |(_, data, _)| data.capacity());
        self.pending.capacity() + partial
    }

    /// True when bytes wait that have not been decoded yet (see [`Decoder::with_early`]).
    pub(crate) fn has_undecoded(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The bytes of an incomplete frame, giving up the decoder (a closing socket looks for
    /// the client's close frame in them).
    pub(crate) fn into_undecoded(self) -> BytesMut {
        self.pending
    }
}

/// How many bytes to make room for, for the frame starting `buf`: its whole size when its
/// header is complete, so the pending buffer grows once rather than read by read, but no more
/// than [`MAX_RESERVE`]: the size is what the client *says*, and a header alone
/// must not make the server reserve a whole maximum-size message (beyond that the buffer
/// grows as the bytes actually arrive).
fn frame_size_hint(buf: &[u8]) -> usize {
    match parse_head(buf) {
        Ok(Some(head)) => head.size.saturating_add(head.len as usize).min(MAX_RESERVE),
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
) -> Result<usize, End> {
    let mut at = 0;
    while let Some(head) = parse_head(&buf[at..])? {
        if !head.is_control() {
            messages.check_size(&head)?;
        }
        let end = at + head.size + head.len as usize;
        if end > buf.len() {
            break;
        }
        let payload = &mut buf[at + head.size..end];
        unmask(payload, head.mask);
        messages.on_frame(&head, payload, on)?;
        at = end;
    }
    Ok(at)
}

impl Assembler {
    fn check_size(&self, head: &Head) -> Result<(), End> {
        let so_far = self.partial.as_deref().map_or(0, |(_, data, _)| data.len());
        if (so_far as u64).saturating_add(head.len) > self.max_message_size as u64 {
            return Err(End::Violation {
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
    ) -> Result<(), End> {
        match head.opcode {
            TEXT | BINARY if self.partial.is_some() => {
                Err((1002, "new message before the previous one finished").into())
            }
            TEXT | BINARY => {
                let text = head.opcode == TEXT;
                if text && head.fin {
                    let Ok(text) = std::str::from_utf8(payload) else {
                        return Err(INVALID_UTF8.into());
                    };
                    on(Event::Text(text));
                    return Ok(());
                }
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
            CONTINUATION => {
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
            PING => {
                on(Event::Ping(payload));
                Ok(())
            }
            PONG => {
                on(Event::Pong);
                Ok(())
            }
            CLOSE => {
                let (code, reason) = crate::frame::parse_close(payload)?;
                Err(End::Close {
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

    /// A client frame from its first byte (FIN, RSV bits, opcode as given) and payload.
    pub(crate) fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_client_frame(first & 0x80 != 0, first & 0x0F, payload, [9, 8, 7, 6]);
        out[0] = first;
        out
    }

    /// Feeds `bytes` to a decoder in chunks of `chunk`, the way reads would split them.
    fn feed(bytes: &[u8], chunk: usize, max: usize) -> (Vec<String>, Option<End>) {
        feed_cuts(bytes, &[chunk], max)
    }

    /// Feeds `bytes` in pieces of the given sizes (cycled), like reads of varying length.
    fn feed_cuts(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<String>, Option<End>) {
        let mut decoder = Decoder::new(max);
        let mut seen = Vec::new();
        let mut on = |e: Event<'_>| match e {
            Event::Text(t) => seen.push(format!("true:{t}")),
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
            if let Err(end) = decoder.feed(&mut piece.to_vec(), &mut on) {
                return (seen, Some(end));
            }
        }
        if decoder.pending.is_empty() {
            assert_eq!(decoder.buffered(), 0, "no memory kept between frames");
        }
        (seen, None)
    }

    fn outcome(end: &Option<End>) -> String {
        match end {
            None => "open".into(),
            Some(End::Violation { code, .. }) => format!("violation {code}"),
            Some(End::Close { code, .. }) => format!("close {code}"),
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
            matches!(end, Some(End::Violation { code: 1009, .. })),
            "{end:?}"
        );
        // Across fragments.
        let mut stream = masked(0x01, &[b'x'; 200]);
        stream.extend(masked(0x80, &[b'x'; 100]));
        let (_, end) = feed(&stream, 1024, 299);
        assert!(
            matches!(end, Some(End::Violation { code: 1009, .. })),
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
        assert!(matches!(end, Some(End::Violation { code: 1002, .. })));
        let mut stream = masked(0x01, b"a");
        stream.extend(masked(0x81, b"b"));
        let (_, end) = feed(&stream, 64, 100);
        assert!(matches!(end, Some(End::Violation { code: 1002, .. })));
        let (_, end) = feed(&masked(0x81, &[0xC3]), 64, 100);
        assert!(matches!(end, Some(End::Violation { code: 1007, .. })));
        let (_, end) = feed(&masked(0x88, &[0x03, 0xE8, b'b', b'y', b'e']), 2, 100);
        match end {
            Some(End::Close { code, reason, .. }) => {
                assert_eq!((code, &*reason), (1000, "bye"))
            }
            other => panic!("{other:?}"),
        }
    }
}
