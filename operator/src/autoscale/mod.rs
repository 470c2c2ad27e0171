//! The SLA autoscaler: observe -> decide -> act, per pool, every `autoscaling.intervalSeconds`.
//!
//! - [`collector`] reads every ready replica's SLA report (or a Prometheus query, [`prometheus`])
//!   and turns one tick into a pool-wide [`Sample`].
//! - [`policy`] is a pure function from the spec, the tuning and replicas in force and the
//!   [`History`] of samples to a [`Decision`] with its reason; `sim` (behind the `sim` feature, off in
//!   the shipped operator) drives it through simulated pools for the tests and the plots in
//!   docs/autoscaling.md.
//! - [`runner`] is the loop; it hands each decision on one way ([`decisions`]): the reconciler
//!   applies its level part (Deployment replicas, the tuning ConfigMap, status and conditions) and
//!   the actuator its actions (tuning pushes to every ready pod at once, cache clears, outlier
//!   pods, Events).

pub mod collector;
pub mod decisions;
pub mod history;
pub mod policy;
pub mod prometheus;
pub mod runner;
#[cfg(feature = "sim")]
pub mod sim;

pub use history::{History, Window};

/// What one replica said at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSample {
    /// Pod name.
    pub pod: String,
    /// Requests completed per second.
    pub rps: f64,
    /// Share of failed requests (5xx, 429).
    pub error_rate: f64,
    /// Requests in the sample's window (the weight of this pod's figures).
    pub requests: u64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// 95th percentile of the batch-queue wait, ms.
    pub queue_wait_p95_ms: f64,
    /// 95th percentile of one batch's inference time, ms.
    pub inference_p95_ms: f64,
    /// Mean images per batch.
    pub mean_batch_size: f64,
    /// Share of cache lookups answered from a cache.
    pub cache_hit_rate: f64,
    /// Cache lookups in the sample's window (0: nothing to judge the hit rate by).
    pub cache_lookups: u64,
    /// Requests queued now.
    pub queue_depth: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Tuning generation the pod runs.
    pub tuning_generation: u64,
}

/// The pool at one tick: what the replicas reported, aggregated, plus what did not answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Seconds since the autoscaler started watching the pool (monotonic).
    pub at: f64,
    /// Ready replicas that answered.
    pub pods: Vec<PodSample>,
    /// Replicas that exist but are not ready yet (starting: pending capacity).
    pub starting: u32,
    /// Ready replicas that did not answer in time (unhealthy, not idle).
    pub silent: u32,
}

impl Sample {
    /// Requests per second across the pool.
    pub fn rps(&self) -> f64 {
        self.pods.iter().map(|p| p.rps).sum()
    }

    /// Requests completed in the tick across the pool.
    pub fn requests(&self) -> u64 {
        self.pods.iter().map(|p| p.requests).sum()
    }

    /// A request-weighted mean of a per-pod figure (a plain mean when no pod served a request).
    pub fn weighted(&self, figure: impl Fn(&PodSample) -> f64) -> f64 {
        let total = self.requests();
        if self.pods.is_empty() {
            return 0.0;
        }
        if total == 0 {
            return self.pods.iter().map(&figure).sum::<f64>() / self.pods.len() as f64;
        }
        self.pods.iter().map(|p| figure(p) * p.requests as f64).sum::<f64>() / total as f64
    }
}
