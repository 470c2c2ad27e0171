//! Reads what replicas report about themselves (`GET /api/v1/metrics/sla` on a pod's IP).
//!
//! The reconciler uses it to learn the model and variant a pool really runs (the sidecar picks the
//! variant from the card and the hardware it finds); the autoscaler's collector builds on it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use inferpool_crds::SlaReport;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

/// Port of the sidecar's HTTP API in every replica.
pub const HTTP_PORT: u16 = 8080;
/// How long one pod may take to answer before it counts as not answering.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The SLA report of one ready replica of the pool selected by `selector`, if any answers.
pub async fn replica_report(client: &Client, namespace: &str, selector: &str) -> Option<SlaReport> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(selector)).await.ok()?;
    let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    for ip in list.items.iter().filter(|p| is_ready(p)).filter_map(pod_ip) {
        if let Some(report) = fetch(&http, &ip).await {
            return Some(report);
        }
    }
    None
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

async fn fetch(http: &HttpClient<HttpConnector, Empty<Bytes>>, ip: &str) -> Option<SlaReport> {
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    let uri: http::Uri = format!("http://{host}:{HTTP_PORT}/api/v1/metrics/sla").parse().ok()?;
    let response = tokio::time::timeout(TIMEOUT, http.get(uri)).await.ok()?.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(TIMEOUT, response.into_body().collect()).await.ok()?.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}
