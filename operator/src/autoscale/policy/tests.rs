//! Table tests of the policy's edge cases.

use inferpool_crds::{InferencePoolSpec, Tuning};

use super::*;
use crate::autoscale::{PodSample, Sample};

fn spec() -> InferencePoolSpec {
    let mut spec = InferencePoolSpec::default();
    spec.sla.p95_latency_ms = 300;
    spec.replicas.min = 2;
    spec.replicas.max = 6;
    spec
}

fn tuning() -> Tuning {
    Tuning { generation: 7, max_batch_size: 16, max_delay_ms: 5, cache_entries: Some(1000) }
}

fn pod(name: &str, rps: f64, p95: f64) -> PodSample {
    PodSample {
        pod: name.to_owned(),
        rps,
        error_rate: 0.0,
        requests: (rps * 2.0) as u64,
        p95_ms: p95,
        queue_wait_p95_ms: p95 / 2.0,
        inference_p95_ms: p95 / 3.0,
        mean_batch_size: 4.0,
        cache_hit_rate: 0.0,
        queue_depth: 0,
        rss_bytes: 1 << 30,
        tuning_generation: 7,
        cache_lookups: 0,
    }
}

/// Runs `ticks` ticks of 2 s with the same per-tick sample; returns the last decision.
fn run(spec: &InferencePoolSpec, replicas: u32, ticks: u32, sample: impl Fn(f64) -> Sample) -> (Decision, State) {
    let mut history = History::default();
    let mut state = State::default();
    let mut replicas = replicas;
    let mut tuning = tuning();
    let mut last = None;
    for tick in 1..=ticks {
        let now = f64::from(tick) * 2.0;
        history.push(sample(now), 120.0);
        let d = decide(&Inputs { spec, replicas, tuning, history: &history, now }, &mut state);
        replicas = d.replicas;
        tuning = d.tuning;
        last = Some(d);
    }
    (last.unwrap_or_else(|| panic!("no ticks")), state)
}

fn pods(n: usize, rps: f64, p95: f64) -> Vec<PodSample> {
    (0..n).map(|i| pod(&format!("p{i}"), rps, p95)).collect()
}

#[test]
fn no_traffic_goes_to_min_only_after_the_delay() {
    let spec = spec();
    let idle = |at| Sample { at, pods: pods(5, 0.0, 0.0), starting: 0, silent: 0 };
    let (early, _) = run(&spec, 5, 100, idle);
    assert_eq!(early.replicas, 5, "200 s < 300 s delay: {}", early.reason);
    assert_eq!(early.observed.compliant, None, "no traffic to judge");
    let (late, _) = run(&spec, 5, 400, idle);
    assert_eq!(late.replicas, 2, "{}", late.reason);
}

#[test]
fn replicas_stay_within_bounds() {
    let spec = spec();
    let cases = [(1, 2, "below min"), (9, 6, "above max")];
    for (replicas, want, what) in cases {
        let (d, _) = run(&spec, replicas, 1, |at| Sample { at, pods: pods(1, 10.0, 50.0), starting: 0, silent: 0 });
        assert_eq!(d.replicas, want, "{what}: {}", d.reason);
    }
    // Overload never goes past max.
    let (d, _) = run(&spec, 2, 50, |at| Sample { at, pods: pods(2, 500.0, 3000.0), starting: 0, silent: 0 });
    assert_eq!(d.replicas, 6, "{}", d.reason);
}

#[test]
fn autoscaling_and_auto_tuning_off_keep_the_spec() {
    let mut spec = spec();
    spec.autoscaling.enabled = false;
    spec.replicas.count = 3;
    spec.batching.auto = false;
    spec.batching.max_batch_size = 8;
    spec.cache.auto = false;
    let (d, _) = run(&spec, 5, 3, |at| Sample { at, pods: pods(5, 300.0, 900.0), starting: 0, silent: 0 });
    assert_eq!(d.replicas, 3);
    assert_eq!((d.tuning.max_batch_size, d.tuning.max_delay_ms, d.tuning.cache_entries), (8, 5, Some(1000)));
    assert_eq!(d.tuning.generation, 8, "one bump for the batch size, none after");
}

#[test]
fn generation_moves_only_when_a_value_changes() {
    let spec = spec();
    let (d, _) = run(&spec, 2, 1, |at| Sample { at, pods: vec![], starting: 0, silent: 0 });
    assert_eq!(d.tuning, tuning(), "nothing observed: nothing changes");
}

#[test]
fn silent_pods_are_not_capacity() {
    let spec = spec();
    // Two pods answer and are overloaded; two more exist but do not answer.
    let (d, _) = run(&spec, 4, 3, |at| Sample { at, pods: pods(2, 150.0, 900.0), starting: 0, silent: 2 });
    assert!(d.replicas > 4, "scale out past the silent pods: {}", d.reason);
}

#[test]
fn starting_pods_are_pending_capacity() {
    let spec = spec();
    let busy = |starting| {
        move |at| {
            let mut p = pods(2, 100.0, 600.0);
            for p in &mut p {
                p.inference_p95_ms = 20.0;
            }
            Sample { at, pods: p, starting, silent: 0 }
        }
    };
    // The SLA is broken but two more pods are starting: no extra scale-out on the p95.
    let (d, _) = run(&spec, 4, 3, busy(2));
    assert_eq!(d.replicas, 4, "{}", d.reason);
    // The same p95 with nothing starting scales out.
    let (d, _) = run(&spec, 2, 3, busy(0));
    assert!(d.replicas > 2, "{}", d.reason);
}

#[test]
fn memory_pressure_shrinks_then_clears_the_cache() {
    let spec = spec();
    let limit = spec.sla.memory_limit_mb * 1024 * 1024;
    let heavy = move |at| {
        let mut p = pods(2, 50.0, 50.0);
        for p in &mut p {
            p.rss_bytes = limit * 96 / 100;
        }
        Sample { at, pods: p, starting: 0, silent: 0 }
    };
    let (first, _) = run(&spec, 2, 1, heavy);
    assert_eq!(first.tuning.cache_entries, Some(500), "{}", first.reason);
    assert!(!first.clear_cache);
    let (later, _) = run(&spec, 2, 31, heavy);
    assert!(later.clear_cache, "still > 95% a stable window after shrinking: {}", later.reason);
    assert!(later.notes.iter().any(|n| n.reason == "CacheCleared" && n.warning));
}

#[test]
fn an_error_outlier_is_deleted_once_per_cooldown() {
    let spec = spec();
    let sample = |at| {
        let mut p = pods(3, 100.0, 50.0);
        p[1].error_rate = 0.3;
        Sample { at, pods: p, starting: 0, silent: 0 }
    };
    let mut history = History::default();
    let mut state = State::default();
    let mut deleted = Vec::new();
    for tick in 1..=40 {
        let now = f64::from(tick) * 2.0;
        history.push(sample(now), 120.0);
        let d = decide(&Inputs { spec: &spec, replicas: 3, tuning: tuning(), history: &history, now }, &mut state);
        deleted.extend(d.delete_pods.iter().map(|p| (now, p.clone())));
    }
    assert_eq!(deleted, vec![(2.0, "p1".to_owned()), (62.0, "p1".to_owned())], "one per 60 s");
}

#[test]
fn pool_wide_errors_scale_out_with_a_warning() {
    let spec = spec();
    let sample = |at| {
        let mut p = pods(3, 100.0, 50.0);
        for p in &mut p {
            p.error_rate = 0.05;
        }
        Sample { at, pods: p, starting: 0, silent: 0 }
    };
    let (d, _) = run(&spec, 3, 1, sample);
    assert_eq!(d.replicas, 4, "{}", d.reason);
    assert!(d.notes.iter().any(|n| n.reason == "HighErrorRate" && n.warning));
    assert!(d.delete_pods.is_empty(), "nobody stands out");
    assert_eq!(d.observed.compliant, Some(false));
}

#[test]
fn a_p95_jump_is_an_anomaly_after_warm_up_and_notes_are_rate_limited() {
    let spec = spec();
    let mut history = History::default();
    let mut state = State::default();
    let mut anomalies = Vec::new();
    let mut notes = Vec::new();
    for tick in 1..=80 {
        let now = f64::from(tick) * 2.0;
        let p95 = if tick > 60 { 200.0 } else { 100.0 + f64::from(tick % 3) };
        history.push(Sample { at: now, pods: pods(3, 50.0, p95), starting: 0, silent: 0 }, 120.0);
        let d = decide(&Inputs { spec: &spec, replicas: 3, tuning: tuning(), history: &history, now }, &mut state);
        if d.anomaly.is_some() {
            anomalies.push(now);
        }
        notes.extend(d.notes.iter().filter(|n| n.reason == "SLAAnomaly").map(|_| now));
    }
    assert!(anomalies.first().is_some_and(|&at| at == 122.0), "{anomalies:?}");
    assert_eq!(notes, vec![122.0], "one note per minute however many anomalous ticks");
}

#[test]
fn every_decision_says_why_with_numbers() {
    let spec = spec();
    let (d, _) = run(&spec, 2, 1, |at| Sample { at, pods: pods(2, 150.0, 900.0), starting: 0, silent: 0 });
    assert!(d.reason.contains("p95 900 ms > 300 ms target at 300 rps"), "{}", d.reason);
    assert!(d.reason.contains("rps/replica"), "{}", d.reason);
    assert!(!d.reason.contains('\n'));
}

#[test]
fn the_hit_rate_counts_only_when_there_were_cache_lookups() {
    let spec = InferencePoolSpec::default();
    let window = Window { requests: 100, p95_ms: 10.0, cache_hit_rate: 0.0, ..Window::default() };
    assert_eq!(observe(&spec, &window).compliant, Some(true), "every request bypassed the cache");
    let missing = Window { cache_lookups: 100, ..window };
    assert_eq!(observe(&spec, &missing).compliant, Some(false), "all lookups missed: below minCacheHitRate");
    assert_eq!(observe(&spec, &Window::default()).compliant, None, "no traffic, nothing to judge");
}
