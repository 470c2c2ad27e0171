//! The JSON reports: `/api/v1/metrics/sla` (read by the operator), `/performance` (the HTTP view)
//! and `/ai-inference` (the model view), all from the same trailing windows; and
//! `/api/v1/health`, the state of each component.

use std::time::Instant;

use inferpool_crds::SlaReport;
use serde_json::{Value, json};

use crate::app::{App, Phase};
use crate::cache::redis::BreakerState;
use crate::labels::{ErrorKind, Tier};

/// Window lengths reported, shortest first.
pub const WINDOWS: [u32; 3] = [2, 10, 60];

/// The SLA report.
pub fn sla(app: &App) -> SlaReport {
    let now = Instant::now();
    let loaded = app.loaded();
    let batcher = app.batcher_any();
    SlaReport {
        model: app.card.card.name.clone(),
        variant: loaded.map_or("", |l| l.variant.as_str()).to_owned(),
        provider: loaded.map_or("", |l| l.provider.as_str()).to_owned(),
        ready: app.is_ready(),
        tuning: batcher.map_or(app.config.tuning, |b| b.tuning()),
        rss_bytes: rss_bytes(),
        queue_depth: batcher.map_or(0, |b| b.depth() as u64),
        uptime_seconds: app.started.elapsed().as_secs_f64(),
        windows: WINDOWS.iter().map(|&s| app.metrics.windows.report(now, s)).collect(),
    }
}

/// Request-level view: rates, errors and latency per window.
pub fn performance(app: &App) -> Value {
    let r = sla(app);
    let windows: Vec<_> = r
        .windows
        .iter()
        .map(|w| json!({"seconds": w.seconds, "requests": w.requests, "rps": w.rps, "errorRate": w.error_rate, "latencyMs": w.latency_ms}))
        .collect();
    json!({
        "ready": r.ready,
        "uptimeSeconds": r.uptime_seconds,
        "rssBytes": r.rss_bytes,
        "queueDepth": r.queue_depth,
        "queueCapacity": app.config.queue_capacity,
        "windows": windows,
    })
}

/// Model-level view: what runs where, and how batches behave.
pub fn ai_inference(app: &App) -> Value {
    let r = sla(app);
    let windows: Vec<_> = r
        .windows
        .iter()
        .map(|w| {
            json!({"seconds": w.seconds, "batches": w.batches, "meanBatchSize": w.mean_batch_size,
                   "inferenceP95Ms": w.inference_p95_ms, "queueWaitP95Ms": w.queue_wait_p95_ms})
        })
        .collect();
    json!({
        "model": r.model,
        "variant": r.variant,
        "provider": r.provider,
        "optimization": format!("{:?}", app.config.optimization),
        "sessions": app.config.sessions,
        "threadsPerSession": app.loaded().map(|l| l.threads),
        "decodeThreads": app.config.decode_threads,
        "jpegDecode": app.config.jpeg_decode.as_str(),
        "embeddingDim": app.card.card.output.dim,
        "imagesEmbeddedTotal": app.metrics.images_embedded(),
        "tuning": r.tuning,
        "windows": windows,
    })
}

/// How a component (or the whole sidecar) is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// Working as configured.
    Healthy,
    /// Serving, without some optional part (Redis, memory headroom).
    Degraded,
    /// Not serving requests (model loading or failed, or draining).
    Unhealthy,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// `GET /api/v1/health`: each component's state and the overall one, which is the worst of them.
/// Unhealthy means "send no requests here" (the same as `/readyz` failing); degraded means the
/// sidecar serves but an optional part is missing: requests still succeed, perhaps slower.
pub fn health(app: &App) -> (Health, Value) {
    let phase = app.phase();
    let model = match phase {
        Phase::Ready => Health::Healthy,
        Phase::Loading | Phase::Failed | Phase::Draining => Health::Unhealthy,
    };
    let loaded = app.loaded();
    let cache = &app.cache;
    let memory_cache = cache.memory();
    let disk = cache.disk_stats();
    let redis = cache.redis().map(|r| (r.is_connected(), r.state()));
    let redis_health = match redis {
        Some((true, BreakerState::Closed)) | None => Health::Healthy,
        Some(_) => Health::Degraded,
    };
    let rss = rss_bytes();
    let threshold = app.config.memory_threshold;
    let memory = if threshold.is_some_and(|t| rss >= t) { Health::Degraded } else { Health::Healthy };
    let disk_health = if cache.disk_writes_failing() { Health::Degraded } else { Health::Healthy };
    let overall = [model, redis_health, memory, disk_health].into_iter().max().unwrap_or(Health::Healthy);
    let errors =
        |tier| app.metrics.cache_errors(tier, ErrorKind::Io) + app.metrics.cache_errors(tier, ErrorKind::Corrupt);
    let body = json!({
        "status": overall.as_str(),
        "components": {
            "model": {
                "status": model.as_str(),
                "phase": format!("{phase:?}").to_ascii_lowercase(),
                "name": app.card.card.name,
                "variant": loaded.map(|l| l.variant.as_str()),
                "provider": loaded.map(|l| l.provider.as_str()),
            },
            "memoryCache": {
                "status": Health::Healthy.as_str(),
                "entries": memory_cache.len(),
                "capacity": memory_cache.capacity(),
            },
            "diskCache": disk.map_or_else(
                || json!({"status": "disabled"}),
                |(entries, bytes, budget)| json!({
                    "status": disk_health.as_str(), "entries": entries, "bytes": bytes, "budgetBytes": budget,
                    "writesFailing": cache.disk_writes_failing(), "errorsTotal": errors(Tier::Disk),
                }),
            ),
            "redis": redis.map_or_else(
                || json!({"status": "disabled"}),
                |(connected, state)| json!({
                    "status": redis_health.as_str(), "connected": connected,
                    "circuit": format!("{state:?}").to_ascii_lowercase(), "errorsTotal": errors(Tier::Redis)
                        + app.metrics.cache_errors(Tier::Redis, ErrorKind::Timeout)
                        + app.metrics.cache_errors(Tier::Redis, ErrorKind::Connection),
                }),
            ),
            "memory": {
                "status": memory.as_str(),
                "rssBytes": rss,
                "limitBytes": app.config.memory_limit,
                "pressureBytes": threshold,
            },
        },
    });
    (overall, body)
}

/// Resident set size of this process (0 where /proc cannot be read).
pub fn rss_bytes() -> u64 {
    procfs::process::Process::myself().and_then(|p| p.statm()).map_or(0, |m| m.resident * procfs::page_size())
}
