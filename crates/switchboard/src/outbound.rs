//! Encoding what the gateway sends: `{"type":...,"payload":...}` frames, as the JSON text
//! serde_json writes (the same bytes), with less work per frame.
//!
//! Every reply, `send` and `broadcast` is encoded here, so the cost is paid per message.
//! serde_json checks each byte of each string against its escape table; here a string with
//! nothing to escape (almost all of them) is found in one pass the compiler vectorizes, and
//! copied whole. A frame is written into a buffer each thread keeps and then copied into one
//! allocation of its exact size (a `Vec` with spare capacity turns into `Bytes` through a
//! second one).

use std::cell::RefCell;

use bytes::Bytes;
use serde_json::Value;

/// The scratch buffer a thread keeps between frames, at most this large.
const KEEP_SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `{"type": kind, "payload": payload}` once, for any number of sockets: the wire
/// shape of every frame the gateway sends (replies, `send`, `broadcast`, error frames).
pub fn encode_frame(kind: &str, payload: &Value) -> Bytes {
    let from_scratch = SCRATCH.try_with(|scratch| {
        // Nothing below calls out of this module, so the buffer is never borrowed twice.
        let mut buf = scratch.borrow_mut();
        buf.clear();
        write_frame(&mut buf, kind, payload);
        let frame = Bytes::copy_from_slice(&buf);
        if buf.capacity() > KEEP_SCRATCH {
            *buf = Vec::new(); // one huge frame does not pin its size on this thread
        }
        frame
    });
    // A thread that is ending has no scratch buffer left: a buffer of the frame's own.
    from_scratch.unwrap_or_else(|_| {
        let mut buf = Vec::new();
        write_frame(&mut buf, kind, payload);
        Bytes::from(buf)
    })
}

fn write_frame(buf: &mut Vec<u8>, kind: &str, payload: &Value) {
    buf.extend_from_slice(b"{\"type\":");
    write_str(buf, kind);
    buf.extend_from_slice(b",\"payload\":");
    write_value(buf, payload);
    buf.push(b'}');
}

/// Appends `value` as compact JSON text.
fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
        // null, booleans and numbers: serde_json's own text (writing to a Vec cannot fail).
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// Appends `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether serde_json would escape any byte of `bytes`: a control character, `"` or `\`.
/// A fold without an early exit, so that it compiles to vector instructions.
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |seen, &b| {
        seen | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What the gateway wrote before: serde_json serializing the frame as a struct.
    fn serde_frame(kind: &str, payload: &Value) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Frame<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            payload: &'a Value,
        }
        serde_json::to_vec(&Frame { kind, payload }).unwrap()
    }

    #[test]
    fn the_same_bytes_as_serde_json() {
        for payload in [
            json!(null),
            json!(true),
            json!(-1.5e300),
            json!(u64::MAX),
            json!(""),
            json!("plain"),
            json!("quote \" backslash \\ newline \n tab \t nul \u{0} del \u{7f} é ✓ 😀 </script>"),
            json!({"b": [1, "x", {"c": null}], "a": {}, "\"k\"": []}),
            json!([[[]], {}]),
        ] {
            for kind in ["t", "a \"quoted\" type", "tab\t"] {
                let frame = encode_frame(kind, &payload);
                assert_eq!(
                    frame.as_ref(),
                    serde_frame(kind, &payload),
                    "{kind} {payload}"
                );
            }
        }
    }

    #[test]
    fn a_huge_frame_does_not_stay_in_the_scratch_buffer() {
        let big = json!("x".repeat(KEEP_SCRATCH * 2));
        assert_eq!(encode_frame("t", &big).len(), KEEP_SCRATCH * 2 + 25);
        SCRATCH.with(|s| assert!(s.borrow().capacity() <= KEEP_SCRATCH));
        // And the buffer still works afterwards.
        let small = encode_frame("t", &json!(1));
        assert_eq!(small.as_ref(), br#"{"type":"t","payload":1}"#);
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_encodes_as_serde_json_does(kind in any::<String>(), payload in any_json()) {
            let frame = encode_frame(&kind, &payload);
            prop_assert_eq!(frame.as_ref(), serde_frame(&kind, &payload));
        }
    }
}
