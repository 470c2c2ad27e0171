//! A kubelet double: keeps one Pod per Deployment replica and Deployment status true.
//!
//! It works on the API server double's store directly (it is part of the same control plane).
//! Every Pod gets its own loopback IP (127.0.0.2, 127.0.0.3, ...), so Pod IPs are distinct as in
//! a cluster. In [`Mode::Fake`] a Pod is Running and Ready as soon as it exists. In
//! [`Mode::Process`] each Pod runs the real sidecar binary with its container's args and env,
//! listening on the Pod's IP (`INFERPOOL_LISTEN` / `INFERPOOL_ADMIN_LISTEN` are set to the pod IP
//! and the container's `http` / `admin` ports), and becomes Ready when the sidecar's `/readyz`
//! answers 200; deleting the Pod kills its process. A Deployment whose pod template changed gets
//! its Pods replaced; Pods deleted by someone else come back; a deleted Deployment's Pods go with
//! it (ownerReference garbage collection).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::apiserver::resources;
use crate::apiserver::store::{Key, Part, Store};

/// How Pods run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No process: Ready at once.
    Fake,
    /// Each Pod runs this sidecar binary.
    Process {
        /// The `inferpool-sidecar` binary.
        sidecar: std::path::PathBuf,
    },
}

/// The running kubelet double.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts reconciling Deployments in `store` into Pods.
    pub fn start(store: Arc<Store>, mode: Mode) -> std::io::Result<Kubelet> {
        let root = tempfile::Builder::new().prefix("inferpool-local-").tempdir()?;
        let task = tokio::spawn(async move {
            let mut events = store.subscribe();
            let mut state = State { mode, next_ip: 0, procs: HashMap::new(), store: Arc::clone(&store), root };
            loop {
                state.reconcile();
                state.reconcile_endpoints();
                // Reconcile again after any change to a Deployment or a Pod; its own writes come
                // back here too and settle, since a reconcile with nothing to do writes nothing.
                loop {
                    match events.recv().await {
                        Ok(e) if matches!(e.key.resource.kind, "Deployment" | "Pod" | "Service") => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Kubelet { task })
    }
}

struct State {
    mode: Mode,
    /// The last address handed out; 127.0.0.1 is left to the host.
    next_ip: u32,
    /// Sidecar processes by (namespace, pod name); dropping one kills it.
    procs: HashMap<(String, String), Proc>,
    store: Arc<Store>,
    /// Each pod's working directory (its container filesystem) lives below; removed on drop.
    root: tempfile::TempDir,
}

/// A pod's sidecar process and the task that watches it.
struct Proc {
    _child: tokio::process::Child,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A short, stable hash of a pod template, as Kubernetes labels pods with.
fn template_hash(template: &Value) -> String {
    let mut h = DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

fn owned_by(pod: &Value, uid: &str) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid)))
}

impl State {
    fn ip(&mut self) -> String {
        self.next_ip += 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + self.next_ip).to_string()
    }

    fn reconcile(&mut self) {
        let store = Arc::clone(&self.store);
        let store = &*store;
        let (Some(deployments), Some(pods)) =
            (resources::find("apps", "v1", "deployments"), resources::find("", "v1", "pods"))
        else {
            return;
        };
        let (all_pods, _) = store.list(pods, None, |_| true);
        let alive: std::collections::HashSet<(String, String)> = all_pods
            .iter()
            .map(|p| (str_at(p, "/metadata/namespace").to_owned(), str_at(p, "/metadata/name").to_owned()))
            .collect();
        self.procs.retain(|k, _| alive.contains(k));
        for d in store.list(deployments, None, |_| true).0 {
            if d.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            let (ns, name, uid) =
                (str_at(&d, "/metadata/namespace"), str_at(&d, "/metadata/name"), str_at(&d, "/metadata/uid"));
            let want = d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1) as usize;
            let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let hash = template_hash(&template);
            let mut mine: Vec<&Value> = all_pods.iter().filter(|p| owned_by(p, uid)).collect();
            // Pods of an older template are replaced.
            for old in mine.iter().filter(|p| str_at(p, "/metadata/labels/pod-template-hash") != hash) {
                let _ = store.delete(&Key {
                    resource: pods,
                    namespace: ns.to_owned(),
                    name: str_at(old, "/metadata/name").to_owned(),
                });
            }
            mine.retain(|p| str_at(p, "/metadata/labels/pod-template-hash") == hash);
            mine.sort_by_key(|p| str_at(p, "/metadata/name").to_owned());
            for extra in mine.iter().skip(want) {
                let _ = store.delete(&Key {
                    resource: pods,
                    namespace: ns.to_owned(),
                    name: str_at(extra, "/metadata/name").to_owned(),
                });
            }
            for _ in mine.len()..want {
                self.create_pod(store, pods, &d, &template, &hash);
            }
            let (now, _) = store.list(pods, Some(ns), |p| owned_by(p, uid));
            let ready = now.iter().filter(|p| is_ready(p)).count();
            let status = json!({"status": {
                "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
                "replicas": now.len(),
                "updatedReplicas": now.iter().filter(|p| str_at(p, "/metadata/labels/pod-template-hash") == hash).count(),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
            }});
            let key = Key { resource: deployments, namespace: ns.to_owned(), name: name.to_owned() };
            if d.get("status").is_none_or(|s| *s != status["status"]) {
                let _ = store.replace(&key, Part::Status, status, false);
            }
        }
    }

    /// Keeps one EndpointSlice per Service with a selector: its pods' IPs, ready or not, and the
    /// Service's ports (at their target port).
    fn reconcile_endpoints(&self) {
        let store = &*self.store;
        let (Some(services), Some(pods), Some(slices)) = (
            resources::find("", "v1", "services"),
            resources::find("", "v1", "pods"),
            resources::find("discovery.k8s.io", "v1", "endpointslices"),
        ) else {
            return;
        };
        for svc in store.list(services, None, |_| true).0 {
            let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object).filter(|s| !s.is_empty())
            else {
                continue;
            };
            let (ns, name) = (str_at(&svc, "/metadata/namespace"), str_at(&svc, "/metadata/name"));
            let matches =
                |p: &Value| selector.iter().all(|(k, v)| p.pointer(&format!("/metadata/labels/{k}")) == Some(v));
            let (mut members, _) = store.list(pods, Some(ns), |p| matches(p) && p.pointer("/status/podIP").is_some());
            members.sort_by_key(|p| str_at(p, "/metadata/name").to_owned());
            let endpoints: Vec<Value> = members
                .iter()
                .map(|p| {
                    let ready = is_ready(p) && p.pointer("/metadata/deletionTimestamp").is_none();
                    json!({
                        "addresses": [str_at(p, "/status/podIP")],
                        "conditions": {"ready": ready, "serving": ready, "terminating": false},
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": str_at(p, "/metadata/name"), "uid": str_at(p, "/metadata/uid")},
                    })
                })
                .collect();
            let ports: Vec<Value> = svc
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p.get("targetPort").filter(|t| t.is_number()).or_else(|| p.get("port")).cloned();
                    json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": port, "protocol": "TCP"})
                })
                .collect();
            let slice = json!({
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "inferpool-local"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": str_at(&svc, "/metadata/uid"), "controller": true}],
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            });
            let key = Key { resource: slices, namespace: ns.to_owned(), name: name.to_owned() };
            match store.get(&key) {
                Ok(current)
                    if current.get("endpoints") == slice.get("endpoints")
                        && current.get("ports") == slice.get("ports") => {}
                Ok(mut current) => {
                    current["endpoints"] = slice["endpoints"].clone();
                    current["ports"] = slice["ports"].clone();
                    let _ = store.replace(&key, Part::Main, current, false);
                }
                Err(_) => {
                    let _ = store.create(slices, ns, slice);
                }
            }
        }
    }

    fn create_pod(
        &mut self,
        store: &Store,
        pods: &'static resources::Resource,
        d: &Value,
        template: &Value,
        hash: &str,
    ) {
        let mut labels = template.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
        labels["pod-template-hash"] = json!(hash);
        let name = str_at(d, "/metadata/name");
        let pod = json!({
            "metadata": {
                "generateName": format!("{name}-{hash}-"),
                "labels": labels,
                "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                    "uid": str_at(d, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": template.get("spec").cloned().unwrap_or(json!({})),
        });
        let ns = str_at(d, "/metadata/namespace");
        let Ok(created) = store.create(pods, ns, pod) else { return };
        let ip = self.ip();
        let key = Key { resource: pods, namespace: ns.to_owned(), name: str_at(&created, "/metadata/name").to_owned() };
        match self.mode.clone() {
            Mode::Fake => set_pod_status(store, &key, &ip, "Running", true),
            Mode::Process { sidecar } => {
                set_pod_status(store, &key, &ip, "Pending", false);
                let dir = self.root.path().join(&key.namespace).join(&key.name);
                match std::fs::create_dir_all(&dir).and_then(|()| spawn_sidecar(&sidecar, &created, &ip, &dir)) {
                    Ok((child, port)) => {
                        let watcher = tokio::spawn(watch_ready(Arc::clone(&self.store), key.clone(), ip, port));
                        self.procs.insert((key.namespace.clone(), key.name.clone()), Proc { _child: child, watcher });
                    }
                    Err(e) => {
                        tracing::warn!(pod = key.name, error = %e, "cannot start the sidecar");
                        set_pod_status(store, &key, &ip, "Failed", false);
                    }
                }
            }
        }
    }
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| {
        c.iter().any(|c| {
            c.get("type").and_then(Value::as_str) == Some("Ready")
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
    })
}

fn set_pod_status(store: &Store, key: &Key, ip: &str, phase: &str, ready: bool) {
    let flag = if ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": phase,
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "127.0.0.1",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ],
    }});
    let _ = store.replace(key, Part::Status, status, false);
}

/// A container port by name, or a default.
fn port(container: &Value, name: &str, default: u16) -> u16 {
    container
        .get("ports")
        .and_then(Value::as_array)
        .and_then(|ports| ports.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name)))
        .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(default)
}

/// Starts the pod's first container as a sidecar process on the pod's IP; returns it and its API port.
fn spawn_sidecar(
    bin: &std::path::Path,
    pod: &Value,
    ip: &str,
    dir: &std::path::Path,
) -> std::io::Result<(tokio::process::Child, u16)> {
    let container = pod.pointer("/spec/containers/0").cloned().unwrap_or(json!({}));
    let (http, admin) = (port(&container, "http", 8080), port(&container, "admin", 9090));
    let mut cmd = tokio::process::Command::new(bin);
    for arg in container.get("args").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        cmd.arg(arg);
    }
    for var in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        if let (Some(name), Some(value)) =
            (var.get("name").and_then(Value::as_str), var.get("value").and_then(Value::as_str))
        {
            cmd.env(name, value);
        }
    }
    cmd.env("INFERPOOL_LISTEN", format!("{ip}:{http}"))
        .env("INFERPOOL_ADMIN_LISTEN", format!("{ip}:{admin}"))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok((cmd.spawn()?, http))
}

/// Marks the pod Ready once its sidecar answers `/readyz` with 200 (the readiness probe).
async fn watch_ready(store: Arc<Store>, key: Key, ip: String, port: u16) {
    let mut probe = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        probe.tick().await;
        if readyz(&ip, port).await {
            set_pod_status(&store, &key, &ip, "Running", true);
            return;
        }
    }
}

async fn readyz(ip: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, port)).await else { return false };
    let req = format!("GET /readyz HTTP/1.1\r\nhost: {ip}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.1 200")
}
