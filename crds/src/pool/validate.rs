//! Cross-field rules of an `InferencePool` spec, checked in Rust.
//!
//! The CRD carries the same rules as CEL `x-kubernetes-validations`; the operator checks them again
//! because an API server without CEL (or a pool stored before a rule existed) lets them through, and
//! a pool that breaks one must end up `Degraded` with a message, never half-built.

use super::InferencePoolSpec;

/// One broken rule: the field it points at and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {message}", if field.starts_with("metadata.") { "" } else { "spec." })]
pub struct SpecError {
    /// Path of the offending field below `spec` (e.g. `replicas.min`), or a `metadata.` path.
    pub field: &'static str,
    /// What is wrong, with the values involved.
    pub message: String,
}

impl InferencePoolSpec {
    /// Checks the rules a schema cannot express; returns every broken one, not just the first.
    pub fn validate(&self) -> Result<(), Vec<SpecError>> {
        let mut errors = Vec::new();
        let mut fail = |field, message| errors.push(SpecError { field, message });
        let replicas = &self.replicas;
        if replicas.min > replicas.max {
            fail("replicas.min", format!("min ({}) must not exceed max ({})", replicas.min, replicas.max));
        }
        if replicas.min < 0 || replicas.count < 0 {
            fail("replicas", format!("counts must not be negative (min {}, count {})", replicas.min, replicas.count));
        }
        let delay = self.batching.max_delay_ms;
        let target = self.sla.p95_latency_ms;
        if delay >= target {
            fail(
                "batching.maxDelayMs",
                format!("a batching delay of {delay} ms alone uses up the p95 target of {target} ms"),
            );
        }
        if self.batching.max_batch_size == 0 {
            fail("batching.maxBatchSize", "must be at least 1".to_owned());
        }
        let scaling = &self.autoscaling;
        if scaling.panic_window_seconds >= scaling.stable_window_seconds {
            fail(
                "autoscaling.panicWindowSeconds",
                format!(
                    "the panic window ({} s) must be shorter than the stable window ({} s)",
                    scaling.panic_window_seconds, scaling.stable_window_seconds
                ),
            );
        }
        for (field, rate) in
            [("sla.maxErrorRate", self.sla.max_error_rate), ("sla.minCacheHitRate", self.sla.min_cache_hit_rate)]
        {
            if !(0.0..=1.0).contains(&rate) {
                fail(field, format!("must be between 0 and 1, got {rate}"));
            }
        }
        if let Some(redis) = &self.cache.redis
            && redis.url.contains('@')
        {
            fail("cache.redis.url", "must not carry credentials; use passwordSecretRef".to_owned());
        }
        if self.gpu.count > 0 && self.gpu.resource_name.trim().is_empty() {
            fail("gpu.resourceName", "must name the GPU resource when gpu.count > 0".to_owned());
        }
        if let Some(Err(error)) = self.template.as_ref().map(|t| t.volumes()) {
            errors.push(error);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> InferencePoolSpec {
        serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("fixture {yaml:?}: {e}"))
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(spec("{}").validate(), Ok(()));
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let table = [
            ("replicas: {min: 5, max: 2}", "replicas.min", "min (5) must not exceed max (2)"),
            ("batching: {maxDelayMs: 600}", "batching.maxDelayMs", "600 ms alone uses up the p95 target of 500 ms"),
            ("sla: {p95LatencyMs: 5}", "batching.maxDelayMs", "5 ms alone uses up the p95 target of 5 ms"),
            ("batching: {maxBatchSize: 0}", "batching.maxBatchSize", "at least 1"),
            ("autoscaling: {panicWindowSeconds: 60}", "autoscaling.panicWindowSeconds", "(60 s) must be shorter"),
            ("sla: {maxErrorRate: 1.5}", "sla.maxErrorRate", "between 0 and 1, got 1.5"),
            ("sla: {minCacheHitRate: -0.1}", "sla.minCacheHitRate", "between 0 and 1, got -0.1"),
            ("cache: {redis: {url: 'redis://u:p@r:6379'}}", "cache.redis.url", "passwordSecretRef"),
            ("gpu: {count: 1, resourceName: ' '}", "gpu.resourceName", "gpu.count > 0"),
            ("replicas: {count: -1}", "replicas", "must not be negative"),
            ("template: {volumes: [{name: v, emptyDir: 3}]}", "template.volumes", "item 0 is not a valid Volume"),
        ];
        for (yaml, field, message) in table {
            let errors = spec(yaml).validate().expect_err(yaml);
            assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
            assert_eq!(errors[0].field, field, "{yaml}");
            assert!(errors[0].message.contains(message), "{yaml}: {}", errors[0].message);
        }
    }

    #[test]
    fn all_broken_rules_are_reported_together() {
        let errors = spec("{replicas: {min: 3, max: 1}, batching: {maxDelayMs: 900}}").validate().expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["replicas.min", "batching.maxDelayMs"]);
        assert_eq!(errors[0].to_string(), "spec.replicas.min: min (3) must not exceed max (1)");
    }
}
