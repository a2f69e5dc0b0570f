//! Decoding what a client sends: a JSON object with a string `type`, nothing else.

use serde_json::Value;

/// A decoded client message: a JSON object whose `type` is a string.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    data: Value,
}

impl ClientMessage {
    /// The message's `type`.
    pub fn message_type(&self) -> &str {
        self.data["type"].as_str().unwrap_or_default()
    }

    /// The whole object, as published on the bus.
    pub fn into_data(self) -> Value {
        self.data
    }
}

/// Why a client message was refused. The client gets an error frame with this text; nothing
/// is published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadMessage {
    /// A binary frame: the protocol is JSON text.
    #[error("binary messages are not supported; send JSON text")]
    Binary,
    /// Not parseable as JSON.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object with a string `type`.
    #[error("message must be a JSON object with a string `type`")]
    NotTyped,
}

/// Decodes the text of one client message.
pub fn decode_client_message(text: &[u8]) -> Result<ClientMessage, BadMessage> {
    // One check of the whole text (quick for ASCII) spares the parser its check of every
    // string it reads.
    let text = std::str::from_utf8(text).map_err(|e| BadMessage::NotJson(e.to_string()))?;
    decode_client_text(text)
}

/// Decodes one client message that is already known to be text (UTF-8).
pub fn decode_client_text(text: &str) -> Result<ClientMessage, BadMessage> {
    let data: Value = serde_json::from_str(text).map_err(|e| BadMessage::NotJson(e.to_string()))?;
    match data.get("type") {
        Some(Value::String(_)) => Ok(ClientMessage { data }),
        _ => Err(BadMessage::NotTyped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_objects_with_a_string_type_pass() {
        let ok = decode_client_message(br#"{"type":"a","payload":[1]}"#).unwrap();
        assert_eq!(ok.message_type(), "a");
        assert_eq!(decode_client_text(r#"{"type":"a","payload":[1]}"#), Ok(ok));
        for bad in [
            &b"nope"[..],
            b"[]",
            b"{}",
            br#"{"type":1}"#,
            br#""type""#,
            b"\xff",
        ] {
            assert!(decode_client_message(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            decode_client_message(b"{").unwrap_err(),
            BadMessage::NotJson(_)
        ));
    }
}
