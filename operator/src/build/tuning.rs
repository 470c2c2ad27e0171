//! The tuning ConfigMap: the batching and cache settings a new pod starts with.
//!
//! Pods read it through `envFrom`, so the autoscaler can change it without touching the pod
//! template (no restart); running pods get the same tuning pushed to their admin port.

use std::collections::BTreeMap;

use inferpool_crds::Tuning;
use inferpool_crds::pool::{InferencePool, InferencePoolSpec};
use k8s_openapi::api::core::v1::ConfigMap;

use super::{Owner, names};

/// ConfigMap annotation carrying the generation of the tuning in its data.
pub const TUNING_GENERATION_ANNOTATION: &str = "inferpool.dev/tuning-generation";

/// The tuning a new pool starts with: generation 1, straight from `spec.batching` and `spec.cache`.
pub fn initial_tuning(spec: &InferencePoolSpec) -> Tuning {
    Tuning {
        generation: 1,
        max_batch_size: spec.batching.max_batch_size,
        max_delay_ms: spec.batching.max_delay_ms,
        cache_entries: Some(spec.cache.memory_entries),
    }
}

/// The pool's tuning ConfigMap holding `tuning` as the sidecar's env vars.
pub(super) fn config_map(pool: &InferencePool, owner: &Owner, tuning: &Tuning) -> ConfigMap {
    let entries = tuning.cache_entries.unwrap_or(pool.spec.cache.memory_entries);
    let mut metadata = owner.meta(names::tuning_config_map(&owner.name));
    metadata.annotations =
        Some(BTreeMap::from([(TUNING_GENERATION_ANNOTATION.to_owned(), tuning.generation.to_string())]));
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([
            ("INFERPOOL_MAX_BATCH".to_owned(), tuning.max_batch_size.to_string()),
            ("INFERPOOL_MAX_DELAY_MS".to_owned(), tuning.max_delay_ms.to_string()),
            ("INFERPOOL_MEMORY_ENTRIES".to_owned(), entries.to_string()),
        ])),
        ..ConfigMap::default()
    }
}
