//! The API-server mock the reconcile tests share: it answers like an empty cluster (children absent,
//! applies echoed back with a resourceVersion) and records every request.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use inferpool_crds::InferencePool;
use inferpool_operator::build::{AdminKey, Settings};
use inferpool_operator::controller::{self, Context};
use inferpool_operator::metrics::Metrics;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// One request the operator sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Sent {
    pub fn is(&self, method: &Method, path_end: &str) -> bool {
        self.method == method && self.path.ends_with(path_end)
    }
}

/// Serves requests as an empty cluster would, recording them, until the client is dropped.
pub fn mock_cluster(pool: Value, existing: Vec<(String, Value)>) -> (Client, Arc<Mutex<Vec<Sent>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            let record = Sent {
                method: parts.method.clone(),
                path: path.clone(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                body: body.clone(),
            };
            log.lock().push(record);
            let found = existing.iter().find(|(p, _)| *p == path).map(|(_, v)| v.clone());
            let (status, reply) = match parts.method {
                Method::GET => match found {
                    Some(object) => (StatusCode::OK, object),
                    None => (StatusCode::NOT_FOUND, not_found(&path)),
                },
                Method::PATCH if path.ends_with("/status") => {
                    let mut object = pool.clone();
                    object["status"] = body["status"].clone();
                    (StatusCode::OK, object)
                }
                Method::POST
                    if existing.iter().any(|(p, _)| {
                        *p == format!("{path}/{}", body["metadata"]["name"].as_str().unwrap_or_default())
                    }) =>
                {
                    (StatusCode::CONFLICT, already_exists(&path))
                }
                Method::PATCH | Method::POST => {
                    let mut object = body;
                    object["metadata"]["resourceVersion"] = json!("7");
                    (if parts.method == Method::POST { StatusCode::CREATED } else { StatusCode::OK }, object)
                }
                _ => (StatusCode::METHOD_NOT_ALLOWED, not_found(&path)),
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()));
            match response {
                Ok(response) => respond.send_response(response),
                Err(_) => return,
            }
        }
    });
    (Client::new(service, "default"), sent)
}

pub fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("{path} not found")})
}

fn already_exists(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409,
           "message": format!("{path}: already exists")})
}

/// The admin key the tests' operator runs with.
pub fn admin_key() -> AdminKey {
    AdminKey::from_material(b"the reconcile tests' admin key").unwrap_or_else(|e| panic!("{e}"))
}

pub fn pool_json(spec: Value) -> Value {
    json!({
        "apiVersion": "inferpool.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "0b6f1d6e-1111-2222-3333-444455556666",
                     "generation": 1, "resourceVersion": "5"},
        "spec": spec,
    })
}

pub fn context(client: Client) -> Arc<Context> {
    let metrics = Arc::new(Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}")));
    let reporter = Reporter { controller: "inferpool-operator".into(), instance: Some("test".into()) };
    let settings = Settings {
        default_image: "registry.local/inferpool/sidecar:test".into(),
        gpu_image: None,
        image_pull_policy: None,
    };
    Arc::new(Context::new(client, settings, admin_key(), reporter, metrics))
}

pub async fn reconcile(spec: Value, existing: Vec<(String, Value)>) -> (Result<Action, String>, Vec<Sent>) {
    let json = pool_json(spec);
    let pool: InferencePool = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("pool: {e}"));
    let (client, sent) = mock_cluster(json, existing);
    let ctx = context(client);
    let result = tokio::time::timeout(Duration::from_secs(10), controller::reconcile(Arc::new(pool), ctx))
        .await
        .unwrap_or_else(|_| panic!("reconcile did not finish"));
    let sent = sent.lock().clone();
    (result.map_err(|e| e.to_string()), sent)
}

pub fn find<'a>(sent: &'a [Sent], method: &Method, path_end: &str) -> &'a Sent {
    sent.iter().find(|s| s.is(method, path_end)).unwrap_or_else(|| {
        panic!("no {method} .../{path_end} in {:#?}", sent.iter().map(|s| (&s.method, &s.path)).collect::<Vec<_>>())
    })
}
