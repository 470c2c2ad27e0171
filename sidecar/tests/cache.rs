//! The embedding cache end to end: real sidecars, a real redis-server, real files on disk.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::redis::RedisServer;
use common::{Server, TOKEN, get, metric, photo, send};
use http::{Method, StatusCode};
use inferpool_sidecar::cache::breaker::BreakerState;
use serde_json::{Value, json};

/// A small image whose bytes differ for every `i`.
fn tiny(i: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 48, |x, y| {
        image::Rgb([(x * 5 + i * 7) as u8, (y * 5 + i * 13) as u8, ((x + y) * 3 + i * 29) as u8])
    });
    common::png(&image::DynamicImage::ImageRgb8(img))
}

/// Embeds an image; returns (embedding, cache source).
async fn embed(s: &Server, image: &[u8], headers: &[(&str, &str)]) -> (Vec<f32>, String) {
    let mut all = vec![("content-type", "image/png")];
    all.extend_from_slice(headers);
    let r = send(Method::POST, &s.url("/api/v1/embed"), &all, image.to_vec()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let e = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    (e, v["cache"].as_str().unwrap().to_owned())
}

async fn metrics(s: &Server) -> String {
    get(&s.url("/metrics")).await.text()
}

async fn images_embedded(s: &Server) -> f64 {
    metric(&metrics(s).await, "inferpool_images_embedded_total")
}

async fn admin(s: &Server, method: Method, path: &str, body: Option<Value>) -> common::Reply {
    let auth = format!("Bearer {TOKEN}");
    let body = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    send(method, &s.admin_url(path), &[("authorization", &auth), ("content-type", "application/json")], body).await
}

/// Bytes the files under `dir` occupy on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += disk_usage(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

fn entry_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().is_dir()) {
        if sub.file_name() == "tmp" {
            continue;
        }
        out.extend(std::fs::read_dir(sub.path()).unwrap().flatten().map(|e| e.path()));
    }
    out.sort();
    out
}

#[tokio::test]
async fn each_tier_answers_in_turn_with_the_same_embedding() {
    let redis = RedisServer::start();
    let data_a = tempfile::tempdir().unwrap();
    let flags = ["--redis-url", &redis.url()];
    let a = Server::start_in(data_a.path(), &flags).await;
    connected(&a).await;
    let image = photo("astronaut.png");

    let (computed, source) = embed(&a, &image, &[]).await;
    assert_eq!(source, "miss");
    let (again, source) = embed(&a, &image, &[]).await;
    assert_eq!((source.as_str(), &again), ("memory", &computed));

    a.app.cache.flush().await;
    let r = admin(&a, Method::DELETE, "/api/v1/cache?tier=memory", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["cleared"]["memory"], 1);
    let (from_disk, source) = embed(&a, &image, &[]).await;
    assert_eq!((source.as_str(), &from_disk), ("disk", &computed));

    // A second replica with its own disk shares Redis.
    let b = Server::start(&flags).await;
    connected(&b).await;
    let (from_redis, source) = embed(&b, &image, &[]).await;
    assert_eq!((source.as_str(), &from_redis), ("redis", &computed));
    let (_, source) = embed(&b, &image, &[]).await;
    assert_eq!(source, "memory", "an L3 hit is promoted to L1");
    b.app.cache.flush().await;
    assert_eq!(b.app.cache.stats()["disk"]["entries"], 1, "an L3 hit is promoted to L2");

    let report = get(&a.url("/api/v1/metrics/sla")).await.json();
    let short = &report["windows"][1];
    assert_eq!(short["cacheLookups"], 3);
    let by_tier = &short["cacheHitRateByTier"];
    assert!((by_tier["memory"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{short}");
    assert!((by_tier["disk"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{short}");
    let text = metrics(&a).await;
    assert_eq!(metric(&text, "inferpool_cache_requests_total{result=\"hit\",tier=\"disk\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "inferpool_cache_entries{tier=\"disk\"}"), 1.0);

    // After a restart the disk still has it.
    a.stop().await;
    let a = Server::start_in(data_a.path(), &["--redis-url", &redis.url()]).await;
    let (restarted, source) = embed(&a, &image, &[]).await;
    assert_eq!((source.as_str(), &restarted), ("disk", &computed));
    assert_eq!(images_embedded(&a).await, 0.0, "the restarted replica ran no inference");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_inference() {
    // A long batching delay keeps the first inference in flight while the others arrive.
    let s = Server::start(&["--max-delay-ms", "200", "--max-batch", "64"]).await;
    let image = tiny(1);
    let calls = (0..50).map(|_| {
        let (url, image) = (s.url("/api/v1/embed"), image.clone());
        tokio::spawn(async move { send(Method::POST, &url, &[("content-type", "image/png")], image).await })
    });
    let replies = futures_join(calls).await;
    let mut sources = std::collections::HashMap::<String, usize>::new();
    let first = replies[0].json()["embedding"].clone();
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["embedding"], first);
        *sources.entry(r.json()["cache"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert_eq!(sources.get("miss"), Some(&1), "{sources:?}");
    assert_eq!(images_embedded(&s).await, 1.0, "{sources:?}");
    assert_eq!(
        metric(&metrics(&s).await, "inferpool_cache_coalesced_total"),
        *sources.get("coalesced").unwrap_or(&0) as f64
    );
    s.stop().await;
}

async fn futures_join(handles: impl Iterator<Item = tokio::task::JoinHandle<common::Reply>>) -> Vec<common::Reply> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn cache_control_refreshes_or_bypasses() {
    let s = Server::start(&[]).await;
    let (a, b) = (tiny(2), tiny(3));
    let (first, source) = embed(&s, &a, &[]).await;
    assert_eq!(source, "miss");
    let (fresh, source) = embed(&s, &a, &[("cache-control", "no-cache")]).await;
    assert_eq!((source.as_str(), &fresh), ("refresh", &first));
    assert_eq!(images_embedded(&s).await, 2.0, "no-cache runs the model even for a cached image");
    let (_, source) = embed(&s, &b, &[("cache-control", "max-age=60, no-store")]).await;
    assert_eq!(source, "bypass");
    let (_, source) = embed(&s, &b, &[]).await;
    assert_eq!(source, "miss", "no-store stored nothing");
    let (_, source) = embed(&s, &b, &[("Cache-Control", "public")]).await;
    assert_eq!(source, "memory", "other directives change nothing");
    s.stop().await;
}

#[tokio::test]
async fn cache_admin_refuses_bad_requests() {
    let s = Server::start(&[]).await;
    let cases: [(&str, Option<&str>, StatusCode, &str); 3] = [
        ("/api/v1/cache?tier=redis", Some(TOKEN), StatusCode::BAD_REQUEST, "invalid_query"),
        ("/api/v1/cache", None, StatusCode::UNAUTHORIZED, "unauthorized"),
        ("/api/v1/cache", Some("wrong"), StatusCode::UNAUTHORIZED, "unauthorized"),
    ];
    for (path, token, status, code) in cases {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = send(Method::DELETE, &s.admin_url(path), &headers, Vec::new()).await;
        assert_eq!((r.status, r.code().as_str()), (status, code), "{path} {token:?}: {}", r.text());
    }
    let stats = get(&s.admin_url("/api/v1/cache")).await.json();
    assert_eq!(stats["memory"]["capacity"], 1000, "{stats}");
    s.stop().await;
}

/// Waits until the sidecar's Redis tier has connected (it connects in the background).
async fn connected(s: &Server) {
    let mut rx = s.app.cache.redis().unwrap().subscribe_connected();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c)).await.unwrap().unwrap();
}

/// A sidecar whose only cache tier is Redis, so every lookup reaches it.
async fn redis_only(redis: &RedisServer) -> Server {
    let s = Server::start(&["--redis-url", &redis.url(), "--memory-entries", "0", "--disk-mb", "0"]).await;
    connected(&s).await;
    s
}

#[tokio::test]
async fn a_redis_outage_fails_no_request_and_l3_comes_back_by_itself() {
    let mut redis = RedisServer::start();
    let s = redis_only(&redis).await;
    let image = tiny(4);
    let (computed, _) = embed(&s, &image, &[]).await;
    s.app.cache.flush().await;
    assert_eq!(embed(&s, &image, &[]).await.1, "redis");

    redis.kill();
    let mut state = s.app.cache.redis().unwrap().subscribe_state();
    for _ in 0..10 {
        let (e, source) = embed(&s, &image, &[]).await;
        assert_eq!((source.as_str(), &e), ("miss", &computed));
    }
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| *s == BreakerState::Open)).await.unwrap().unwrap();
    let text = metrics(&s).await;
    assert_eq!(metric(&text, "inferpool_cache_circuit_state{tier=\"redis\"}"), 1.0, "{text}");
    assert!(metric(&text, "inferpool_cache_requests_total{result=\"skipped\",tier=\"redis\"}") > 0.0);

    redis.restart();
    // The restarted Redis is empty: the first answers refill it, then L3 hits resume.
    let mut resumed = false;
    for _ in 0..200 {
        let (e, source) = embed(&s, &image, &[]).await;
        assert_eq!(e, computed);
        if source == "redis" {
            resumed = true;
            break;
        }
        s.app.cache.flush().await;
        // The breaker only probes when a request comes after its cooldown, so requests are paced
        // rather than awaited: no event says "Redis is usable again" before a probe has run.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "L3 hits did not resume after Redis came back");
    let text = metrics(&s).await;
    assert_eq!(metric(&text, "inferpool_cache_circuit_state{tier=\"redis\"}"), 0.0);
    let failed: f64 = ["500", "503", "504"]
        .iter()
        .map(|c| metric(&text, &format!("inferpool_requests_total{{code=\"{c}\",route=\"embed\"}}")))
        .sum();
    assert_eq!(failed, 0.0);
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_redis_costs_at_most_its_timeout() {
    let redis = RedisServer::start();
    let s = redis_only(&redis).await;
    let image = tiny(5);
    embed(&s, &image, &[]).await;
    redis.pause();
    // Each request would hang forever on a stalled Redis without the lookup budget.
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(5), embed(&s, &image, &[])).await;
        assert_eq!(r.expect("a request waited on a stalled Redis").1, "miss");
    }
    let text = metrics(&s).await;
    assert!(metric(&text, "inferpool_cache_errors_total{kind=\"timeout\",tier=\"redis\"}") >= 1.0, "{text}");
    redis.resume();
    s.stop().await;
}

#[tokio::test]
async fn damaged_disk_entries_are_dropped_counted_and_recomputed() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_in(data.path(), &[]).await;
    let images: Vec<_> = (10..14).map(tiny).collect();
    let mut computed = Vec::new();
    for img in &images {
        computed.push(embed(&s, img, &[]).await.0);
    }
    s.app.cache.flush().await;
    s.stop().await;

    let files = entry_files(&data.path().join("cache"));
    assert_eq!(files.len(), 4);
    let truncate = |p: &Path, len: u64| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(len).unwrap();
    let flip = |p: &Path, at: usize| {
        let mut b = std::fs::read(p).unwrap();
        let i = at.min(b.len() - 1);
        b[i] ^= 0xff;
        std::fs::write(p, b).unwrap();
    };
    truncate(&files[0], 0);
    truncate(&files[1], 100);
    flip(&files[2], 10);
    flip(&files[3], 4000);

    let s = Server::start_in(data.path(), &[]).await;
    for (img, want) in images.iter().zip(&computed) {
        let (e, source) = embed(&s, img, &[]).await;
        assert_eq!((source.as_str(), &e), ("miss", want));
    }
    let text = metrics(&s).await;
    assert_eq!(metric(&text, "inferpool_cache_errors_total{kind=\"corrupt\",tier=\"disk\"}"), 4.0, "{text}");
    // The recomputed entries were written again.
    s.app.cache.flush().await;
    admin(&s, Method::DELETE, "/api/v1/cache", None).await;
    assert_eq!(embed(&s, &images[0], &[]).await.1, "disk");
    s.stop().await;
}

#[tokio::test]
async fn the_disk_tier_stays_within_its_budget() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_in(data.path(), &["--disk-mb", "1", "--memory-entries", "0"]).await;
    let dir = data.path().join("cache");
    for i in 100..400 {
        embed(&s, &tiny(i), &[]).await;
        if i % 50 == 0 {
            s.app.cache.flush().await;
            assert!(disk_usage(&dir) <= 1 << 20, "{} bytes on disk", disk_usage(&dir));
        }
    }
    s.app.cache.flush().await;
    let used = disk_usage(&dir);
    let stats = s.app.cache.stats();
    assert!(used <= 1 << 20, "{used} bytes on disk");
    assert!(stats["disk"]["bytes"].as_u64().unwrap() <= 1 << 20, "{stats}");
    assert!(stats["disk"]["entries"].as_u64().unwrap() >= 100, "the budget is used: {stats}");
    s.stop().await;
}

#[tokio::test]
async fn a_tuning_push_resizes_memory_and_keeps_hot_entries() {
    let s = Server::start(&["--memory-entries", "200", "--disk-mb", "0"]).await;
    for i in 500..600 {
        embed(&s, &tiny(i), &[]).await;
    }
    for _ in 0..3 {
        for i in 500..510 {
            assert_eq!(embed(&s, &tiny(i), &[]).await.1, "memory");
        }
    }
    let r = admin(
        &s,
        Method::PUT,
        "/api/v1/tuning",
        Some(json!({"generation": 1, "maxBatchSize": 16, "maxDelayMs": 5, "cacheEntries": 40})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let stats = get(&s.admin_url("/api/v1/cache")).await.json();
    assert_eq!(stats["memory"]["capacity"], 40, "{stats}");
    assert!(stats["memory"]["entries"].as_u64().unwrap() < 60, "{stats}");
    for i in 500..510 {
        assert_eq!(embed(&s, &tiny(i), &[]).await.1, "memory", "hot entry {i} was dropped by the shrink");
    }
    assert_eq!(metric(&metrics(&s).await, "inferpool_cache_memory_capacity_entries"), 40.0);
    s.stop().await;
}

#[tokio::test]
async fn memory_pressure_shrinks_then_clears_the_memory_tier() {
    // A limit far below what the process already uses: the guard acts on its first checks.
    let s = Server::start(&["--memory-limit-mb", "16", "--disk-mb", "0"]).await;
    let text = metrics(&s).await;
    assert_eq!(metric(&text, "inferpool_memory_limit_bytes"), f64::from(16u32 << 20));
    assert!(metric(&text, "inferpool_resident_memory_bytes") > f64::from(16u32 << 20), "{text}");
    for i in 700..720 {
        embed(&s, &tiny(i), &[]).await;
    }
    let mut cleared = false;
    for _ in 0..100 {
        let text = metrics(&s).await;
        if metric(&text, "inferpool_cache_pressure_actions_total{action=\"clear\"}") >= 1.0 {
            assert!(metric(&text, "inferpool_cache_pressure_actions_total{action=\"shrink\"}") >= 1.0);
            cleared = true;
            break;
        }
        // The guard checks once a second and publishes only through metrics: poll them.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cleared, "memory pressure never cleared the cache");
    let stats = s.app.cache.stats();
    assert!(stats["memory"]["capacity"].as_u64().unwrap() < 1000, "{stats}");
    s.stop().await;
}

#[tokio::test]
async fn profiles_are_shared_by_replicas_through_redis() {
    let mut redis = RedisServer::start();
    let flags = ["--redis-url", &redis.url()];
    let (a, b) = (Server::start(&flags).await, Server::start(&flags).await);
    connected(&a).await;
    connected(&b).await;
    let cat = photo("chelsea.png");
    let r = common::put_json(&a.url("/api/v1/profiles/cats"), &common::profile_body(&[("chelsea", &cat)])).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["shared"], true);

    // B has never seen it: naming it pulls it at once.
    let r = get(&b.url("/api/v1/profiles/cats")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["references"][0]["id"], "chelsea");
    let r =
        send(Method::POST, &b.url("/api/v1/match?profile=cats"), &[("content-type", "image/png")], cat.clone()).await;
    assert_eq!(r.json()["matched"], true, "{}", r.text());

    // A delete through A reaches B at its next pull (the background one runs every second).
    let r = send(Method::DELETE, &a.url("/api/v1/profiles/cats"), &[], Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    b.app.profile_sync.as_ref().unwrap().pull().await.unwrap();
    assert_eq!(get(&b.url("/api/v1/profiles/cats")).await.status, StatusCode::NOT_FOUND);

    // Without Redis each replica keeps serving what it has on disk.
    let r = common::put_json(&b.url("/api/v1/profiles/dogs"), &common::profile_body(&[("chelsea", &cat)])).await;
    assert_eq!(r.status, StatusCode::CREATED);
    get(&a.url("/api/v1/profiles/dogs")).await;
    redis.kill();
    let r = get(&a.url("/api/v1/profiles/dogs")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = common::put_json(&a.url("/api/v1/profiles/birds"), &common::profile_body(&[("chelsea", &cat)])).await;
    assert_eq!((r.status, r.json()["shared"].clone()), (StatusCode::CREATED, json!(false)), "{}", r.text());
    a.stop().await;
    b.stop().await;
}
