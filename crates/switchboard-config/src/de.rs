//! Field deserializers shared by the sections: durations, byte sizes, positive counts.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

// Each field is checked inside the deserializer's visit of its own scalar: serde_yaml then
// reports the error at that value's line and under its full key path. A check made after the
// value was read is reported at the enclosing section's line, under the section's path.

/// The longest duration any key takes: ten years (`10y`, of 365.25 days). A timeout or an
/// interval beyond it is a typo, and a deadline `now + it` could overflow the clock (a panic
/// per connection), or `now - it` wrap (every token expired).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

/// Parses `30s`, `5m`, `1h 30m` (humantime), at most ten years: how every duration key is
/// read, and what `serve --drain` takes too.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration `{text}`: {e} (try `30s`)"))?;
    if d > MAX_DURATION {
        return Err(format!("duration `{text}` is too long (at most 10 years)"));
    }
    Ok(d)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as `30s`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor)
}

pub(crate) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A whole number of at least 1 that fits `N`; `what` is the error's text when it is 0. Both
/// checks are made inside the visit, so the error names the key and the value's line.
struct PositiveVisitor<N> {
    what: &'static str,
    fits: std::marker::PhantomData<N>,
}

impl<N> PositiveVisitor<N> {
    fn new(what: &'static str) -> Self {
        PositiveVisitor {
            what,
            fits: std::marker::PhantomData,
        }
    }
}

impl<N: TryFrom<u64>> Visitor<'_> for PositiveVisitor<N> {
    type Value = N;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number of at least 1")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<N, E> {
        if v == 0 {
            return Err(E::custom(self.what));
        }
        N::try_from(v).map_err(|_| E::custom(format_args!("{v} is too large")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<N, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(self.what)),
        }
    }
}

pub(crate) fn de_opt_positive<'de, D, N>(d: D) -> Result<Option<N>, D::Error>
where
    D: Deserializer<'de>,
    N: TryFrom<u64>,
{
    d.deserialize_u64(PositiveVisitor::new(
        "limits must be at least 1 (leave the key out for the default)",
    ))
    .map(Some)
}

pub(crate) fn de_positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_u64(PositiveVisitor::new("must be at least 1"))
}

/// Parses `1000`, `64KiB`, `64 KB`, `1MiB`, `1M` into bytes (K = 1024).
pub fn parse_byte_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if !digits.is_empty() && unit.starts_with('.') {
        return Err(format!(
            "size `{text}` has a fraction: sizes are whole numbers of a unit (`1536KiB`, not \
             `1.5MiB`)"
        ));
    }
    if !digits.is_empty() && unit.starts_with([',', '_', '\'']) {
        return Err(format!(
            "size `{text}` has a decimal comma or a separator: write a whole number without \
             either (`1000KiB`, not `1,000KiB`; `1536KiB`, not `1,5MiB`)"
        ));
    }
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}` (try `64KiB`)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size unit in `{text}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size `{text}` is too large"))?;
    if bytes == 0 {
        return Err("size must be at least 1 byte".into());
    }
    Ok(bytes)
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as `64KiB` or a number of bytes")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
        parse_byte_size(&v.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
        parse_byte_size(&v.to_string()).map_err(E::custom)
    }

    /// A YAML float (`1.5`, `2.0`, `1e3`): refused, whole or not, since `2.0` would read as 2
    /// bytes where `2.0MiB` was likely meant.
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<usize, E> {
        Err(E::custom(format!(
            "size `{v}` is a decimal number: sizes are whole numbers of a unit (`1536KiB`, \
             not `1.5MiB`; `1000`, not `1e3`)"
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        parse_byte_size(v).map_err(E::custom)
    }
}

pub(crate) fn de_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_any(ByteSizeVisitor)
}

/// An environment variable's name, as `${NAME}` takes it: letters, digits and `_`, not
/// starting with a digit. The value is not echoed in the error: written as `"${SECRET}"` by
/// mistake, it is the secret itself.
pub(crate) fn de_env_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(StrVisitor {
        expecting: "the name of an environment variable",
        parse: |name| {
            env_name(name)?;
            Ok(name.to_string())
        },
    })
}

/// Checks that `name` can name an environment variable (see [`de_env_name`]).
pub(crate) fn env_name(name: &str) -> Result<(), String> {
    if crate::expand::is_var_name(name) {
        Ok(())
    } else {
        Err(
            "must name an environment variable (letters, digits and `_`, not starting with a \
             digit), not hold its value"
                .into(),
        )
    }
}

/// An `ip:port` address to listen on. The parser's own message (`invalid socket address
/// syntax`) does not say what it wants, nor that host names are not looked up.
pub(crate) fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    d.deserialize_str(StrVisitor {
        expecting: "an address such as `127.0.0.1:4000`",
        parse: |text| {
            text.trim().parse().map_err(|_| {
                format!(
                    "`{text}` is not an address to listen on: write an IP address and a port, \
                     such as 127.0.0.1:4000, 0.0.0.0:4000 or [::]:4000 (host names are not \
                     looked up)"
                )
            })
        },
    })
}

/// A string value parsed inside the visit of its own scalar, so that its error names the
/// key and the value's line (see the top of this file).
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// `url` as a message may show it: anything up to an `@` after the scheme (a
/// `user:password@`, wherever the `@` is) is `***`. The same as
/// `switchboard_bus_nats::redacted_url` (as `url_parts` is its `url_parts`): this crate
/// depends on no other of the workspace.
pub(crate) fn redacted_url(url: &str) -> String {
    match url_parts(url) {
        (scheme, Some(_), rest) => format!("{scheme}***@{rest}"),
        (_, None, _) => url.to_string(),
    }
}

/// `url` as `scheme://` (or nothing), its `user:password@` or `token@` without the `@`
/// (what comes before the last `@`: a password may hold a `/`), and the rest.
pub(crate) fn url_parts(url: &str) -> (&str, Option<&str>, &str) {
    let (scheme, rest) = url.split_at(url.find("://").map_or(0, |at| at + 3));
    match rest.rsplit_once('@') {
        Some((userinfo, after)) => (scheme, Some(userinfo), after),
        None => (scheme, None, rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_capped() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10y"), Ok(MAX_DURATION));
        assert!(parse_duration("11y").unwrap_err().contains("too long"));
        assert!(parse_duration("500000000000y").is_err());
        assert!(parse_duration("5")
            .unwrap_err()
            .contains("invalid duration `5`"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1000"), Ok(1000));
        assert_eq!(parse_byte_size("64KiB"), Ok(65536));
        assert_eq!(parse_byte_size("2 MB"), Ok(2 << 20));
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("").is_err());
        for fraction in ["1.5MiB", "1.5 MB", "0.5"] {
            let e = parse_byte_size(fraction).unwrap_err();
            assert!(e.contains("has a fraction"), "{fraction}: {e}");
        }
        let e = parse_byte_size("1,000KiB").unwrap_err();
        assert!(e.contains("a decimal comma or a separator"), "{e}");
    }
}
