//! Reads what replicas report about themselves, for the status: the model and variant a pool
//! really runs (the sidecar picks the variant from the card and the hardware it finds).

use inferpool_crds::SlaReport;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::pods::{self, HttpClient};

/// The SLA report of one ready replica of the pool selected by `selector`, if any answers.
pub async fn replica_report(client: &Client, http: &HttpClient, namespace: &str, selector: &str) -> Option<SlaReport> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default().labels(selector)).await.ok()?;
    for ip in list.items.iter().filter(|p| pods::is_ready(p)).filter_map(pods::ip) {
        if let Ok(report) = pods::sla_report(http, &ip).await {
            return Some(report);
        }
    }
    None
}
