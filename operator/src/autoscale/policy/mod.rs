//! The autoscaling policy: a pure function of what was observed.
//!
//! [`decide`] reads the spec, the replicas and tuning in force and the [`History`] of samples, and
//! returns a [`Decision`] with its reason. It keeps what it must remember between ticks
//! (recommendations for scale-down stabilisation, the panic deadline, the batch cost model, the
//! latency baseline, cool-downs, when each note was last published) in [`State`]. No clock, no I/O:
//! the same inputs and state give the same decision. The rules, one module each:
//!
//! - [`replicas`]: demand over measured per-replica capacity at the SLA (Knative KPA windows, HPA
//!   scale-down stabilisation);
//! - [`batching`]: the batch cost model learned from the pods and the batch size and delay chosen
//!   from it;
//! - [`cache`]: memory-tier growth against the hit-rate target, shrinking and clearing under memory
//!   pressure;
//! - [`health`]: error-rate outlier pods and pool-wide errors;
//! - [`anomaly`]: p95 against its rolling baseline.
//!
//! docs/autoscaling.md explains each rule and its defaults.

use std::collections::BTreeMap;

use inferpool_crds::pool::SlaStatus;
use inferpool_crds::{InferencePoolSpec, Tuning};

use super::{History, Window};

mod anomaly;
mod batching;
mod cache;
mod health;
mod replicas;

#[cfg(test)]
mod tests;

/// Fewer requests than this in a window are too few to judge a p95 or an error rate.
pub const MIN_REQUESTS: u64 = 50;
/// The same note (reason) is published at most once per this many seconds unless its subject changes.
pub const NOTE_INTERVAL_SECONDS: f64 = 60.0;

/// What the policy decides from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The pool's spec (bounds, SLA, windows, which parts are automatic).
    pub spec: &'a InferencePoolSpec,
    /// Replicas the Deployment runs now.
    pub replicas: u32,
    /// Tuning in force now.
    pub tuning: Tuning,
    /// Samples so far.
    pub history: &'a History,
    /// Seconds, on the samples' clock.
    pub now: f64,
}

/// The policy's memory between ticks (stabilisation, hysteresis, baselines).
#[derive(Debug, Clone, Default)]
pub struct State {
    /// First tick seen: scale-down waits until a whole stabilisation window was observed.
    started_at: Option<f64>,
    replicas: replicas::Memory,
    batching: batching::Memory,
    cache: cache::Memory,
    health: health::Memory,
    anomaly: anomaly::Baseline,
    /// Per note reason: when it was last published and what it was about.
    notes: BTreeMap<&'static str, (f64, String)>,
}

impl State {
    /// Per-replica capacity at the SLA, rps, as last estimated (None before any traffic).
    pub fn capacity_rps(&self) -> Option<f64> {
        self.replicas.capacity
    }

    /// Whether the policy is in panic mode at `now`.
    pub fn panicking(&self, now: f64) -> bool {
        self.replicas.panic_until.is_some_and(|until| now < until)
    }
}

/// Stable or panic mode (Knative's KPA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Decisions from the stable window.
    #[default]
    Stable,
    /// A burst needs at least twice the capacity: scale up at once, never down.
    Panic,
}

/// The service level observed over the stable window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observed {
    /// p95 latency, ms.
    pub p95_ms: f64,
    /// Share of failed requests.
    pub error_rate: f64,
    /// Share of requests answered from a cache.
    pub cache_hit_rate: f64,
    /// Requests per second across the pool.
    pub rps: f64,
    /// Whether every SLA target is met; `None` without traffic to judge.
    pub compliant: Option<bool>,
}

impl Observed {
    /// The status's SLA figures, rounded for people; none until there was traffic.
    pub fn sla_status(&self) -> Option<SlaStatus> {
        let compliant = self.compliant?;
        let round = |x: f64, digits: i32| (x * 10f64.powi(digits)).round() / 10f64.powi(digits);
        Some(SlaStatus {
            p95_ms: round(self.p95_ms, 1),
            error_rate: round(self.error_rate, 4),
            cache_hit_rate: round(self.cache_hit_rate, 3),
            rps: round(self.rps, 1),
            compliant,
        })
    }
}

/// Something worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A Warning rather than a Normal Event.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// One tick's decision, with its reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas the Deployment should run.
    pub replicas: u32,
    /// Tuning to run (generation moved on when a value changed).
    pub tuning: Tuning,
    /// Pods to delete (error outliers); their Deployment replaces them.
    pub delete_pods: Vec<String>,
    /// Clear the replicas' memory caches (memory pressure that shrinking did not cure).
    pub clear_cache: bool,
    /// Stable or panic.
    pub mode: Mode,
    /// The service level over the stable window.
    pub observed: Observed,
    /// p95 outside two standard deviations of its rolling baseline, with the numbers.
    pub anomaly: Option<String>,
    /// Events to publish (already rate-limited by the policy).
    pub notes: Vec<Note>,
    /// Why, in one line (status.lastDecision).
    pub reason: String,
    /// Measured capacity of one replica at the SLA, requests per second (None before any traffic).
    pub capacity_rps: Option<f64>,
}

/// The service level over a window; `compliant` is None without traffic.
pub fn observe(spec: &InferencePoolSpec, w: &Window) -> Observed {
    let compliant = (w.requests > 0).then(|| {
        // Without cache lookups (every request bypassed the cache) the hit rate says nothing.
        w.p95_ms <= f64::from(spec.sla.p95_latency_ms)
            && w.error_rate <= spec.sla.max_error_rate
            && (w.cache_lookups == 0 || w.cache_hit_rate >= spec.sla.min_cache_hit_rate)
    });
    Observed { p95_ms: w.p95_ms, error_rate: w.error_rate, cache_hit_rate: w.cache_hit_rate, rps: w.rps, compliant }
}

/// Decides one tick.
pub fn decide(inputs: &Inputs, state: &mut State) -> Decision {
    let spec = inputs.spec;
    let now = inputs.now;
    let started_at = *state.started_at.get_or_insert(now);
    let stable = inputs.history.window(f64::from(spec.autoscaling.stable_window_seconds), now);
    let panic = inputs.history.window(f64::from(spec.autoscaling.panic_window_seconds), now);
    let observed = observe(spec, &stable);
    let mut notes = Vec::new();
    let mut reasons = Vec::new();

    // Errors first: an outlier pod is excluded from the pool-wide error rate.
    let health = health::check(inputs, &mut state.health);
    if let Some(out) = &health.deleted {
        let message = format!(
            "pod {} fails {:.1}% of requests against {:.1}% on the other pods: deleting it",
            out.pod,
            out.error_rate * 100.0,
            out.others * 100.0
        );
        note(state, &mut notes, now, true, "PodReplaced", message.clone(), out.pod.clone());
        reasons.push(message);
    }

    // Tuning: batching and cache, each only when automatic.
    batching::learn(&mut state.batching, inputs.history);
    let model = batching::model(&state.batching);
    let mut tuning = inputs.tuning;
    let memory_ratio = cache::memory_ratio(spec, &stable, &panic);
    if spec.batching.auto {
        if let Some((batch, delay, why)) = batching::tune(inputs, &mut state.batching, model, &stable, memory_ratio) {
            tuning.max_batch_size = batch;
            tuning.max_delay_ms = delay;
            reasons.push(why);
        }
    } else {
        tuning.max_batch_size = spec.batching.max_batch_size;
        tuning.max_delay_ms = spec.batching.max_delay_ms;
    }
    let mut clear_cache = false;
    if spec.cache.auto {
        let entries = tuning.cache_entries.unwrap_or(spec.cache.memory_entries);
        let step = cache::tune(inputs, &mut state.cache, entries, &stable, &panic, memory_ratio);
        if let Some(why) = step.reason {
            tuning.cache_entries = Some(step.entries);
            clear_cache = step.clear;
            let (warning, reason) = if step.clear { (true, "CacheCleared") } else { (false, "CacheResized") };
            note(state, &mut notes, now, warning, reason, why.clone(), step.entries.to_string());
            reasons.push(why);
        }
    } else if tuning.cache_entries.is_some_and(|e| e != spec.cache.memory_entries) {
        tuning.cache_entries = Some(spec.cache.memory_entries);
    }
    let changed = (tuning.max_batch_size, tuning.max_delay_ms, tuning.cache_entries)
        != (inputs.tuning.max_batch_size, inputs.tuning.max_delay_ms, inputs.tuning.cache_entries);
    if changed {
        tuning.generation = inputs.tuning.generation + 1;
        if spec.batching.auto
            && (tuning.max_batch_size, tuning.max_delay_ms)
                != (inputs.tuning.max_batch_size, inputs.tuning.max_delay_ms)
        {
            let message = format!(
                "batching {}x{} ms -> {}x{} ms",
                inputs.tuning.max_batch_size, inputs.tuning.max_delay_ms, tuning.max_batch_size, tuning.max_delay_ms
            );
            let subject = format!("{}/{}", tuning.max_batch_size, tuning.max_delay_ms);
            note(state, &mut notes, now, false, "Retuned", message, subject);
        }
    }

    // Replicas, with the capacity measured at the batch size now in force.
    let hit_rate = if stable.requests > 0 { stable.cache_hit_rate } else { 0.0 };
    let mut capacity = model.map(|m| batching::capacity_rps(&m, tuning.max_batch_size, spec, hit_rate));
    if let (Some(m), Some(c)) = (model, capacity.as_mut())
        && !m.calibrated
        && panic.requests >= MIN_REQUESTS
        && panic.p95_ms <= f64::from(spec.sla.p95_latency_ms)
        && panic.ready > 0.0
    {
        // One batch size seen: the line through the origin under-states capacity. While the SLA
        // holds, the pods sustain their load at the planned utilisation at least.
        *c = c.max(panic.demand_rps() / panic.ready / spec.autoscaling.target_utilization.clamp(0.1, 1.0));
    }
    let plan = replicas::plan(inputs, &mut state.replicas, started_at, capacity, &stable, &panic, health.pool_error);
    if plan.replicas != inputs.replicas {
        let (warning, reason) = match (plan.replicas > inputs.replicas, plan.mode) {
            (true, Mode::Panic) => (true, "ScaledUpInPanic"),
            (true, Mode::Stable) => (false, "ScaledUp"),
            (false, _) => (false, "ScaledDown"),
        };
        note(state, &mut notes, now, warning, reason, plan.reason.clone(), plan.replicas.to_string());
    }
    if let Some(rate) = health.pool_error {
        let message = format!(
            "pool error rate {:.1}% > {:.1}% allowed: scaling out",
            rate * 100.0,
            spec.sla.max_error_rate * 100.0
        );
        note(state, &mut notes, now, true, "HighErrorRate", message, String::new());
    }
    reasons.insert(0, plan.reason);

    let anomaly = anomaly::check(&mut state.anomaly, inputs, &panic);
    if let Some(message) = &anomaly {
        note(state, &mut notes, now, true, "SLAAnomaly", message.clone(), String::new());
    }

    Decision {
        replicas: plan.replicas,
        tuning,
        delete_pods: health.deleted.into_iter().map(|o| o.pod).collect(),
        clear_cache,
        mode: plan.mode,
        observed,
        anomaly,
        notes,
        reason: reasons.join("; "),
        capacity_rps: state.replicas.capacity,
    }
}

/// Publishes a note unless the same reason was published about the same subject in the last minute.
#[allow(clippy::too_many_arguments)]
fn note(
    state: &mut State,
    notes: &mut Vec<Note>,
    now: f64,
    warning: bool,
    reason: &'static str,
    message: String,
    subject: String,
) {
    let fresh = match state.notes.get(reason) {
        None => true,
        Some((at, last)) => now - at >= NOTE_INTERVAL_SECONDS || *last != subject,
    };
    if fresh {
        state.notes.insert(reason, (now, subject));
        notes.push(Note { warning, reason, message });
    }
}
