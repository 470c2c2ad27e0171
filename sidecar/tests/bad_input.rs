//! Bad input of every kind gets its specific status and JSON error, and the server stays healthy.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// A PNG that claims to be `w` x `h` pixels: signature and IHDR only, no pixel data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    admin: bool,
    headers: Vec<(&'static str, &'static str)>,
    body: Bytes,
    status: StatusCode,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: &'static str,
    body: impl Into<Bytes>,
    status: StatusCode,
    code: &'static str,
) -> Case {
    let headers = if path.contains("profiles") {
        vec![("content-type", "application/json")]
    } else {
        vec![("content-type", "image/jpeg")]
    };
    Case { name, method, path, admin: false, headers, body: body.into(), status, code }
}

impl Case {
    fn headers(mut self, headers: &[(&'static str, &'static str)]) -> Self {
        self.headers = headers.to_vec();
        self
    }
    fn admin(mut self) -> Self {
        self.admin = true;
        self
    }
}

#[tokio::test]
async fn bad_input_gets_a_specific_error_and_the_server_stays_healthy() {
    let s = Server::start(&["--max-body-bytes", "1048576"]).await;
    let chelsea = photo("chelsea.png");
    let jpeg_photo = jpeg(&decode(&chelsea), 90);
    // A 640x400 photo whose frame header was rewritten to claim 6000x6000.
    let mut lying = jpeg(&decode(&chelsea).resize_exact(640, 400, image::imageops::FilterType::Triangle), 90);
    let sof = lying.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline frame header");
    lying[sof + 5..sof + 9].copy_from_slice(&[0x17, 0x70, 0x17, 0x70]);
    let put = put_json(&s.url("/api/v1/profiles/known"), &profile_body(&[("a", &chelsea)])).await;
    assert_eq!(put.status, StatusCode::CREATED);
    use Method as M;
    use StatusCode as S;
    let embed = "/api/v1/embed";
    let profile = "/api/v1/profiles/p1";
    let auth = ("authorization", "Bearer test-admin-token");
    let json_body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let cases = [
        case("empty body", M::POST, embed, vec![], S::BAD_REQUEST, "empty_body"),
        case(
            "truncated JPEG",
            M::POST,
            embed,
            jpeg_photo[..jpeg_photo.len() / 2].to_vec(),
            S::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
        case(
            "header claims 6000x6000 over 640x400 of data",
            M::POST,
            embed,
            lying,
            S::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
        case(
            "bytes that are no image",
            M::POST,
            embed,
            b"hello, this is not an image".to_vec(),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image",
        ),
        case(
            "wrong Content-Type",
            M::POST,
            embed,
            jpeg_photo.clone(),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .headers(&[("content-type", "application/json")]),
        case("body over the limit", M::POST, embed, vec![0u8; 2 << 20], S::PAYLOAD_TOO_LARGE, "body_too_large"),
        case(
            "50000x50000 PNG header",
            M::POST,
            embed,
            png_header(50_000, 50_000),
            S::PAYLOAD_TOO_LARGE,
            "image_too_large",
        ),
        case("bad priority", M::POST, embed, jpeg_photo.clone(), S::BAD_REQUEST, "invalid_header")
            .headers(&[("content-type", "image/jpeg"), ("x-priority", "urgent")]),
        case("bad deadline", M::POST, embed, jpeg_photo.clone(), S::BAD_REQUEST, "invalid_header")
            .headers(&[("content-type", "image/jpeg"), ("x-deadline-ms", "soon")]),
        case("deadline already past", M::POST, embed, jpeg_photo.clone(), S::GATEWAY_TIMEOUT, "deadline_exceeded")
            .headers(&[("content-type", "image/jpeg"), ("x-deadline-ms", "0")]),
        case("match without profile", M::POST, "/api/v1/match", jpeg_photo.clone(), S::BAD_REQUEST, "invalid_query"),
        case(
            "match unknown profile",
            M::POST,
            "/api/v1/match?profile=nobody",
            jpeg_photo.clone(),
            S::NOT_FOUND,
            "profile_not_found",
        ),
        case("scan top_k 0", M::POST, "/api/v1/scan?top_k=0", jpeg_photo.clone(), S::BAD_REQUEST, "invalid_query"),
        case(
            "scan top_k twice",
            M::POST,
            "/api/v1/scan?top_k=1&top_k=2",
            jpeg_photo.clone(),
            S::BAD_REQUEST,
            "invalid_query",
        ),
        case(
            "misspelt parameter",
            M::POST,
            "/api/v1/embed?topk=3",
            jpeg_photo.clone(),
            S::BAD_REQUEST,
            "invalid_query",
        ),
        case(
            "percent-encoded unsafe profile id",
            M::POST,
            "/api/v1/match?profile=..%2Fsecret",
            jpeg_photo.clone(),
            S::BAD_REQUEST,
            "invalid_profile_id",
        ),
        case(
            "include other than embeddings",
            M::GET,
            "/api/v1/profiles/nobody?include=all",
            vec![],
            S::BAD_REQUEST,
            "invalid_query",
        ),
        case("invalid profile JSON", M::PUT, profile, b"{\"references\": [".to_vec(), S::BAD_REQUEST, "invalid_json"),
        case(
            "profile JSON of the wrong shape",
            M::PUT,
            profile,
            json_body(json!({"refs": []})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        case(
            "profile without references",
            M::PUT,
            profile,
            json_body(json!({"references": []})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_profile",
        ),
        case("unknown profile", M::GET, "/api/v1/profiles/nobody", vec![], S::NOT_FOUND, "profile_not_found"),
        case("delete unknown profile", M::DELETE, "/api/v1/profiles/nobody", vec![], S::NOT_FOUND, "profile_not_found"),
        case(
            "bad profile id",
            M::PUT,
            "/api/v1/profiles/..secret",
            json_body(json!({"references": [{"id": "a", "embedding": [1.0]}]})),
            S::BAD_REQUEST,
            "invalid_profile_id",
        ),
        case(
            "bad base64",
            M::PUT,
            profile,
            json_body(json!({"references": [{"id": "a", "image_b64": "not base64!"}]})),
            S::BAD_REQUEST,
            "invalid_base64",
        ),
        case(
            "reference image that is no image",
            M::PUT,
            profile,
            json_body(json!({"references": [{"id": "a", "image_b64": "aGVsbG8="}]})),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image",
        ),
        case(
            "wrong embedding dimension",
            M::PUT,
            profile,
            json_body(json!({"references": [{"id": "a", "embedding": [0.5, 0.5, 0.5]}]})),
            S::UNPROCESSABLE_ENTITY,
            "dimension_mismatch",
        ),
        case(
            "both image and embedding",
            M::PUT,
            profile,
            json_body(json!({"references": [{"id": "a", "image_b64": "aGVsbG8=", "embedding": [1.0]}]})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        case(
            "profile threshold out of range",
            M::PUT,
            profile,
            json_body(json!({"threshold": 3.0, "references": [{"id": "a", "embedding": vec![0.1; 1280]}]})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_profile",
        ),
        case(
            "profile as an image upload",
            M::PUT,
            profile,
            jpeg_photo.clone(),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .headers(&[("content-type", "image/jpeg")]),
        case("unknown route", M::GET, "/api/v2/embed", vec![], S::NOT_FOUND, "not_found"),
        case("wrong method", M::GET, embed, vec![], S::METHOD_NOT_ALLOWED, "method_not_allowed"),
        case(
            "tuning without token",
            M::PUT,
            "/api/v1/tuning",
            json_body(json!({"generation": 1, "maxBatchSize": 8, "maxDelayMs": 2})),
            S::UNAUTHORIZED,
            "unauthorized",
        )
        .admin(),
        case(
            "tuning with a wrong token",
            M::PUT,
            "/api/v1/tuning",
            json_body(json!({"generation": 1, "maxBatchSize": 8, "maxDelayMs": 2})),
            S::UNAUTHORIZED,
            "unauthorized",
        )
        .admin()
        .headers(&[("authorization", "Bearer guess")]),
        case(
            "invalid tuning",
            M::PUT,
            "/api/v1/tuning",
            json_body(json!({"generation": 1, "maxBatchSize": 0, "maxDelayMs": 99999})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_request",
        )
        .admin()
        .headers(&[auth]),
        case(
            "tuning with an unknown field",
            M::PUT,
            "/api/v1/tuning",
            json_body(json!({"generation": 1, "batch": 8})),
            S::UNPROCESSABLE_ENTITY,
            "invalid_request",
        )
        .admin()
        .headers(&[auth]),
        case("tuning that is not JSON", M::PUT, "/api/v1/tuning", b"batch=8".to_vec(), S::BAD_REQUEST, "invalid_json")
            .admin()
            .headers(&[auth]),
    ];
    for c in cases {
        let url = if c.admin { s.admin_url(c.path) } else { s.url(c.path) };
        let r = send(c.method.clone(), &url, &c.headers, c.body.clone()).await;
        assert_eq!((r.status, r.code().as_str()), (c.status, c.code), "{}: {}", c.name, r.text());
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{}: no message", c.name);
        assert_eq!(get(&s.url("/healthz")).await.status, StatusCode::OK, "unhealthy after {}", c.name);
    }
    // Nothing above broke the server or the stored profile: a real request still works.
    let m = post_image(&s.url("/api/v1/match?profile=known"), &jpeg_photo).await;
    assert_eq!((m.status, m.json()["matched"].as_bool()), (StatusCode::OK, Some(true)), "{}", m.text());
    assert_eq!(get(&s.url("/api/v1/profiles/p1")).await.status, StatusCode::NOT_FOUND, "a refused upload was stored");
    s.stop().await;
}
