//! The clock and the ids every layer uses: wall-clock milliseconds, request ids and error ids.
//! Kept apart so that no layer imports another one for a timestamp.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh request id: 32 characters from `[a-z0-9]` (~165 bits from the OS's CSPRNG).
pub fn new_request_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::with_capacity(32);
    while id.len() < 32 {
        let mut bytes = [0u8; 64];
        // getrandom only fails when the OS has no entropy source at all; a fixed fallback would
        // make ids guessable, so that is a hard stop.
        getrandom::fill(&mut bytes).expect("the OS random number generator is available");
        for b in bytes {
            // 252 = 7 × 36: rejection keeps every character equally likely.
            if b < 252 && id.len() < 32 {
                id.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    id
}

/// Whether `id` has the shape of a request id (checked before any lookup).
pub fn is_request_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The id an HTTP request's log lines carry and its response echoes in `X-Request-Id`: the
/// client's own when it is a plain token of at most 64 characters (so a caller's tracing joins
/// ours), else a fresh one. Anything else a client sends there never reaches a log line.
pub fn http_request_id(sent: Option<&str>) -> String {
    match sent {
        Some(id)
            if !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                }) =>
        {
            id.to_string()
        }
        _ => new_error_id(),
    }
}

/// A fresh id for an internal error: logged with the details, shown to the client alone.
pub fn new_error_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_clients_request_id_is_kept_only_when_it_is_a_plain_token() {
        assert_eq!(
            super::http_request_id(Some("trace-7f3a:01")),
            "trace-7f3a:01"
        );
        for unsafe_id in ["", "two words", "line\nbreak", &"x".repeat(65), "quote\"d"] {
            let id = super::http_request_id(Some(unsafe_id));
            assert_ne!(id, unsafe_id);
            assert_eq!(id.len(), 16, "{id}");
        }
        assert_ne!(super::http_request_id(None), super::http_request_id(None));
    }
}
