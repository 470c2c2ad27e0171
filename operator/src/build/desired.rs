//! What the pool should run now: its replica count and tuning, from the spec, the status the
//! operator last wrote and (when autoscaling) the autoscaler's latest decision. Pure, like the
//! child builders, so the reconciler, `render` and the autoscaler agree on one answer.

use inferpool_crds::Tuning;
use inferpool_crds::pool::InferencePool;

use super::initial_tuning;

/// Replicas for the Deployment. Autoscaling on: the autoscaler's `decided` count, else what the
/// status last recorded (so a restarted operator keeps the pool's size), else the floor; always
/// within `[min, max]`. Off: the manual count, which the scale subresource sets.
pub fn desired_replicas(pool: &InferencePool, decided: Option<u32>) -> i32 {
    let replicas = pool.spec.replicas;
    if !pool.spec.autoscaling.enabled {
        return replicas.count;
    }
    let decided = decided.and_then(|r| i32::try_from(r).ok());
    let recorded = pool.status.as_ref().map(|s| s.desired_replicas).filter(|r| *r > 0);
    decided.or(recorded).unwrap_or(replicas.min).clamp(replicas.min, replicas.max.max(replicas.min))
}

/// The tuning to run: what is in force, with the fields the user pinned (auto off) taken from the
/// spec; the generation moves on only when a value changes, so pods never see a pointless push.
pub fn desired_tuning(pool: &InferencePool) -> Tuning {
    let from_spec = initial_tuning(&pool.spec);
    let Some(current) = pool.status.as_ref().and_then(|s| s.tuning) else { return from_spec };
    let spec = &pool.spec;
    let wanted = Tuning {
        generation: current.generation,
        max_batch_size: if spec.batching.auto { current.max_batch_size } else { from_spec.max_batch_size },
        max_delay_ms: if spec.batching.auto { current.max_delay_ms } else { from_spec.max_delay_ms },
        cache_entries: if spec.cache.auto { current.cache_entries } else { from_spec.cache_entries },
    };
    if wanted == current { current } else { Tuning { generation: current.generation + 1, ..wanted } }
}
