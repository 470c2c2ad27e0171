//! Child-object builders: pure functions that turn an `InferencePool` into the objects that run it.
//!
//! The reconciler calls [`children`] and server-side applies what comes back, so every object here
//! carries its `apiVersion`/`kind`, the pool's namespace, the standard labels and a controller
//! owner reference (deleting the pool garbage-collects its children). Nothing here does I/O: the
//! replica count and the tuning in force are decided elsewhere and passed in, which keeps the
//! builders testable from YAML fixtures.
//!
//! Layout: `pod` (the replica pod template: sidecar container, env, probes, security, volumes),
//! `deployment` (the Deployment and its restart hash), `service` (Service and
//! PodDisruptionBudget), `tuning` (the tuning ConfigMap), `secret` (the admin-token Secret), `desired`
//! (the replica count and tuning to run, from the spec, the status and the autoscaler's decision).

mod deployment;
mod desired;
mod pod;
mod secret;
mod service;
mod tuning;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use inferpool_crds::Tuning;
use inferpool_crds::pool::InferencePool;
use inferpool_crds::wire::API_PORT;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::{Error, Result};

pub use deployment::{RESTART_HASH_ANNOTATION, restart_hash};
pub use desired::{desired_replicas, desired_tuning};
pub use secret::{ADMIN_TOKEN_KEY, AdminKey, MIN_KEY_BYTES, ShortKey, admin_secret};
pub use tuning::{TUNING_GENERATION_ANNOTATION, initial_tuning};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "inferpool-operator";

/// Name of the sidecar container in every replica pod.
pub const SIDECAR_CONTAINER: &str = "sidecar";
/// Name of the public port, on the container and the Service.
pub const HTTP_PORT_NAME: &str = "http";
/// Name of the admin port, on the container and the Service.
pub const ADMIN_PORT_NAME: &str = "admin";

/// Where the disk cache (L2) volume is mounted.
pub const CACHE_MOUNT_PATH: &str = "/var/cache/inferpool";
/// Where the durable-state volume is mounted; the sidecar's data dir is `data` below it.
pub const DATA_MOUNT_PATH: &str = "/var/lib/inferpool";
/// Where the scratch volume is mounted (the root filesystem is read-only).
pub const TMP_MOUNT_PATH: &str = "/tmp";
/// Volume names the operator uses itself; template volumes must pick others.
pub const RESERVED_VOLUMES: [&str; 3] = [pod::CACHE_VOLUME, pod::DATA_VOLUME, pod::TMP_VOLUME];
/// Mount paths the operator uses itself; template mounts must stay clear of them.
pub const RESERVED_MOUNT_PATHS: [&str; 3] = [CACHE_MOUNT_PATH, DATA_MOUNT_PATH, TMP_MOUNT_PATH];

/// Label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label naming the pool an object belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming the object's role.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label naming who manages the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`COMPONENT_LABEL`] on everything that belongs to a pool.
pub const COMPONENT: &str = "model-replica";

/// Operator-wide settings the builders need (from the operator's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Sidecar image for CPU pools that do not name one.
    pub default_image: String,
    /// Sidecar image with the CUDA provider, for GPU pools that do not name one; without it such
    /// a pool is refused (Degraded), since the CPU image exits at start with `--provider cuda`.
    pub gpu_image: Option<String>,
    /// `imagePullPolicy` of the sidecar container; the cluster's default when absent.
    pub image_pull_policy: Option<String>,
}

/// The objects one pool is made of, ready for server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The replica pods.
    pub deployment: Deployment,
    /// The pool's in-cluster address.
    pub service: Service,
    /// The tuning new pods start with (`envFrom`), changed without restarting pods.
    pub tuning: ConfigMap,
    /// Keeps voluntary evictions to one replica at a time.
    pub pdb: PodDisruptionBudget,
}

/// Names of a pool's children, all derived from the pool's name.
pub mod names {
    /// Name of the pool's Deployment.
    pub fn deployment(pool_name: &str) -> String {
        pool_name.to_owned()
    }

    /// Name of the pool's Service (hence the DNS-1035 rule on pool names).
    pub fn service(pool_name: &str) -> String {
        pool_name.to_owned()
    }

    /// Name of the pool's tuning ConfigMap.
    pub fn tuning_config_map(pool_name: &str) -> String {
        format!("{pool_name}-tuning")
    }

    /// Name of the Secret holding the pool's admin token.
    pub fn admin_secret(pool_name: &str) -> String {
        format!("{pool_name}-admin")
    }

    /// Name of the pool's PodDisruptionBudget.
    pub fn pdb(pool_name: &str) -> String {
        pool_name.to_owned()
    }
}

/// Builds every child of `pool` with `replicas` pods and `tuning` in force.
pub fn children(pool: &InferencePool, settings: &Settings, replicas: i32, tuning: &Tuning) -> Result<Children> {
    let owner = Owner::of(pool)?;
    Ok(Children {
        deployment: deployment::deployment(pool, &owner, settings, replicas)?,
        service: service::service(&owner),
        tuning: tuning::config_map(pool, &owner, tuning),
        pdb: service::pdb(&owner),
    })
}

/// Labels that select a pool's pods (name, instance, component); they never change.
pub fn selector_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), "inferpool".to_owned()),
        (INSTANCE_LABEL.to_owned(), pool_name.to_owned()),
        (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
    ])
}

/// The selector labels as `k=v,k=v`, for the scale subresource's `status.selector`.
pub fn selector_string(pool_name: &str) -> String {
    selector_labels(pool_name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels on every child: the selector labels plus `managed-by`.
pub fn labels(pool_name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pool_name);
    labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
    labels
}

/// In-cluster address of the pool's Service: `http://<service>.<namespace>.svc:8080`.
pub fn endpoint(pool: &InferencePool) -> Result<String> {
    let owner = Owner::of(pool)?;
    Ok(format!("http://{}.{}.svc:{API_PORT}", names::service(&owner.name), owner.namespace))
}

/// What every child takes from its pool: name, namespace and the controller reference.
#[derive(Debug, Clone)]
struct Owner {
    name: String,
    namespace: String,
    reference: OwnerReference,
}

impl Owner {
    /// Reads the pool's identity; the API server always sets these, so absence is a caller bug.
    fn of(pool: &InferencePool) -> Result<Self> {
        let meta = pool.meta();
        let name = meta.name.clone().ok_or(Error::MissingMetadata("name"))?;
        let namespace = meta.namespace.clone().ok_or(Error::MissingMetadata("namespace"))?;
        let mut reference = pool.controller_owner_ref(&()).ok_or(Error::MissingMetadata("uid"))?;
        // Foreground deletion of the pool waits for its children.
        reference.block_owner_deletion = Some(true);
        Ok(Self { name, namespace, reference })
    }

    /// Metadata of a child called `name`.
    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}
