//! Any bytes as what the public API reads from a request before any work: the query string of
//! every route, the steering headers (priority, deadline, Cache-Control, Content-Type) and the
//! profile-upload body. The input is split at newlines: query, X-Priority, X-Deadline-Ms,
//! Cache-Control, Content-Type, then the body (the rest, newlines included).
//!
//! The body is also read as a PDQ hash in hex, as partners' hash lists carry them.
//!
//! Properties: nothing panics; every refusal is a client error (4xx), except a deadline of 0,
//! which is 504 as at the handler; whatever is accepted is within its documented range.
#![no_main]

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use inferpool_sidecar::http::ApiError;
use inferpool_sidecar::http::parse::{MAX_TOP_K, ProfileUpload, Query, Source, request_options, require_image};
use inferpool_sidecar::pdq::Pdq;
use inferpool_sidecar::profiles::check_id;
use libfuzzer_sys::fuzz_target;

fn client_error(e: &ApiError) {
    let (status, code) = e.status_code();
    assert!(status.is_client_error() || code == "deadline_exceeded", "{e} answered {status} {code}");
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(6, |b| *b == b'\n');
    let query = parts.next().and_then(|q| std::str::from_utf8(q).ok());
    let mut headers = HeaderMap::new();
    for name in ["x-priority", "x-deadline-ms", "cache-control", "content-type"] {
        if let Some(value) = parts.next().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let body = parts.next().unwrap_or_default();

    for accepted in [&["profile"][..], &["top_k"], &["include"], &[]] {
        match Query::parse(query, accepted) {
            Err(e) => client_error(&e),
            Ok(q) => {
                match q.profile() {
                    Ok(id) => assert!(check_id(&id).is_ok(), "an accepted profile id is valid: {id:?}"),
                    Err(e) => client_error(&e),
                }
                match q.top_k() {
                    Ok(k) => assert!((1..=MAX_TOP_K).contains(&k), "top_k {k}"),
                    Err(e) => client_error(&e),
                }
                if let Err(e) = q.include_embeddings() {
                    client_error(&e);
                }
            }
        }
    }

    let before = Instant::now();
    match request_options(&headers, Duration::from_secs(2), Duration::ZERO) {
        Ok(opts) => assert!(opts.deadline > before, "an accepted deadline is in the future"),
        Err(e) => client_error(&e),
    }
    if let Err(e) = require_image(&headers) {
        client_error(&e);
    }

    if let Ok(text) = std::str::from_utf8(body)
        && let Ok(hash) = Pdq::from_hex(text)
    {
        assert_eq!(hash.to_string(), text.to_ascii_lowercase(), "a parsed PDQ hash prints as it was given");
    }

    match ProfileUpload::parse(body) {
        Ok(upload) => {
            for (_, source) in &upload.references {
                if let Source::Image(bytes) = source {
                    assert!(bytes.len() <= body.len(), "decoded base64 is shorter than the body");
                }
            }
        }
        Err(e) => client_error(&e),
    }
});
