//! Batching: the cost of a batch as the pods measure it, the capacity it gives, and the batch size
//! and delay chosen from it.
//!
//! Every pod reports its mean batch size and the p95 time of one batch. The policy keeps, from the
//! pool's request-weighted figures of each tick, an exponentially weighted point per power-of-two
//! batch size and fits `batch_ms = a + b x n` through
//! them (least squares; through the origin, which over-states large batches, while all points sit at
//! one size). From that model:
//!
//! - capacity at the SLA: a request waits at most for the batch in progress and then runs in the
//!   next, so p95 ~ 2 x batch_ms(n). The largest batch that keeps that under the target,
//!   `n_sla = (target/2 - a) / b`, capped by `maxBatchSize`, gives `n_sla / batch_ms(n_sla)` rps;
//!   cache hits skip the model, so that is divided by the miss share;
//! - batch size: a hill-climb over powers of two in `1..=MAX_BATCH_SIZE`. Double while a full batch
//!   twice over plus the delay fits [`FIT`] of the target (bigger batches raise throughput until they
//!   alone break the SLA) and memory is under [`GROW_MEMORY`] of the limit; halve when even half the
//!   batch twice over plus the delay exceeds [`SHRINK`] times the target (a batch limit only costs
//!   latency when the queue is long enough to fill it). The gap between the two tests is the
//!   hysteresis; moves are at least [`COOLDOWN_SECONDS`] apart;
//! - delay: the time a batch takes to fill at the observed per-pod arrival rate of cache misses,
//!   capped at a tenth of the target and at what the target leaves after two full batches, so the
//!   delay alone never breaks the SLA; it moves only by more than 25% (or 2 ms) and at most doubles
//!   or halves per move, except that a delay above the cap is cut at once.

use inferpool_crds::InferencePoolSpec;
use inferpool_crds::tuning::{MAX_BATCH_SIZE, MAX_DELAY_MS};

use super::{Inputs, MIN_REQUESTS, Window};
use crate::autoscale::History;

/// Least time between two batching moves, in seconds.
pub const COOLDOWN_SECONDS: f64 = 30.0;
/// Grow the batch while twice a full batch plus the delay fits this share of the p95 target.
pub const FIT: f64 = 0.8;
/// Halve the batch when twice half a batch plus the delay exceeds this share of the p95 target.
pub const SHRINK: f64 = 1.2;
/// Grow the batch only while the largest pod uses less than this share of its memory limit.
pub const GROW_MEMORY: f64 = 0.70;
/// Longest delay, as a share of the p95 target.
pub const MAX_DELAY_SHARE: f64 = 0.1;

const BUCKETS: usize = 11;
const LEARN_RATE: f64 = 0.2;

#[derive(Debug, Clone, Copy, Default)]
struct Point {
    n: f64,
    ms: f64,
    seen: bool,
}

/// What the batching rule remembers: one cost point per power-of-two batch size.
#[derive(Debug, Clone, Default)]
pub(super) struct Memory {
    points: [Point; BUCKETS],
    learned_until: Option<f64>,
    last_move: Option<f64>,
}

/// Inference time of one batch: `fixed_ms + per_item_ms x n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CostModel {
    pub(super) fixed_ms: f64,
    pub(super) per_item_ms: f64,
    /// Fitted through two batch sizes at least 1.5x apart (not only through the origin).
    pub(super) calibrated: bool,
}

impl CostModel {
    /// Milliseconds one batch of `n` takes.
    pub(super) fn batch_ms(&self, n: f64) -> f64 {
        self.fixed_ms + self.per_item_ms * n
    }
}

/// Folds the samples not seen yet into the cost points.
pub(super) fn learn(mem: &mut Memory, history: &History) {
    let from = mem.learned_until;
    for s in history.iter().filter(|s| from.is_none_or(|at| s.at > at)) {
        // The pool's request-weighted figures: one slow pod must not pass for a bigger batch size.
        let batched: Vec<_> =
            s.pods.iter().filter(|p| p.requests > 0 && p.mean_batch_size >= 1.0 && p.inference_p95_ms > 0.0).collect();
        let requests: u64 = batched.iter().map(|p| p.requests).sum();
        if requests > 0 {
            let weighted = |f: fn(&crate::autoscale::PodSample) -> f64| {
                batched.iter().map(|p| f(p) * p.requests as f64).sum::<f64>() / requests as f64
            };
            let (n, ms) = (weighted(|p| p.mean_batch_size), weighted(|p| p.inference_p95_ms));
            let k = (n.log2().round().max(0.0) as usize).min(BUCKETS - 1);
            let point = &mut mem.points[k];
            if point.seen {
                point.n += LEARN_RATE * (n - point.n);
                point.ms += LEARN_RATE * (ms - point.ms);
            } else {
                *point = Point { n, ms, seen: true };
            }
        }
        mem.learned_until = Some(s.at);
    }
}

/// The cost model fitted through the points; None before any batch was measured.
pub(super) fn model(mem: &Memory) -> Option<CostModel> {
    let points: Vec<(f64, f64)> = mem.points.iter().filter(|p| p.seen).map(|p| (p.n, p.ms)).collect();
    let (largest_n, largest_ms) = points.iter().copied().max_by(|a, b| a.0.total_cmp(&b.0))?;
    let smallest_n = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let through_origin = CostModel { fixed_ms: 0.0, per_item_ms: largest_ms / largest_n, calibrated: false };
    if points.len() < 2 || largest_n < 1.5 * smallest_n {
        return Some(through_origin);
    }
    let k = points.len() as f64;
    let mean_n = points.iter().map(|p| p.0).sum::<f64>() / k;
    let mean_ms = points.iter().map(|p| p.1).sum::<f64>() / k;
    let var: f64 = points.iter().map(|p| (p.0 - mean_n).powi(2)).sum();
    let cov: f64 = points.iter().map(|p| (p.0 - mean_n) * (p.1 - mean_ms)).sum();
    let slope = cov / var;
    let fixed = mean_ms - slope * mean_n;
    if slope <= 0.0 {
        return Some(through_origin);
    }
    if fixed < 0.0 {
        let nn: f64 = points.iter().map(|p| p.0 * p.0).sum();
        let nt: f64 = points.iter().map(|p| p.0 * p.1).sum();
        return Some(CostModel { fixed_ms: 0.0, per_item_ms: nt / nn, calibrated: true });
    }
    Some(CostModel { fixed_ms: fixed, per_item_ms: slope, calibrated: true })
}

/// One replica's requests per second at the SLA with batches of at most `batch`.
pub(super) fn capacity_rps(model: &CostModel, batch: u32, spec: &InferencePoolSpec, hit_rate: f64) -> f64 {
    let target = f64::from(spec.sla.p95_latency_ms);
    let n_sla =
        if model.per_item_ms > 0.0 { (target / 2.0 - model.fixed_ms) / model.per_item_ms } else { f64::from(batch) };
    let n = n_sla.min(f64::from(batch)).max(1.0);
    let model_rps = 1000.0 * n / model.batch_ms(n).max(0.001);
    model_rps / (1.0 - hit_rate).max(0.2)
}

/// A new (batch size, delay) and why, or None to keep the current ones.
pub(super) fn tune(
    inputs: &Inputs,
    mem: &mut Memory,
    model: Option<CostModel>,
    stable: &Window,
    memory_ratio: f64,
) -> Option<(u32, u32, String)> {
    let model = model?;
    let now = inputs.now;
    if stable.requests < MIN_REQUESTS || mem.last_move.is_some_and(|at| now - at < COOLDOWN_SECONDS) {
        return None;
    }
    let target = f64::from(inputs.spec.sla.p95_latency_ms);
    let b = inputs.tuning.max_batch_size.clamp(1, MAX_BATCH_SIZE);
    let d = inputs.tuning.max_delay_ms.min(MAX_DELAY_MS);
    let ms = |n: u32| model.batch_ms(f64::from(n));
    let mut why = Vec::new();

    let mut batch = b;
    if b < MAX_BATCH_SIZE && 2.0 * ms(b) + f64::from(d) <= FIT * target && memory_ratio < GROW_MEMORY {
        batch = (b * 2).min(MAX_BATCH_SIZE);
        why.push(format!(
            "a full batch of {b} takes {:.0} ms, twice that plus {d} ms delay fits the {target:.0} ms target: batch {b} -> {batch}",
            ms(b)
        ));
    } else if b > 1 && model.calibrated && 2.0 * ms(b / 2) + f64::from(d) > SHRINK * target {
        batch = b / 2;
        why.push(format!(
            "even a batch of {batch} takes {:.0} ms, twice that plus {d} ms delay breaks the {target:.0} ms target: batch {b} -> {batch}",
            ms(batch)
        ));
    }

    let misses = stable.rps * (1.0 - stable.cache_hit_rate).max(0.0) / stable.ready.max(1.0);
    let fill_ms = if misses > 0.0 { 1000.0 * f64::from(batch) / misses } else { f64::INFINITY };
    let cap = (MAX_DELAY_SHARE * target).min(FIT * target - 2.0 * ms(batch)).max(0.0);
    let want = fill_ms.min(cap).round();
    let current = f64::from(d);
    let mut delay = d;
    if current > cap {
        delay = cap.floor() as u32;
    } else if (want - current).abs() >= (0.25 * current).max(2.0) {
        let bounded = want.clamp((current / 2.0).floor(), (current * 2.0).max(current + 5.0));
        delay = (bounded as u32).min(MAX_DELAY_MS);
    }
    if delay != d {
        why.push(format!(
            "a batch of {batch} fills in {fill_ms:.0} ms at {misses:.0} rps per pod, delay capped at {cap:.0} ms: delay {d} -> {delay} ms"
        ));
    }
    if (batch, delay) == (b, d) {
        return None;
    }
    mem.last_move = Some(now);
    Some((batch, delay, why.join("; ")))
}
