//! Overload through the HTTP API: requests the queue cannot serve in time are refused before they
//! are decoded, with a Retry-After from the drain time; concurrent large uploads keep the decode
//! stage at its bound.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::{Method, StatusCode};

/// `n` distinct JPEGs of `w` x `h` made from a real photo (distinct so no cache or coalescing
/// answers them).
fn distinct_jpegs(n: usize, w: u32, h: u32) -> Vec<Vec<u8>> {
    let base = decode(&photo("coffee.png")).resize_exact(w, h, image::imageops::FilterType::Triangle).to_rgb8();
    (0..n)
        .map(|i| {
            let mut img = base.clone();
            img.put_pixel(0, 0, image::Rgb([i as u8, (i >> 8) as u8, 7]));
            jpeg(&image::DynamicImage::ImageRgb8(img), 90)
        })
        .collect()
}

async fn embed(url: String, body: Vec<u8>, deadline_ms: &str) -> Reply {
    let headers = [("content-type", "image/jpeg"), ("cache-control", "no-store"), ("x-deadline-ms", deadline_ms)];
    send(Method::POST, &url, &headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_what_the_deadline_allows_is_refused_before_decoding() {
    // One image per batch: a burst of 64 needs 64 model runs, far more than a 300 ms budget.
    let s = Server::start(&["--max-batch", "1", "--max-delay-ms", "0", "--queue-capacity", "4096"]).await;
    let images = distinct_jpegs(65, 640, 400);
    // One request first, so both stages have been measured.
    assert_eq!(embed(s.url("/api/v1/embed"), images[64].clone(), "60000").await.status, StatusCode::OK);

    let tasks: Vec<_> =
        images[..64].iter().map(|img| tokio::spawn(embed(s.url("/api/v1/embed"), img.clone(), "300"))).collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let count = |status: StatusCode| replies.iter().filter(|r| r.status == status).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!(!refused.is_empty(), "no request was refused");
    assert!(count(StatusCode::OK) >= 1, "nothing was answered");
    for r in &refused {
        assert_eq!(r.code(), "overloaded", "{}", r.text());
        let retry: u64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!(retry >= 1, "Retry-After {retry}");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("queued ahead"), "{}", r.text());
    }
    assert_eq!(
        count(StatusCode::OK) + refused.len() + count(StatusCode::GATEWAY_TIMEOUT),
        64,
        "every request got 200, 429 or 504"
    );
    let m = get(&s.admin_url("/metrics")).await.text();
    let decoded = metric(&m, "inferpool_decode_seconds_count");
    assert!(decoded <= (65 - refused.len()) as f64, "{decoded} decodes for {} refused of 65", refused.len());
    assert_eq!(metric(&m, "inferpool_admission_refused_total{reason=\"overloaded\"}"), refused.len() as f64);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_uploads_keep_the_decode_stage_at_its_bound() {
    let s = Server::start(&["--decode-threads", "2", "--queue-capacity", "4096"]).await;
    let images = distinct_jpegs(24, 3000, 2000);
    let tasks: Vec<_> =
        images.into_iter().map(|img| tokio::spawn(embed(s.url("/api/v1/embed"), img, "120000"))).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    let m = get(&s.admin_url("/metrics")).await.text();
    assert_eq!(metric(&m, "inferpool_decode_workers"), 2.0);
    let peak = metric(&m, "inferpool_decode_inflight_peak");
    assert!((1.0..=2.0).contains(&peak), "{peak} images decoded at once with 2 decode threads");
    assert_eq!(metric(&m, "inferpool_decode_seconds_count"), 24.0);
    assert_eq!(metric(&m, "inferpool_decode_inflight"), 0.0);
    s.stop().await;
}
