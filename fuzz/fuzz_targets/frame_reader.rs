//! `switchboard_transport::codec::Decoder` on arbitrary byte streams cut at arbitrary points:
//! it must never panic, must hand out the same events and end the same way however the
//! stream is cut (one piece, or the pieces the fuzzer chose), never hand out a message over
//! the limit or a text message that is not UTF-8, and hold no bytes between whole frames.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_transport::codec::{Decoder, End, Event};

const MAX_MESSAGE: usize = 1024;

/// Decodes `stream` in pieces of the sizes in `cuts` (cycled; empty: one piece).
fn decode(stream: &[u8], cuts: &[u8]) -> (Vec<String>, Option<End>) {
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut seen = Vec::new();
    let mut on = |event: Event<'_>| match event {
        // A text message in one frame, lent: recorded as the same message in fragments
        // would be, so that the events compare however the frames came.
        Event::Text(text) => {
            assert!(text.len() <= MAX_MESSAGE, "a message over the limit");
            seen.push(format!("true:{:?}", text.as_bytes()));
        }
        Event::Message { text, data } => {
            assert!(data.len() <= MAX_MESSAGE, "a message over the limit");
            if text {
                assert!(std::str::from_utf8(&data).is_ok(), "text that is not UTF-8");
            }
            seen.push(format!("{text}:{:?}", &data[..]));
        }
        Event::Ping(payload) => {
            assert!(payload.len() <= 125, "a ping over 125 bytes");
            seen.push(format!("ping:{payload:?}"));
        }
        Event::Pong => seen.push("pong".into()),
    };
    let mut rest = stream;
    let mut sizes = cuts.iter().map(|c| usize::from(*c).max(1)).cycle();
    while !rest.is_empty() {
        let size = if cuts.is_empty() {
            rest.len()
        } else {
            sizes.next().unwrap_or(1)
        };
        let (piece, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        if let Err(end) = decoder.feed(&mut piece.to_vec(), &mut on) {
            return (seen, Some(end));
        }
    }
    (seen, None)
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (cuts, stream) = input;
    let (whole, whole_end) = decode(&stream, &[]);
    let (split, split_end) = decode(&stream, &cuts);
    assert_eq!(whole, split, "the cut changed the events");
    assert_eq!(whole_end, split_end, "the cut changed the ending");
    if let Some(End::Violation { code, .. }) = whole_end {
        assert!(
            matches!(code, 1002 | 1007 | 1009),
            "unexpected close code {code}"
        );
    }
});
