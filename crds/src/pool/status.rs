//! What the operator reports: the `status` of an `InferencePool`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Tuning;

/// Observed state of a pool, written only by the operator.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica pods that exist (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Replica pods ready for traffic.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas the operator wants now.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Label selector of the replica pods, as a string (the scale subresource's selector).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// In-cluster address of the pool: `http://<service>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Model the replicas serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model variant picked by the optimisation goal (fp32, fp16 or int8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Batching and cache tuning in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<Tuning>,
    /// Service level observed over the stable window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<SlaStatus>,
    /// The operator's latest scaling or tuning decision and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<Decision>,
    /// Ready, Progressing, Degraded and SLACompliant, following Kubernetes condition conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Observed service level of a pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlaStatus {
    /// 95th percentile latency, in milliseconds.
    pub p95_ms: f64,
    /// Share of failed requests (0..1).
    pub error_rate: f64,
    /// Share of requests answered from a cache (0..1).
    pub cache_hit_rate: f64,
    /// Requests per second across the pool.
    pub rps: f64,
    /// Whether every SLA target is met.
    pub compliant: bool,
}

/// One decision of the operator, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// What changed, e.g. `replicas 2 -> 4`.
    pub action: String,
    /// Why, in words a reader of `kubectl describe` understands.
    pub reason: String,
    /// When it was made.
    pub time: Time,
}

/// Condition types the operator sets.
pub mod condition {
    /// Every desired replica is ready and serving.
    pub const READY: &str = "Ready";
    /// The pool is moving towards its desired state (rollout, scaling).
    pub const PROGRESSING: &str = "Progressing";
    /// The pool cannot reach its desired state (invalid spec, failing rollout).
    pub const DEGRADED: &str = "Degraded";
    /// The observed service level meets the SLA.
    pub const SLA_COMPLIANT: &str = "SLACompliant";
    /// The p95 latency left its rolling baseline (two standard deviations).
    pub const SLA_ANOMALY: &str = "SLAAnomaly";
}
