//! The request signature: `X-Switchboard-Signature: t=<unix seconds>,id=<event id>,v1=<hex>`,
//! where `v1` is HMAC-SHA256 with the endpoint's secret over `<t>.<id>.<body>`. The backend
//! recomputes it over the raw body, compares in constant time, and refuses a `t` too far from
//! its clock (replays); `id` stays the same across the retries of one event (deduplication).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

/// The signature header's value for `body`, sent at `t` (seconds since the epoch).
pub fn signature(secret: &[u8], t: u64, id: &str, body: &[u8]) -> String {
    format!(
        "t={t},id={id},v1={}",
        hex(&signed(secret, t, id, body).finalize().into_bytes())
    )
}

/// Checks a signature header's value against `body`: true when it is well-formed, its `v1`
/// matches, and `t` is within `tolerance` seconds of `now` (what a backend does; the tests and
/// the examples check the same way).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: u64, tolerance: u64) -> bool {
    let (mut t, mut id, mut v1) = (None, None, None);
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("id", v)) => id = Some(v),
            Some(("v1", v)) => v1 = unhex(v),
            _ => {}
        }
    }
    let (Some(t), Some(id), Some(v1)) = (t, id, v1) else {
        return false;
    };
    if t.abs_diff(now) > tolerance {
        return false;
    }
    signed(secret, t, id, body).verify_slice(&v1).is_ok() // constant time
}

/// The HMAC of `<t>.<id>.<body>`, not yet finalized: what the signature and its check share.
fn signed(secret: &[u8], t: u64, id: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    m.update(format!("{t}.{id}.").as_bytes());
    m.update(body);
    m
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_byte_does_not() {
        let secret: &[u8] = b"0123456789abcdef";
        let header = signature(secret, 1_700_000_000, "n-1", b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000,id=n-1,v1="), "{header}");
        let other_id = header.replace("id=n-1", "id=n-2");
        // (secret, header, body, now): only the first verifies
        let cases: [(&[u8], &str, &[u8], u64); 6] = [
            (secret, &header, b"{\"a\":1}", 1_700_000_010),
            (secret, &header, b"{\"a\":2}", 1_700_000_010),
            (b"another secret!!", &header, b"{\"a\":1}", 1_700_000_010),
            (secret, &header, b"{\"a\":1}", 1_700_001_000),
            (secret, &other_id, b"{\"a\":1}", 1_700_000_010),
            (secret, "t=1,v1=zz", b"", 1),
        ];
        for (i, (key, header, body, now)) in cases.into_iter().enumerate() {
            assert_eq!(verify(key, header, body, now, 300), i == 0, "case {i}");
        }
    }

    #[test]
    fn the_mac_is_the_published_test_vector() {
        // RFC 4231 test case 2, so other languages can check their implementation against it.
        let mut m = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
