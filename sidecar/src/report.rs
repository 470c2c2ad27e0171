//! The JSON reports: `/api/v1/metrics/sla` (read by the operator), `/performance` (the HTTP view)
//! and `/ai-inference` (the model view). All three come from the same trailing windows.

use std::time::Instant;

use inferpool_crds::SlaReport;
use serde_json::{Value, json};

use crate::app::App;

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

/// Resident set size of this process (0 where /proc cannot be read).
pub fn rss_bytes() -> u64 {
    procfs::process::Process::myself().and_then(|p| p.statm()).map_or(0, |m| m.resident * procfs::page_size())
}
