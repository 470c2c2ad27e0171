//! Zero-loss rollouts: a pool's pods as the operator builds them, run by the kubelet double with
//! real sidecars, under load through the Service proxy, which (like kube-proxy) acts on endpoint
//! changes a second late. A rolling update loses no request; the same pod deletion without the
//! sidecar's drain delay does, which is what makes the first result mean something.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Http;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use inferpool_crds::InferencePool;
use inferpool_operator::build::{self, Settings};
use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::apiserver::store::Store;
use inferpool_tests::kubelet::{Kubelet, Mode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Config};
use serde_json::{Value, json};

const NS: &str = "shop";

struct Cluster {
    server: ApiServer,
    _kubelet: Kubelet,
    client: Client,
    proxy: String,
}

async fn cluster() -> Cluster {
    // TEST_LOG=inferpool_tests=debug shows what the control plane does (off by default).
    let filter = tracing_subscriber::EnvFilter::try_from_env("TEST_LOG").unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    let sidecar = inferpool_tests::fixtures::sidecar_bin().unwrap();
    let kubelet = Kubelet::start(Arc::clone(&server.store), Mode::Process { sidecar }).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    let store = Arc::clone(&server.store);
    tokio::spawn(inferpool_tests::proxy::serve(proxy, store, NS.to_owned(), "catalog".to_owned()));
    Cluster { server, _kubelet: kubelet, client, proxy: addr }
}

/// The pool, stored so that its children's owner exists (no operator runs here: the test applies
/// what the operator would build).
async fn create_pool(client: &Client) -> InferencePool {
    let pool: InferencePool = serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "catalog", "namespace": NS},
        "spec": {"replicas": {"count": 2}, "autoscaling": {"enabled": false}, "cache": {"diskMb": 16}},
    }))
    .unwrap();
    Api::<InferencePool>::namespaced(client.clone(), NS).create(&PostParams::default(), &pool).await.unwrap()
}

/// `pool` with another optimization, which changes the pod template.
fn with_optimization(pool: &InferencePool, optimization: &str) -> InferencePool {
    let mut value = serde_json::to_value(pool).unwrap();
    value["spec"]["optimization"] = json!(optimization);
    serde_json::from_value(value).unwrap()
}

/// The Deployment the operator builds for `pool`, with `env` set in the sidecar.
fn deployment(pool: &InferencePool, env: &[(&str, &str)]) -> Deployment {
    let settings =
        Settings { default_image: "inferpool-sidecar:test".into(), gpu_image: None, image_pull_policy: None };
    let children = build::children(pool, &settings, 2, &build::desired_tuning(pool)).unwrap();
    let mut deployment = serde_json::to_value(&children.deployment).unwrap();
    let vars = deployment.pointer_mut("/spec/template/spec/containers/0/env").unwrap().as_array_mut().unwrap();
    for (name, value) in env {
        vars.retain(|v| v["name"] != *name);
        vars.push(json!({"name": name, "value": value}));
    }
    vars.push(json!({"name": "INFERPOOL_LOG", "value": "warn"}));
    serde_json::from_value(deployment).unwrap()
}

/// Everything but the Deployment: the Service, the tuning ConfigMap and the admin Secret.
async fn supporting_objects(client: &Client, pool: &InferencePool) {
    let settings =
        Settings { default_image: "inferpool-sidecar:test".into(), gpu_image: None, image_pull_policy: None };
    let children = build::children(pool, &settings, 2, &build::desired_tuning(pool)).unwrap();
    let params = PostParams::default();
    Api::<Service>::namespaced(client.clone(), NS).create(&params, &children.service).await.unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), NS).create(&params, &children.tuning).await.unwrap();
    let secret = build::admin_secret(pool, "rollout-test-token").unwrap();
    Api::<Secret>::namespaced(client.clone(), NS).create(&params, &secret).await.unwrap();
}

/// Outcomes of the load: status codes, and "connection" for requests that got no answer.
type Outcomes = BTreeMap<String, u64>;

/// Closed-loop clients through the proxy, each request on a new connection (as many distinct
/// clients would), until `stop` is set.
fn load(proxy: &str, workers: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Outcomes> {
    let url = format!("http://{proxy}/api/v1/embed");
    let photo = Bytes::from(inferpool_tests::fixtures::photo("chelsea.png").unwrap());
    tokio::spawn(async move {
        let http: Http<HttpConnector, Full<Bytes>> =
            Http::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(HttpConnector::new());
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (http, url, photo, stop) = (http.clone(), url.clone(), photo.clone(), Arc::clone(&stop));
            set.spawn(async move {
                let mut outcomes = Outcomes::new();
                while !stop.load(Ordering::Relaxed) {
                    let request = http::Request::post(&url).header("content-type", "image/png");
                    let outcome = match http.request(request.body(Full::new(photo.clone())).unwrap()).await {
                        Ok(response) => {
                            let status = response.status().as_u16().to_string();
                            let _ = response.into_body().collect().await;
                            status
                        }
                        Err(_) => "connection".to_owned(),
                    };
                    *outcomes.entry(outcome).or_default() += 1;
                }
                outcomes
            });
        }
        let mut all = Outcomes::new();
        while let Some(outcomes) = set.join_next().await {
            for (k, v) in outcomes.unwrap() {
                *all.entry(k).or_default() += v;
            }
        }
        all
    })
}

fn pods_of(store: &Store) -> Vec<Value> {
    let pods = inferpool_tests::apiserver::resources::find("", "v1", "pods").unwrap();
    store.list(pods, Some(NS), |_| true).0
}

/// Waits on the store's change feed until `done` holds for the pool's pods.
async fn until(store: &Store, secs: u64, what: &str, done: impl Fn(&[Value]) -> bool) {
    let mut events = store.subscribe();
    let wait = async {
        while !done(&pods_of(store)) {
            let _ = events.recv().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), wait).await.unwrap_or_else(|_| {
        let deployments = inferpool_tests::apiserver::resources::find("apps", "v1", "deployments").unwrap();
        panic!(
            "{what}: timed out; pods: {}\ndeployments: {}",
            serde_json::to_string_pretty(&pods_of(store)).unwrap(),
            serde_json::to_string(&store.list(deployments, Some(NS), |_| true).0).unwrap()
        )
    });
}

fn ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        && p.pointer("/metadata/deletionTimestamp").is_none()
}

fn env_of(p: &Value, name: &str) -> Option<String> {
    p.pointer("/spec/containers/0/env")?.as_array()?.iter().find(|v| v["name"] == name)?["value"]
        .as_str()
        .map(str::to_owned)
}

/// Starts the pool with `env`, runs load through the proxy while `disrupt` runs, and returns
/// the outcomes.
async fn under_load<F: std::future::Future<Output = ()>>(
    env: &[(&str, &str)],
    disrupt: impl FnOnce(Client, Arc<Store>, InferencePool) -> F,
) -> Outcomes {
    let cluster = cluster().await;
    let pool = create_pool(&cluster.client).await;
    supporting_objects(&cluster.client, &pool).await;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), NS);
    deployments.create(&PostParams::default(), &deployment(&pool, env)).await.unwrap();
    let store = Arc::clone(&cluster.server.store);
    until(&store, 120, "2 ready replicas", |pods| pods.iter().filter(|p| ready(p)).count() == 2).await;
    // The proxy acts on endpoint changes after its documented delay (it exposes no event).
    tokio::time::sleep(inferpool_tests::proxy::PROPAGATION * 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&cluster.proxy, 4, Arc::clone(&stop));
    disrupt(cluster.client.clone(), store, pool).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = running.await.unwrap();
    drop(cluster);
    outcomes
}

#[tokio::test]
async fn a_rolling_update_under_load_loses_no_request_and_without_the_drain_delay_a_deletion_does() {
    // The operator's pods: 5 s drain delay, grace derived from it.
    let rollout = under_load(&[], |client, store, pool| async move {
        let deployments: Api<Deployment> = Api::namespaced(client, NS);
        let before: Vec<String> =
            pods_of(&store).iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect();
        // A spec change the template carries: the Deployment rolls (maxSurge 1, maxUnavailable 0).
        let changed = deployment(&with_optimization(&pool, "Speed"), &[]);
        let mut current = deployments.get("catalog").await.unwrap();
        current.spec = changed.spec;
        deployments.replace("catalog", &PostParams::default(), &current).await.unwrap();
        until(&store, 180, "the rollout", |pods| {
            let new_ready = pods
                .iter()
                .filter(|p| ready(p) && env_of(p, "INFERPOOL_OPTIMIZATION").as_deref() == Some("Speed"))
                .count();
            let old_left = pods.iter().filter(|p| before.iter().any(|b| p["metadata"]["name"] == b.as_str())).count();
            new_ready == 2 && old_left == 0
        })
        .await;
    })
    .await;
    eprintln!("rolling update of 2 replicas under load, outcomes: {rollout:?}");
    let total: u64 = rollout.values().sum();
    assert!(total > 20, "too little load to mean anything: {rollout:?}");
    assert_eq!(rollout.get("200").copied(), Some(total), "requests lost in the rollout: {rollout:?}");

    // The control: the sidecar closes its listener at SIGTERM, while the proxy still sends new
    // connections its way for a second.
    let control = under_load(&[("INFERPOOL_DRAIN_DELAY_SECONDS", "0")], |client, store, _| async move {
        let pod_api: Api<Pod> = Api::namespaced(client, NS);
        let victim = pod_api.list(&ListParams::default()).await.unwrap().items[0].metadata.name.clone().unwrap();
        pod_api.delete(&victim, &DeleteParams::default()).await.unwrap();
        until(&store, 120, "the victim replaced", |pods| {
            pods.iter().filter(|p| ready(p)).count() == 2
                && !pods.iter().any(|p| p["metadata"]["name"] == victim.as_str())
        })
        .await;
    })
    .await;
    eprintln!("one pod deleted under load without a drain delay, outcomes: {control:?}");
    let failed: u64 = control.iter().filter(|(k, _)| *k != "200").map(|(_, v)| v).sum();
    assert!(failed > 0, "no request failed without the drain delay, so the rollout result proves nothing: {control:?}");
}
