//! The kubelet double keeps Pods and Deployment status true, seen through kube-rs; in process
//! mode it resolves env, stands in for mounts, runs probes, restarts and rolls pods like a kubelet.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::apiserver::resources;
use inferpool_tests::apiserver::store::{Change, Store};
use inferpool_tests::kubelet::{Kubelet, Mode, Options};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config};
use serde_json::{Value, json};

mod faults;
mod process;

async fn start(mode: Mode) -> (ApiServer, Kubelet, Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    let kubelet = Kubelet::start(std::sync::Arc::clone(&server.store), mode).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    (server, kubelet, client)
}

fn deployment(replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "model"}},
            "template": {
                "metadata": {"labels": {"app": "model"}},
                "spec": {"containers": [{
                    "name": "sidecar",
                    "image": "inferpool-sidecar",
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
                    "env": [{"name": "INFERPOOL_LOG", "value": "warn"}, {"name": "INFERPOOL_DISK_MB", "value": "16"}],
                }]},
            },
        },
    }))
    .unwrap()
}

fn ready(n: i32) -> impl Fn(Option<&Deployment>) -> bool {
    move |d| d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.ready_replicas == Some(n) && s.replicas == Some(n))
}

async fn pods(api: &Api<Pod>) -> Vec<Pod> {
    api.list(&ListParams::default().labels("app=model")).await.unwrap().items
}

#[tokio::test]
async fn replicas_become_pods_with_distinct_ips_and_follow_the_deployment() {
    let (_server, _kubelet, client) = start(Mode::Fake).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "pool");
    deployments.create(&PostParams::default(), &deployment(2)).await.unwrap();
    let wait =
        |n| tokio::time::timeout(Duration::from_secs(10), await_condition(deployments.clone(), "model", ready(n)));
    wait(2).await.unwrap().unwrap();
    let first = pods(&pod_api).await;
    assert_eq!(first.len(), 2);
    let ips: BTreeSet<_> = first.iter().map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap()).collect();
    assert_eq!(ips.len(), 2, "pod IPs are distinct: {ips:?}");
    assert!(ips.iter().all(|ip| ip.starts_with("127.0.0.") && ip != "127.0.0.1"));

    deployments.patch("model", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    wait(3).await.unwrap().unwrap();
    assert_eq!(pods(&pod_api).await.len(), 3);

    // A Service's EndpointSlice lists its pods' IPs at the target port.
    let services: Api<Service> = Api::namespaced(client.clone(), "pool");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {"selector": {"app": "model"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "pool");
    let slice = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let found =
                slices.list(&ListParams::default().labels("kubernetes.io/service-name=model")).await.unwrap().items;
            if let Some(s) = found.into_iter().find(|s| s.endpoints.as_ref().is_some_and(|e| e.len() == 3)) {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let endpoints = slice.endpoints.clone().unwrap_or_default();
    let slice_ips: BTreeSet<_> = endpoints.iter().flat_map(|e| e.addresses.clone()).collect();
    let pod_ips: BTreeSet<_> = pods(&pod_api).await.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
    assert_eq!(slice_ips, pod_ips);
    assert!(endpoints.iter().all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)));
    assert_eq!(slice.ports.unwrap()[0].port, Some(8080));

    // A deleted pod is replaced.
    let victim = first[0].metadata.name.clone().unwrap();
    pod_api.delete(&victim, &DeleteParams::default()).await.unwrap();
    let replaced = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = pods(&pod_api).await;
            if now.len() == 3 && now.iter().all(|p| p.metadata.name.as_deref() != Some(victim.as_str())) {
                return now;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(replaced.len(), 3);

    // A new template replaces every pod; the status reports the new generation.
    let change = json!({"spec": {"template": {"metadata": {"annotations": {"restart": "1"}}}}});
    deployments.patch("model", &PatchParams::default(), &Patch::Merge(change)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(deployments.clone(), "model", |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref()).is_some_and(|s| {
                s.observed_generation == Some(3) && s.updated_replicas == Some(3) && s.replicas == Some(3)
            })
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let names_now: BTreeSet<_> = pods(&pod_api).await.into_iter().map(|p| p.metadata.name.unwrap()).collect();
    assert!(
        replaced.iter().all(|p| !names_now.contains(p.metadata.name.as_ref().unwrap())),
        "old pods remain: {names_now:?}"
    );

    deployments.delete("model", &DeleteParams::default()).await.unwrap();
    assert!(pods(&pod_api).await.is_empty(), "pods go with their deployment");
}

/// The sidecar binary the workspace build made (`make test` builds every binary first).
fn sidecar_bin() -> std::path::PathBuf {
    inferpool_tests::fixtures::sidecar_bin().unwrap()
}

/// Whether something answers `GET /readyz` with 200 at ip:8080.
async fn answers(ip: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, 8080)).await else { return false };
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

fn ips(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect()
}

#[tokio::test]
async fn process_mode_runs_a_real_sidecar_per_pod() {
    let (_server, kubelet, client) = start(Mode::Process { sidecar: sidecar_bin() }).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    let pod_api: Api<Pod> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &deployment(2)).await.unwrap();
    let wait =
        |n| tokio::time::timeout(Duration::from_secs(120), await_condition(deployments.clone(), "model", ready(n)));
    wait(2).await.unwrap().unwrap();
    let two = ips(&pods(&pod_api).await);
    assert_eq!(two.len(), 2);
    for ip in &two {
        assert!(answers(ip).await, "the sidecar on {ip} does not answer");
    }

    deployments.patch("model", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    wait(3).await.unwrap().unwrap();
    let three = ips(&pods(&pod_api).await);
    assert_eq!(three.len(), 3);
    let added = three.difference(&two).next().unwrap().clone();
    assert!(answers(&added).await);

    // Deleting a pod kills its sidecar; a replacement starts and becomes ready.
    let victim = pods(&pod_api).await.into_iter().find(|p| ips(std::slice::from_ref(p)).contains(&added)).unwrap();
    pod_api.delete(victim.metadata.name.as_ref().unwrap(), &DeleteParams::default()).await.unwrap();
    stops_answering(&added).await;
    let replaced = |d: Option<&Deployment>| {
        ready(3)(d) && d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.replicas == Some(3))
    };
    tokio::time::timeout(Duration::from_secs(120), await_condition(deployments.clone(), "model", replaced))
        .await
        .unwrap()
        .unwrap();
    let now = ips(&pods(&pod_api).await);
    assert!(!now.contains(&added) && now.len() == 3, "{now:?}");

    // Deleting the Deployment stops every sidecar.
    deployments.delete("model", &DeleteParams::default()).await.unwrap();
    for ip in &now {
        stops_answering(ip).await;
    }
    drop(kubelet);
}

/// Waits until nothing answers on ip:8080 (the process was killed); the kill is asynchronous.
async fn stops_answering(ip: &str) {
    let gone = async {
        while answers(ip).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.unwrap_or_else(|_| panic!("{ip} still answers"));
}

// ---- process mode: environment, volumes, probes, restarts, rolling updates ----

/// Short restart back-off for tests (the default starts at 1 s).
const FAST: Options = Options { crash_backoff: Duration::from_millis(100), crash_backoff_cap: Duration::from_secs(1) };

async fn start_process() -> (ApiServer, Kubelet, Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    let kubelet =
        Kubelet::start_with(std::sync::Arc::clone(&server.store), Mode::Process { sidecar: sidecar_bin() }, FAST)
            .unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    (server, kubelet, client)
}

/// A Deployment `model` of the sidecar, with `spec` merged into its container and `pod` into its
/// pod spec.
fn sidecar_deployment(replicas: i32, container: Value, pod: Value) -> Deployment {
    let mut c = json!({
        "name": "sidecar",
        "image": "inferpool-sidecar",
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
        "env": [{"name": "INFERPOOL_LOG", "value": "warn"}, {"name": "INFERPOOL_DISK_MB", "value": "16"}],
    });
    for (k, v) in container.as_object().unwrap() {
        if k == "env" {
            c["env"].as_array_mut().unwrap().extend(v.as_array().unwrap().iter().cloned());
        } else {
            c[k] = v.clone();
        }
    }
    let mut spec = json!({"containers": [c]});
    for (k, v) in pod.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "model"}},
            "template": {"metadata": {"labels": {"app": "model"}}, "spec": spec},
        },
    }))
    .unwrap()
}

fn pods_in(store: &Store) -> Vec<Value> {
    store.list(resources::find("", "v1", "pods").unwrap(), Some("pool"), |_| true).0
}

/// Waits, on the store's change feed (no polling), until `check` finds something in the pods.
async fn until_pods<T>(store: &Store, secs: u64, mut check: impl FnMut(&[Value]) -> Option<T>) -> T {
    let mut events = store.subscribe();
    let wait = async {
        loop {
            if let Some(t) = check(&pods_in(store)) {
                return t;
            }
            let _ = events.recv().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out; pods: {}", serde_json::to_string_pretty(&pods_in(store)).unwrap()))
}

fn pod_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn ip_of(p: &Value) -> String {
    p.pointer("/status/podIP").and_then(Value::as_str).unwrap().to_owned()
}

/// The live child of this test process listening on `ip` (found by its `INFERPOOL_LISTEN`), with
/// its environment and arguments.
fn process_on(ip: &str) -> Option<(u32, BTreeMap<String, String>, Vec<String>)> {
    let listen = format!("INFERPOOL_LISTEN={ip}:8080");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let vars: Vec<String> = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        if !vars.contains(&listen) || !alive(pid) || parent(pid) != Some(std::process::id()) {
            continue;
        }
        let env = vars.iter().filter_map(|v| v.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args = cmdline.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        return Some((pid, env, args));
    }
    None
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}
