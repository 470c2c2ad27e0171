//! Every response carries an `X-Request-Id`: the client's when it is usable, a fresh one otherwise.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};

const HEADER: &str = "x-request-id";

#[tokio::test]
async fn request_ids_are_echoed_generated_or_replaced_on_every_listener_and_status() {
    let s = Server::start(&[]).await;
    let too_long = "x".repeat(129);
    let longest = "y".repeat(128);
    // (url, method, id sent, status, whether the id sent comes back)
    let cases = [
        (s.url("/healthz"), Method::GET, Some("client-id-1"), StatusCode::OK, true),
        (s.url("/healthz"), Method::GET, Some(longest.as_str()), StatusCode::OK, true),
        (s.url("/no/such/path"), Method::GET, Some("not-found-2"), StatusCode::NOT_FOUND, true),
        (s.url("/api/v1/embed"), Method::GET, Some("wrong-method-3"), StatusCode::METHOD_NOT_ALLOWED, true),
        (s.admin_url("/api/v1/tuning"), Method::PUT, Some("no-token-4"), StatusCode::UNAUTHORIZED, true),
        (s.admin_url("/live"), Method::GET, None, StatusCode::OK, false),
        (s.url("/healthz"), Method::GET, Some("has space"), StatusCode::OK, false),
        (s.url("/healthz"), Method::GET, Some(too_long.as_str()), StatusCode::OK, false),
        (s.url("/healthz"), Method::GET, Some(""), StatusCode::OK, false),
    ];
    for (url, method, sent, status, echoed) in cases {
        let headers: Vec<(&str, &str)> = sent.map(|id| (HEADER, id)).into_iter().collect();
        let reply = send(method.clone(), &url, &headers, Bytes::new()).await;
        assert_eq!(reply.status, status, "{method} {url}");
        let got = reply.headers.get(HEADER).unwrap_or_else(|| panic!("{method} {url}: no {HEADER}"));
        let got = got.to_str().unwrap();
        if echoed {
            assert_eq!(Some(got), sent, "{method} {url}");
        } else {
            assert_ne!(Some(got), sent, "{method} {url}");
            assert!(got.len() == 32 && got.bytes().all(|b| b.is_ascii_hexdigit()), "{method} {url}: {got:?}");
        }
    }
    let first = get(&s.url("/healthz")).await.headers[HEADER].clone();
    let second = get(&s.url("/healthz")).await.headers[HEADER].clone();
    assert_ne!(first, second, "two requests without an id got the same one");
    s.stop().await;
}
