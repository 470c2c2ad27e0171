//! The autoscaling policy: a pure function of what was observed. (Interface; the rules follow.)

use inferpool_crds::{InferencePoolSpec, Tuning};

use super::History;

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
pub struct State {}

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
}

/// Decides one tick.
pub fn decide(inputs: &Inputs, _state: &mut State) -> Decision {
    let floor = u32::try_from(inputs.spec.replicas.min.max(0)).unwrap_or(0);
    Decision {
        replicas: inputs.replicas.max(floor),
        tuning: inputs.tuning,
        delete_pods: Vec::new(),
        clear_cache: false,
        mode: Mode::Stable,
        observed: Observed::default(),
        anomaly: None,
        notes: Vec::new(),
        reason: "holding".to_owned(),
    }
}
