//! The scenarios the tests assert on and docs/autoscaling.md plots.

use inferpool_crds::{InferencePoolSpec, Tuning};

use super::{Fault, PodModel, Scenario};

/// The pool every scenario starts from: p95 target 300 ms, 1..=10 replicas, default windows.
pub fn base_spec() -> InferencePoolSpec {
    let mut spec = InferencePoolSpec::default();
    spec.sla.p95_latency_ms = 300;
    spec.replicas.min = 1;
    spec.replicas.max = 10;
    spec
}

/// The spec's starting tuning.
pub fn spec_tuning(spec: &InferencePoolSpec) -> Tuning {
    Tuning {
        generation: 1,
        max_batch_size: spec.batching.max_batch_size,
        max_delay_ms: spec.batching.max_delay_ms,
        cache_entries: Some(spec.cache.memory_entries),
    }
}

fn scenario(name: &'static str, title: &'static str, seconds: f64, load: Vec<(f64, f64)>, replicas: u32) -> Scenario {
    let spec = base_spec();
    Scenario {
        name,
        title,
        tuning: spec_tuning(&spec),
        spec,
        seconds,
        load,
        load_noise: 0.05,
        pod: PodModel::default(),
        fault: None,
        working_set: vec![(0.0, 1000.0)],
        max_hit_rate: 0.0,
        replicas,
        seed: 42,
    }
}

/// Load jumps from 100 to 500 rps.
pub fn step_up() -> Scenario {
    scenario(
        "step-up",
        "5x step up: 100 -> 500 rps at 300 s",
        900.0,
        vec![(0.0, 100.0), (300.0, 100.0), (300.0, 500.0)],
        1,
    )
}

/// Load falls from 600 to 100 rps.
pub fn step_down() -> Scenario {
    scenario(
        "step-down",
        "step down: 600 -> 100 rps at 400 s",
        1400.0,
        vec![(0.0, 600.0), (400.0, 600.0), (400.0, 100.0)],
        4,
    )
}

/// Load climbs from 50 to 800 rps over 20 minutes.
pub fn slow_ramp() -> Scenario {
    scenario("slow-ramp", "slow ramp: 50 -> 800 rps over 20 min", 1500.0, vec![(0.0, 50.0), (1200.0, 800.0)], 1)
}

/// A 20 s burst to 4x the load.
pub fn spike() -> Scenario {
    scenario(
        "spike",
        "20 s spike: 150 -> 600 rps at 300 s",
        1000.0,
        vec![(0.0, 150.0), (300.0, 150.0), (300.0, 600.0), (320.0, 600.0), (320.0, 150.0)],
        1,
    )
}

/// Steady load with heavy per-second noise.
pub fn noisy_steady() -> Scenario {
    let mut s =
        scenario("noisy-steady", "noisy steady load: 450 rps, 25% noise, 30 min", 1800.0, vec![(0.0, 450.0)], 3);
    s.load_noise = 0.25;
    s
}

/// One pod of four fails a fifth of its requests.
pub fn failing_pod() -> Scenario {
    let mut s =
        scenario("failing-pod", "one failing pod (20% errors) among four at 450 rps", 900.0, vec![(0.0, 450.0)], 4);
    s.fault = Some(Fault { nth: 1, slow: 1.0, error_rate: 0.2 });
    s
}

/// One pod of four is three times slower.
pub fn slow_pod() -> Scenario {
    let mut s = scenario("slow-pod", "one pod 3x slower among four at 450 rps", 900.0, vec![(0.0, 450.0)], 4);
    s.fault = Some(Fault { nth: 1, slow: 3.0, error_rate: 0.0 });
    s
}

/// The working set grows tenfold: the hit rate drops from 90% to 11%.
pub fn cache_hit_drop() -> Scenario {
    let mut s = scenario(
        "cache-hit-drop",
        "cache hit drop: working set 800 -> 8000 images at 200 s",
        1200.0,
        vec![(0.0, 600.0)],
        1,
    );
    s.max_hit_rate = 0.9;
    s.working_set = vec![(0.0, 800.0), (200.0, 800.0), (200.0, 8000.0)];
    s
}

/// One replica (min = max = 1) under steady load, batching tuned from `batch` and `delay_ms`.
pub fn batch_tuning(batch: u32, delay_ms: u32) -> Scenario {
    let mut s =
        scenario("batch-tuning", "batch tuning on one replica at 240 rps from batch 1", 600.0, vec![(0.0, 240.0)], 1);
    s.spec.replicas.min = 1;
    s.spec.replicas.max = 1;
    s.tuning.max_batch_size = batch;
    s.tuning.max_delay_ms = delay_ms;
    s
}

/// Every scenario that docs/autoscaling.md plots.
pub fn all() -> Vec<Scenario> {
    vec![
        step_up(),
        step_down(),
        slow_ramp(),
        spike(),
        noisy_steady(),
        failing_pod(),
        slow_pod(),
        cache_hit_drop(),
        batch_tuning(1, 0),
    ]
}
