//! The operator's own HTTP endpoint: health, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use inferpool_operator::metrics::Metrics;
use inferpool_operator::server::{State, serve};

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>,
    url: String,
) -> (u16, String) {
    let response =
        client.get(url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
    let base = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}")));
    let metrics = Arc::new(Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}")));
    metrics.pools.set(2);
    let state = Arc::new(State { metrics, ready: Default::default() });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    let client = Client::builder(TokioExecutor::new()).build_http();

    assert_eq!(get(&client, format!("{base}/healthz")).await.0, 200);
    let (code, body) = get(&client, format!("{base}/readyz")).await;
    assert_eq!(code, 503, "not ready before the API server answered: {body}");
    state.ready.store(true, Ordering::Release);
    assert_eq!(get(&client, format!("{base}/readyz")).await.0, 200);
    let (code, body) = get(&client, format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    assert!(body.contains("inferpool_operator_pools 2"), "{body}");
    assert_eq!(get(&client, format!("{base}/nope")).await.0, 404);

    let _ = stop.send(());
    server.await.unwrap_or_else(|e| panic!("server: {e}"));
}

#[test]
fn the_crd_subcommand_prints_the_committed_crd() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_inferpool-operator"))
        .arg("crd")
        .output()
        .unwrap_or_else(|e| panic!("running inferpool-operator crd: {e}"));
    assert!(output.status.success());
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/inferencepool.yaml"))
        .unwrap_or_else(|e| panic!("crds/inferencepool.yaml: {e}"));
    assert_eq!(String::from_utf8_lossy(&output.stdout), committed);
}
