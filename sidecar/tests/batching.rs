//! Dynamic batching, live tuning, deadlines and back-pressure, observed through the HTTP API.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// Embeds an image through the model: these tests send one image many times, and the cache
/// would otherwise answer (or coalesce) the repeats.
async fn post_model(url: &str, image: &[u8]) -> Reply {
    send(Method::POST, url, &[("content-type", "image/jpeg"), ("cache-control", "no-store")], image.to_vec()).await
}

/// Sends `n` embed requests at once and returns their replies.
async fn burst(s: &Server, n: usize, image: &[u8]) -> Vec<Reply> {
    let url = s.url("/api/v1/embed");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (url, image) = (url.clone(), image.to_vec());
            tokio::spawn(async move { post_model(&url, &image).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

/// (batches run, images run) so far, from /metrics.
async fn batches(s: &Server) -> (f64, f64) {
    let m = get(&s.url("/metrics")).await.text();
    (metric(&m, "inferpool_batch_size_count"), metric(&m, "inferpool_batch_size_sum"))
}

/// Sends `n` requests with a long deadline and returns once all of them wait in the batcher (a
/// long max delay keeps them there). The batcher has no event for this, so its depth is polled.
async fn hold(s: &Server, n: usize, image: &[u8]) -> Vec<tokio::task::JoinHandle<Reply>> {
    let waiting = (0..n)
        .map(|_| {
            let (url, image) = (s.url("/api/v1/embed"), image.to_vec());
            let headers = [("content-type", "image/jpeg"), ("x-deadline-ms", "20000"), ("cache-control", "no-store")];
            tokio::spawn(async move { send(Method::POST, &url, &headers, image).await })
        })
        .collect();
    let queued = async {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        loop {
            ticker.tick().await;
            if s.app.batcher().is_some_and(|b| b.depth() == n) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued).await.unwrap();
    waiting
}

async fn push_tuning(s: &Server, tuning: Value) -> Reply {
    let body = serde_json::to_vec(&tuning).unwrap();
    send(Method::PUT, &s.admin_url("/api/v1/tuning"), &[("authorization", &format!("Bearer {TOKEN}"))], body).await
}

#[tokio::test]
async fn concurrent_requests_share_batches_and_tuning_changes_that_live() {
    let s = Server::start(&["--max-batch", "8", "--max-delay-ms", "500"]).await;
    let image = jpeg(&decode(&photo("coffee.png")), 85);

    let replies = burst(&s, 8, &image).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let (count, sum) = batches(&s).await;
    assert_eq!(sum, 8.0);
    assert!(sum / count > 1.0, "8 concurrent requests ran in {count} batches");

    // The operator's push: one image per batch, applied without a restart.
    let r = push_tuning(&s, json!({"generation": 1, "maxBatchSize": 1, "maxDelayMs": 0})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(get(&s.admin_url("/api/v1/tuning")).await.json()["maxBatchSize"], 1);
    let replies = burst(&s, 6, &image).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let (count2, sum2) = batches(&s).await;
    assert_eq!((count2 - count, sum2 - sum), (6.0, 6.0), "every batch after the push holds one image");

    let sla = get(&s.url("/api/v1/metrics/sla")).await.json();
    assert_eq!(sla["tuning"]["generation"], 1);
    let metrics = get(&s.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, "inferpool_tuning_generation"), 1.0);
    assert_eq!(metric(&metrics, "inferpool_tuning_max_batch_size"), 1.0);

    // A late push of an older generation does not undo the newer one.
    let r = push_tuning(&s, json!({"generation": 0, "maxBatchSize": 32, "maxDelayMs": 5})).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::CONFLICT, "stale_generation"));
    assert_eq!(get(&s.admin_url("/api/v1/tuning")).await.json()["maxBatchSize"], 1);
    s.stop().await;
}

#[tokio::test]
async fn a_lone_request_waits_for_max_delay_and_no_longer() {
    let s = Server::start(&["--max-batch", "64", "--max-delay-ms", "300"]).await;
    let image = photo("rocket.jpg");
    let e = post_model(&s.url("/api/v1/embed"), &image).await.json();
    let queue = e["timing_ms"]["queue"].as_f64().unwrap();
    assert!((300.0..2000.0).contains(&queue), "queued {queue} ms with max delay 300 ms");

    push_tuning(&s, json!({"generation": 2, "maxBatchSize": 64, "maxDelayMs": 0})).await;
    let e = post_model(&s.url("/api/v1/embed"), &image).await.json();
    let queue = e["timing_ms"]["queue"].as_f64().unwrap();
    assert!(queue < 300.0, "queued {queue} ms with max delay 0");
    s.stop().await;
}

#[tokio::test]
async fn full_queue_answers_429_and_expired_requests_504() {
    let s = Server::start(&["--max-batch", "64", "--max-delay-ms", "3000", "--queue-capacity", "2"]).await;
    let image = photo("rocket.jpg");

    // Alone in a 3 s batch window, a request with a 200 ms budget times out.
    let r = send(
        Method::POST,
        &s.url("/api/v1/embed"),
        &[("content-type", "image/jpeg"), ("x-deadline-ms", "200"), ("cache-control", "no-store")],
        image.clone(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"));

    let waiting = hold(&s, 2, &image).await;
    let r = post_model(&s.url("/api/v1/embed"), &image).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "queue_full"));
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");

    // The queued requests are not lost: they run when their batch window closes.
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
    let sla = get(&s.url("/api/v1/metrics/sla")).await.json();
    // 504 and 429 count against the SLA; the two successes do not.
    assert_eq!((sla["windows"][2]["requests"].as_u64(), sla["windows"][2]["errors"].as_u64()), (Some(4), Some(2)));
    s.stop().await;
}
