//! The replica pod template: the sidecar container and what the user's `spec.template` adds.
//!
//! Every sidecar setting that comes from the spec is an `INFERPOOL_` env var; the live-tunable ones
//! (batch size, delay, memory entries) come from the tuning ConfigMap through `envFrom` instead, so
//! a tuning decision never changes this template and never restarts a pod. The pod meets the
//! "restricted" Pod Security Standard, user containers included.

use std::collections::BTreeMap;

use inferpool_crds::pool::{InferencePool, InferencePoolSpec};
use inferpool_crds::wire::{ADMIN_PORT, API_PORT};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ADMIN_PORT_NAME, ADMIN_TOKEN_KEY, CACHE_MOUNT_PATH, DATA_MOUNT_PATH, HTTP_PORT_NAME, Owner, SIDECAR_CONTAINER,
    Settings, TMP_MOUNT_PATH, labels, names, selector_labels,
};
use crate::{Error, Result};

/// Volume of the disk cache (L2).
pub(super) const CACHE_VOLUME: &str = "cache";
/// Volume of durable state (profiles).
pub(super) const DATA_VOLUME: &str = "data";
/// Scratch volume at /tmp.
pub(super) const TMP_VOLUME: &str = "tmp";

/// User and group the pod runs as (the conventional distroless `nonroot`).
const NON_ROOT_ID: i64 = 65532;
/// Seconds the sidecar keeps serving after SIGTERM, not ready, while endpoints drop the pod: kube-
/// proxy and ingress controllers take a second or a few to stop sending new connections to it.
const DRAIN_DELAY_SECONDS: i64 = 5;
/// Seconds the sidecar then drains in-flight and queued work (its default, set explicitly).
const SHUTDOWN_GRACE_SECONDS: i64 = 20;
/// Seconds for the process to flush its cache writes and exit after the drain.
const EXIT_MARGIN_SECONDS: i64 = 5;
/// Seconds Kubernetes waits before SIGKILL: the whole shutdown, so it is never cut short.
pub(super) const TERMINATION_GRACE_SECONDS: i64 = DRAIN_DELAY_SECONDS + SHUTDOWN_GRACE_SECONDS + EXIT_MARGIN_SECONDS;

/// The pod template of a pool's replicas.
pub(super) fn template(pool: &InferencePool, owner: &Owner, settings: &Settings) -> Result<PodTemplateSpec> {
    let spec = &pool.spec;
    let template = spec.template.clone().unwrap_or_default();
    let extra_volumes = template.volumes().map_err(|e| Error::InvalidSpec(vec![e]))?;

    let mut pod_labels = template.labels;
    pod_labels.extend(labels(&owner.name));
    let mut annotations = template.annotations;
    annotations.extend(operator_annotations(spec, settings));

    let mut sidecar = sidecar(spec, owner, settings);
    if !template.volume_mounts.is_empty() {
        sidecar.volume_mounts.get_or_insert_with(Vec::new).extend(template.volume_mounts);
    }
    let mut containers = vec![sidecar];
    containers.extend(template.containers.into_iter().map(restricted));

    let mut volumes = volumes(spec);
    volumes.extend(extra_volumes);

    let gpu = &spec.gpu;
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers,
            volumes: Some(volumes),
            security_context: Some(pod_security_context()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            node_selector: (!gpu.node_selector.is_empty()).then(|| gpu.node_selector.clone()),
            tolerations: (!gpu.tolerations.is_empty()).then(|| gpu.tolerations.clone()),
            topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "kubernetes.io/hostname".to_owned(),
                when_unsatisfiable: "ScheduleAnyway".to_owned(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&owner.name)),
                    ..LabelSelector::default()
                }),
                ..TopologySpreadConstraint::default()
            }]),
            // The sidecar never calls the API server: no token in its pods unless the user picked a
            // service account for their own containers.
            automount_service_account_token: template.service_account_name.is_none().then_some(false),
            // Service links would inject `<SERVICE>_PORT`-style variables for every Service in the
            // namespace; one named `inferpool...` would put unknown `INFERPOOL_` ones in the env.
            enable_service_links: Some(false),
            service_account_name: template.service_account_name,
            priority_class_name: template.priority_class_name,
            ..PodSpec::default()
        }),
    })
}

/// The image a pool's sidecar runs: its own, else the operator's CUDA image for a GPU pool (which
/// validation refuses when there is none), else the operator's default.
pub(super) fn image<'a>(spec: &'a InferencePoolSpec, settings: &'a Settings) -> &'a str {
    let gpu_image = settings.gpu_image.as_deref().filter(|_| spec.gpu.count > 0);
    spec.image.as_deref().or(gpu_image).unwrap_or(&settings.default_image)
}

/// The sidecar's execution provider: CUDA when the pod gets GPUs (fail loudly rather than run slow).
pub(super) fn provider(spec: &InferencePoolSpec) -> &'static str {
    if spec.gpu.count > 0 { "cuda" } else { "cpu" }
}

/// Annotations the operator owns; they win over the user's on a clash.
fn operator_annotations(spec: &InferencePoolSpec, settings: &Settings) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), ADMIN_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        (super::RESTART_HASH_ANNOTATION.to_owned(), super::restart_hash(spec, settings)),
    ])
}

/// The sidecar container.
fn sidecar(spec: &InferencePoolSpec, owner: &Owner, settings: &Settings) -> Container {
    let pool_name = owner.name.as_str();
    Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(image(spec, settings).to_owned()),
        image_pull_policy: settings.image_pull_policy.clone(),
        ports: Some(vec![port(HTTP_PORT_NAME, API_PORT), port(ADMIN_PORT_NAME, ADMIN_PORT)]),
        env: Some(env(spec, owner)),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource { name: names::tuning_config_map(pool_name), optional: None }),
            ..EnvFromSource::default()
        }]),
        resources: Some(resources(spec)),
        // Loading and warming a model on a GPU can take minutes; the startup probe holds the
        // liveness probe off for up to 10 min so a slow load is not mistaken for a hang.
        startup_probe: Some(probe("/readyz", 5, 120)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        security_context: Some(restricted_security_context(None)),
        volume_mounts: Some(vec![
            mount(CACHE_VOLUME, CACHE_MOUNT_PATH),
            mount(DATA_VOLUME, DATA_MOUNT_PATH),
            mount(TMP_VOLUME, TMP_MOUNT_PATH),
        ]),
        ..Container::default()
    }
}

/// The sidecar's environment (everything but the live tuning, which comes from the ConfigMap).
fn env(spec: &InferencePoolSpec, owner: &Owner) -> Vec<EnvVar> {
    let pool_name = owner.name.as_str();
    let mut env = vec![
        value("INFERPOOL_LISTEN", format!("0.0.0.0:{API_PORT}")),
        value("INFERPOOL_ADMIN_LISTEN", format!("0.0.0.0:{ADMIN_PORT}")),
    ];
    if let Some(path) = model_path(&spec.model.uri) {
        env.push(value("INFERPOOL_MODEL", path.to_owned()));
    }
    env.extend([
        value("INFERPOOL_OPTIMIZATION", spec.optimization.as_str().to_owned()),
        value("INFERPOOL_PROVIDER", provider(spec).to_owned()),
        value("INFERPOOL_CACHE_DIR", CACHE_MOUNT_PATH.to_owned()),
        value("INFERPOOL_DATA_DIR", format!("{DATA_MOUNT_PATH}/data")),
        value("INFERPOOL_DISK_MB", spec.cache.disk_mb.to_string()),
        value("INFERPOOL_MEMORY_LIMIT_MB", spec.sla.memory_limit_mb.to_string()),
        value("INFERPOOL_LOG_FORMAT", "json".to_owned()),
        value("INFERPOOL_DRAIN_DELAY_SECONDS", DRAIN_DELAY_SECONDS.to_string()),
        value("INFERPOOL_SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_SECONDS.to_string()),
        secret(
            "INFERPOOL_ADMIN_TOKEN",
            SecretKeySelector { name: names::admin_secret(pool_name), key: ADMIN_TOKEN_KEY.to_owned(), optional: None },
        ),
    ]);
    if let Some(redis) = &spec.cache.redis {
        env.push(value("INFERPOOL_REDIS_URL", redis.url.clone()));
        env.push(value("INFERPOOL_REDIS_TTL_SECONDS", redis.ttl_seconds.to_string()));
        let prefix = redis_prefix(&owner.namespace, pool_name);
        let embedding_prefix = if redis.share_embeddings { SHARED_EMBEDDING_PREFIX.to_owned() } else { prefix.clone() };
        env.push(value("INFERPOOL_REDIS_PREFIX", prefix));
        env.push(value("INFERPOOL_REDIS_EMBEDDING_PREFIX", embedding_prefix));
        if let Some(username) = &redis.username_secret_ref {
            env.push(secret("INFERPOOL_REDIS_USERNAME", username.clone()));
        }
        if let Some(password) = &redis.password_secret_ref {
            env.push(secret("INFERPOOL_REDIS_PASSWORD", password.clone()));
        }
    }
    env
}

/// Prefix of a pool's own Redis keys: namespace and name, which together name one pool and
/// cannot contain `:` (both are DNS labels), so no pool's prefix is a prefix of another's.
pub fn redis_prefix(namespace: &str, pool: &str) -> String {
    format!("inferpool:{namespace}:{pool}:")
}

/// Prefix of embedding entries for pools with `cache.redis.shareEmbeddings`. Entries are keyed
/// by the model fingerprint and the image, so only pools serving the same model share one.
pub const SHARED_EMBEDDING_PREFIX: &str = "inferpool:shared:";

/// The file path of a `file:///path` model URI; `None` for the image's built-in model.
pub(super) fn model_path(uri: &str) -> Option<&str> {
    uri.strip_prefix("file://").filter(|path| path.starts_with('/'))
}

/// Resources: the user's, or derived from the SLA's memory limit; GPUs added in either case.
fn resources(spec: &InferencePoolSpec) -> ResourceRequirements {
    let memory = Quantity(format!("{}Mi", spec.sla.memory_limit_mb));
    let mut resources = spec.resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".to_owned(), Quantity("1".to_owned()))])),
        ..ResourceRequirements::default()
    });
    // The memory limit is what the sidecar's memory-pressure guard measures against; a request
    // equal to it keeps the scheduler honest about what a replica needs. A user who set a memory
    // request but no limit chose that on purpose (and a derived limit below their request would
    // make every pod unschedulable), so only a resources block silent on memory gets the limit.
    let has_memory =
        |side: &Option<BTreeMap<String, Quantity>>| side.as_ref().is_some_and(|m| m.contains_key("memory"));
    if !has_memory(&resources.limits) && !has_memory(&resources.requests) {
        resources.limits.get_or_insert_with(BTreeMap::new).insert("memory".to_owned(), memory.clone());
        if spec.resources.is_none() {
            resources.requests.get_or_insert_with(BTreeMap::new).insert("memory".to_owned(), memory);
        }
    }
    let gpu = &spec.gpu;
    if gpu.count > 0 {
        // Extended resources need requests equal to limits: take the user's value from either side
        // when given, so the two never disagree.
        let name = gpu.resource_name.clone();
        let given = resources
            .limits
            .as_ref()
            .and_then(|l| l.get(&name))
            .or_else(|| resources.requests.as_ref().and_then(|r| r.get(&name)))
            .cloned();
        let quantity = given.unwrap_or_else(|| Quantity(gpu.count.to_string()));
        for side in [&mut resources.limits, &mut resources.requests] {
            side.get_or_insert_with(BTreeMap::new).entry(name.clone()).or_insert_with(|| quantity.clone());
        }
    }
    resources
}

/// The pool's own volumes: cache, data and scratch.
fn volumes(spec: &InferencePoolSpec) -> Vec<Volume> {
    let cache = match &spec.cache.claim_name {
        Some(claim) => Volume {
            name: CACHE_VOLUME.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        None => empty_dir(CACHE_VOLUME, None, Some(format!("{}Mi", spec.cache.disk_mb))),
    };
    vec![cache, empty_dir(DATA_VOLUME, None, None), empty_dir(TMP_VOLUME, Some("Memory"), Some("64Mi".to_owned()))]
}

fn empty_dir(name: &str, medium: Option<&str>, size_limit: Option<String>) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_owned),
            size_limit: size_limit.map(Quantity),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// Pod-level security: non-root with a fixed id, the runtime's default seccomp profile.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NON_ROOT_ID),
        run_as_group: Some(NON_ROOT_ID),
        fs_group: Some(NON_ROOT_ID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }),
        ..PodSecurityContext::default()
    }
}

/// A user container made to fit the "restricted" profile: unset fields filled, escalation off.
pub(super) fn restricted(mut container: Container) -> Container {
    container.security_context = Some(restricted_security_context(container.security_context.take()));
    container
}

/// `given` with the restricted fields filled in; privilege and escalation are always turned off and
/// `ALL` is always dropped, since the pod would be refused otherwise.
fn restricted_security_context(given: Option<SecurityContext>) -> SecurityContext {
    let mut context = given.unwrap_or_default();
    context.privileged = Some(false);
    context.allow_privilege_escalation = Some(false);
    context.run_as_non_root.get_or_insert(true);
    context.read_only_root_filesystem.get_or_insert(true);
    let capabilities = context.capabilities.get_or_insert_with(Capabilities::default);
    let drop = capabilities.drop.get_or_insert_with(Vec::new);
    if !drop.iter().any(|c| c == "ALL") {
        drop.push("ALL".to_owned());
    }
    context
}

fn probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(HTTP_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.to_owned(), mount_path: path.to_owned(), ..VolumeMount::default() }
}

fn value(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value), value_from: None }
}

fn secret(name: &str, selector: SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource { secret_key_ref: Some(selector), ..EnvVarSource::default() }),
    }
}
