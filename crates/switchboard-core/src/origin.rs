//! Which web pages may open sockets.

/// Which `Origin`s may open a socket. A request without an `Origin` header (not from a
/// browser) is allowed under every policy: the check exists to stop other sites' pages from
/// using a visitor's cookies (cross-site WebSocket hijacking, or a cross-site `POST`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OriginPolicy {
    /// The `Origin`'s host and port must equal the `Host` header.
    SameHost,
    /// Any origin.
    Any,
    /// Exactly these origins (`https://app.example.com`), compared case-insensitively.
    List(Vec<String>),
}

impl OriginPolicy {
    /// Whether a request with these headers passes.
    pub fn allows(&self, headers: &http::HeaderMap) -> bool {
        let mut origins = headers.get_all(http::header::ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return true;
        };
        if origins.next().is_some() && !matches!(self, OriginPolicy::Any) {
            return false; // two origins: which one would the check be about?
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
            OriginPolicy::SameHost => {
                let authority = origin
                    .strip_prefix("https://")
                    .or_else(|| origin.strip_prefix("http://"));
                let host = headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok());
                matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_origins_pass_only_where_any_origin_does() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, "gw.example".parse().unwrap());
        headers.append(http::header::ORIGIN, "https://gw.example".parse().unwrap());
        let list = OriginPolicy::List(vec!["https://gw.example".into()]);
        for policy in [&OriginPolicy::SameHost, &list, &OriginPolicy::Any] {
            assert!(policy.allows(&headers));
        }
        headers.append(
            http::header::ORIGIN,
            "https://evil.example".parse().unwrap(),
        );
        assert!(!OriginPolicy::SameHost.allows(&headers));
        assert!(!list.allows(&headers));
        assert!(OriginPolicy::Any.allows(&headers));
    }
}
