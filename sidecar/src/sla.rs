//! Trailing-window statistics behind the SLA report (`/api/v1/metrics/sla`).
//!
//! Prometheus histograms only grow; the operator needs "the last 10 s" and "the last 60 s" without
//! running a Prometheus. So each event is also counted into a ring of one-second buckets, each with
//! log-scale latency histograms (10% wide bins, so a quantile is within ±5%), and a window is the sum
//! of its buckets. Recording is one short critical section; reading sums at most 60 buckets.

use std::time::{Duration, Instant};

use inferpool_crds::{LatencyQuantiles, TierHitRates, WindowReport};
use parking_lot::Mutex;

use crate::labels::Tier;

/// Longest window kept, in seconds.
pub const MAX_WINDOW: u64 = 60;
/// Bin growth factor of the latency histograms.
const GROWTH: f64 = 1.1;
/// Bins: 1 µs * 1.1^230 is about 3.3 hours, far beyond any deadline.
const BINS: usize = 230;

/// A log-scale histogram of durations.
#[derive(Clone)]
struct Hist([u32; BINS]);

impl Hist {
    fn bin(d: Duration) -> usize {
        let micros = d.as_secs_f64() * 1e6;
        if micros <= 1.0 { 0 } else { ((micros.ln() / GROWTH.ln()) as usize + 1).min(BINS - 1) }
    }

    fn add(&mut self, d: Duration) {
        self.0[Self::bin(d)] += 1;
    }

    fn merge(&mut self, other: &Hist) {
        self.0.iter_mut().zip(other.0.iter()).for_each(|(a, b)| *a += b);
    }

    /// The q-quantile in milliseconds: the geometric middle of the bin that holds it.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.0.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.0.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                let upper = GROWTH.powi(i as i32);
                return if i == 0 { 1e-3 } else { upper / GROWTH.sqrt() / 1e3 };
            }
        }
        0.0
    }
}

/// Counts of one second.
#[derive(Clone)]
struct Bucket {
    second: u64,
    requests: u64,
    errors: u64,
    latency: Hist,
    queue_wait: Hist,
    inference: Hist,
    batches: u64,
    batch_images: u64,
    cache_lookups: u64,
    /// Hits by tier: memory, disk, redis.
    cache_hits: [u64; 3],
}

impl Bucket {
    fn empty(second: u64) -> Self {
        Bucket {
            second,
            requests: 0,
            errors: 0,
            latency: Hist([0; BINS]),
            queue_wait: Hist([0; BINS]),
            inference: Hist([0; BINS]),
            batches: 0,
            batch_images: 0,
            cache_lookups: 0,
            cache_hits: [0; 3],
        }
    }

    fn merge(&mut self, b: &Bucket) {
        self.requests += b.requests;
        self.errors += b.errors;
        self.latency.merge(&b.latency);
        self.queue_wait.merge(&b.queue_wait);
        self.inference.merge(&b.inference);
        self.batches += b.batches;
        self.batch_images += b.batch_images;
        self.cache_lookups += b.cache_lookups;
        self.cache_hits.iter_mut().zip(b.cache_hits).for_each(|(a, b)| *a += b);
    }
}

/// One-second buckets over the last [`MAX_WINDOW`] seconds.
pub struct Windows {
    start: Instant,
    ring: Mutex<Vec<Bucket>>,
}

impl Default for Windows {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Windows {
    /// Empty windows whose clock starts at `start`.
    pub fn new(start: Instant) -> Self {
        Windows { start, ring: Mutex::new((0..MAX_WINDOW).map(|_| Bucket::empty(u64::MAX)).collect()) }
    }

    fn with_bucket(&self, at: Instant, f: impl FnOnce(&mut Bucket)) {
        let second = at.saturating_duration_since(self.start).as_secs();
        let mut ring = self.ring.lock();
        let b = &mut ring[(second % MAX_WINDOW) as usize];
        if b.second != second {
            *b = Bucket::empty(second);
        }
        f(b);
    }

    /// A finished request: its end-to-end latency and whether it counts as an error.
    pub fn request(&self, at: Instant, latency: Duration, error: bool) {
        self.with_bucket(at, |b| {
            b.requests += 1;
            b.errors += u64::from(error);
            b.latency.add(latency);
        });
    }

    /// Time a request waited in the batch queue.
    pub fn queue_wait(&self, at: Instant, wait: Duration) {
        self.with_bucket(at, |b| b.queue_wait.add(wait));
    }

    /// A batch of `size` images that took `inference`.
    pub fn batch(&self, at: Instant, size: usize, inference: Duration) {
        self.with_bucket(at, |b| {
            b.batches += 1;
            b.batch_images += size as u64;
            b.inference.add(inference);
        });
    }

    /// A cache lookup and the tier that answered it (`None`: a miss).
    pub fn cache_lookup(&self, at: Instant, answered_by: Option<Tier>) {
        self.with_bucket(at, |b| {
            b.cache_lookups += 1;
            if let Some(tier) = answered_by {
                b.cache_hits[tier_index(tier)] += 1;
            }
        });
    }

    /// Statistics over the `seconds` (at most [`MAX_WINDOW`]) before `now`, the current second included.
    pub fn report(&self, now: Instant, seconds: u32) -> WindowReport {
        let seconds = u64::from(seconds).clamp(1, MAX_WINDOW);
        let elapsed = now.saturating_duration_since(self.start);
        let current = elapsed.as_secs();
        let mut sum = Bucket::empty(0);
        {
            let ring = self.ring.lock();
            for b in ring.iter().filter(|b| b.second <= current && b.second + seconds > current) {
                sum.merge(b);
            }
        }
        // A young process has not lived the whole window; divide by what it has lived.
        let span = elapsed.as_secs_f64().clamp(1.0, seconds as f64);
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        WindowReport {
            seconds: seconds as u32,
            requests: sum.requests,
            rps: sum.requests as f64 / span,
            errors: sum.errors,
            error_rate: ratio(sum.errors, sum.requests),
            latency_ms: LatencyQuantiles {
                p50: sum.latency.quantile_ms(0.50),
                p95: sum.latency.quantile_ms(0.95),
                p99: sum.latency.quantile_ms(0.99),
            },
            queue_wait_p95_ms: sum.queue_wait.quantile_ms(0.95),
            inference_p95_ms: sum.inference.quantile_ms(0.95),
            batches: sum.batches,
            mean_batch_size: ratio(sum.batch_images, sum.batches),
            cache_lookups: sum.cache_lookups,
            cache_hit_rate: ratio(sum.cache_hits.iter().sum(), sum.cache_lookups),
            cache_hit_rate_by_tier: TierHitRates {
                memory: ratio(sum.cache_hits[0], sum.cache_lookups),
                disk: ratio(sum.cache_hits[1], sum.cache_lookups),
                redis: ratio(sum.cache_hits[2], sum.cache_lookups),
            },
        }
    }
}

fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Memory => 0,
        Tier::Disk => 1,
        Tier::Redis => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn quantiles_are_within_five_percent() {
        let w = Windows::new(Instant::now());
        let t = w.start + Duration::from_millis(500);
        for ms in 1..=1000u32 {
            w.request(t, MS * ms, ms % 100 == 0);
        }
        let r = w.report(t, 10);
        assert_eq!((r.requests, r.errors), (1000, 10));
        assert!((r.error_rate - 0.01).abs() < 1e-9);
        for (got, want) in [(r.latency_ms.p50, 500.0), (r.latency_ms.p95, 950.0), (r.latency_ms.p99, 990.0)] {
            assert!((got / want - 1.0).abs() < 0.05, "got {got}, want {want}");
        }
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let w = Windows::new(Instant::now());
        let at = |s: u64| w.start + Duration::from_secs(s);
        w.request(at(0), MS, false);
        w.request(at(30), MS, true);
        w.batch(at(30), 4, MS);
        w.batch(at(31), 2, MS);
        w.cache_lookup(at(31), Some(Tier::Disk));
        w.cache_lookup(at(31), None);
        w.cache_lookup(at(31), Some(Tier::Memory));
        w.cache_lookup(at(31), None);
        let short = w.report(at(35), 10);
        assert_eq!((short.requests, short.errors, short.batches), (1, 1, 2));
        assert_eq!(short.mean_batch_size, 3.0);
        assert_eq!(short.cache_hit_rate, 0.5);
        assert_eq!(short.cache_hit_rate_by_tier, TierHitRates { memory: 0.25, disk: 0.25, redis: 0.0 });
        assert_eq!(short.rps, 0.1);
        assert_eq!(w.report(at(35), 60).requests, 2);
        // 60 s later the ring slot of second 0 is reused by second 60 and the old count is gone.
        w.request(at(60), MS, false);
        assert_eq!(w.report(at(60), 60).requests, 2);
        assert_eq!(w.report(at(95), 60).requests, 1);
    }

    #[test]
    fn empty_windows_report_zeroes() {
        let w = Windows::new(Instant::now());
        let r = w.report(Instant::now(), 60);
        assert_eq!((r.requests, r.rps, r.error_rate, r.latency_ms.p95, r.cache_hit_rate), (0, 0.0, 0.0, 0.0, 0.0));
    }
}
