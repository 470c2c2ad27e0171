//! A kubelet double, with the Deployment and EndpointSlice controllers it needs: keeps Pods for
//! each Deployment's replicas, runs them, and keeps Deployment status and EndpointSlices true.
//!
//! It works on the API server double's store directly (it is part of the same control plane) and
//! reconciles after every change to a Deployment, Pod or Service. Every Pod gets its own loopback
//! IP (127.0.0.2, 127.0.0.3, ...), so Pod IPs are distinct as in a cluster.
//!
//! - [`rollout`]: which pods to create and delete for a Deployment's strategy, and its status.
//! - [`pods`]: in [`Mode::Process`], one task per Pod runs the real sidecar as the Pod's
//!   container: environment from [`env`], volume mounts stood in for by [`volumes`], probes from
//!   [`probes`], restarts with back-off.
//! - [`endpoints`]: one EndpointSlice per Service.
//!
//! In [`Mode::Fake`] a Pod is Running and Ready as soon as it exists.

mod endpoints;
pub mod env;
mod pods;
pub mod probes;
pub mod rollout;
pub mod volumes;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use inferpool_crds::wire;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use crate::apiserver::resources;
use crate::apiserver::store::{Key, Part, Store};
use pods::{PodCtx, PodHandle};
use rollout::{PodInfo, Strategy};

/// How Pods run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No process: Ready at once.
    Fake,
    /// Each Pod runs this sidecar binary.
    Process {
        /// The `inferpool-sidecar` binary.
        sidecar: PathBuf,
    },
}

/// Tunables of the kubelet double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The first wait before restarting a container that died; it doubles on every restart.
    pub crash_backoff: Duration,
    /// The longest wait between restarts.
    pub crash_backoff_cap: Duration,
}

impl Default for Options {
    /// 1 s doubling up to 30 s: the kubelet's 10 s to 5 min is too slow for a local loop.
    fn default() -> Self {
        Options { crash_backoff: Duration::from_secs(1), crash_backoff_cap: Duration::from_secs(30) }
    }
}

/// The running kubelet double.
pub struct Kubelet {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Kubelet {
    /// Without [`Kubelet::shutdown`], pods' processes are killed as their tasks are dropped.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Kubelet {
    /// Starts reconciling Deployments in `store` into Pods, with default [`Options`].
    pub fn start(store: Arc<Store>, mode: Mode) -> std::io::Result<Kubelet> {
        Kubelet::start_with(store, mode, Options::default())
    }

    /// Starts reconciling Deployments in `store` into Pods. A relative sidecar path is made
    /// absolute here (pods run in their own directories); a missing one is refused.
    pub fn start_with(store: Arc<Store>, mode: Mode, options: Options) -> std::io::Result<Kubelet> {
        let mode = match mode {
            Mode::Process { sidecar } => Mode::Process {
                sidecar: std::path::absolute(&sidecar)
                    .and_then(|p| p.canonicalize())
                    .map_err(|e| std::io::Error::new(e.kind(), format!("sidecar binary {}: {e}", sidecar.display())))?,
            },
            fake => fake,
        };
        remove_stale_roots(&std::env::temp_dir());
        let root = tempfile::Builder::new().prefix(&format!("{ROOT_PREFIX}{}-", std::process::id())).tempdir()?;
        tracing::info!(dir = %root.path().display(), "pods' directories; a sidecar logs to NAMESPACE/POD/sidecar.log");
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut events = store.subscribe();
            let mut state =
                State { mode, options, setpriv: find_setpriv(), pods: HashMap::new(), store: Arc::clone(&store), root };
            loop {
                state.reconcile();
                endpoints::reconcile(&state.store);
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    more = relevant_change(&mut events) => if !more { break },
                }
            }
            state.shutdown().await;
        });
        Ok(Kubelet { stop, task: Some(task) })
    }

    /// Stops every pod, waiting until each process is killed and reaped.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Waits for a change to a Deployment, Pod or Service (or missed events); false when the store
/// is gone. The kubelet's own writes come back here too and settle, since a reconcile with
/// nothing to do writes nothing.
async fn relevant_change(events: &mut broadcast::Receiver<Arc<crate::apiserver::store::Event>>) -> bool {
    loop {
        match events.recv().await {
            Ok(e) if matches!(e.key.resource.kind, "Deployment" | "Pod" | "Service") => return true,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// `setpriv` from util-linux, if on the PATH: run through it with `--pdeathsig KILL`, a sidecar
/// is killed by the kernel when the kubelet dies, even by SIGKILL.
/// Pods' directories live under `<tmp>/inferpool-local-<pid>-<random>`, removed when the kubelet
/// stops.
pub const ROOT_PREFIX: &str = "inferpool-local-";

/// Removes the pods' directories of kubelets whose process is gone (killed with SIGKILL, so it
/// could not clean up), found by the process id in their names.
fn remove_stale_roots(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(ROOT_PREFIX)?.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid.to_string()).exists() {
            tracing::info!(dir = %entry.path().display(), pid, "removing the pods' directory of a kubelet that is gone");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn find_setpriv() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("setpriv")).find(|p| p.is_file())
}

/// The offset from 127.0.0.1 of the next pod address (127.0.0.1 is left to the host).
static NEXT_IP: AtomicU32 = AtomicU32::new(1);

struct State {
    mode: Mode,
    options: Options,
    setpriv: Option<PathBuf>,
    /// Pod tasks by (namespace, pod name), in process mode; dropping one stops its pod.
    pods: HashMap<(String, String), PodHandle>,
    store: Arc<Store>,
    /// Pods' directories (`<namespace>/<pod>`) and claims' (`claims/<namespace>/<claim>`).
    root: tempfile::TempDir,
}

/// The string at `pointer` in `v`, or "".
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The container the sidecar stands in for: the one named `sidecar`, else the first.
pub(crate) fn main_container(pod: &Value) -> Value {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    containers
        .and_then(|cs| cs.iter().find(|c| c.get("name").and_then(Value::as_str) == Some("sidecar")).or(cs.first()))
        .cloned()
        .unwrap_or(json!({}))
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

/// Whether a pod's Ready condition is True.
pub(crate) fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|c| {
        c.iter().any(|c| {
            c.get("type").and_then(Value::as_str) == Some("Ready")
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
    })
}

/// The node every process-mode pod is bound to.
pub const NODE_NAME: &str = "inferpool-local";

/// Loopback addresses tried for one pod before it is reported unschedulable.
const IP_ATTEMPTS: u32 = 32;

impl State {
    /// The next loopback address whose `ports` are free, or why there is none. Addresses are
    /// counted process-wide, so kubelets in one process (tests) never share one; taken ports skip
    /// an address another process (another `inferpool-local`) uses. A port bound on 0.0.0.0 is
    /// taken on every address: after [`IP_ATTEMPTS`] the search stops and says which port.
    fn ip(&mut self, ports: &[u16]) -> Result<String, String> {
        let taken = |ip: Ipv4Addr| ports.iter().copied().find(|p| std::net::TcpListener::bind((ip, *p)).is_err());
        let mut last = None;
        for _ in 0..IP_ATTEMPTS {
            let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + n);
            if !matches!(self.mode, Mode::Process { .. }) {
                return Ok(ip.to_string());
            }
            match taken(ip) {
                None => return Ok(ip.to_string()),
                Some(port) => last = Some((ip, port)),
            }
        }
        let (ip, port) = last.unwrap_or((Ipv4Addr::LOCALHOST, 0));
        Err(format!(
            "0/1 nodes are available: port {port} is taken on the last {IP_ATTEMPTS} loopback addresses tried (up to \
             {ip}); a process listening on 0.0.0.0:{port} holds it on all of them (the operator's default \
             --listen 0.0.0.0:8080, for instance): give that process another address"
        ))
    }

    async fn shutdown(&mut self) {
        for (_, pod) in self.pods.drain() {
            pod.stop().await;
        }
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
        let alive: HashSet<(String, String)> = all_pods
            .iter()
            .map(|p| (str_at(p, "/metadata/namespace").to_owned(), str_at(p, "/metadata/name").to_owned()))
            .collect();
        // A deleted pod's task stops: its process is killed and its directory removed.
        self.pods.retain(|k, _| alive.contains(k));
        // A pod being deleted gracefully is stopped as a kubelet does (SIGTERM, then SIGKILL when
        // its grace period is over) and then deleted for good; one with no process goes at once.
        for p in all_pods.iter().filter(|p| p.pointer("/metadata/deletionTimestamp").is_some()) {
            let id = (str_at(p, "/metadata/namespace").to_owned(), str_at(p, "/metadata/name").to_owned());
            let grace = p.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30);
            match self.pods.get(&id) {
                Some(handle) => handle.terminate(Duration::from_secs(grace)),
                None => {
                    let _ = store.delete_now(&Key { resource: pods, namespace: id.0, name: id.1 });
                }
            }
        }
        for d in store.list(deployments, None, |_| true).0 {
            if d.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            let (ns, name, uid) =
                (str_at(&d, "/metadata/namespace"), str_at(&d, "/metadata/name"), str_at(&d, "/metadata/uid"));
            let replicas = d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1) as usize;
            let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let hash = template_hash(&template);
            let strategy = Strategy::of(&d, replicas);
            // Terminating pods are no longer the Deployment's replicas (as for a ReplicaSet).
            let infos = |pods: &[Value]| -> Vec<PodInfo> {
                pods.iter()
                    .filter(|p| owned_by(p, uid) && p.pointer("/metadata/deletionTimestamp").is_none())
                    .map(|p| PodInfo {
                        name: str_at(p, "/metadata/name").to_owned(),
                        updated: str_at(p, "/metadata/labels/pod-template-hash") == hash,
                        ready: is_ready(p),
                    })
                    .collect()
            };
            let plan = rollout::plan(replicas, strategy, &infos(&all_pods));
            for victim in plan.delete {
                let _ = store.delete(&Key { resource: pods, namespace: ns.to_owned(), name: victim });
            }
            for _ in 0..plan.create {
                self.create_pod(store, pods, &d, &template, &hash);
            }
            let (now, _) = store.list(pods, Some(ns), |_| true);
            let status = rollout::status(&d, replicas, strategy, &infos(&now));
            let key = Key { resource: deployments, namespace: ns.to_owned(), name: name.to_owned() };
            if d.get("status") != Some(&status) {
                let _ = store.replace(&key, Part::Status, json!({ "status": status }), false);
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
        let mut spec = template.get("spec").cloned().unwrap_or(json!({}));
        if matches!(self.mode, Mode::Process { .. }) {
            // Bound to this node: deleting it then waits for its process to stop.
            spec["nodeName"] = json!(NODE_NAME);
        }
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
            "spec": spec,
        });
        let ns = str_at(d, "/metadata/namespace");
        let created = match store.create(pods, ns, pod) {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(deployment = name, error = %e.message, "cannot create a pod");
                return;
            }
        };
        let container = main_container(&created);
        let ports = [
            probes::named_port(&container, "http").unwrap_or(wire::API_PORT),
            probes::named_port(&container, "admin").unwrap_or(wire::ADMIN_PORT),
        ];
        let key = Key { resource: pods, namespace: ns.to_owned(), name: str_at(&created, "/metadata/name").to_owned() };
        let ip = match self.ip(&ports) {
            Ok(ip) => ip,
            Err(message) => {
                // As the scheduler reports a pod no node can take: Pending, unscheduled, an Event.
                tracing::warn!(pod = key.name, "{message}");
                let unscheduled = json!({"status": {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message},
                ]}});
                let _ = store.replace(&key, Part::Status, unscheduled, false);
                pods::event(store, &key, "Warning", "FailedScheduling", &message);
                return;
            }
        };
        let status = |ready: bool, state: Value| {
            pods::pod_status(
                &ip,
                if ready { "Running" } else { "Pending" },
                ready,
                json!([{
                    "name": str_at(&container, "/name"), "image": str_at(&container, "/image"), "imageID": "",
                    "ready": ready, "started": ready, "restartCount": 0, "state": state, "lastState": {},
                }]),
            )
        };
        match &self.mode {
            Mode::Fake => {
                let _ =
                    store.replace(&key, Part::Status, json!({"status": status(true, json!({"running": {}}))}), false);
            }
            Mode::Process { sidecar } => {
                let waiting = json!({"waiting": {"reason": "ContainerCreating"}});
                let _ = store.replace(&key, Part::Status, json!({"status": status(false, waiting)}), false);
                let ctx = PodCtx {
                    store: Arc::clone(&self.store),
                    dir: self.root.path().join(&key.namespace).join(&key.name),
                    claims: self.root.path().join("claims"),
                    key: key.clone(),
                    pod: created,
                    ip,
                    sidecar: sidecar.clone(),
                    setpriv: self.setpriv.clone(),
                    options: self.options,
                };
                self.pods.insert((key.namespace, key.name), PodHandle::start(ctx));
            }
        }
    }
}
