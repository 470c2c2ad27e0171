//! Reads a pool's replicas: its pods from the shared pod store (no API request) and what ready
//! replicas report about themselves, such as the model and variant a pool really runs (the sidecar
//! picks the variant from the card and the hardware it finds).

use std::sync::Arc;

use inferpool_crds::{InferencePool, SlaReport};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::build;
use crate::pods::{self, HttpClient};

/// The pool's pods that are not being deleted, from the store.
pub fn members(pods: &Store<Pod>, pool: &InferencePool) -> Vec<Arc<Pod>> {
    let (namespace, name) = (pool.namespace(), pool.name_any());
    pods.state()
        .into_iter()
        .filter(|p| p.namespace() == namespace)
        .filter(|p| p.labels().get(build::INSTANCE_LABEL) == Some(&name))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The SLA report of one ready replica of the pool, if any answers.
pub async fn replica_report(pods: &Store<Pod>, http: &HttpClient, pool: &InferencePool) -> Option<SlaReport> {
    for ip in members(pods, pool).iter().filter(|p| pods::is_ready(p)).filter_map(|p| pods::ip(p)) {
        if let Ok(report) = pods::sla_report(http, &ip).await {
            return Some(report);
        }
    }
    None
}
