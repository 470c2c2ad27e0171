//! Talking to the replicas themselves over HTTP: their SLA reports (API port) and tuning pushes
//! and cache commands (admin port, with the pool's token). Every call has a short timeout, so a
//! replica that hangs costs one timeout, never a stuck reconcile or autoscaler tick.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use inferpool_crds::wire::{self, ADMIN_PORT, API_PORT};
use inferpool_crds::{SlaReport, Tuning};
use k8s_openapi::api::core::v1::Pod;

/// How long one replica may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP client for replicas (plain HTTP inside the cluster network).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with pooled connections, to be shared.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The pod's IP, once it has one.
pub fn ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty())
}

/// Why a call to a replica failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// No answer within [`TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The replica answered with an error status.
    #[error("answered {0}: {1}")]
    Status(StatusCode, String),
    /// The answer was not what the replica's API promises.
    #[error("unreadable answer: {0}")]
    Body(String),
}

async fn call(
    http: &HttpClient,
    method: Method,
    url: String,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Bytes, PodError> {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, wire::bearer(token));
    }
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request =
        request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| PodError::Body(e.to_string()))?;
    let exchange = async {
        let response = http.request(request).await.map_err(|e| PodError::Connect(e.to_string()))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| PodError::Body(e.to_string()))?.to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(PodError::Status(status, String::from_utf8_lossy(&bytes).chars().take(200).collect()))
        }
    };
    tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| PodError::Timeout(TIMEOUT))?
}

fn url(ip: &str, port: u16, path: &str) -> String {
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    format!("http://{host}:{port}{path}")
}

/// A replica's SLA report.
pub async fn sla_report(http: &HttpClient, ip: &str) -> Result<SlaReport, PodError> {
    let bytes = call(http, Method::GET, url(ip, API_PORT, wire::SLA_REPORT), None, None).await?;
    serde_json::from_slice(&bytes).map_err(|e| PodError::Body(e.to_string()))
}

/// Pushes a tuning to a replica's admin port.
pub async fn push_tuning(http: &HttpClient, ip: &str, token: &str, tuning: &Tuning) -> Result<(), PodError> {
    let body = serde_json::to_vec(tuning).map_err(|e| PodError::Body(e.to_string()))?;
    call(http, Method::PUT, url(ip, ADMIN_PORT, wire::TUNING), Some(token), Some(body)).await.map(|_| ())
}

/// Clears a replica's in-memory cache.
pub async fn clear_memory_cache(http: &HttpClient, ip: &str, token: &str) -> Result<(), PodError> {
    call(http, Method::DELETE, url(ip, ADMIN_PORT, &format!("{}?tier=memory", wire::CACHE)), Some(token), None)
        .await
        .map(|_| ())
}
