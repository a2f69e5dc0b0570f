//! [`JsonObject`]: a JSON object kept as text and parsed when first read.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A JSON object that reads like a [`Map`] (it derefs to one) but is kept as its JSON text
/// until someone reads it: [`Context::headers`](crate::Context::headers) and
/// [`Context::params`](crate::Context::params).
///
/// A gateway keeps one shared copy of each socket's text and hands every message a cheap
/// clone, so neither an idle socket nor a message whose handler never looks at its context
/// pays for a parsed map; the map is built on first read and lives as long as that message.
///
/// ```
/// use switchboard_bus::JsonObject;
/// let headers = JsonObject::from_json_text(r#"{"origin":"https://a.example","jwt":{"sub":"alex"}}"#.into());
/// assert_eq!(headers["jwt"]["sub"], "alex");
/// assert_eq!(headers.get("origin").and_then(|v| v.as_str()), Some("https://a.example"));
/// ```
#[derive(Clone, Default)]
pub struct JsonObject {
    /// The object as JSON text, while it is unchanged; `None` once the map is the truth.
    text: Option<Arc<str>>,
    map: OnceLock<Map<String, Value>>,
}

impl JsonObject {
    /// An object read from `text`, parsed on first use. Text that is not a JSON object reads
    /// as an empty object.
    pub fn from_json_text(text: Arc<str>) -> Self {
        JsonObject {
            text: Some(text),
            map: OnceLock::new(),
        }
    }

    /// The object's JSON text, if it was made from text and has not been changed since.
    pub fn json_text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The object's JSON text, shared, if it was made from text and has not been changed
    /// since: to make another object from the same text without copying it.
    pub fn shared_json_text(&self) -> Option<&Arc<str>> {
        self.text.as_ref()
    }

    /// Whether the map has been made (by [`JsonObject::as_map`] or a read through it): a
    /// holder sharing one object between many readers can tell that it now holds the map,
    /// not only the text.
    pub fn is_parsed(&self) -> bool {
        self.map.get().is_some()
    }

    /// The object as a map (parsed now if it has not been yet).
    pub fn as_map(&self) -> &Map<String, Value> {
        self.map.get_or_init(|| match self.text.as_deref() {
            Some(text) => serde_json::from_str(text).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "context text is not a JSON object; read as empty");
                Map::new()
            }),
            None => Map::new(),
        })
    }
}

impl Deref for JsonObject {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Map<String, Value> {
        self.as_map()
    }
}

impl DerefMut for JsonObject {
    /// Changing the object parses it first; from then on the map is the truth.
    fn deref_mut(&mut self) -> &mut Map<String, Value> {
        self.as_map();
        self.text = None;
        self.map.get_mut().expect("parsed just above")
    }
}

impl From<Map<String, Value>> for JsonObject {
    fn from(map: Map<String, Value>) -> Self {
        JsonObject {
            text: None,
            map: OnceLock::from(map),
        }
    }
}

impl PartialEq for JsonObject {
    fn eq(&self, other: &Self) -> bool {
        match (self.json_text(), other.json_text()) {
            (Some(a), Some(b)) if a == b => true,
            _ => self.as_map() == other.as_map(),
        }
    }
}

impl fmt::Debug for JsonObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_map().fmt(f)
    }
}

impl Serialize for JsonObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_map().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(JsonObject::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_writes_and_serializes_like_a_map() {
        let text: Arc<str> = r#"{"a":1,"b":{"c":"d"}}"#.into();
        let mut o = JsonObject::from_json_text(text.clone());
        assert!(!o.is_parsed(), "text until read");
        assert_eq!(o["b"]["c"], "d");
        assert!(o.is_parsed(), "a read makes the map");
        assert_eq!(o.json_text(), Some(&*text));
        assert!(Arc::ptr_eq(o.shared_json_text().unwrap(), &text));
        assert_eq!(
            o,
            JsonObject::from(json!({"b":{"c":"d"},"a":1}).as_object().unwrap().clone())
        );
        o.insert("e".into(), json!(true));
        assert_eq!(
            o.json_text(),
            None,
            "changed: the text no longer says what it holds"
        );
        assert_eq!(
            serde_json::to_value(&o).unwrap(),
            json!({"a":1,"b":{"c":"d"},"e":true})
        );
        let back: JsonObject = serde_json::from_value(json!({"x": [1]})).unwrap();
        assert_eq!(back["x"][0], 1);
        assert!(JsonObject::from_json_text("[1,2]".into()).is_empty());
        assert!(JsonObject::default().is_empty());
    }
}
