//! Shedding before work: a request that cannot be answered within its deadline is refused before
//! anything is decoded.
//!
//! The judgement uses Little's law (W = L / λ): the work already queued ahead of the request (L)
//! at each stage, divided by the rate that stage is measured to serve at (λ), is how long the
//! request would wait; its own decode and one batch are added. The rates are moving averages of
//! what the stages actually did, not fixed estimates, so a faster GPU, a smaller photo mix or a
//! retune shows up within a few requests.
//!
//! Two rules keep the estimate from locking the server out (an earlier version that refused from
//! a batch-time estimate alone did: one slow batch refused everything, and then no batch ran to
//! correct it):
//! - a request with nothing queued ahead of it is always admitted, so measurements keep coming;
//! - until a stage has been measured, nothing is refused on its account.
//!
//! A refusal carries `Retry-After`: the time until enough of the queue has drained that a request
//! with the same budget would fit, so clients that retry spread out instead of coming straight
//! back (docs/sidecar.md says what a client should do).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of the newest observation in each moving average.
const ALPHA: f64 = 0.2;

/// Share of its budget a request's expected time may fill. The estimate is a mean and the
/// stages' times vary (more so when the CPUs are contended), so a request expected to finish just
/// inside its deadline often finishes just outside it, after its decode and inference were spent:
/// under a 10x overload that was one admitted request in five.
const HEADROOM: f64 = 0.8;

/// A moving average of seconds, shared between threads without a lock. No value until the first
/// observation.
#[derive(Debug)]
pub struct Ewma(AtomicU64);

impl Default for Ewma {
    fn default() -> Self {
        Ewma(AtomicU64::new(f64::NAN.to_bits()))
    }
}

impl Ewma {
    /// Folds one observation in.
    pub fn observe(&self, x: f64) {
        if !x.is_finite() || x < 0.0 {
            return;
        }
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let old = f64::from_bits(bits);
            Some(if old.is_nan() { x } else { old + ALPHA * (x - old) }.to_bits())
        });
    }

    /// The average, once something was observed.
    pub fn get(&self) -> Option<f64> {
        Some(f64::from_bits(self.0.load(Ordering::Relaxed))).filter(|v| !v.is_nan())
    }
}

/// What the decode and inference stages are measured to do.
#[derive(Debug, Default)]
pub struct ServiceRates {
    /// Seconds one image takes to decode and resize on one decode worker.
    pub decode: Ewma,
    /// Seconds one batch takes in the model.
    pub batch: Ewma,
    /// Images per batch.
    pub batch_images: Ewma,
}

/// The work queued ahead of a new request, and the workers serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Images waiting for, or in, the decode stage ahead of this one.
    pub decode_ahead: usize,
    /// Decoded images waiting for inference ahead of this one.
    pub infer_ahead: usize,
    /// Decode workers.
    pub decoders: usize,
    /// Model sessions running batches side by side.
    pub sessions: usize,
}

/// Why a request was refused for load.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "overloaded: an answer would take about {} ms with {ahead} requests queued ahead, more than the {} ms deadline",
    expected.as_millis(),
    budget.as_millis()
)]
pub struct Overload {
    /// How long the answer would take.
    pub expected: Duration,
    /// What the request allowed.
    pub budget: Duration,
    /// Requests queued ahead of it.
    pub ahead: usize,
    /// When a request with the same budget is expected to fit.
    pub retry_after: Duration,
}

impl ServiceRates {
    /// How long a request arriving now would take to be answered, if every stage it depends on
    /// has been measured.
    pub fn expected(&self, load: Load) -> Option<Duration> {
        let decode = self.decode.get()?;
        let batch = self.batch.get()?;
        let per_image = batch / self.batch_images.get()?.max(1.0);
        // Stages run side by side, so the slower one sets the wait; every image still waiting
        // for a decoder also goes through the model after it.
        let decode_wait = load.decode_ahead as f64 * decode / load.decoders.max(1) as f64;
        let infer_wait = (load.decode_ahead + load.infer_ahead) as f64 * per_image / load.sessions.max(1) as f64;
        let total = decode_wait.max(infer_wait) + decode + batch;
        Some(Duration::from_secs_f64(total.min(1e6)))
    }

    /// Admits a request with `budget` left before its deadline, or refuses it (see the module docs):
    /// refused when its expected time exceeds [`HEADROOM`] of the budget.
    pub fn admit(&self, load: Load, budget: Duration) -> Result<(), Overload> {
        let ahead = load.decode_ahead + load.infer_ahead;
        if ahead == 0 {
            return Ok(());
        }
        match self.expected(load) {
            Some(expected) if expected.as_secs_f64() > budget.as_secs_f64() * HEADROOM => {
                let excess = expected.saturating_sub(budget.mul_f64(HEADROOM));
                Err(Overload { expected, budget, ahead, retry_after: retry_after(excess) })
            }
            _ => Ok(()),
        }
    }
}

/// `Retry-After` for a queue that needs `excess` more time than a request allows: whole seconds
/// (the header's unit), rounded up, at least one.
pub fn retry_after(excess: Duration) -> Duration {
    Duration::from_secs(excess.as_secs_f64().ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(decode: f64, batch: f64, images: f64) -> ServiceRates {
        let r = ServiceRates::default();
        r.decode.observe(decode);
        r.batch.observe(batch);
        r.batch_images.observe(images);
        r
    }

    fn load(decode_ahead: usize, infer_ahead: usize) -> Load {
        Load { decode_ahead, infer_ahead, decoders: 2, sessions: 1 }
    }

    #[test]
    fn the_moving_average_starts_at_the_first_value_and_ignores_nonsense() {
        let e = Ewma::default();
        assert_eq!(e.get(), None);
        e.observe(1.0);
        assert_eq!(e.get(), Some(1.0));
        e.observe(2.0);
        assert!((e.get().unwrap() - 1.2).abs() < 1e-12);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            e.observe(bad);
        }
        assert!((e.get().unwrap() - 1.2).abs() < 1e-12);
    }

    #[test]
    fn the_wait_is_the_queue_ahead_over_the_slower_stage_rate() {
        // 10 ms a decode on 2 workers, 16 images in 40 ms a batch (2.5 ms an image).
        let r = rates(0.010, 0.040, 16.0);
        let cases = [
            // decode-bound: 100 images ahead at 5 ms each = 0.5 s; inference needs 0.25 s.
            (load(100, 0), 0.5 + 0.010 + 0.040),
            // inference-bound: 400 decoded images at 2.5 ms each = 1 s.
            (load(0, 400), 1.0 + 0.010 + 0.040),
            // both: 100 still to decode, 300 to infer: (100 + 300) * 2.5 ms = 1 s > 0.5 s.
            (load(100, 300), 1.0 + 0.010 + 0.040),
            (Load { sessions: 2, ..load(0, 400) }, 0.5 + 0.010 + 0.040),
        ];
        for (load, want) in cases {
            let got = r.expected(load).unwrap().as_secs_f64();
            assert!((got - want).abs() < 1e-9, "{load:?}: {got} s, want {want} s");
        }
    }

    #[test]
    fn admission_refuses_only_when_the_drain_time_exceeds_the_budget() {
        let r = rates(0.010, 0.040, 16.0);
        let ms = Duration::from_millis;
        // (load, budget, admitted)
        let cases = [
            (load(0, 0), ms(1), true),        // nothing ahead: always admitted
            (load(0, 400), ms(2000), true),   // 1.05 s expected, 1.6 s allowed (80% headroom)
            (load(0, 400), ms(1300), false),  // 1.05 s expected, 1.04 s allowed
            (load(0, 400), ms(1000), false),  // 1.05 s expected
            (load(100, 0), ms(700), true),    // 0.55 s expected, 0.56 s allowed
            (load(100, 0), ms(600), false),   // 0.55 s expected, 0.48 s allowed
            (load(1000, 0), ms(2000), false), // 5.05 s expected
        ];
        for (load, budget, admitted) in cases {
            assert_eq!(r.admit(load, budget).is_ok(), admitted, "{load:?} with {budget:?}");
        }
        let refused = r.admit(load(1000, 0), ms(2000)).unwrap_err();
        // 5.05 s expected against 1.6 s usable: 3.45 s too long, so retry in 4 s.
        assert_eq!((refused.ahead, refused.retry_after), (1000, Duration::from_secs(4)));
        assert!(refused.to_string().contains("5050 ms with 1000 requests queued ahead"), "{refused}");
    }

    #[test]
    fn an_unmeasured_stage_refuses_nothing() {
        let r = ServiceRates::default();
        r.decode.observe(1.0);
        assert_eq!(r.expected(load(1000, 1000)), None);
        assert!(r.admit(load(1000, 1000), Duration::from_millis(1)).is_ok());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let cases = [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (7.5, 8)];
        for (excess, want) in cases {
            assert_eq!(retry_after(Duration::from_secs_f64(excess)), Duration::from_secs(want), "{excess}");
        }
    }
}
