//! WebSocket framing for the load client's poll loop: a client frame written masked into a
//! buffer, and whole server frames cut out of the bytes read so far (RFC 6455 §5.2).
//!
//! The client needs only this much: servers send it small unmasked frames, and it sends text,
//! pong and close. Written by hand so that a frame costs no allocation and no copy beyond the
//! one read (fastwebsockets' reader keeps a buffer and a task per socket).

/// Opcodes the client sends or reads.
pub mod opcode {
    /// A text frame.
    pub const TEXT: u8 = 0x1;
    /// A close frame.
    pub const CLOSE: u8 = 0x8;
    /// A ping frame.
    pub const PING: u8 = 0x9;
    /// A pong frame.
    pub const PONG: u8 = 0xA;
}

/// Appends one final, masked client frame of `opcode` carrying `payload` to `out`.
pub fn push_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], key: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}

/// A whole server frame found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The frame's opcode.
    pub opcode: u8,
    /// Where its payload lies in the buffer.
    pub payload: std::ops::Range<usize>,
    /// The frame's whole length (header and payload): where the next one starts.
    pub len: usize,
}

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole frame.
    Frame(Cut),
    /// The start of a frame whose whole length is not known yet, or is known and not all here;
    /// `need` is that length when known.
    Partial {
        /// The frame's whole length, once its header is here.
        need: Option<usize>,
    },
}

/// Cuts the frame at the start of `buf`. Refuses what a server must not send the client here:
/// a masked frame, a fragment (every server sends the bench's small messages whole), reserved
/// bits, or a frame longer than `max` bytes.
pub fn cut(buf: &[u8], max: usize) -> Result<Next, String> {
    let Some(&[b0, b1]) = buf.get(..2) else {
        return Ok(Next::Partial { need: None });
    };
    if b0 & 0x80 == 0 {
        return Err("a fragmented frame (FIN not set)".into());
    }
    if b0 & 0x70 != 0 {
        return Err(format!("reserved bits set: {b0:#04x}"));
    }
    if b1 & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    let (head, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(Next::Partial { need: None }),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            None => return Ok(Next::Partial { need: None }),
        },
        n => (2, u64::from(n)),
    };
    let whole = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(head))
        .filter(|&w| w <= max)
        .ok_or_else(|| format!("a frame of {len} bytes, over the client's {max}"))?;
    if buf.len() < whole {
        return Ok(Next::Partial { need: Some(whole) });
    }
    Ok(Next::Frame(Cut {
        opcode: b0 & 0x0f,
        payload: head..whole,
        len: whole,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_of_every_header_size_are_cut_whole_and_only_whole() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = server_frame(opcode::TEXT, &payload);
            let whole = buf.len();
            buf.extend_from_slice(&server_frame(opcode::PING, b"next"));
            for short in [0, 1, 3, whole - 1].into_iter().filter(|&s| s < whole) {
                assert!(
                    matches!(cut(&buf[..short], 1 << 20), Ok(Next::Partial { .. })),
                    "{len}: {short} bytes are not a frame"
                );
            }
            let Ok(Next::Frame(c)) = cut(&buf, 1 << 20) else {
                panic!("{len}: no frame");
            };
            assert_eq!((c.opcode, c.len), (opcode::TEXT, whole));
            assert_eq!(&buf[c.payload], &payload[..]);
            let Ok(Next::Frame(next)) = cut(&buf[whole..], 1 << 20) else {
                panic!("{len}: the next frame");
            };
            assert_eq!(&buf[whole..][next.payload], b"next");
        }
    }

    #[test]
    fn a_partial_frame_names_its_length_once_its_header_is_in() {
        let buf = server_frame(opcode::TEXT, &[b'x'; 300]);
        assert_eq!(
            cut(&buf[..3], 1 << 20),
            Ok(Next::Partial { need: None }),
            "the 16-bit length is not all here"
        );
        assert_eq!(
            cut(&buf[..10], 1 << 20),
            Ok(Next::Partial { need: Some(304) })
        );
    }

    #[test]
    fn what_a_server_must_not_send_is_refused() {
        assert!(cut(&[0x01, 0x00], 100).unwrap_err().contains("FIN"));
        assert!(cut(&[0xC1, 0x00], 100).unwrap_err().contains("reserved"));
        assert!(cut(&[0x81, 0x80, 0, 0, 0, 0], 100)
            .unwrap_err()
            .contains("masked"));
        let big = server_frame(opcode::TEXT, &[0; 200]);
        assert!(cut(&big, 100)
            .unwrap_err()
            .contains("over the client's 100"));
        let absurd = [0x81, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(cut(&absurd, usize::MAX).is_err(), "no overflow");
    }

    #[test]
    fn a_masked_client_frame_unmasks_to_its_payload() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = vec![0xAA];
            push_masked(&mut out, opcode::TEXT, &payload, key);
            let f = &out[1..];
            assert_eq!(f[0], 0x81);
            assert_eq!(f[1] & 0x80, 0x80, "masked");
            let (head, declared) = match f[1] & 0x7f {
                126 => (4, u16::from_be_bytes([f[2], f[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(f[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            assert_eq!(declared, len);
            assert_eq!(&f[head..head + 4], &key);
            let unmasked: Vec<u8> = f[head + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }
}
