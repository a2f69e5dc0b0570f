//! Which web pages may open sockets.

/// Which `Origin`s may open a socket. A request without an `Origin` header (not from a
/// browser) is allowed under every policy: the check exists to stop other sites' pages from
/// using a visitor's cookies (cross-site WebSocket hijacking, or a cross-site `POST`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OriginPolicy {
    /// The `Origin`'s host and port must equal the `Host` header's (a port left out is the
    /// default of the origin's scheme: 443 for `https`, 80 for `http`). The scheme is not
    /// known here (a proxy in front may end TLS), so a page over plain `http` of the same host
    /// and port passes: [`OriginPolicy::SameHostOverTls`] where the listener ends TLS itself.
    SameHost,
    /// As [`OriginPolicy::SameHost`], for a listener that ends TLS itself: the page must be
    /// `https` too (a plain-`http` page of the same host is another origin, one a network
    /// attacker can serve), and a `Host` without a port means 443.
    SameHostOverTls,
    /// Any origin.
    Any,
    /// Exactly these origins (`https://app.example.com`), compared as origins are: scheme and
    /// host case-insensitively, a default port written out or not (`https://a.example:443`
    /// is `https://a.example`).
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
            OriginPolicy::List(list) => {
                let given = WebOrigin::parse(origin);
                list.iter()
                    .any(|allowed| match (&given, WebOrigin::parse(allowed)) {
                        (Some(given), Some(allowed)) => *given == allowed,
                        // Not an http(s) origin (`null`, another scheme): the text itself.
                        _ => allowed.eq_ignore_ascii_case(origin),
                    })
            }
            OriginPolicy::SameHost | OriginPolicy::SameHostOverTls => {
                let Some(origin) = WebOrigin::parse(origin) else {
                    return false;
                };
                if matches!(self, OriginPolicy::SameHostOverTls) && origin.scheme != "https" {
                    return false;
                }
                let host = headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| split_host_port(h, default_port(origin.scheme)));
                matches!(host, Some((h, port)) if h.eq_ignore_ascii_case(origin.host) && port == origin.port)
            }
        }
    }
}

/// An `http` or `https` origin, borrowed from the header (or the list entry) it was read
/// from: the scheme in lowercase, the port always given; hosts compare in any case.
#[derive(Debug)]
struct WebOrigin<'a> {
    scheme: &'static str,
    host: &'a str,
    port: u16,
}

impl PartialEq for WebOrigin<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme
            && self.port == other.port
            && self.host.eq_ignore_ascii_case(other.host)
    }
}

impl<'a> WebOrigin<'a> {
    /// `scheme://host[:port]`, nothing after it (an origin has no path); `None` otherwise.
    fn parse(text: &'a str) -> Option<WebOrigin<'a>> {
        let (scheme, authority) = text.split_once("://")?;
        let scheme = ["https", "http"]
            .into_iter()
            .find(|known| scheme.eq_ignore_ascii_case(known))?;
        let (host, port) = split_host_port(authority, default_port(scheme))?;
        Some(WebOrigin { scheme, host, port })
    }
}

/// The port of `scheme` (`https` or `http`) where none is written.
fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

/// `host[:port]` (an IPv6 host in brackets) into the host and the port, `default_port` when
/// none is given; `None` for an empty host, a bad port, or anything after the authority.
fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (inside, rest) = v6.split_once(']')?;
            let host = &authority[..inside.len() + 2];
            match rest {
                "" => (host, None),
                _ => (host, Some(rest.strip_prefix(':')?)),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let port = match port {
        None => default_port,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    Some((host, port))
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

    fn request(host: &str, origin: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().unwrap());
        headers.insert(http::header::ORIGIN, origin.parse().unwrap());
        headers
    }

    #[test]
    fn origins_compare_as_origins_not_as_text() {
        let same = OriginPolicy::SameHost;
        for (host, origin) in [
            ("gw.example", "https://gw.example"),
            ("gw.example", "HTTPS://GW.example"),
            ("gw.example", "https://gw.example:443"),
            ("gw.example:443", "https://gw.example"),
            ("gw.example", "http://gw.example:80"),
            ("gw.example:8080", "http://gw.example:8080"),
            ("[::1]:8080", "http://[::1]:8080"),
        ] {
            assert!(same.allows(&request(host, origin)), "{host} {origin}");
        }
        for (host, origin) in [
            ("gw.example", "https://gw.example:8443"),
            ("gw.example:8080", "http://gw.example"),
            ("gw.example", "https://evil.example"),
            ("gw.example", "https://gw.example.evil.example"),
            ("gw.example", "https://user@gw.example"),
            ("gw.example", "https://gw.example/path"),
            ("gw.example", "https://gw.example:"),
            ("gw.example", "ftp://gw.example"),
            ("gw.example", "null"),
            ("[::1]:8080", "http://[::1]:8081"),
        ] {
            assert!(!same.allows(&request(host, origin)), "{host} {origin}");
        }
        // Over TLS the page must be https: a plain-http page of the same host is refused.
        let tls = OriginPolicy::SameHostOverTls;
        for (host, origin, passes) in [
            ("gw.example", "https://gw.example", true),
            ("gw.example", "HTTPS://gw.example:443", true),
            ("gw.example:8443", "https://gw.example:8443", true),
            ("gw.example", "http://gw.example", false),
            ("gw.example", "http://gw.example:443", false),
            ("gw.example:8443", "http://gw.example:8443", false),
        ] {
            assert_eq!(
                tls.allows(&request(host, origin)),
                passes,
                "{host} {origin}"
            );
        }
        // Without TLS at the listener the scheme is not known: the http page passes.
        assert!(same.allows(&request("gw.example", "http://gw.example")));
        let list = OriginPolicy::List(vec!["https://app.example.com".into(), "null".into()]);
        for origin in [
            "https://app.example.com",
            "HTTPS://App.Example.com",
            "https://app.example.com:443",
            "null",
        ] {
            assert!(list.allows(&request("gw.example", origin)), "{origin}");
        }
        for origin in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil",
        ] {
            assert!(!list.allows(&request("gw.example", origin)), "{origin}");
        }
    }
}
