//! What a user asks for: the `spec` of an `InferencePool`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ResourceRequirements, SecretKeySelector, Toleration, Volume};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::InferencePoolStatus;
pub use crate::Optimization;

/// A pool of model replicas serving one image-matching model within an SLA.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[kube(
    group = "inferpool.dev",
    version = "v1alpha1",
    kind = "InferencePool",
    plural = "inferencepools",
    shortname = "ipool",
    category = "inferpool",
    namespaced,
    status = "InferencePoolStatus",
    scale(
        spec_replicas_path = ".spec.replicas.count",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"P95(ms)","type":"number","jsonPath":".status.sla.p95Ms"}"#,
    printcolumn = r#"{"name":"SLA","type":"string","jsonPath":".status.conditions[?(@.type==\"SLACompliant\")].status"}"#,
    printcolumn = r#"{"name":"Batch","type":"integer","jsonPath":".status.tuning.maxBatchSize"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.replicas.min <= self.replicas.max")
        .message("replicas.min must not exceed replicas.max")
        .field_path(".replicas.min"),
    validation = Rule::new("self.batching.maxDelayMs < self.sla.p95LatencyMs")
        .message("batching.maxDelayMs alone would use up sla.p95LatencyMs")
        .field_path(".batching.maxDelayMs"),
    validation = Rule::new("self.autoscaling.panicWindowSeconds < self.autoscaling.stableWindowSeconds")
        .message("autoscaling.panicWindowSeconds must be shorter than stableWindowSeconds")
        .field_path(".autoscaling.panicWindowSeconds")
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Which model the replicas serve.
    #[serde(default)]
    pub model: ModelSpec,
    /// Trade-off that picks the model variant (fp32, fp16, int8) and graph optimisation.
    #[serde(default)]
    pub optimization: Optimization,
    /// How many replicas run.
    #[serde(default)]
    pub replicas: ReplicasSpec,
    /// Accelerators per replica and where replicas may be scheduled.
    #[serde(default)]
    pub gpu: GpuSpec,
    /// Dynamic batching: the starting point the autoscaler tunes from when `auto` is on.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// The three cache tiers: memory, local disk and (optionally) a shared Redis.
    #[serde(default)]
    pub cache: CacheSpec,
    /// The service level the pool must keep.
    #[serde(default)]
    pub sla: SlaSpec,
    /// How the operator scales the pool against its SLA.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// Where the autoscaler reads the pool's metrics: the replicas themselves (default) or Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSpec>,
    /// Sidecar image; the operator's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the sidecar container; requests and limits derived from the SLA's memory
    /// limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra pod settings merged into every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PoolTemplate>,
}

/// The model a pool serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// `default` (the model built into the sidecar image) or `file:///path` to a model card
    /// (card.json or its directory) on a volume mounted through `template`.
    #[serde(default = "default_model_uri")]
    #[schemars(regex(pattern = r"^(default|file:///.+)$"))]
    pub uri: String,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self { uri: default_model_uri() }
    }
}

fn default_model_uri() -> String {
    "default".to_owned()
}

/// Replica bounds and the manual count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasSpec {
    /// Fewest replicas the autoscaler keeps.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Most replicas the autoscaler runs.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Replica count when autoscaling is off; `kubectl scale` sets it through the scale subresource.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub count: i32,
}

impl Default for ReplicasSpec {
    fn default() -> Self {
        Self { min: 1, max: default_max_replicas(), count: 1 }
    }
}

fn one() -> i32 {
    1
}

fn default_max_replicas() -> i32 {
    10
}

/// Accelerators and placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// GPUs per replica; 0 runs on the CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub count: u32,
    /// Extended resource name of the GPU device plugin.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1, max = 253))]
    pub resource_name: String,
    /// Node labels a replica's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints replicas tolerate (GPU nodes are usually tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            count: 0,
            resource_name: default_gpu_resource(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_owned()
}

/// Dynamic batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Most requests run together in one inference call.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: u32,
    /// Longest a request waits for its batch to fill, in milliseconds.
    #[serde(default = "default_max_delay")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_delay_ms: u32,
    /// Let the operator tune batch size and delay against the SLA.
    #[serde(default = "yes")]
    pub auto: bool,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self { max_batch_size: default_max_batch(), max_delay_ms: default_max_delay(), auto: true }
    }
}

fn default_max_batch() -> u32 {
    16
}

fn default_max_delay() -> u32 {
    5
}

fn yes() -> bool {
    true
}

/// Cache tiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// In-memory (L1) capacity, in embeddings.
    #[serde(default = "default_memory_entries")]
    #[schemars(range(min = 0, max = 1000000))]
    pub memory_entries: u64,
    /// Local disk (L2) budget, in MiB; also the size limit of the cache volume.
    #[serde(default = "default_disk_mb")]
    #[schemars(range(min = 0, max = 1048576))]
    pub disk_mb: u64,
    /// PersistentVolumeClaim for the disk tier (kept across pod restarts); an emptyDir when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// Shared Redis (L3); absent: no shared tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// Let the operator grow or shrink the memory tier against the SLA's hit rate and memory limit.
    #[serde(default = "yes")]
    pub auto: bool,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            memory_entries: default_memory_entries(),
            disk_mb: default_disk_mb(),
            claim_name: None,
            redis: None,
            auto: true,
        }
    }
}

fn default_memory_entries() -> u64 {
    1000
}

fn default_disk_mb() -> u64 {
    1024
}

/// The shared Redis tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://host:port[/db]` or `rediss://` for TLS; no password here (use `passwordSecretRef`).
    #[schemars(regex(pattern = r"^rediss?://[^\s@]+$"))]
    pub url: String,
    /// Secret key holding the Redis ACL username (the URL cannot carry credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeySelector>,
    /// Secret key holding the Redis password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeySelector>,
    /// Share embedding entries with other pools that set this on the same Redis. Entries are keyed
    /// by the model fingerprint, so only pools serving the same model share any; profiles are
    /// never shared. Off: every key is the pool's own (`inferpool:NAMESPACE:POOL:`).
    #[serde(default)]
    pub share_embeddings: bool,
    /// How long a shared entry lives, in seconds.
    #[serde(default = "default_redis_ttl")]
    #[schemars(range(min = 1, max = 2592000))]
    pub ttl_seconds: u32,
}

fn default_redis_ttl() -> u32 {
    3600
}

/// The service level a pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlaSpec {
    /// 95th percentile latency target of `/api/v1/match`, in milliseconds.
    #[serde(default = "default_p95")]
    #[schemars(range(min = 1, max = 600000))]
    pub p95_latency_ms: u32,
    /// Highest acceptable share of failed requests (0..1).
    #[serde(default = "default_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// Cache hit rate the cache tuning aims for (0..1).
    #[serde(default = "default_hit_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_cache_hit_rate: f64,
    /// Memory limit of each replica, in MiB; the container's limit when `resources` does not set one.
    #[serde(default = "default_memory_limit")]
    #[schemars(range(min = 256, max = 1048576))]
    pub memory_limit_mb: u64,
}

impl Default for SlaSpec {
    fn default() -> Self {
        Self {
            p95_latency_ms: default_p95(),
            max_error_rate: default_error_rate(),
            min_cache_hit_rate: default_hit_rate(),
            memory_limit_mb: default_memory_limit(),
        }
    }
}

fn default_p95() -> u32 {
    500
}

fn default_error_rate() -> f64 {
    0.01
}

fn default_hit_rate() -> f64 {
    0.7
}

fn default_memory_limit() -> u64 {
    4096
}

/// Autoscaling windows (Knative KPA and HPA v2 semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Scale between `replicas.min` and `replicas.max` on the SLA; off: run `replicas.count`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often pods' SLA reports are read, in seconds.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: u32,
    /// Window that steady-state decisions average over, in seconds.
    #[serde(default = "default_stable_window")]
    #[schemars(range(min = 6, max = 3600))]
    pub stable_window_seconds: u32,
    /// Short window that detects bursts, in seconds.
    #[serde(default = "default_panic_window")]
    #[schemars(range(min = 1, max = 600))]
    pub panic_window_seconds: u32,
    /// How long lower demand must last before replicas are removed, in seconds.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: u32,
    /// Share of a replica's measured capacity at the SLA that the autoscaler plans to use; the rest
    /// is headroom for bursts (Knative's target utilisation).
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub target_utilization: f64,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: default_interval(),
            stable_window_seconds: default_stable_window(),
            panic_window_seconds: default_panic_window(),
            scale_down_delay_seconds: default_scale_down_delay(),
            target_utilization: default_target_utilization(),
        }
    }
}

fn default_interval() -> u32 {
    2
}

fn default_stable_window() -> u32 {
    60
}

fn default_panic_window() -> u32 {
    6
}

fn default_scale_down_delay() -> u32 {
    300
}

fn default_target_utilization() -> f64 {
    0.7
}

/// Where the autoscaler reads metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Read the pool's metrics from Prometheus instead of from each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
}

/// A Prometheus server that scrapes the pool's replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring.svc:9090`.
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub url: String,
    /// PromQL label matchers that select the pool's replicas' series, without braces; default
    /// `namespace="<namespace>",pod=~"<pool>-.*"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The label that names the pod in those series.
    #[serde(default = "default_pod_label")]
    pub pod_label: String,
    /// How often Prometheus scrapes the replicas, in seconds; rates are taken over four of them.
    #[serde(default = "default_scrape_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub scrape_interval_seconds: u32,
}

fn default_scrape_interval() -> u32 {
    15
}

fn default_pod_label() -> String {
    "pod".to_owned()
}

/// Extra pod settings merged into every replica's pod.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolTemplate {
    /// Extra pod annotations (the operator's own win on a clash).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels (the selector labels cannot be overridden).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Containers run beside the sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    /// Extra volumes (core/v1 `Volume` objects); mount them into the sidecar with `volumeMounts`.
    /// The schema only requires a name, which keeps the CRD small enough for client-side
    /// `kubectl apply`; the operator checks the rest ([`PoolTemplate::volumes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "volume_list_schema")]
    pub volumes: Vec<serde_json::Value>,
    /// Extra mounts in the sidecar container (e.g. a model volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<k8s_openapi::api::core::v1::VolumeMount>,
    /// Service account the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

fn volume_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

impl PoolTemplate {
    /// The extra volumes as typed objects; an error names the first one that is not a valid Volume.
    pub fn volumes(&self) -> Result<Vec<Volume>, super::SpecError> {
        self.volumes
            .iter()
            .enumerate()
            .map(|(i, value)| {
                serde_json::from_value(value.clone()).map_err(|e| super::SpecError {
                    field: "template.volumes",
                    message: format!("item {i} is not a valid Volume: {e}"),
                })
            })
            .collect()
    }
}
