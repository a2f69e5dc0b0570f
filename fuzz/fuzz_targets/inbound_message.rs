//! `switchboard::decode_client_message` on arbitrary bytes: it must never panic, and it
//! accepts exactly what the gateway may publish: a JSON object whose `type` is a string.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::{decode_client_message, BadMessage};

fuzz_target!(|data: &[u8]| {
    match decode_client_message(data) {
        Ok(message) => {
            // JSON is UTF-8: anything accepted was valid UTF-8.
            assert!(std::str::from_utf8(data).is_ok(), "accepted non-UTF-8");
            let kind = message.message_type().to_owned();
            let value = message.into_data();
            assert!(value.is_object(), "accepted a non-object: {value}");
            assert_eq!(
                value.get("type").and_then(|t| t.as_str()),
                Some(kind.as_str()),
                "`type` is not the string message_type() reports"
            );
            // What is published re-encodes to a message that is accepted again.
            let again = decode_client_message(value.to_string().as_bytes());
            assert!(again.is_ok(), "re-encoded message refused: {again:?}");
        }
        Err(e) => {
            // The client gets this text in its error frame.
            assert!(!e.to_string().trim().is_empty(), "empty error text: {e:?}");
            if matches!(e, BadMessage::Binary) {
                panic!("text decoding reported a binary frame");
            }
        }
    }
});
