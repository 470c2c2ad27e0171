//! A discrete-event simulation of a pool, to drive the real policy in tests and plots.
//!
//! Model: requests arrive as a Poisson process whose rate follows the scenario's load profile
//! (piecewise linear, times a per-second log-normal noise factor) and go to a ready pod picked at
//! random (kube-proxy's choice). A share of them hits the cache, depending on the cache entries
//! against the scenario's working set; the rest queue in that pod's batcher ([`pod`]). Every
//! `intervalSeconds` each ready pod reports its last 2 s as the collector would ([`crate::autoscale::PodSample`]),
//! the policy decides, and the decision is applied: new pods become ready after a start-up delay,
//! deleted pods are replaced, the tuning reaches every pod at once. Everything is deterministic
//! for a seed.
//!
//! Limits: one model per pool and no GPU contention between pods; a pod removed by a scale-down
//! drops its queue (the real sidecar drains it); the cache's hit rate follows its size at once
//! instead of warming up; memory is a linear function of the largest batch run and the cache size.

use inferpool_crds::{InferencePoolSpec, Tuning};

use super::policy::{self, Inputs, Mode, Note, State};
use super::{History, Sample};

pub mod pod;
pub mod rng;
pub mod scenarios;

use pod::Pod;
use rng::Rng;

/// One replica's cost and resource model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodModel {
    /// Fixed cost of one batch, ms (`a` in `a + b x n`).
    pub fixed_ms: f64,
    /// Cost per image in a batch, ms (`b`).
    pub per_item_ms: f64,
    /// Time outside the model (decode, resize, HTTP), ms.
    pub overhead_ms: f64,
    /// Latency of a cache hit, ms.
    pub hit_ms: f64,
    /// Log-normal sigma of a batch's time.
    pub noise: f64,
    /// Seconds from creation to ready (image pull, model load, warm-up).
    pub startup_seconds: f64,
    /// Request deadline, ms (then 504).
    pub deadline_ms: f64,
    /// Resident memory of an idle pod, MiB.
    pub base_rss_mb: f64,
    /// Extra memory per image of the largest batch run, MiB (ONNX Runtime keeps its buffers).
    pub rss_per_item_mb: f64,
    /// Memory per cache entry, KiB.
    pub entry_kb: f64,
}

impl Default for PodModel {
    fn default() -> Self {
        Self {
            fixed_ms: 25.0,
            per_item_ms: 3.0,
            overhead_ms: 3.0,
            hit_ms: 1.0,
            noise: 0.1,
            startup_seconds: 30.0,
            deadline_ms: 2000.0,
            base_rss_mb: 600.0,
            rss_per_item_mb: 4.0,
            entry_kb: 6.0,
        }
    }
}

/// A pod that misbehaves: the `nth` pod created (0-based) is slow, failing, or both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// Which pod, by creation order.
    pub nth: u32,
    /// Service time multiplier.
    pub slow: f64,
    /// Share of its requests that fail.
    pub error_rate: f64,
}

/// A simulated pool and what happens to it.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short name (file names, test names).
    pub name: &'static str,
    /// What it shows, in one line.
    pub title: &'static str,
    /// The pool's spec.
    pub spec: InferencePoolSpec,
    /// Simulated seconds.
    pub seconds: f64,
    /// Offered load, (seconds, rps) points joined by straight lines.
    pub load: Vec<(f64, f64)>,
    /// Log-normal sigma of the load's per-second noise.
    pub load_noise: f64,
    /// The pods' cost model.
    pub pod: PodModel,
    /// A misbehaving pod, if any.
    pub fault: Option<Fault>,
    /// Distinct images in use, (seconds, entries) points; the hit rate is
    /// `max_hit_rate x min(1, cache entries / working set)`.
    pub working_set: Vec<(f64, f64)>,
    /// Hit rate with a cache as big as the working set (0: no cache hits).
    pub max_hit_rate: f64,
    /// Replicas ready at the start.
    pub replicas: u32,
    /// Tuning at the start.
    pub tuning: Tuning,
    /// Random seed.
    pub seed: u64,
}

/// The pool at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Seconds.
    pub at: f64,
    /// Offered load, rps.
    pub load_rps: f64,
    /// Requests answered per second (the collector's figure).
    pub served_rps: f64,
    /// Ready pods.
    pub ready: u32,
    /// Pods starting.
    pub starting: u32,
    /// Replicas the policy wants.
    pub desired: u32,
    /// The tick's request-weighted p95, ms.
    pub p95_ms: f64,
    /// The SLA's p95 target, ms.
    pub target_ms: f64,
    /// Share of failed requests in the tick.
    pub error_rate: f64,
    /// Share of cache hits in the tick.
    pub hit_rate: f64,
    /// Largest pod's memory, MiB.
    pub rss_mb: f64,
    /// Tuning in force after the tick's decision.
    pub tuning: Tuning,
    /// Stable or panic.
    pub mode: Mode,
}

/// What a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// One point per tick.
    pub points: Vec<Point>,
    /// Pods the policy deleted, with the time.
    pub deleted: Vec<(f64, String)>,
    /// Notes the policy published, with the time.
    pub notes: Vec<(f64, Note)>,
    /// Reasons of the decisions that changed replicas or tuning, with the time.
    pub reasons: Vec<(f64, String)>,
}

/// The value of a piecewise-linear profile at `t` (flat before the first and after the last point).
pub fn profile(points: &[(f64, f64)], t: f64) -> f64 {
    let Some(&(t0, v0)) = points.first() else { return 0.0 };
    if t <= t0 {
        return v0;
    }
    for w in points.windows(2) {
        let ((ta, va), (tb, vb)) = (w[0], w[1]);
        if t < tb {
            return if tb > ta { va + (vb - va) * (t - ta) / (tb - ta) } else { vb };
        }
    }
    points.last().map_or(0.0, |p| p.1)
}

const SLICE: f64 = 0.01;

/// Runs a scenario through the policy and records what happened.
pub fn run(s: &Scenario) -> Trace {
    let mut rng = Rng::new(s.seed);
    let spec = &s.spec;
    let interval = f64::from(spec.autoscaling.interval_seconds.max(1));
    let keep = f64::from(spec.autoscaling.stable_window_seconds) + interval;
    let mut tuning = s.tuning;
    let mut created = 0;
    let mut pods: Vec<Pod> = Vec::new();
    for _ in 0..s.replicas {
        pods.push(new_pod(s, &mut created, 0.0, tuning));
    }
    let mut desired = s.replicas;
    let (mut history, mut state, mut trace) = (History::default(), State::default(), Trace::default());
    let mut load_factor = 1.0;
    let ticks = (s.seconds / interval).round() as u64;
    let slices_per_tick = (interval / SLICE).round() as u64;
    let mut ready_now: Vec<usize> = Vec::new();
    for tick in 1..=ticks {
        for k in 0..slices_per_tick {
            let t = (tick - 1) as f64 * interval + k as f64 * SLICE;
            if k % 100 == 0 {
                load_factor = (s.load_noise * rng.normal() - s.load_noise * s.load_noise / 2.0).exp();
                ready_now = (0..pods.len()).filter(|&i| pods[i].ready(t)).collect();
            }
            let rate = profile(&s.load, t) * load_factor;
            let hit_rate = hit_rate(s, t, tuning);
            let mut arrivals: Vec<f64> = (0..rng.poisson(rate * SLICE)).map(|_| t + rng.uniform() * SLICE).collect();
            arrivals.sort_by(f64::total_cmp);
            for at in arrivals {
                if ready_now.is_empty() {
                    break;
                }
                let i = ready_now[rng.below(ready_now.len())];
                let hit = rng.uniform() < hit_rate;
                pods[i].arrive(at, hit, &s.pod, &mut rng);
            }
        }
        let now = tick as f64 * interval;
        let mut sample = Sample { at: now, pods: Vec::new(), starting: 0, silent: 0 };
        for p in &mut pods {
            p.advance(now, &s.pod, &mut rng);
            if p.ready(now) {
                sample.pods.push(p.report(now, &s.pod));
            } else {
                sample.starting += 1;
            }
        }
        let point = Point {
            at: now,
            load_rps: profile(&s.load, now),
            served_rps: sample.rps(),
            ready: sample.pods.len() as u32,
            starting: sample.starting,
            desired,
            p95_ms: sample.weighted(|p| p.p95_ms),
            target_ms: f64::from(spec.sla.p95_latency_ms),
            error_rate: sample.weighted(|p| p.error_rate),
            hit_rate: sample.weighted(|p| p.cache_hit_rate),
            rss_mb: sample.pods.iter().map(|p| p.rss_bytes).max().unwrap_or(0) as f64 / 1024.0 / 1024.0,
            tuning,
            mode: Mode::Stable,
        };
        history.push(sample, keep);
        let inputs = Inputs { spec, replicas: desired, tuning, history: &history, now };
        let decision = policy::decide(&inputs, &mut state);
        if decision.replicas != desired || decision.tuning != tuning || !decision.delete_pods.is_empty() {
            trace.reasons.push((now, decision.reason.clone()));
        }
        trace.notes.extend(decision.notes.iter().map(|n| (now, n.clone())));
        for name in &decision.delete_pods {
            if let Some(i) = pods.iter().position(|p| &p.name == name) {
                pods.remove(i);
                trace.deleted.push((now, name.clone()));
            }
        }
        desired = decision.replicas;
        tuning = decision.tuning;
        while pods.len() < desired as usize {
            let startup = s.pod.startup_seconds * (1.0 + 0.1 * rng.normal()).max(0.5);
            pods.push(new_pod(s, &mut created, now + startup, tuning));
        }
        while pods.len() > desired as usize {
            // Starting pods go first, then the newest (what a ReplicaSet deletes first).
            let victim = pods.iter().rposition(|p| !p.ready(now)).unwrap_or(pods.len() - 1);
            pods.remove(victim);
        }
        for p in &mut pods {
            p.retune(tuning);
        }
        trace.points.push(Point { desired, tuning, mode: decision.mode, ..point });
    }
    trace
}

fn new_pod(s: &Scenario, created: &mut u32, ready_at: f64, tuning: Tuning) -> Pod {
    let mut pod = Pod::new(format!("{}-{created}", s.name), ready_at, tuning);
    if let Some(f) = s.fault.filter(|f| f.nth == *created) {
        pod.slow = f.slow;
        pod.fail = f.error_rate;
    }
    *created += 1;
    pod
}

fn hit_rate(s: &Scenario, t: f64, tuning: Tuning) -> f64 {
    let working_set = profile(&s.working_set, t);
    if s.max_hit_rate <= 0.0 || working_set <= 0.0 {
        return 0.0;
    }
    let entries = tuning.cache_entries.unwrap_or(s.spec.cache.memory_entries) as f64;
    s.max_hit_rate * (entries / working_set).min(1.0)
}

/// One pod's p95 (ms) at a constant offered `rps` with the given batching: the request-weighted
/// mean of its 2 s reports after a 10 s warm-up, as the policy's windows see it.
pub fn single_pod_p95(model: &PodModel, batch: u32, delay_ms: u32, rps: f64, seconds: f64, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let tuning = Tuning { generation: 1, max_batch_size: batch, max_delay_ms: delay_ms, cache_entries: None };
    let mut pod = Pod::new("bench".to_owned(), 0.0, tuning);
    let slices = (pod::REPORT_WINDOW_SECONDS / SLICE).round() as u64;
    let reports = ((10.0 + seconds) / pod::REPORT_WINDOW_SECONDS).ceil() as u64;
    let (mut sum, mut weight) = (0.0, 0.0);
    for r in 0..reports {
        for k in 0..slices {
            let t = (r * slices + k) as f64 * SLICE;
            let mut arrivals: Vec<f64> = (0..rng.poisson(rps * SLICE)).map(|_| t + rng.uniform() * SLICE).collect();
            arrivals.sort_by(f64::total_cmp);
            for at in arrivals {
                pod.arrive(at, false, model, &mut rng);
            }
        }
        let now = (r + 1) as f64 * pod::REPORT_WINDOW_SECONDS;
        pod.advance(now, model, &mut rng);
        let report = pod.report(now, model);
        if now > 10.0 {
            sum += report.p95_ms * report.requests as f64;
            weight += report.requests as f64;
        }
    }
    if weight > 0.0 { sum / weight } else { 0.0 }
}

/// The highest rps one pod serves with its p95 under `target_ms`, with the given batching (bisection).
pub fn sla_throughput(model: &PodModel, batch: u32, delay_ms: u32, target_ms: f64, seed: u64) -> f64 {
    let full = 1000.0 * f64::from(batch) / (model.fixed_ms + model.per_item_ms * f64::from(batch));
    let (mut lo, mut hi) = (0.0, full * 1.1);
    for _ in 0..9 {
        let mid = (lo + hi) / 2.0;
        if single_pod_p95(model, batch, delay_ms, mid, 40.0, seed) <= target_ms {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}
