//! The Deployment of a pool's replicas, and the restart hash that says why its pods rolled.
//!
//! Rollouts surge one pod at a time and never take a ready replica away first
//! (`maxUnavailable: 0`), so a pool keeps its capacity while a new model or image comes up.

use inferpool_crds::pool::{InferencePool, InferencePoolSpec};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::{Owner, Settings, names, pod, selector_labels};
use crate::Result;

/// Pod annotation recording the hash of the settings that need a restart (see [`restart_hash`]).
pub const RESTART_HASH_ANNOTATION: &str = "inferpool.dev/restart-hash";

/// Seconds a rollout may go without progress before the Deployment reports it stalled: above the
/// startup probe's 10 min so that a slow GPU model load is not called a failed rollout.
const PROGRESS_DEADLINE_SECONDS: i32 = 900;

/// The pool's Deployment with `replicas` pods.
pub(super) fn deployment(
    pool: &InferencePool,
    owner: &Owner,
    settings: &Settings,
    replicas: i32,
) -> Result<Deployment> {
    Ok(Deployment {
        metadata: owner.meta(names::deployment(&owner.name)),
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(&owner.name)), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            revision_history_limit: Some(3),
            progress_deadline_seconds: Some(PROGRESS_DEADLINE_SECONDS),
            template: pod::template(pool, owner, settings)?,
            ..DeploymentSpec::default()
        },
        status: None,
    })
}

/// Short sha256 (16 hex digits) of the settings whose change restarts the pods: model URI,
/// optimisation, provider and GPU count, image.
///
/// Any of these changes the pod template anyway; the annotation is the explicit record of why
/// pods rolled, readable with `kubectl get rs -o yaml` next to the previous revision's value.
pub fn restart_hash(spec: &InferencePoolSpec, settings: &Settings) -> String {
    let record = format!(
        "model={}\noptimization={}\nprovider={}\ngpus={}\nimage={}\n",
        spec.model.uri,
        spec.optimization.as_str(),
        pod::provider(spec),
        spec.gpu.count,
        pod::image(spec, settings),
    );
    let digest = Sha256::digest(record.as_bytes());
    hex::encode(&digest[..8])
}
