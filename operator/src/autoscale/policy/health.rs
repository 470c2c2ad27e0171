//! Errors: a pod that fails far more often than the others is deleted (its Deployment replaces
//! it); errors across the pool are a reason to scale out.
//!
//! Over the last [`WINDOW_SECONDS`], among the pods that answered the latest tick: a pod with at
//! least [`MIN_POD_REQUESTS`] requests whose error rate is above `sla.maxErrorRate` and more than
//! [`OUTLIER_FACTOR`] times the other pods' is an outlier. One pod is deleted per
//! [`DELETE_COOLDOWN_SECONDS`]. The pool-wide rate leaves outliers out (deleting them is the cure);
//! above `sla.maxErrorRate` it asks the replica rule for one more replica.

use super::{Inputs, MIN_REQUESTS};

/// The window error rates are judged over, in seconds.
pub const WINDOW_SECONDS: f64 = 30.0;
/// Requests a pod must have served to be judged.
pub const MIN_POD_REQUESTS: u64 = 50;
/// How many times the other pods' error rate makes an outlier.
pub const OUTLIER_FACTOR: f64 = 3.0;
/// Least time between two pod deletions, in seconds.
pub const DELETE_COOLDOWN_SECONDS: f64 = 60.0;

/// What the error rule remembers.
#[derive(Debug, Clone, Default)]
pub(super) struct Memory {
    last_deletion: Option<f64>,
}

/// A pod to delete and the numbers that condemned it.
pub(super) struct Outlier {
    pub(super) pod: String,
    pub(super) error_rate: f64,
    pub(super) others: f64,
}

/// The error rule's outcome.
pub(super) struct Health {
    /// The pod to delete now, if any.
    pub(super) deleted: Option<Outlier>,
    /// The pool-wide error rate (outliers left out) when it is above the SLA.
    pub(super) pool_error: Option<f64>,
}

/// Judges the pods' error rates.
pub(super) fn check(inputs: &Inputs, mem: &mut Memory) -> Health {
    let now = inputs.now;
    let max = inputs.spec.sla.max_error_rate;
    let alive: Vec<&str> =
        inputs.history.latest().map(|s| s.pods.iter().map(|p| p.pod.as_str()).collect()).unwrap_or_default();
    let pods: Vec<_> =
        inputs.history.pods(WINDOW_SECONDS, now).into_iter().filter(|p| alive.contains(&p.pod.as_str())).collect();
    let failed = |p: &super::super::history::PodWindow| p.error_rate * p.requests as f64;
    let total_requests: u64 = pods.iter().map(|p| p.requests).sum();
    let total_failed: f64 = pods.iter().map(failed).sum();
    let mut outliers = Vec::new();
    for p in pods.iter().filter(|p| p.requests >= MIN_POD_REQUESTS && p.error_rate > max) {
        let rest = total_requests - p.requests;
        let others = if rest > 0 { (total_failed - failed(p)) / rest as f64 } else { continue };
        if p.error_rate > OUTLIER_FACTOR * others {
            outliers.push(Outlier { pod: p.pod.clone(), error_rate: p.error_rate, others });
        }
    }
    let (mut good_requests, mut good_failed) = (0, 0.0);
    for p in pods.iter().filter(|p| !outliers.iter().any(|o| o.pod == p.pod)) {
        good_requests += p.requests;
        good_failed += failed(p);
    }
    let pool_rate = if good_requests > 0 { good_failed / good_requests as f64 } else { 0.0 };
    let pool_error = (good_requests >= MIN_REQUESTS && pool_rate > max).then_some(pool_rate);
    let due = mem.last_deletion.is_none_or(|at| now - at >= DELETE_COOLDOWN_SECONDS);
    let deleted = if due { outliers.into_iter().max_by(|a, b| a.error_rate.total_cmp(&b.error_rate)) } else { None };
    if deleted.is_some() {
        mem.last_deletion = Some(now);
    }
    Health { deleted, pool_error }
}
