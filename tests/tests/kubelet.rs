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

#[tokio::test]
async fn process_mode_resolves_env_from_config_maps_and_secrets_like_a_kubelet() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "pool");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "model-tuning"},
                "data": {"INFERPOOL_MAX_BATCH": "4", "INFERPOOL_MAX_DELAY_MS": "7", "INFERPOOL_MEMORY_ENTRIES": "100"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let container = json!({
        "envFrom": [{"configMapRef": {"name": "model-tuning"}}, {"secretRef": {"name": "extra", "optional": true}}],
        "env": [
            {"name": "INFERPOOL_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "model-admin", "key": "token"}}},
            {"name": "INFERPOOL_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "model-redis", "key": "password"}}},
            {"name": "INFERPOOL_MAX_DELAY_MS", "value": "9"},
            {"name": "QUEUE", "value": "3$(INFERPOOL_MAX_BATCH)"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "args": ["--queue-capacity=$(QUEUE)", "--redis-prefix=$(UNDEFINED)"],
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();

    // A missing Secret keeps the pod Pending, its container waiting with the kubelet's reason.
    let waiting = until_pods(store, 30, |pods| {
        pods.iter()
            .find(|p| {
                p.pointer("/status/containerStatuses/0/state/waiting/reason")
                    == Some(&json!("CreateContainerConfigError"))
            })
            .cloned()
    })
    .await;
    assert_eq!(waiting["status"]["phase"], "Pending");
    assert_eq!(
        waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
        "secret \"model-admin\" not found"
    );
    assert!(process_on(&ip_of(&waiting)).is_none(), "no process starts before its config resolves");

    // Created, the Secret lets it go on, to the next missing one: a Secret with stringData.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "pool");
    let admin = json!({"metadata": {"name": "model-admin"}, "data": {"token": "czNjcjN0"}});
    secrets.create(&PostParams::default(), &serde_json::from_value(admin).unwrap()).await.unwrap();
    until_pods(store, 30, |pods| {
        pods.iter()
            .any(|p| {
                p.pointer("/status/containerStatuses/0/state/waiting/message")
                    == Some(&json!("secret \"model-redis\" not found"))
            })
            .then_some(())
    })
    .await;
    let redis = json!({"metadata": {"name": "model-redis"}, "stringData": {"password": "hunter2"}});
    secrets.create(&PostParams::default(), &serde_json::from_value(redis).unwrap()).await.unwrap();
    let pod = until_pods(store, 60, |pods| pods.iter().find(|p| pod_ready(p)).cloned()).await;
    assert_eq!(pod["metadata"]["name"], waiting["metadata"]["name"], "the same pod started");

    let (_, env, args) = process_on(&ip_of(&pod)).expect("the sidecar runs");
    assert_eq!(env["INFERPOOL_ADMIN_TOKEN"], "s3cr3t", "secretKeyRef data is base64-decoded");
    assert_eq!(env["INFERPOOL_REDIS_PASSWORD"], "hunter2");
    assert_eq!(env["INFERPOOL_MAX_BATCH"], "4", "envFrom a ConfigMap");
    assert_eq!(env["INFERPOOL_MAX_DELAY_MS"], "9", "env overrides envFrom");
    assert_eq!(env["INFERPOOL_MEMORY_ENTRIES"], "100");
    assert_eq!(env["QUEUE"], "34", "$(VAR) expands in env values");
    assert_eq!(env["POD_NAME"], pod["metadata"]["name"].as_str().unwrap());
    assert!(args.contains(&"--queue-capacity=34".to_owned()), "$(VAR) expands in args: {args:?}");
    assert!(args.contains(&"--redis-prefix=$(UNDEFINED)".to_owned()), "undefined references stay: {args:?}");

    // The sidecar runs with them: its live tuning shows the ConfigMap's batch size and the override.
    let tuning = admin_get(&ip_of(&pod), "/api/v1/tuning").await;
    assert_eq!((tuning["maxBatchSize"].clone(), tuning["maxDelayMs"].clone()), (json!(4), json!(9)), "{tuning}");
}

/// `GET path` on the admin port of the pod at `ip`, as JSON.
async fn admin_get(ip: &str, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((ip, 9090)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn process_mode_stands_in_for_empty_dir_and_claim_mounts_with_directories() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({
        "env": [
            {"name": "INFERPOOL_CACHE_DIR", "value": "/var/cache/inferpool"},
            {"name": "INFERPOOL_DATA_DIR", "value": "/var/lib/inferpool/data"},
        ],
        "volumeMounts": [
            {"name": "cache", "mountPath": "/var/cache/inferpool"},
            {"name": "data", "mountPath": "/var/lib/inferpool"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    let volumes = json!({"volumes": [
        {"name": "cache", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "model-disk"}},
        {"name": "tmp", "emptyDir": {}},
    ]});
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, volumes)).await.unwrap();
    let first = until_pods(store, 60, |pods| pods.iter().find(|p| pod_ready(p)).cloned()).await;
    let (_, env, _) = process_on(&ip_of(&first)).unwrap();
    let cache = std::path::PathBuf::from(&env["INFERPOOL_CACHE_DIR"]);
    let data = std::path::PathBuf::from(&env["INFERPOOL_DATA_DIR"]);
    assert!(cache.is_dir() && cache.ends_with("volumes/cache"), "{cache:?}");
    assert!(data.ends_with("claims/pool/model-disk/data"), "{data:?}");
    let claim = data.parent().unwrap().to_owned();
    std::fs::write(claim.join("written-by-the-first-pod"), b"1").unwrap();

    // A replacement pod gets a fresh emptyDir but the same claim directory.
    let pod_api: Api<Pod> = Api::namespaced(client, "pool");
    let first_name = first["metadata"]["name"].as_str().unwrap().to_owned();
    pod_api.delete(&first_name, &DeleteParams::default()).await.unwrap();
    let second = until_pods(store, 60, |pods| {
        pods.iter().find(|p| pod_ready(p) && p["metadata"]["name"] != first_name.as_str()).cloned()
    })
    .await;
    let (_, env2, _) = process_on(&ip_of(&second)).unwrap();
    assert_eq!(env2["INFERPOOL_DATA_DIR"], env["INFERPOOL_DATA_DIR"], "a claim outlives its pod");
    assert!(claim.join("written-by-the-first-pod").exists());
    assert_ne!(env2["INFERPOOL_CACHE_DIR"], env["INFERPOOL_CACHE_DIR"]);
    // The first pod's emptyDir goes once its process is reaped (asynchronously after the delete).
    let gone = async {
        while cache.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the deleted pod's emptyDir remains");
}

#[tokio::test]
async fn failing_liveness_restarts_the_container_and_readiness_follows_its_probe() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({
        "startupProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/no-such-path", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2},
        "readinessProbe": {"httpGet": {"path": "/no-such-path", "port": "admin"}, "periodSeconds": 1},
    });
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();
    let mut pids = BTreeSet::new();
    let mut ever_ready = false;
    let restarted = until_pods(store, 90, |pods| {
        let p = pods.first()?;
        ever_ready |= pod_ready(p);
        if let Some((pid, _, _)) = p.pointer("/status/podIP").and_then(Value::as_str).and_then(process_on) {
            pids.insert(pid);
        }
        let restarts = p.pointer("/status/containerStatuses/0/restartCount").and_then(Value::as_u64)?;
        (restarts >= 2).then(|| p.clone())
    })
    .await;
    let status = &restarted["status"]["containerStatuses"][0];
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 137, "killed: {status}");
    assert!(pids.len() >= 2, "each restart is a new process: {pids:?}");
    assert!(!ever_ready, "readiness follows the container's probe (a 404 path), not /readyz");
    assert_eq!(restarted["status"]["phase"], "Running");
}

#[tokio::test]
async fn a_crashing_container_is_restarted_with_a_doubling_capped_backoff() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({"env": [{"name": "INFERPOOL_MAX_BATCH", "value": "lots"}]});
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();
    let mut backoffs: Vec<(u64, String)> = Vec::new();
    let last = until_pods(store, 60, |pods| {
        let c = pods.first()?.pointer("/status/containerStatuses/0")?.clone();
        if c["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
            let seen = (c["restartCount"].as_u64()?, c["state"]["waiting"]["message"].as_str()?.to_owned());
            if backoffs.last() != Some(&seen) {
                backoffs.push(seen);
            }
        }
        (c["restartCount"].as_u64()? >= 5 && c["state"]["waiting"]["reason"] == "CrashLoopBackOff").then_some(c)
    })
    .await;
    assert_eq!(last["lastState"]["terminated"]["exitCode"], 64, "the sidecar's bad-config exit: {last}");
    assert_eq!(last["ready"], false);
    let waits: Vec<&str> = backoffs.iter().map(|(_, m)| m.split_whitespace().nth(1).unwrap()).collect::<Vec<_>>();
    assert_eq!(&waits[..5], ["100ms", "200ms", "400ms", "800ms", "1s"], "{backoffs:?}");
    let counts: Vec<u64> = backoffs.iter().map(|(n, _)| *n).collect();
    assert_eq!(&counts[..5], [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_template_change_rolls_pods_within_max_surge_and_max_unavailable() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let mut d = serde_json::to_value(sidecar_deployment(2, json!({}), json!({}))).unwrap();
    d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    let d: Deployment = serde_json::from_value(d).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &d).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), await_condition(deployments.clone(), "model", ready(2)))
        .await
        .unwrap()
        .unwrap();
    let old: BTreeSet<String> =
        pods_in(store).iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    let old_hash = pods_in(store)[0]["metadata"]["labels"]["pod-template-hash"].as_str().unwrap().to_owned();

    // Follow every change in order, checking the bounds after each.
    let mut events = store.subscribe();
    let change = json!({"spec": {"template": {"metadata": {"annotations": {"restart": "1"}}}}});
    deployments.patch("model", &PatchParams::default(), &Patch::Merge(change)).await.unwrap();
    let mut pods: BTreeMap<String, Value> =
        pods_in(store).into_iter().map(|p| (p["metadata"]["name"].as_str().unwrap().to_owned(), p)).collect();
    let (mut most, mut done) = (0, false);
    let follow = async {
        while !done {
            let e = events.recv().await.unwrap();
            match e.key.resource.kind {
                "Pod" => {
                    if e.change == Change::Deleted {
                        pods.remove(&e.key.name);
                    } else {
                        pods.insert(e.key.name.clone(), e.object.clone());
                    }
                    let ready = pods.values().filter(|p| pod_ready(p)).count();
                    // As in Kubernetes, pods already terminating no longer count against the surge.
                    let active = pods.values().filter(|p| p.pointer("/metadata/deletionTimestamp").is_none()).count();
                    most = most.max(active);
                    assert!(active <= 3, "more than replicas + maxSurge pods: {:?}", pods.keys());
                    assert!(ready >= 2, "fewer than replicas - maxUnavailable ready at rv {}: {:?}", e.rv, pods.keys());
                }
                "Deployment" => {
                    let s = &e.object["status"];
                    let n = |f: &str| s[f].as_u64().unwrap_or(0);
                    assert!(n("replicas") <= 3 && n("readyReplicas") >= 2, "{s}");
                    assert_eq!(n("availableReplicas"), n("readyReplicas"));
                    assert_eq!(n("unavailableReplicas"), n("replicas") - n("availableReplicas"), "{s}");
                    assert!(n("updatedReplicas") <= n("replicas"));
                    let condition =
                        |t: &str| s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
                    assert_eq!(condition("Available")["status"], "True", "{s}");
                    assert_eq!(condition("Progressing")["status"], "True", "{s}");
                    done = s["observedGeneration"] == e.object["metadata"]["generation"]
                        && n("updatedReplicas") == 2
                        && n("replicas") == 2
                        && n("availableReplicas") == 2
                        && condition("Progressing")["reason"] == "NewReplicaSetAvailable";
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), follow).await.expect("the rollout did not complete");
    assert_eq!(most, 3, "the rollout used its surge");
    // Old pods may still be terminating (their sidecars drain); they are no longer replicas.
    let now: Vec<Value> =
        pods_in(store).into_iter().filter(|p| p.pointer("/metadata/deletionTimestamp").is_none()).collect();
    assert_eq!(now.len(), 2);
    for p in &now {
        assert!(!old.contains(p["metadata"]["name"].as_str().unwrap()), "an old pod remains");
        assert_ne!(p["metadata"]["labels"]["pod-template-hash"], old_hash.as_str());
        assert!(pod_ready(p));
    }
}

/// Core/v1 Events about pod `name` in `pool`: (reason, message).
fn pod_events(store: &Store, name: &str) -> Vec<(String, String)> {
    let events = resources::find("", "v1", "events").unwrap();
    store
        .list(events, Some("pool"), |e| e.pointer("/involvedObject/name").and_then(Value::as_str) == Some(name))
        .0
        .iter()
        .map(|e| (e["reason"].as_str().unwrap_or("").to_owned(), e["message"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[tokio::test]
async fn a_port_taken_on_every_address_leaves_the_pod_unschedulable_with_an_event_and_the_kubelet_working() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    // A listener on 0.0.0.0 holds its port on every loopback address.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let ports = json!({"ports": [{"name": "http", "containerPort": port}, {"name": "admin", "containerPort": 9090}]});
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, ports, json!({}))).await.unwrap();
    let (name, condition) = until_pods(store, 30, |pods| {
        let pod = pods.first()?;
        let condition = pod.pointer("/status/conditions/0")?.clone();
        (condition["type"] == "PodScheduled").then(|| (pod["metadata"]["name"].as_str().unwrap().to_owned(), condition))
    })
    .await;
    assert_eq!((condition["status"].as_str(), condition["reason"].as_str()), (Some("False"), Some("Unschedulable")));
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains(&format!("port {port} is taken")) && message.contains("0.0.0.0"), "{message}");
    let events = pod_events(store, &name);
    assert!(events.iter().any(|(reason, m)| reason == "FailedScheduling" && m == message), "{events:?}");

    // The kubelet is not stuck: a Deployment on free ports still comes up.
    let mut other = serde_json::to_value(sidecar_deployment(1, json!({}), json!({}))).unwrap();
    other["metadata"]["name"] = json!("other");
    other["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    other["spec"]["template"]["metadata"]["labels"]["app"] = json!("other");
    deployments.create(&PostParams::default(), &serde_json::from_value(other).unwrap()).await.unwrap();
    let other_ready =
        |p: &Value| p["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("other-")) && pod_ready(p);
    until_pods(store, 60, |pods| pods.iter().any(other_ready).then_some(())).await;
    drop(held);
}

#[tokio::test]
async fn a_missing_sidecar_binary_fails_the_pod_with_a_start_error_and_an_event() {
    // Refused at start, whether relative or absolute.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    for missing in ["target/debug/no-such-sidecar", "/nonexistent/inferpool-sidecar"] {
        let refused = Kubelet::start(std::sync::Arc::clone(&server.store), Mode::Process { sidecar: missing.into() });
        let error = refused.err().expect("a missing sidecar binary is refused");
        assert!(error.to_string().contains(missing), "{error}");
    }

    // Gone after start (a rebuild deleted it): each start fails with the reason, never exit 127.
    let dir = tempfile::tempdir().unwrap();
    let sidecar = dir.path().join("inferpool-sidecar");
    std::fs::copy(sidecar_bin(), &sidecar).unwrap();
    let _kubelet =
        Kubelet::start_with(std::sync::Arc::clone(&server.store), Mode::Process { sidecar: sidecar.clone() }, FAST)
            .unwrap();
    std::fs::remove_file(&sidecar).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, json!({}), json!({}))).await.unwrap();
    let store = &*server.store;
    let (name, last) = until_pods(store, 30, |pods| {
        let pod = pods.first()?;
        let last = pod.pointer("/status/containerStatuses/0/lastState/terminated")?.clone();
        Some((pod["metadata"]["name"].as_str()?.to_owned(), last))
    })
    .await;
    assert_eq!((last["reason"].as_str(), last["exitCode"].as_u64()), (Some("StartError"), Some(128)), "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains(sidecar.to_str().unwrap()) && message.contains("no such file"), "{message}");
    let events = pod_events(store, &name);
    assert!(events.iter().any(|(reason, m)| reason == "Failed" && m.contains("no such file")), "{events:?}");
}

#[tokio::test]
async fn a_killed_kubelets_directory_is_removed_by_the_next_one() {
    // A process id above the kernel's limit is never alive.
    let stale = std::env::temp_dir().join(format!("{}4294967-stale", inferpool_tests::kubelet::ROOT_PREFIX));
    std::fs::create_dir_all(stale.join("pool/model-0")).unwrap();
    let ours =
        std::env::temp_dir().join(format!("{}{}-kept", inferpool_tests::kubelet::ROOT_PREFIX, std::process::id()));
    std::fs::create_dir_all(&ours).unwrap();
    let (_server, _kubelet, _client) = start(Mode::Fake).await;
    assert!(!stale.exists(), "{} was left", stale.display());
    assert!(ours.exists(), "a live process's directory was removed");
    std::fs::remove_dir_all(&ours).unwrap();
}
