//! The socket's hooks: `onconnect`, `onmessage` (with its `types` routes), `onclose`, `send`
//! and `broadcast`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::de::de_duration;
use crate::Topic;

/// A hook that publishes to one topic (`onclose`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PublishHook {
    /// The topic to publish to.
    pub publish: Topic,
}

/// The `onconnect` hook: the topic, and whether the socket waits for the handler's verdict.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConnectHook {
    /// The topic to publish to.
    pub publish: Topic,
    /// Hold the socket until a connect handler answers (extension; AWS API Gateway's
    /// `$connect`): until its `reply`, nothing the socket sends is read or published and no
    /// `send`/`broadcast` reaches it; its `fail` closes the socket. Default false.
    #[serde(default)]
    pub gate: bool,
    /// With `gate`: how long to wait for the answer before closing the socket (1011).
    /// Default 10 s.
    #[serde(default = "default_gate_timeout", deserialize_with = "de_duration")]
    pub gate_timeout: Duration,
}

fn default_gate_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A built-in subscriber's topic (`send`, `broadcast`, `disconnect`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SubscribeHook {
    /// The topic to subscribe to.
    pub subscribe: Topic,
}

/// The `onmessage` hook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OnMessage {
    /// Every message a socket sends is published here (optional).
    #[serde(default)]
    pub publish: Option<Topic>,
    /// Messages of one `type` are *also* published to that entry's topic.
    #[serde(default)]
    pub types: TypeRoutes,
}

/// One entry of `onmessage.types`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TypeRoute {
    /// The `type` of the incoming message this entry matches.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The topic such messages are published to.
    pub publish: Topic,
}

/// The message `type` a client sends to refresh its token in-band; never published.
pub const REFRESH_TYPE: &str = "$refresh";

/// `onmessage.types`: a list whose `type` values are unique.
#[derive(Debug, Clone, Default)]
pub struct TypeRoutes(Vec<TypeRoute>);

impl TypeRoutes {
    /// The entries, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, TypeRoute> {
        self.0.iter()
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a TypeRoutes {
    type Item = &'a TypeRoute;
    type IntoIter = std::slice::Iter<'a, TypeRoute>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for TypeRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TypeRoutes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of {type, publish} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TypeRoutes, A::Error> {
                let mut routes: Vec<TypeRoute> = Vec::new();
                while let Some(route) = seq.next_element::<TypeRoute>()? {
                    if route.message_type == REFRESH_TYPE {
                        return Err(de::Error::custom(format_args!(
                            "type `{REFRESH_TYPE}` is reserved: the gateway answers it (token refresh)"
                        )));
                    }
                    if let Some(first) = routes
                        .iter()
                        .position(|r| r.message_type == route.message_type)
                    {
                        return Err(de::Error::custom(format_args!(
                            "duplicate type `{}`: entries {} and {} of the list",
                            route.message_type,
                            first + 1,
                            routes.len() + 1
                        )));
                    }
                    routes.push(route);
                }
                Ok(TypeRoutes(routes))
            }
        }
        d.deserialize_seq(V)
    }
}
