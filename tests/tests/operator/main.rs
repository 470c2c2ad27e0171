//! The operator end to end on the local control plane: the real controller (in this process),
//! the API server double and the kubelet double, with real sidecar processes where it matters.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod autoscale;
mod rbac;
mod real_cluster;
mod traffic;

use std::sync::Arc;
use std::time::Duration;

use inferpool_crds::InferencePool;
use inferpool_operator::build::{AdminKey, Settings};
use inferpool_operator::controller::{self, Context};
use inferpool_operator::leader::{self, LeaseSettings};
use inferpool_operator::metrics::Metrics;
use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::kubelet::{Kubelet, Mode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::sync::watch;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    url: String,
    server: ApiServer,
    _kubelet: Kubelet,
    client: Client,
}

async fn cluster(mode: Mode) -> Cluster {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The operator holds only what the Helm chart grants it (see rbac.rs).
    let server = ApiServer::start_with(listener, Some(rbac::operator_rbac())).unwrap();
    let kubelet = Kubelet::start(Arc::clone(&server.store), mode).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    Cluster { url: server.url(), server, _kubelet: kubelet, client }
}

/// A cluster with one operator replica (no leader election) and the pools API of its namespace.
async fn with_operator(mode: Mode) -> (Cluster, Operator, Api<InferencePool>) {
    let cluster = cluster(mode).await;
    let operator = Operator::start(&cluster.url, "op-0", None);
    let pools = Api::namespaced(cluster.client.clone(), NS);
    (cluster, operator, pools)
}

fn sidecar_bin() -> std::path::PathBuf {
    inferpool_tests::fixtures::sidecar_bin().unwrap()
}

/// One operator replica on its own thread and runtime, talking to the API server over HTTP like
/// the binary does. `kill` drops the runtime with every task in it, the lease renewal included,
/// without running any clean-up: to the rest of the system it looks like a crash.
struct Operator {
    metrics: Arc<Metrics>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Operator {
    fn start(url: &str, identity: &str, lease_seconds: Option<u64>) -> Operator {
        Self::with_config(Config::new(url.parse().unwrap()), "inferpool-sidecar:test", NS, identity, lease_seconds)
    }

    /// An operator for the cluster in `config`, its lease in `namespace`.
    fn with_config(
        config: Config,
        image: &str,
        namespace: &str,
        identity: &str,
        lease_seconds: Option<u64>,
    ) -> Operator {
        // TEST_LOG=inferpool_operator=debug shows what the operator does (off by default).
        let filter = tracing_subscriber::EnvFilter::try_from_env("TEST_LOG").unwrap_or_else(|_| "off".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (kill, killed) = oneshot::channel::<()>();
        let (identity, task_metrics) = (identity.to_owned(), metrics.clone());
        let (image, namespace) = (image.to_owned(), namespace.to_owned());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = Client::try_from(controller::identified(config)).unwrap();
                let reporter = Reporter { controller: "inferpool-operator".into(), instance: Some(identity.clone()) };
                let settings = Settings { default_image: image, gpu_image: None, image_pull_policy: None };
                let ctx = Arc::new(Context::new(client.clone(), settings, admin_key(), reporter, task_metrics.clone()));
                let (_stop, stopped) = watch::channel(false);
                let run = || controller::run(ctx.clone(), None, stopped.clone());
                let operate = async {
                    match lease_seconds {
                        Some(duration_seconds) => {
                            let name = "inferpool-operator".into();
                            let lease = LeaseSettings { name, namespace, identity, duration_seconds };
                            leader::lead(client, &lease, task_metrics, stopped.clone(), run).await.unwrap();
                        }
                        None => run().await,
                    }
                };
                tokio::select! {
                    () = operate => {}
                    _ = killed => {}
                }
            });
            runtime.shutdown_background();
        });
        Operator { metrics, kill: Some(kill), thread: Some(thread) }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn reconciles(&self) -> u64 {
        self.metrics.reconciles.with_label_values(&["success"]).get()
    }

    /// Waits until this replica has completed `n` successful reconciles. Nothing in the API
    /// shows an idle reconcile (that is the point), so this polls the replica's own counter.
    async fn reconciled(&self, n: u64) {
        let done = tokio::time::timeout(WAIT, async {
            while self.reconciles() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        done.await.unwrap_or_else(|_| panic!("only {} reconciles", self.reconciles()));
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pool(name: &str, spec: Value) -> InferencePool {
    serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS}, "spec": spec,
    }))
    .unwrap()
}

fn condition(pool: &InferencePool, type_: &str) -> Option<(String, String)> {
    let status = pool.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

fn has_condition(type_: &'static str, status: &'static str) -> impl Fn(Option<&InferencePool>) -> bool {
    move |p| p.and_then(|p| condition(p, type_)).is_some_and(|(s, _)| s == status)
}

async fn wait_for<K, F>(api: &Api<K>, name: &str, what: &str, cond: F) -> K
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: kube::runtime::wait::Condition<K>,
{
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name} was deleted while waiting until {what}"),
        Ok(Err(error)) => panic!("watching {name}: {error}"),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            panic!("{name}: timed out waiting until {what}; last seen: {last:#?}")
        }
    }
}

async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let Some(object) = api.get_opt(name).await.unwrap() else { return };
    let uid = object.meta().uid.clone().unwrap_or_default();
    let deleted = kube::runtime::wait::conditions::is_deleted(&uid);
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, deleted)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => panic!("watching {name}: {error}"),
        Err(_) => panic!("{name} was not deleted"),
    }
}

/// The pool's pods that are not terminating (deleted pods linger while their sidecars drain).
async fn pods(client: &Client, pool: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let selector = format!("app.kubernetes.io/instance={pool}");
    let mut pods = api.list(&ListParams::default().labels(&selector)).await.unwrap().items;
    pods.retain(|p| p.metadata.deletion_timestamp.is_none());
    pods
}

fn resource_versions<K: Resource>(objects: &[Option<K>]) -> Vec<Option<String>> {
    objects.iter().map(|o| o.as_ref().and_then(|o| o.meta().resource_version.clone())).collect()
}

#[tokio::test]
async fn a_pool_becomes_ready_with_real_sidecars_rolls_on_a_model_change_and_is_deleted_whole() {
    let (cluster, _operator, pools) = with_operator(Mode::Process { sidecar: sidecar_bin() }).await;
    let client = &cluster.client;
    let spec = json!({"replicas": {"min": 2, "max": 4}, "cache": {"diskMb": 16}, "sla": {"memoryLimitMb": 2048}});
    pools.create(&PostParams::default(), &pool("shop", spec)).await.unwrap();

    let ready = wait_for(&pools, "shop", "Ready", has_condition("Ready", "True")).await;
    let status = ready.status.clone().unwrap();
    assert_eq!((status.replicas, status.ready_replicas, status.desired_replicas), (2, 2, 2));
    assert_eq!(status.endpoint.as_deref(), Some("http://shop.default.svc:8080"));
    assert_eq!(condition(&ready, "Degraded").map(|c| c.0).as_deref(), Some("False"));
    let first = pods(client, "shop").await;
    assert_eq!(first.len(), 2);
    // The Service reaches both replicas (what the pool's clients and the local proxy use).
    let mut endpoints = inferpool_tests::proxy::endpoints(&cluster.server.store, NS, "shop");
    endpoints.sort();
    let mut ips: Vec<_> = first.iter().filter_map(|p| Some((p.status.as_ref()?.pod_ip.clone()?, 8080))).collect();
    ips.sort();
    assert_eq!(endpoints, ips);

    // The variant the sidecars really picked is read back from them.
    let with_variant = wait_for(&pools, "shop", "the variant is known", |p: Option<&InferencePool>| {
        p.and_then(|p| p.status.as_ref()).is_some_and(|s| s.variant.as_deref() == Some("fp32"))
    })
    .await;
    assert_eq!(with_variant.status.unwrap().model.as_deref(), Some("efficientnet-lite0"));

    // A change that needs new pods (the optimisation goal picks another variant) rolls them.
    let patch = json!({"spec": {"optimization": "Memory"}});
    pools.patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let rolled = wait_for(&pools, "shop", "rolled to int8", |p: Option<&InferencePool>| {
        p.is_some_and(|p| {
            let s = p.status.as_ref();
            s.is_some_and(|s| s.variant.as_deref() == Some("int8") && s.observed_generation == p.metadata.generation)
                && condition(p, "Ready").is_some_and(|c| c.0 == "True")
        })
    })
    .await;
    assert_eq!(rolled.status.and_then(|s| s.model).as_deref(), Some("efficientnet-lite0"));
    let second = pods(client, "shop").await;
    let old: Vec<_> = first.iter().map(|p| p.name_any()).collect();
    assert_eq!(second.len(), 2);
    assert!(second.iter().all(|p| !old.contains(&p.name_any())), "every pod was replaced");

    // Deleting the pool deletes everything it owns.
    pools.delete("shop", &DeleteParams::default()).await.unwrap();
    wait_gone(&Api::<Deployment>::namespaced(client.clone(), NS), "shop").await;
    wait_gone(&Api::<Service>::namespaced(client.clone(), NS), "shop").await;
    wait_gone(&Api::<ConfigMap>::namespaced(client.clone(), NS), "shop-tuning").await;
    wait_gone(&Api::<Secret>::namespaced(client.clone(), NS), "shop-admin").await;
    wait_gone(&Api::<PodDisruptionBudget>::namespaced(client.clone(), NS), "shop").await;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    for pod in second {
        wait_gone(&pod_api, &pod.name_any()).await;
    }
    let left = pod_api.list(&ListParams::default().labels("app.kubernetes.io/instance=shop")).await.unwrap().items;
    assert!(left.is_empty(), "pods left after the pool was deleted");
}

#[tokio::test]
async fn invalid_pools_are_refused_or_reported_degraded() {
    let (cluster, _operator, pools) = with_operator(Mode::Fake).await;
    let client = &cluster.client;

    // Out of the schema's range: the API server refuses it with the field path.
    let bad = pool("bad-range", json!({"replicas": {"min": -1}}));
    match pools.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
            assert!(status.message.contains("spec.replicas.min"), "{}", status.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // Valid per field, invalid across fields: accepted (the double does not run CEL), then
    // Degraded with the reason, and nothing built.
    pools.create(&PostParams::default(), &pool("crossed", json!({"replicas": {"min": 5, "max": 2}}))).await.unwrap();
    let degraded = wait_for(&pools, "crossed", "Degraded", has_condition("Degraded", "True")).await;
    assert_eq!(condition(&degraded, "Degraded").unwrap().1, "InvalidSpec");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    assert!(deployments.get_opt("crossed").await.unwrap().is_none(), "nothing is built for an invalid pool");

    // Fixing it builds the pool.
    let fix = json!({"spec": {"replicas": {"min": 1, "max": 2}}});
    pools.patch("crossed", &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    let fixed = wait_for(&pools, "crossed", "Ready", has_condition("Ready", "True")).await;
    assert_eq!(condition(&fixed, "Degraded").unwrap(), ("False".to_owned(), "AsExpected".to_owned()));

    // A GPU pool without an image, and this operator has no CUDA image: refused with the reason
    // and the Degraded message naming what is missing, instead of pods that exit at start.
    pools.create(&PostParams::default(), &pool("gpu-no-image", json!({"gpu": {"count": 1}}))).await.unwrap();
    let refused = wait_for(&pools, "gpu-no-image", "Degraded", has_condition("Degraded", "True")).await;
    let message =
        refused.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Degraded").unwrap().message.clone();
    assert!(message.contains("no CUDA sidecar image") && message.contains("--gpu-image"), "{message}");
    assert!(deployments.get_opt("gpu-no-image").await.unwrap().is_none(), "{message}");
}

#[tokio::test]
async fn the_scale_subresource_drives_replicas_when_autoscaling_is_off() {
    let (cluster, _operator, pools) = with_operator(Mode::Fake).await;
    let client = &cluster.client;
    let spec = json!({"autoscaling": {"enabled": false}, "replicas": {"count": 1}});
    pools.create(&PostParams::default(), &pool("manual", spec)).await.unwrap();
    wait_for(&pools, "manual", "Ready", has_condition("Ready", "True")).await;

    // What `kubectl scale ipool/manual --replicas=3` sends.
    let scale = json!({"spec": {"replicas": 3}});
    pools.patch_scale("manual", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    wait_for(&deployments, "manual", "3 replicas", |d: Option<&Deployment>| d.and_then(|d| d.spec.replicas) == Some(3))
        .await;
    let scaled = wait_for(&pools, "manual", "3 ready", |p: Option<&InferencePool>| {
        p.and_then(|p| p.status.as_ref()).is_some_and(|s| s.ready_replicas == 3)
    })
    .await;
    assert_eq!(scaled.spec.replicas.count, 3);
    let read = pools.get_scale("manual").await.unwrap();
    assert_eq!(read.status.and_then(|s| s.selector).as_deref(), Some(scaled.status.unwrap().selector.as_str()));
}

#[tokio::test]
async fn a_restarted_operator_writes_nothing_for_an_unchanged_pool() {
    let cluster = cluster(Mode::Fake).await;
    let client = &cluster.client;
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), NS);
    let first = Operator::start(&cluster.url, "op-0", None);
    pools.create(&PostParams::default(), &pool("steady", json!({}))).await.unwrap();
    wait_for(&pools, "steady", "Ready", has_condition("Ready", "True")).await;

    let snapshot = || async {
        let d = Api::<Deployment>::namespaced(client.clone(), NS).get_opt("steady").await.unwrap();
        let s = Api::<Service>::namespaced(client.clone(), NS).get_opt("steady").await.unwrap();
        let c = Api::<ConfigMap>::namespaced(client.clone(), NS).get_opt("steady-tuning").await.unwrap();
        let x = Api::<Secret>::namespaced(client.clone(), NS).get_opt("steady-admin").await.unwrap();
        let b = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS).get_opt("steady").await.unwrap();
        let p = pools.get_opt("steady").await.unwrap();
        let mut rvs = resource_versions(&[d]);
        rvs.extend(resource_versions(&[s]));
        rvs.extend(resource_versions(&[c]));
        rvs.extend(resource_versions(&[x]));
        rvs.extend(resource_versions(&[b]));
        rvs.extend(resource_versions(&[p]));
        rvs
    };
    let before = snapshot().await;
    assert!(before.iter().all(Option::is_some), "{before:?}");
    drop(first);

    let second = Operator::start(&cluster.url, "op-1", None);
    second.reconciled(1).await;
    assert_eq!(snapshot().await, before, "a reconcile of an unchanged pool wrote something");
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_the_standby_takes_over_when_it_dies() {
    let cluster = cluster(Mode::Fake).await;
    let client = &cluster.client;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let mut a = Operator::start(&cluster.url, "op-a", Some(3));
    let mut b = Operator::start(&cluster.url, "op-b", Some(3));
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let lease =
        wait_for(&leases, "inferpool-operator", "a holder", |l: Option<&Lease>| l.and_then(holder).is_some()).await;
    let first = holder(&lease).unwrap();
    let (leader, standby, standby_name) = if first == "op-a" { (&mut a, &b, "op-b") } else { (&mut b, &a, "op-a") };

    let pools: Api<InferencePool> = Api::namespaced(client.clone(), NS);
    pools.create(&PostParams::default(), &pool("led", json!({}))).await.unwrap();
    wait_for(&pools, "led", "Ready", has_condition("Ready", "True")).await;
    leader.reconciled(1).await;
    assert_eq!(standby.reconciles(), 0, "the standby reconciled while not leading");
    assert_eq!(standby.metrics.leader.get(), 0);

    leader.kill();
    wait_for(&leases, "inferpool-operator", "the standby holds it", |l: Option<&Lease>| {
        l.and_then(holder).as_deref() == Some(standby_name)
    })
    .await;
    let patch = json!({"spec": {"replicas": {"min": 2}}});
    pools.patch("led", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    wait_for(&deployments, "led", "2 replicas", |d: Option<&Deployment>| d.and_then(|d| d.spec.replicas) == Some(2))
        .await;
    standby.reconciled(1).await;
    assert_eq!(standby.metrics.leader.get(), 1);
}

#[tokio::test]
async fn every_decision_is_explained_by_events_on_the_pool() {
    let (cluster, _operator, pools) = with_operator(Mode::Fake).await;
    let client = &cluster.client;
    pools.create(&PostParams::default(), &pool("told", json!({}))).await.unwrap();
    wait_for(&pools, "told", "Ready", has_condition("Ready", "True")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("told"))
        .map(|e| e.note.unwrap_or_default())
        .collect();
    for child in
        ["Deployment told", "Service told", "ConfigMap told-tuning", "Secret told-admin", "PodDisruptionBudget told"]
    {
        assert!(notes.iter().any(|n| n == &format!("Created {child}")), "no Event for {child}: {notes:?}");
    }
}

/// The admin key of every operator a test starts (replicas of one operator share it).
fn admin_key() -> AdminKey {
    AdminKey::from_material(inferpool_tests::fixtures::OPERATOR_ADMIN_KEY.as_bytes()).unwrap()
}
