//! The samples of the last minutes and the windows the policy reads from them.
//!
//! The collector pushes one [`Sample`] per tick; the policy asks for a [`Window`] over the stable
//! window (steady-state decisions) and one over the panic window (bursts), Knative-style, plus the
//! per-pod figures ([`PodWindow`]) that outlier detection compares.
//!
//! Percentiles cannot be merged exactly from percentiles: a window's `p95_ms` is the
//! request-weighted mean of the samples' request-weighted pod p95s. It sits between the best and the
//! worst pod's p95 and under-states the pool's true p95 when one pod alone is slow; the per-pod
//! figures are there for that case.

use std::collections::VecDeque;

use super::{PodSample, Sample};

/// Samples kept for the policy's windows, oldest first.
#[derive(Debug, Clone, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

/// Aggregates over the samples of one trailing window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// Samples in the window.
    pub samples: usize,
    /// Seconds between the first and the last sample of the window.
    pub span_seconds: f64,
    /// Mean over the samples of the pool's requests per second.
    pub rps: f64,
    /// Requests completed in the window across the pool.
    pub requests: u64,
    /// Cache lookups in the window (0: the hit rate says nothing).
    pub cache_lookups: u64,
    /// p95 latency, ms: request-weighted over samples of each sample's request-weighted pod p95.
    pub p95_ms: f64,
    /// Share of failed requests (request-weighted).
    pub error_rate: f64,
    /// Share of requests answered from a cache (request-weighted).
    pub cache_hit_rate: f64,
    /// p95 of the batch-queue wait, ms (request-weighted).
    pub queue_wait_p95_ms: f64,
    /// p95 of one batch's inference time, ms (request-weighted).
    pub inference_p95_ms: f64,
    /// Mean images per batch (request-weighted).
    pub mean_batch_size: f64,
    /// Mean number of ready pods that answered.
    pub ready: f64,
    /// Pods starting at the latest sample (pending capacity).
    pub starting: u32,
    /// Ready pods that did not answer at the latest sample.
    pub silent: u32,
    /// Largest resident memory of any pod in the window, bytes.
    pub max_rss_bytes: u64,
    /// Requests queued across the pool at the latest sample.
    pub queue_depth: u64,
    /// How fast the pool's queues grew over the window, requests per second (negative: draining).
    pub queue_growth_rps: f64,
}

impl Window {
    /// Requests per second the pool was asked for: completed plus what piled up in the queues.
    pub fn demand_rps(&self) -> f64 {
        self.rps + self.queue_growth_rps.max(0.0)
    }
}

/// One pod's figures over a window, for outlier detection.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodWindow {
    /// Pod name.
    pub pod: String,
    /// Samples in which the pod answered.
    pub samples: usize,
    /// Requests the pod completed in the window.
    pub requests: u64,
    /// Share of the pod's requests that failed.
    pub error_rate: f64,
    /// Request-weighted p95 latency of the pod, ms.
    pub p95_ms: f64,
    /// Mean requests per second of the pod over the samples in which it answered.
    pub rps: f64,
}

/// The per-pod figures a window averages, in the order `History::window` stores them.
const FIGURES: [fn(&PodSample) -> f64; 6] = [
    |p| p.p95_ms,
    |p| p.error_rate,
    |p| p.cache_hit_rate,
    |p| p.queue_wait_p95_ms,
    |p| p.inference_p95_ms,
    |p| p.mean_batch_size,
];

/// Running request-weighted sums (plain means when nothing was requested).
#[derive(Default)]
struct Weighted {
    sum: f64,
    weight: f64,
    plain: f64,
    count: f64,
}

impl Weighted {
    fn add(&mut self, value: f64, requests: u64) {
        self.sum += value * requests as f64;
        self.weight += requests as f64;
        self.plain += value;
        self.count += 1.0;
    }

    fn mean(&self) -> f64 {
        if self.weight > 0.0 {
            self.sum / self.weight
        } else if self.count > 0.0 {
            self.plain / self.count
        } else {
            0.0
        }
    }
}

impl History {
    /// Adds a sample and forgets those older than `keep_seconds` before it.
    pub fn push(&mut self, sample: Sample, keep_seconds: f64) {
        let at = sample.at;
        self.samples.push_back(sample);
        while self.samples.front().is_some_and(|s| s.at < at - keep_seconds) {
            self.samples.pop_front();
        }
    }

    /// The newest sample, if any.
    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// Every sample kept, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Samples kept now.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is kept.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples of the last `seconds` before `now`, oldest first.
    pub fn recent(&self, seconds: f64, now: f64) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.at > now - seconds && s.at <= now)
    }

    /// The aggregate over the samples of the last `seconds` before `now`.
    pub fn window(&self, seconds: f64, now: f64) -> Window {
        let mut w = Window::default();
        // p95, error rate, hit rate, queue wait, inference time, batch size.
        let mut acc: [Weighted; 6] = Default::default();
        let (mut rps_sum, mut ready_sum) = (0.0, 0.0);
        let mut first: Option<&Sample> = None;
        let mut last: Option<&Sample> = None;
        for s in self.recent(seconds, now) {
            first.get_or_insert(s);
            last = Some(s);
            w.samples += 1;
            rps_sum += s.rps();
            ready_sum += s.pods.len() as f64;
            let requests = s.requests();
            w.requests += requests;
            w.cache_lookups += s.pods.iter().map(|p| p.cache_lookups).sum::<u64>();
            if !s.pods.is_empty() {
                for (acc, figure) in acc.iter_mut().zip(FIGURES) {
                    acc.add(s.weighted(figure), requests);
                }
            }
            let rss = s.pods.iter().map(|p| p.rss_bytes).max().unwrap_or(0);
            w.max_rss_bytes = w.max_rss_bytes.max(rss);
        }
        let (Some(first), Some(last)) = (first, last) else {
            return w;
        };
        let n = w.samples as f64;
        w.rps = rps_sum / n;
        w.ready = ready_sum / n;
        [w.p95_ms, w.error_rate, w.cache_hit_rate, w.queue_wait_p95_ms, w.inference_p95_ms, w.mean_batch_size] =
            acc.map(|a| a.mean());
        w.starting = last.starting;
        w.silent = last.silent;
        w.span_seconds = last.at - first.at;
        let depth = |s: &Sample| s.pods.iter().map(|p| p.queue_depth).sum::<u64>();
        w.queue_depth = depth(last);
        if w.span_seconds > 0.0 {
            w.queue_growth_rps = (depth(last) as f64 - depth(first) as f64) / w.span_seconds;
        }
        w
    }

    /// Each pod's figures over the last `seconds` before `now`, in the order pods first appear.
    pub fn pods(&self, seconds: f64, now: f64) -> Vec<PodWindow> {
        let mut pods: Vec<(PodWindow, Weighted, Weighted, f64)> = Vec::new();
        for s in self.recent(seconds, now) {
            for p in &s.pods {
                let at = match pods.iter().position(|(w, ..)| w.pod == p.pod) {
                    Some(at) => at,
                    None => {
                        let w = PodWindow { pod: p.pod.clone(), ..PodWindow::default() };
                        pods.push((w, Weighted::default(), Weighted::default(), 0.0));
                        pods.len() - 1
                    }
                };
                let (w, errors, p95, rps) = &mut pods[at];
                w.samples += 1;
                w.requests += p.requests;
                errors.add(p.error_rate, p.requests);
                p95.add(p.p95_ms, p.requests);
                *rps += p.rps;
            }
        }
        pods.into_iter()
            .map(|(mut w, errors, p95, rps)| {
                w.error_rate = errors.mean();
                w.p95_ms = p95.mean();
                w.rps = rps / w.samples.max(1) as f64;
                w
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, rps: f64, requests: u64, p95: f64, errors: f64) -> PodSample {
        PodSample {
            pod: name.to_owned(),
            rps,
            error_rate: errors,
            requests,
            p95_ms: p95,
            queue_wait_p95_ms: p95 / 2.0,
            inference_p95_ms: p95 / 4.0,
            mean_batch_size: 4.0,
            cache_hit_rate: 0.5,
            queue_depth: 2,
            rss_bytes: 100 + requests,
            tuning_generation: 1,
            cache_lookups: requests,
        }
    }

    fn sample(at: f64, pods: Vec<PodSample>) -> Sample {
        Sample { at, pods, starting: at as u32, silent: 0 }
    }

    #[test]
    fn push_forgets_samples_older_than_kept() {
        let mut h = History::default();
        for at in 0..10 {
            h.push(sample(f64::from(at) * 2.0, vec![]), 6.0);
        }
        assert_eq!(h.len(), 4, "18, 16, 14, 12 kept");
        assert_eq!(h.latest().map(|s| s.at), Some(18.0));
    }

    #[test]
    fn window_weights_by_requests_and_keeps_latest_counts() {
        let mut h = History::default();
        h.push(sample(2.0, vec![pod("a", 10.0, 20, 100.0, 0.0)]), 60.0);
        h.push(sample(4.0, vec![pod("a", 30.0, 60, 300.0, 0.1), pod("b", 10.0, 20, 100.0, 0.0)]), 60.0);
        let w = h.window(60.0, 4.0);
        assert_eq!(w.samples, 2);
        assert_eq!(w.requests, 100);
        assert!((w.rps - 25.0).abs() < 1e-9, "mean of 10 and 40: {}", w.rps);
        // Sample 2's weighted p95 is (300*60 + 100*20)/80 = 250, weight 80; sample 1's 100, weight 20.
        assert!((w.p95_ms - (250.0 * 80.0 + 100.0 * 20.0) / 100.0).abs() < 1e-9, "{}", w.p95_ms);
        assert!((w.error_rate - 6.0 / 100.0).abs() < 1e-9, "{}", w.error_rate);
        assert!((w.ready - 1.5).abs() < 1e-9);
        assert_eq!(w.starting, 4, "latest sample's");
        assert_eq!(w.max_rss_bytes, 160);
        assert_eq!(w.queue_depth, 4);
        assert!((w.queue_growth_rps - 1.0).abs() < 1e-9, "2 -> 4 requests in 2 s");
    }

    #[test]
    fn window_only_counts_samples_inside_it() {
        let mut h = History::default();
        for at in 1..=10 {
            h.push(sample(f64::from(at), vec![pod("a", f64::from(at), 1, 10.0, 0.0)]), 60.0);
        }
        let w = h.window(3.0, 10.0);
        assert_eq!(w.samples, 3);
        assert!((w.rps - 9.0).abs() < 1e-9);
        assert_eq!(h.window(3.0, 100.0), Window::default(), "nothing that recent");
    }

    #[test]
    fn window_without_requests_uses_plain_means() {
        let mut h = History::default();
        h.push(sample(1.0, vec![pod("a", 0.0, 0, 10.0, 0.0), pod("b", 0.0, 0, 30.0, 0.0)]), 60.0);
        let w = h.window(10.0, 1.0);
        assert_eq!(w.requests, 0);
        assert!((w.p95_ms - 20.0).abs() < 1e-9);
    }

    #[test]
    fn pods_collects_each_pods_figures() {
        let mut h = History::default();
        h.push(sample(1.0, vec![pod("a", 10.0, 10, 100.0, 0.0), pod("b", 10.0, 10, 100.0, 0.5)]), 60.0);
        h.push(sample(2.0, vec![pod("b", 30.0, 30, 200.0, 0.1)]), 60.0);
        let pods = h.pods(10.0, 2.0);
        assert_eq!(pods.len(), 2);
        assert_eq!((pods[0].pod.as_str(), pods[0].samples, pods[0].requests), ("a", 1, 10));
        let b = &pods[1];
        assert_eq!((b.samples, b.requests), (2, 40));
        assert!((b.error_rate - (5.0 + 3.0) / 40.0).abs() < 1e-9);
        assert!((b.p95_ms - 175.0).abs() < 1e-9);
        assert!((b.rps - 20.0).abs() < 1e-9);
    }
}
