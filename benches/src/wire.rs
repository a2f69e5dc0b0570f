//! The bench messages: JSON templates with a stamped payload string, and reading the stamp
//! back from whatever frame a server sends.
//!
//! A payload is `STAMP_LEN` hex digits (send time in ns since the client's start, sequence
//! number, sender index) padded with `x` to the payload length. Servers pass it through as
//! a JSON string, so the client finds it again after `"payload":"`.

/// The default payload length in bytes (the issue's 64 B).
pub const DEFAULT_PAYLOAD: usize = 64;
/// Hex digits of a stamp: 16 (time) + 16 (sequence) + 8 (sender).
pub const STAMP_LEN: usize = 40;

const PAYLOAD_KEY: &[u8] = br#""payload":""#;
const TYPE_KEY: &[u8] = br#""type":""#;

/// What a client message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{"type":"echo"}`: the server's echo handler replies.
    Echo,
    /// `{"type":"send","to":U}`: delivered to every socket of user `U` via the send topic.
    Send,
    /// `{"type":"broadcast"}`: delivered to every socket via the broadcast topic.
    Broadcast,
    /// `{"username":U,"type":"bench"}`: what a plain NATS client publishes to `socket:send`
    /// (docs/PROTOCOL.md); every socket of user `U` gets `{"type":"bench","payload":P}`.
    Nats,
}

/// The send time, sequence number and sender carried by a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the client's clock base when the message was sent.
    pub sent_ns: u64,
    /// The sender's sequence number (for broadcasts: the broadcast's index).
    pub seq: u64,
    /// The sending socket's index.
    pub from: u32,
}

/// A client message with a payload slot to stamp before each send.
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    at: usize,
}

impl Template {
    /// The message of `kind` with a payload of `payload_len` bytes (at least [`STAMP_LEN`]);
    /// `to` is the target user of [`Kind::Send`] and [`Kind::Nats`].
    pub fn new(kind: Kind, to: &str, payload_len: usize) -> Template {
        let payload_len = payload_len.max(STAMP_LEN);
        let head = match kind {
            Kind::Echo => r#"{"type":"echo","payload":""#.to_string(),
            Kind::Broadcast => r#"{"type":"broadcast","payload":""#.to_string(),
            Kind::Send => format!(r#"{{"type":"send","to":"{to}","payload":""#),
            Kind::Nats => format!(r#"{{"username":"{to}","type":"bench","payload":""#),
        };
        let mut bytes = head.into_bytes();
        let at = bytes.len();
        bytes.resize(at + payload_len, b'x');
        bytes.extend_from_slice(br#""}"#);
        Template { bytes, at }
    }

    /// Copies the message into `out` (cleared first) with `stamp` in its payload.
    pub fn stamped_into(&self, stamp: Stamp, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        write_hex(&mut out[self.at..self.at + 16], stamp.sent_ns);
        write_hex(&mut out[self.at + 16..self.at + 32], stamp.seq);
        write_hex(&mut out[self.at + 32..self.at + 40], u64::from(stamp.from));
    }

    /// The message's length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a message has at least its JSON braces.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn write_hex(out: &mut [u8], mut v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn read_hex(digits: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &d in digits {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(n);
    }
    Some(v)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The stamp in a server frame's payload string, if it has one (error frames do not).
pub fn read_stamp(frame: &[u8]) -> Option<Stamp> {
    let at = find(frame, PAYLOAD_KEY)? + PAYLOAD_KEY.len();
    let digits = frame.get(at..at + STAMP_LEN)?;
    Some(Stamp {
        sent_ns: read_hex(&digits[..16])?,
        seq: read_hex(&digits[16..32])?,
        from: u32::try_from(read_hex(&digits[32..40])?).ok()?,
    })
}

/// The `type` of a server frame, if it is a string.
pub fn frame_type(frame: &[u8]) -> Option<&str> {
    let at = find(frame, TYPE_KEY)? + TYPE_KEY.len();
    let len = frame[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&frame[at..at + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_survives_a_server_reply() {
        let t = Template::new(Kind::Echo, "", DEFAULT_PAYLOAD);
        let stamp = Stamp {
            sent_ns: 123_456_789_012,
            seq: 42,
            from: 7,
        };
        let mut msg = Vec::new();
        t.stamped_into(stamp, &mut msg);
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(v["type"], "echo");
        assert_eq!(v["payload"].as_str().unwrap().len(), DEFAULT_PAYLOAD);
        // What a server sends back: another type, the same payload.
        let reply = serde_json::to_vec(&serde_json::json!({
            "type": "bench:echo", "payload": v["payload"],
        }))
        .unwrap();
        assert_eq!(read_stamp(&reply), Some(stamp));
        assert_eq!(frame_type(&reply), Some("bench:echo"));
    }

    #[test]
    fn send_names_its_target_and_error_frames_have_no_stamp() {
        let t = Template::new(Kind::Send, "user-3", 64);
        let mut msg = Vec::new();
        t.stamped_into(
            Stamp {
                sent_ns: 1,
                seq: 2,
                from: 3,
            },
            &mut msg,
        );
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(v["to"], "user-3");
        let err = br#"{"type":"error","payload":{"message":"nope"}}"#;
        assert_eq!(read_stamp(err), None);
        assert_eq!(frame_type(err), Some("error"));
    }

    #[test]
    fn short_payloads_still_hold_a_stamp() {
        let t = Template::new(Kind::Broadcast, "", 8);
        assert_eq!(
            t.len(),
            r#"{"type":"broadcast","payload":""}"#.len() + STAMP_LEN
        );
    }
}
