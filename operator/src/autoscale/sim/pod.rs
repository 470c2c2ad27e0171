//! One simulated replica: the sidecar's batcher in front of a model whose batch of `n` takes
//! `fixed + per_item x n` ms (times a slow factor and log-normal noise).
//!
//! A batch closes when it is full or `maxDelayMs` after its first request arrived, and starts when
//! the model is free; a request still waiting when its deadline passes is answered 504 (an error)
//! without running. Cache hits never queue: they are answered in `hit_ms`.

use std::collections::VecDeque;

use inferpool_crds::Tuning;

use super::PodModel;
use super::rng::Rng;
use crate::autoscale::PodSample;

/// The sidecar's SLA window the collector reads, in seconds.
pub const REPORT_WINDOW_SECONDS: f64 = 2.0;

/// A finished request.
#[derive(Debug, Clone, Copy)]
struct Done {
    at: f64,
    latency_ms: f64,
    wait_ms: f64,
    error: bool,
    hit: bool,
}

/// A finished batch.
#[derive(Debug, Clone, Copy)]
struct Batch {
    at: f64,
    n: usize,
    ms: f64,
}

/// One replica of the simulated pool.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// When it becomes ready, seconds.
    pub ready_at: f64,
    /// Service time multiplier (1: healthy).
    pub slow: f64,
    /// Share of requests that fail regardless of load.
    pub fail: f64,
    queue: VecDeque<f64>,
    free_at: f64,
    done: Vec<Done>,
    batches: Vec<Batch>,
    largest_batch: usize,
    tuning: Tuning,
}

impl Pod {
    /// A pod that becomes ready at `ready_at` and runs `tuning`.
    pub fn new(name: String, ready_at: f64, tuning: Tuning) -> Self {
        Self {
            name,
            ready_at,
            slow: 1.0,
            fail: 0.0,
            queue: VecDeque::new(),
            free_at: 0.0,
            done: Vec::new(),
            batches: Vec::new(),
            largest_batch: 0,
            tuning,
        }
    }

    /// Applies a tuning push at once.
    pub fn retune(&mut self, tuning: Tuning) {
        self.tuning = tuning;
    }

    /// Whether the pod takes traffic at `at`.
    pub fn ready(&self, at: f64) -> bool {
        self.ready_at <= at
    }

    /// A request that arrives at `at`; `hit` answers it from the cache.
    pub fn arrive(&mut self, at: f64, hit: bool, model: &PodModel, rng: &mut Rng) {
        if hit {
            let error = rng.uniform() < self.fail;
            self.done.push(Done { at: at + model.hit_ms / 1000.0, latency_ms: model.hit_ms, wait_ms: 0.0, error, hit });
        } else {
            self.advance(at, model, rng);
            self.queue.push_back(at);
        }
    }

    /// Runs every batch that must have started by `until`.
    pub fn advance(&mut self, until: f64, model: &PodModel, rng: &mut Rng) {
        let max = self.tuning.max_batch_size.max(1) as usize;
        let delay = f64::from(self.tuning.max_delay_ms) / 1000.0;
        let deadline = model.deadline_ms / 1000.0;
        while let Some(&first) = self.queue.front() {
            let mut close = first + delay;
            if self.queue.len() >= max {
                close = close.min(self.queue[max - 1]);
            }
            let start = self.free_at.max(close);
            let known = self.queue.iter().take_while(|&&a| a <= start).count();
            if start > until && known < max {
                break; // requests still to arrive may join this batch
            }
            let mut members = Vec::with_capacity(max);
            while members.len() < max && self.queue.front().is_some_and(|&a| a <= start) {
                let Some(arrival) = self.queue.pop_front() else { break };
                if start - arrival > deadline {
                    let at = arrival + deadline;
                    self.done.push(Done {
                        at,
                        latency_ms: model.deadline_ms,
                        wait_ms: model.deadline_ms,
                        error: true,
                        hit: false,
                    });
                } else {
                    members.push(arrival);
                }
            }
            if members.is_empty() {
                continue;
            }
            let n = members.len();
            let noise = (model.noise * rng.normal() - model.noise * model.noise / 2.0).exp();
            let ms = (model.fixed_ms + model.per_item_ms * n as f64) * self.slow * noise;
            let end = start + ms / 1000.0;
            self.free_at = end;
            self.largest_batch = self.largest_batch.max(n);
            self.batches.push(Batch { at: end, n, ms });
            for arrival in members {
                let error = rng.uniform() < self.fail;
                let latency_ms = (end - arrival) * 1000.0 + model.overhead_ms;
                self.done.push(Done { at: end, latency_ms, wait_ms: (start - arrival) * 1000.0, error, hit: false });
            }
        }
    }

    /// What the pod reports at `now` over the last [`REPORT_WINDOW_SECONDS`]; forgets older records.
    pub fn report(&mut self, now: f64, model: &PodModel) -> PodSample {
        let from = now - REPORT_WINDOW_SECONDS;
        self.done.retain(|d| d.at > from);
        self.batches.retain(|b| b.at > from);
        let done: Vec<&Done> = self.done.iter().filter(|d| d.at <= now).collect();
        let batches: Vec<&Batch> = self.batches.iter().filter(|b| b.at <= now).collect();
        let requests = done.len();
        let share = |f: fn(&Done) -> bool| {
            if requests == 0 { 0.0 } else { done.iter().filter(|d| f(d)).count() as f64 / requests as f64 }
        };
        let waits: Vec<f64> = done.iter().filter(|d| !d.hit).map(|d| d.wait_ms).collect();
        let mean_batch_size = if batches.is_empty() {
            0.0
        } else {
            batches.iter().map(|b| b.n as f64).sum::<f64>() / batches.len() as f64
        };
        let entries = self.tuning.cache_entries.unwrap_or(0) as f64;
        let rss_mb =
            model.base_rss_mb + model.rss_per_item_mb * self.largest_batch as f64 + entries * model.entry_kb / 1024.0;
        PodSample {
            pod: self.name.clone(),
            rps: requests as f64 / REPORT_WINDOW_SECONDS,
            error_rate: share(|d| d.error),
            requests: requests as u64,
            p95_ms: p95(done.iter().map(|d| d.latency_ms).collect()),
            queue_wait_p95_ms: p95(waits),
            inference_p95_ms: p95(batches.iter().map(|b| b.ms).collect()),
            mean_batch_size,
            cache_hit_rate: share(|d| d.hit),
            queue_depth: self.queue.len() as u64,
            rss_bytes: (rss_mb * 1024.0 * 1024.0) as u64,
            tuning_generation: self.tuning.generation,
            cache_lookups: requests as u64,
        }
    }
}

/// The 95th percentile (nearest rank); 0 for no values.
pub fn p95(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64) * 0.95).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
