//! Request ids: every request gets one, taken from the client's `X-Request-Id` when it is usable
//! and generated otherwise, and every response carries it back.
//!
//! The id is a field of the request's span, so every log line written while the request is handled
//! names it, and a client can quote it to find them. A client's id is used only when it is visible
//! ASCII and at most [`MAX_LEN`] characters: anything else could forge log lines or bloat them.

use http::{HeaderMap, HeaderValue};

/// The request and response header.
pub const HEADER: &str = "x-request-id";
/// Longest client id used as is.
pub const MAX_LEN: usize = 128;

/// The id of a request with these headers: the client's when valid, else a fresh random one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    headers.get(HEADER).filter(|v| is_valid(v.as_bytes())).cloned().unwrap_or_else(generate)
}

/// Whether a client's id can be used: 1 to [`MAX_LEN`] visible ASCII characters (no spaces).
fn is_valid(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().all(u8::is_ascii_graphic)
}

/// 16 random bytes as 32 lowercase hex digits.
fn generate() -> HeaderValue {
    let mut bytes = [0u8; 16];
    if let Err(error) = getrandom::fill(&mut bytes) {
        // No entropy source: unique ids still help, so fall back to time and a counter.
        tracing::debug!(%error, "no random source for request ids");
        bytes = fallback_bytes();
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_str(&hex::encode(bytes)).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn fallback_bytes() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = [nanos.to_le_bytes().as_slice(), &COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes()].concat();
    let hash = blake3::hash(&seed);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: Option<&[u8]>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(id) = id {
            headers.insert(HEADER, HeaderValue::from_bytes(id).unwrap());
        }
        headers
    }

    #[test]
    fn a_valid_client_id_is_kept_anything_else_is_replaced() {
        let longest = "a".repeat(MAX_LEN);
        let too_long = "a".repeat(MAX_LEN + 1);
        let cases: [(Option<&[u8]>, bool); 7] = [
            (Some(b"abc-123_XYZ.~:/"), true),
            (Some(longest.as_bytes()), true),
            (Some(too_long.as_bytes()), false),
            (Some(b"has space"), false),
            (Some(b"tab\there"), false),
            (Some(b"caf\xc3\xa9"), false),
            (None, false),
        ];
        for (sent, kept) in cases {
            let id = of(&headers(sent));
            if kept {
                assert_eq!(Some(id.as_bytes()), sent);
            } else {
                assert_eq!(id.len(), 32, "{sent:?} -> {id:?}");
                assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
            }
        }
    }

    #[test]
    fn generated_ids_differ() {
        assert_ne!(of(&HeaderMap::new()), of(&HeaderMap::new()));
        assert_ne!(fallback_bytes(), fallback_bytes());
    }
}
