//! WebSocket frames (RFC 6455 section 5) as the server sees them: parsing a client frame's
//! header, encoding a server frame's header, and the checks a close frame's payload must
//! pass. Pure functions over byte slices; the socket code decides when to call them.

use bytes::BytesMut;

/// Opcodes (RFC 6455 5.2): continuation.
pub const CONTINUATION: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping.
pub const PING: u8 = 0x9;
/// Pong.
pub const PONG: u8 = 0xA;

/// The longest header a server frame has (no mask): 2 bytes + a 64-bit length.
pub(crate) const MAX_SERVER_HEAD: usize = 10;

/// A protocol violation: the close code to send and what was wrong.
pub type Violation = (u16, &'static str);

/// The header of one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The final frame of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: u8,
    /// The masking key.
    pub mask: [u8; 4],
    /// Payload length in bytes.
    pub len: u64,
    /// Header length in bytes (where the payload starts).
    pub size: usize,
}

impl Head {
    /// A control frame (close, ping, pong).
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed.
///
/// Rejects what RFC 6455 says a server must fail the connection for, with `1002`: reserved
/// bits set (no extension is ever negotiated), reserved opcodes, unmasked client frames,
/// fragmented or over-125-byte control frames, and lengths with the top bit set.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Violation> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err((1002, "reserved bits set without an extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err((1002, "reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err((1002, "client frame not masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len >> 63 != 0 {
        return Err((1002, "frame length with the most significant bit set"));
    }
    if opcode & 0x8 != 0 {
        if !fin {
            return Err((1002, "fragmented control frame"));
        }
        if len > 125 {
            return Err((1002, "control frame payload over 125 bytes"));
        }
    }
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        len,
        size: at + 4,
    }))
}

/// Writes the header of a final, unmasked (server) frame into `out`; returns its length.
pub(crate) fn encode_head(opcode: u8, len: usize, out: &mut [u8; MAX_SERVER_HEAD]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The length of a server frame's header for a payload of `len` bytes.
pub(crate) fn head_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// A whole client frame: masked with `mask`, as a client must send it (RFC 6455 5.3). For
/// clients and tests; a server sends [`encode_frame`]'s unmasked frames.
pub fn encode_client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(u8::from(fin) << 7 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Appends a whole server frame (final, unmasked) to `buf`.
pub fn encode_frame(opcode: u8, payload: &[u8], buf: &mut BytesMut) {
    let mut head = [0u8; MAX_SERVER_HEAD];
    let n = encode_head(opcode, payload.len(), &mut head);
    buf.reserve(n + payload.len());
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(payload);
}

/// The code and reason of a client's close frame, or why the frame is invalid: a one-byte
/// payload or a code no endpoint may send is `1002`, a reason that is not UTF-8 is `1007`.
pub(crate) fn parse_close(payload: &[u8]) -> Result<(u16, String), Violation> {
    match payload {
        [] => Ok((1005, String::new())),
        [_] => Err((1002, "close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_received_close_code(code) {
                return Err((1002, "invalid close code"));
            }
            match std::str::from_utf8(reason) {
                Ok(reason) => Ok((code, reason.to_string())),
                Err(_) => Err((1007, "close reason is not UTF-8")),
            }
        }
    }
}

/// Codes a peer may put in a close frame: the defined ones except those reserved for
/// reporting (1004-1006, 1015), and the registered and private ranges.
fn is_valid_received_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A text message that is not UTF-8: close with 1007.
pub(crate) const INVALID_UTF8: Violation = (1007, "invalid UTF-8 in text message");

/// Checks a text message's UTF-8 as its fragments arrive, so an invalid sequence fails the
/// connection at the fragment that contains it rather than at the end of the message.
#[derive(Debug, Default)]
pub(crate) struct Utf8Progress {
    /// Bytes known to be complete, valid UTF-8.
    valid_up_to: usize,
}

impl Utf8Progress {
    /// Checks the bytes of `message` after those already checked. `fin`: this is the whole
    /// message, so an incomplete sequence at the end is an error too.
    pub(crate) fn check(&mut self, message: &[u8], fin: bool) -> Result<(), Violation> {
        const INVALID: Violation = INVALID_UTF8;
        match std::str::from_utf8(&message[self.valid_up_to..]) {
            Ok(_) => {
                self.valid_up_to = message.len();
                Ok(())
            }
            // An incomplete sequence at the end may be completed by the next fragment.
            Err(e) if e.error_len().is_none() && !fin => {
                self.valid_up_to += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(INVALID),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_length_forms_and_waits_for_missing_bytes() {
        for len in [0, 125, 126, 65535, 65536] {
            let frame = encode_client_frame(true, TEXT, &vec![b'a'; len], [1, 2, 3, 4]);
            let head = parse_head(&frame).unwrap().unwrap();
            assert_eq!((head.fin, head.opcode, head.len), (true, TEXT, len as u64));
            assert_eq!(head.size + len, frame.len());
            assert_eq!(head.mask, [1, 2, 3, 4]);
            for cut in 0..head.size {
                assert_eq!(parse_head(&frame[..cut]), Ok(None), "len {len}, cut {cut}");
            }
        }
    }

    #[test]
    fn rejects_what_the_rfc_says_to_fail() {
        let cases: [(&[u8], u16); 7] = [
            (&[0x91, 0x80, 0, 0, 0, 0], 1002),         // RSV1
            (&[0x83, 0x80, 0, 0, 0, 0], 1002),         // reserved data opcode
            (&[0x8B, 0x80, 0, 0, 0, 0], 1002),         // reserved control opcode
            (&[0x81, 0x00], 1002),                     // unmasked
            (&[0x09, 0x80, 0, 0, 0, 0], 1002),         // fragmented ping
            (&[0x89, 0xFE, 0, 126, 0, 0, 0, 0], 1002), // 126-byte ping
            (&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1002), // top bit
        ];
        for (bytes, code) in cases {
            assert_eq!(parse_head(bytes).unwrap_err().0, code, "{bytes:02x?}");
        }
    }

    #[test]
    fn encodes_headers_at_each_length_boundary() {
        for (len, size) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut head = [0u8; MAX_SERVER_HEAD];
            assert_eq!(encode_head(TEXT, len, &mut head), size, "len {len}");
            assert_eq!(head[0], 0x81);
        }
        let mut buf = BytesMut::new();
        encode_frame(CLOSE, &[0x03, 0xE8], &mut buf);
        assert_eq!(buf[..], [0x88, 2, 0x03, 0xE8]);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(b""), Ok((1005, String::new())));
        assert_eq!(
            parse_close(&[0x03, 0xE8, b'o', b'k']),
            Ok((1000, "ok".into()))
        );
        assert_eq!(parse_close(&[0x03]).unwrap_err().0, 1002);
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()).unwrap_err().0,
                1002,
                "{bad}"
            );
        }
        for good in [1000u16, 1003, 1007, 1011, 1012, 3000, 4999] {
            assert!(parse_close(&good.to_be_bytes()).is_ok(), "{good}");
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]).unwrap_err().0, 1007);
    }

    #[test]
    fn utf8_is_checked_across_fragments_and_fails_fast() {
        let euro = "€".as_bytes(); // three bytes
        let mut progress = Utf8Progress::default();
        let mut message = b"ab".to_vec();
        message.push(euro[0]);
        assert!(
            progress.check(&message, false).is_ok(),
            "split sequence waits"
        );
        message.extend_from_slice(&euro[1..]);
        assert!(progress.check(&message, true).is_ok());

        let mut progress = Utf8Progress::default();
        assert!(
            progress.check(&[euro[0]], true).is_err(),
            "incomplete at the end"
        );
        let mut progress = Utf8Progress::default();
        assert!(
            progress.check(&[b'a', 0xFF], false).is_err(),
            "fails before fin"
        );
    }
}
