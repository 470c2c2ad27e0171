//! `GET /api/v1/health` and the readiness probe through the sidecar's life: loading, serving with
//! and without Redis, under memory pressure, and draining.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisServer, free_port};
use common::*;
use http::StatusCode;
use inferpool_sidecar::App;
use inferpool_sidecar::http::api;
use inferpool_sidecar::report::{self, Health};
use serde_json::Value;

fn component<'a>(body: &'a Value, name: &str) -> &'a Value {
    &body["components"][name]
}

async fn health(s: &Server) -> (StatusCode, Value) {
    let reply = get(&s.url("/api/v1/health")).await;
    (reply.status, reply.json())
}

#[tokio::test]
async fn a_loading_sidecar_is_unhealthy_and_not_ready() {
    let data = tempfile::tempdir().unwrap();
    // The model is not loaded until the server starts: the state a probe sees while it loads.
    let app = Arc::new(App::new(config(data.path(), &[])).unwrap());
    let (overall, body) = report::health(&app);
    assert_eq!(overall, Health::Unhealthy);
    assert_eq!(
        (body["status"].as_str(), component(&body, "model")["phase"].as_str()),
        (Some("unhealthy"), Some("loading"))
    );
    let refused = api::readiness(&app).expect_err("ready while loading");
    assert_eq!(refused.status_code(), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"));
}

#[tokio::test]
async fn each_component_is_reported_and_redis_coming_back_makes_it_healthy() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let s = Server::start(&["--redis-url", &url, "--disk-mb", "16"]).await;

    // Redis is not there: the sidecar serves (200) but says it is degraded, and why.
    let (status, body) = health(&s).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("degraded")), "{body:#}");
    let redis = component(&body, "redis");
    assert_eq!((redis["status"].as_str(), redis["connected"].as_bool()), (Some("degraded"), Some(false)), "{body:#}");
    let model = component(&body, "model");
    assert_eq!((model["status"].as_str(), model["name"].as_str()), (Some("healthy"), Some("efficientnet-lite0")));
    assert!(model["variant"].as_str().is_some_and(|v| !v.is_empty()), "{body:#}");
    assert_eq!(component(&body, "diskCache")["budgetBytes"], 16 << 20, "{body:#}");
    assert_eq!(component(&body, "memoryCache")["status"], "healthy");
    assert_eq!(component(&body, "memory")["status"], "healthy", "{body:#}");

    // Redis appears: once the tier has connected, everything is healthy.
    let _redis = RedisServer::start_on(port);
    let mut connected = s.app.cache.redis().unwrap().subscribe_connected();
    tokio::time::timeout(Duration::from_secs(30), connected.wait_for(|up| *up)).await.unwrap().unwrap();
    let (status, body) = health(&s).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("healthy")), "{body:#}");
    assert_eq!(component(&body, "redis")["circuit"], "closed");

    // Draining: not ready, and unhealthy, while in-flight work finishes.
    s.app.set_draining();
    assert_eq!(get(&s.url("/readyz")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = health(&s).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unhealthy")));
    assert_eq!(component(&body, "model")["phase"], "draining");
    s.stop().await;
}

#[tokio::test]
async fn memory_above_the_pressure_threshold_is_degraded_and_without_optional_tiers_they_say_disabled() {
    // A 1 MiB limit: any process is above 85% of it.
    let s = Server::start(&["--memory-limit-mb", "1", "--disk-mb", "0"]).await;
    let (status, body) = health(&s).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("degraded")), "{body:#}");
    let memory = component(&body, "memory");
    assert_eq!(memory["status"], "degraded");
    assert_eq!(memory["limitBytes"], 1 << 20);
    assert!(memory["rssBytes"].as_u64().unwrap() > memory["pressureBytes"].as_u64().unwrap(), "{body:#}");
    assert_eq!(component(&body, "diskCache")["status"], "disabled");
    assert_eq!(component(&body, "redis")["status"], "disabled");
    s.stop().await;
}
