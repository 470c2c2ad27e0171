//! Anomaly: the recent p95 against its rolling baseline.
//!
//! The baseline is an exponentially weighted mean and variance of the panic window's p95, with a
//! time constant of one stable window (`alpha = interval / stableWindow`). After [`WARM_UP`] ticks
//! with traffic, a p95 further than [`SIGMAS`] standard deviations from the mean (and at least
//! [`MIN_SHIFT`] of the mean, so a very steady pool does not cry wolf over a millisecond) is an
//! anomaly.

use super::{Inputs, MIN_REQUESTS, Window};

/// Ticks with traffic before the baseline is trusted.
pub const WARM_UP: u32 = 30;
/// Standard deviations that make an anomaly.
pub const SIGMAS: f64 = 2.0;
/// Least shift that makes an anomaly, as a share of the baseline mean.
pub const MIN_SHIFT: f64 = 0.1;

/// The rolling p95 baseline.
#[derive(Debug, Clone, Default)]
pub(super) struct Baseline {
    mean: f64,
    var: f64,
    count: u32,
}

/// Folds the recent p95 into the baseline and says whether it was anomalous.
pub(super) fn check(b: &mut Baseline, inputs: &Inputs, panic: &Window) -> Option<String> {
    if panic.requests < MIN_REQUESTS {
        return None;
    }
    let x = panic.p95_ms;
    let sd = b.var.sqrt();
    let anomaly = (b.count >= WARM_UP && (x - b.mean).abs() > (SIGMAS * sd).max(MIN_SHIFT * b.mean))
        .then(|| format!("p95 {x:.0} ms outside 2 sigma of its baseline {:.0} ms +- {sd:.0} ms", b.mean));
    let a = &inputs.spec.autoscaling;
    let alpha = (f64::from(a.interval_seconds) / f64::from(a.stable_window_seconds.max(1))).clamp(0.01, 0.5);
    if b.count == 0 {
        b.mean = x;
    } else {
        let diff = x - b.mean;
        b.mean += alpha * diff;
        b.var = (1.0 - alpha) * (b.var + alpha * diff * diff);
    }
    b.count = b.count.saturating_add(1);
    anomaly
}
