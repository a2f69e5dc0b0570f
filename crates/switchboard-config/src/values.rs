//! Validated values used across sections: topics and URL paths.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A topic name: any non-empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(pub(crate) String);

impl Topic {
    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(de::Error::custom("topic must not be empty"));
        }
        Ok(Topic(s))
    }
}

/// An HTTP path starting with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPath(pub(crate) String);

impl UrlPath {
    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for UrlPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(de::Error::custom(format_args!(
                "path `{s}` must start with `/`"
            )));
        }
        if s.contains(['?', '#', ' ']) {
            return Err(de::Error::custom(format_args!(
                "path `{s}` must be a plain path (no query, fragment or spaces)"
            )));
        }
        // A request's path arrives as visible ASCII (anything else percent-encoded): a path
        // with a control character (a trailing newline from `${VAR}`, say) or a letter
        // outside ASCII would never match one.
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(de::Error::custom(format_args!(
                "path {s:?} must be visible ASCII (no control characters or spaces; \
                 percent-encode other characters)"
            )));
        }
        Ok(UrlPath(s))
    }
}
