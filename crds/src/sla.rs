//! The SLA report a replica serves at `/api/v1/metrics/sla` and the operator aggregates.
//!
//! One report holds the same statistics over three trailing windows (2 s, 10 s and 60 s), so a reader can
//! tell a burst from a trend without keeping history of its own.

use serde::{Deserialize, Serialize};

use crate::Tuning;

/// What one replica reports about its service level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlaReport {
    /// Model name from its card.
    pub model: String,
    /// Model variant in use (`fp32`, `fp16`, `int8`).
    pub variant: String,
    /// Execution provider in use (`cuda` or `cpu`).
    pub provider: String,
    /// Whether the replica is ready for traffic.
    pub ready: bool,
    /// The tuning in force; its generation tells the operator whether a push arrived.
    pub tuning: Tuning,
    /// Resident set size of the process, in bytes.
    pub rss_bytes: u64,
    /// Requests waiting in the batcher's queue now.
    pub queue_depth: u64,
    /// Seconds since the replica started.
    pub uptime_seconds: f64,
    /// Statistics over trailing windows, shortest first.
    pub windows: Vec<WindowReport>,
}

/// Statistics over one trailing window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowReport {
    /// Window length in seconds.
    pub seconds: u32,
    /// Requests completed in the window (any status).
    pub requests: u64,
    /// Completed requests per second over the window.
    pub rps: f64,
    /// Requests answered with a server-side failure (5xx) or refused for load (429).
    pub errors: u64,
    /// `errors / requests`, 0 when there were none.
    pub error_rate: f64,
    /// End-to-end request latency quantiles, in milliseconds.
    pub latency_ms: LatencyQuantiles,
    /// 95th percentile of the time requests waited in the batch queue, in milliseconds.
    pub queue_wait_p95_ms: f64,
    /// 95th percentile of one batch's inference time, in milliseconds.
    pub inference_p95_ms: f64,
    /// Batches run in the window.
    pub batches: u64,
    /// Mean number of images per batch.
    pub mean_batch_size: f64,
    /// Cache lookups in the window.
    pub cache_lookups: u64,
    /// Fraction of cache lookups answered from any tier (0 when there were none).
    pub cache_hit_rate: f64,
    /// Fraction of cache lookups answered by each tier; the three add up to `cache_hit_rate`.
    #[serde(default)]
    pub cache_hit_rate_by_tier: TierHitRates,
}

/// Cache hit rates per tier, each a fraction of all lookups.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TierHitRates {
    /// Answered from process memory (L1).
    pub memory: f64,
    /// Answered from the local disk (L2).
    pub disk: f64,
    /// Answered from Redis (L3).
    pub redis: f64,
}

/// Latency quantiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencyQuantiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}
